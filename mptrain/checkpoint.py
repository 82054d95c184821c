"""Checkpoints: plain containers (readable with weights_only=True), written atomically, resumed exactly.

Files in <run>/checkpoints/: last.pt (newest), step_<N>.pt (the newest `keep_last`), best.pt (by
`checkpoint.monitor`). A save writes a temp file in the same directory, fsyncs it and renames it over
the old one, so a crash or `kill -9` at any moment leaves the previous checkpoint readable.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import random
import re
import signal
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__
from .config import check_monitor
from .distributed import any_rank
from .errors import MptrainError
from .loop import Callback
from .rundir import umask_mode

log = logging.getLogger("mptrain")

FORMAT_VERSION = 1
STEP_FILE = re.compile(r"step_(\d+)\.pt$")
# config keys that may differ on resume without changing the result of the steps already taken
SAFE_TO_CHANGE = ("trainer.max_steps", "trainer.max_epochs", "trainer.log_every", "trainer.eval_every",
                  "trainer.progress_bar", "trainer.tensorboard", "trainer.device", "trainer.num_workers",
                  "checkpoint.", "resume", "diagnostics.", "trainer.profile.", "trainer.detect_anomaly")
WARN_IF_CHANGED = ("seed", "trainer.seed", "precision.")


class CheckpointError(MptrainError):
    """A checkpoint cannot be read, does not fit, or cannot be written."""


# ---- RNG -----------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """Python, numpy, torch CPU and CUDA generator states, as plain containers."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {
        "python": [version, list(state), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---- finiteness ----------------------------------------------------------------------------------

def _float_tensors(tree: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)] if tree.is_floating_point() or tree.is_complex() else []
    if isinstance(tree, dict):
        return [pair for k, v in tree.items() for pair in _float_tensors(v, f"{prefix}.{k}")]
    if isinstance(tree, (list, tuple)):
        return [pair for i, v in enumerate(tree) for pair in _float_tensors(v, f"{prefix}.{i}")]
    return []


def finite_state(model_state: dict, optimizer_state: dict | None = None, **more: Any) -> str | None:
    """The name of the first tensor holding inf or NaN, or None when all are finite.

    One max-|x| per tensor (torch._foreach_norm, ord=inf: NaN and inf propagate, finite values never
    overflow), stacked, one isfinite and one host read for the lot. `more`: other named trees (e.g.
    precision={"master": ...})."""
    named = _float_tensors(model_state, "model")
    if optimizer_state is not None:
        named += _float_tensors(optimizer_state.get("state", {}), "optimizer.state")
    for key, tree in more.items():
        named += _float_tensors(tree, key)
    if not named:
        return None
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    ok = torch.ones(len(named), dtype=torch.bool)
    for idx in by_device.values():
        tensors = [named[i][1].detach() for i in idx]
        tensors = [t.abs() if t.is_complex() else t for t in tensors]
        maxes = torch.stack([m.float() for m in torch._foreach_norm(tensors, ord=float("inf"))])
        ok[idx] = torch.isfinite(maxes).cpu()  # one device sync per device
    if bool(ok.all()):
        return None
    return named[int((~ok).nonzero()[0])][0]


class NonFiniteCheckpoint(CheckpointError):
    """A checkpoint would hold (or holds) inf or NaN weights or optimizer state."""

    exit_code = 1  # a diverged run, like TrainingFailed


def check_finite(ckpt: dict, what: str) -> None:
    """Raise NonFiniteCheckpoint if a checkpoint's model, optimizer or master weights are not finite."""
    master = ckpt.get("precision", {}).get("master") if isinstance(ckpt.get("precision"), dict) else None
    bad = finite_state(ckpt.get("model", {}), ckpt.get("optimizer"), **({"precision.master": master} if master else {}))
    if bad is not None:
        step = ckpt.get("train_state", {}).get("step", "?")
        raise NonFiniteCheckpoint(f"{what} at step {step}: {bad} holds inf or NaN (the run diverged); "
                                  "the previous checkpoint is kept")


# ---- writing -------------------------------------------------------------------------------------

def save_atomic(obj: Any, path: Path, also: Path | None = None, check: bool = True) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over `path` (and hard-link it as
    `also`). On any failure the temp file is removed and the old `path` is untouched.

    `check`: a checkpoint (a dict with "model") holding inf or NaN is refused before anything is
    written (NonFiniteCheckpoint). The file gets the mode an ordinary new file would (0666 & ~umask).
    `also` is a hard link, not a copy (a copy doubles the write); resume=auto's fallback therefore
    treats linked names as one file (see find_resumable)."""
    if check and isinstance(obj, dict) and "model" in obj:
        check_finite(obj, f"not saving {path.name}")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if also is not None:
            also.unlink(missing_ok=True)
            os.link(tmp, also)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and isinstance(cause, OSError)):
            reason = getattr(cause, "strerror", None) or str(e).splitlines()[0]
            raise CheckpointError(f"could not write checkpoint {path}: {reason}; the previous "
                                  "checkpoint is intact. Free disk space or fix permissions, then resume=auto") from None
        raise


# ---- reading -------------------------------------------------------------------------------------

def load_file(path: Path) -> dict:
    """Read a checkpoint with weights_only=True; any fault becomes one clear CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass a checkpoint file (e.g. {path}/last.pt) "
                              "or resume=auto")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing file or resume=auto")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:  # other OSErrors (EINVAL on a truncated zip) mean a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except pickle.UnpicklingError:
        _refuse_code(path)
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (unreadable pickle); use an older "
                              "step_<N>.pt or resume=auto, which picks the newest readable one") from None
    except Exception as e:  # a damaged file can fail in many ways inside the unpickler
        _refuse_code(path)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first}); use an older step_<N>.pt "
                              "or resume=auto, which picks the newest readable one") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path} is not an mptrain checkpoint (no format_version)")
    if not isinstance(ckpt["format_version"], int) or isinstance(ckpt["format_version"], bool):
        raise CheckpointError(f"checkpoint {path} is malformed: format_version is {ckpt['format_version']!r}")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {ckpt['format_version']}, newer than this "
                              f"mptrain ({__version__}) reads ({FORMAT_VERSION}); upgrade mptrain")
    check_structure(ckpt, path)
    return ckpt


SAFE_MODULES = ("torch", "collections", "_codecs", "numpy")  # what torch.save itself references


def _code_reference(path: Path) -> str | None:
    """The first callable a pickle would import that is not torch's own (e.g. posix.system), found by
    reading its opcodes without running them; None if there is none or the file cannot be parsed."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = b"".join(z.read(n) for n in z.namelist() if n.endswith(".pkl"))
        else:
            data = path.read_bytes()
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                name = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            else:
                if isinstance(arg, str):
                    strings.append(arg)
                continue
            if name.split(".")[0] not in SAFE_MODULES:
                return name
    except Exception:
        return None
    return None


def _refuse_code(path: Path) -> None:
    name = _code_reference(path)
    if name is not None:
        raise CheckpointError(f"refused to load {path}: it holds Python objects that would run code when loaded ({name}); "
                              "mptrain checkpoints never hold code. Use a checkpoint written by mptrain")


# the fields a resume reads, with the types it needs (a crafted file must fail here, with one line)
STRUCTURE = {
    "format_version": int, "config": dict, "train_state": dict, "precision": dict, "scheduler": dict,
    "rng": dict,
}
TRAIN_STATE = {"step": int, "epoch": int, "step_in_epoch": int, "samples": int}


def check_structure(ckpt: dict, path: Path) -> None:
    """The fields resume uses exist and have the right types; model/optimizer hold tensors."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is malformed: {what}; it was not written by this mptrain "
                               "or was edited. Use another checkpoint or resume=auto")

    for key, kind in STRUCTURE.items():
        if key not in ckpt:
            raise bad(f"no {key!r}")
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise bad(f"{key!r} is {type(ckpt[key]).__name__}, not {kind.__name__}")
    for key, kind in TRAIN_STATE.items():
        value = ckpt["train_state"].get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            raise bad(f"train_state.{key} is {value!r}, not a non-negative {kind.__name__}")
    if "model" in ckpt:
        model = ckpt["model"]
        if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in model.items()):
            raise bad("'model' is not a dict of named tensors")
        opt = ckpt.get("optimizer")
        if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
            raise bad("'optimizer' is not an optimizer state_dict (state, param_groups)")


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in a run, newest first: last.pt, then step_<N>.pt by N descending."""
    if not ckpt_dir.is_dir():
        return []
    steps = sorted((p for p in ckpt_dir.iterdir() if STEP_FILE.match(p.name)),
                   key=lambda p: int(STEP_FILE.match(p.name).group(1)), reverse=True)
    last = ckpt_dir / "last.pt"
    return ([last] if last.is_file() else []) + steps


def find_resumable(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint with finite weights (a damaged last.pt falls back to the newest
    step file). step_<N>.pt may be a hard link of last.pt: one file is tried once, under its first name."""
    best, seen = None, set()
    for path in candidates(ckpt_dir):
        st = path.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue  # the same file as one already tried (a hard link): no separate backup
        seen.add((st.st_dev, st.st_ino))
        try:
            ckpt = load_file(path)
            if "model" in ckpt:
                check_finite(ckpt, f"checkpoint {path}")
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        if best is None or ckpt["train_state"]["step"] > best[1]["train_state"]["step"]:
            best = (path, ckpt)
    return best


# ---- checking a checkpoint against the run -----------------------------------------------------------

def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(saved), _flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check_model_fits(state: dict, model: torch.nn.Module, path: Path) -> None:
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    extra = sorted(state.keys() - own.keys())
    shapes = [f"{k} {list(state[k].shape)} in the checkpoint vs {list(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]  # model order
    if missing or extra or shapes:
        detail = f"{len(shapes)} tensors differ in shape, e.g. " * bool(shapes) + "; ".join(shapes[:3] + [f"missing {', '.join(missing[:3])}"] * bool(missing)
                           + [f"unexpected {', '.join(extra[:3])}"] * bool(extra))
        raise CheckpointError(f"checkpoint {path} was written for another model: {detail}. Resume with the "
                              "checkpoint's model settings, or start a new run directory")


def report_config_changes(saved: dict, current: dict) -> None:
    for key, old, new in config_differences(saved, current):
        if key.startswith(SAFE_TO_CHANGE):
            log.info("resume: %s changed %r -> %r (safe)", key, old, new)
        elif key.startswith(WARN_IF_CHANGED):
            log.warning("resume: %s changed %r -> %r; the resumed run is not the run the checkpoint began", key, old, new)
        else:
            log.warning("resume: %s changed %r -> %r", key, old, new)


# ---- signals -------------------------------------------------------------------------------------

class StopSignals:
    """SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 set a flag; the loop finishes its step, checkpoints and stops.

    A second SIGINT (Ctrl-C twice) stops at once. The previous handlers come back on exit, so
    Hydra multirun jobs in the same process do not inherit them.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # USR2: submitit on SLURM

    def __init__(self) -> None:
        self.received: int | None = None
        self._saved: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        try:
            for s in self.SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals to the host program
            self._saved.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)

    def forward(self) -> None:
        """Pass the signal on to the handler that was there before (e.g. submitit's requeue on SLURM)."""
        previous = self._saved.get(self.received)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.received, None)


class Interrupted(MptrainError):
    """Stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, step: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after saving a checkpoint; "
                         "continue with resume=auto in the same run directory")


# ---- the callback that writes checkpoints ----------------------------------------------------------

SHARDED_DIR = "sharded"
STEP_DIR = re.compile(r"step_(\d+)$")


def sharded_complete(ckpt_dir: Path) -> list[Path]:
    """Committed sharded (FSDP) checkpoints (those with DCP's .metadata), newest first."""
    root = ckpt_dir / SHARDED_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)


DEFAULT_MONITOR = "val/acc"  # checkpoint.monitor's default: classification's metric


def pick_monitor(monitor: str | None, mode: str, reported) -> tuple[str | None, str]:
    """The metric best.pt follows, given the names a task reports. The default (val/acc) falls back to the
    task's val/loss (min) where the task has no accuracy; any other unknown name is refused."""
    if monitor is None or monitor in reported:
        return monitor, mode
    if monitor == DEFAULT_MONITOR and "val/loss" in reported:
        log.info("checkpoint.monitor: this task reports no %s; best.pt follows val/loss (min)", monitor)
        return "val/loss", "min"
    check_monitor(monitor, list(reported))  # raises, naming what the task reports
    return monitor, mode


class Checkpointer(Callback):
    """Saves last.pt (+ step_<N>.pt) every `every_steps` steps, every `every_epochs` epochs, at the end
    of the run and on a stop signal; best.pt whenever the monitored validation metric improves.

    `save_sharded(c, extra, ckpt_dir, keep)` (FSDP): every rank writes its shards; given by the recipe."""

    def __init__(self, cfg: DictConfig, run_dir: Path, config: dict, signals: StopSignals, log_every: int = 1,
                 save_sharded=None, metrics: tuple[str, ...] | None = None):
        """`metrics`: the validation metrics the task declares it reports (None: known at the first validation)."""
        self.cfg, self.config, self.signals, self.log_every = cfg, config, signals, log_every
        self.save_sharded = save_sharded
        self.monitor, self.mode = cfg.monitor, cfg.mode
        self.monitor_checked = metrics is not None
        if metrics is not None:
            self.monitor, self.mode = pick_monitor(self.monitor, self.mode, metrics)
        self.dir = Path(run_dir) / "checkpoints"
        self.saved: list[int] = []  # the steps of the last.pt this attempt wrote, oldest first

    def on_step_end(self, c: Any, state: Any, out: Any = None) -> None:
        cfg = self.cfg
        improved = self._update_best(state)
        stop = self.signals.received is not None
        if c.world_size > 1:
            # every rank must stop after the same step; asking the others is an all-reduce and a host sync,
            # so it happens only every log_every steps (where the loop reads the loss anyway)
            stop = state.step % self.log_every == 0 and any_rank(stop, c.dist, c.device)
        due = cfg.enabled and (
            (cfg.every_steps is not None and state.step % cfg.every_steps == 0)
            or (cfg.every_epochs is not None and state.step_in_epoch == 0 and state.epoch % cfg.every_epochs == 0)
            or state.step == c.total_steps)
        if stop or due or (cfg.enabled and out is not None and out.event is not None):  # a change of course: save
            self.save(c, state)
        if improved and cfg.enabled and cfg.save_best and c.is_main and self.save_sharded is None:
            save_atomic(self.contents(c, state), self.dir / "best.pt")
        if stop:
            raise Interrupted(self.signals.received or signal.SIGTERM, state.step)

    def on_validation_end(self, c: Any, state: Any, metrics: dict) -> None:
        if not self.monitor_checked:  # a task that does not declare its metrics: check the name now
            self.monitor, self.mode = pick_monitor(self.monitor, self.mode, metrics)
            self.monitor_checked = True

    def _update_best(self, state: Any) -> bool:
        monitor, val = self.monitor, state.last_val
        if monitor is None or val.get("step") != state.step or monitor not in val:
            return False
        value, best = val[monitor], state.best_metric
        if not all(math.isfinite(v) for k, v in val.items() if k != "step"):
            return False  # a diverged validation (any metric inf or NaN, e.g. val/loss beside val/acc) is never "best"
        if best is None or (value > best if self.mode == "max" else value < best):
            state.best_metric = value
            return True
        return False

    def contents(self, c: Any, state: Any, weights: bool = True) -> dict:
        """Everything a resume needs, as state_dict()s; `weights=False` leaves out model and optimizer
        (FSDP saves those sharded)."""
        out = {
            "format_version": FORMAT_VERSION,
            "mptrain_version": __version__,
            "torch_version": str(torch.__version__),
            "precision": c.precision.state_dict(),
            "scheduler": c.scheduler.state_dict(),
            "train_state": state.state_dict(),
            "rng": capture_rng(),
            "config": self.config,
        }
        if weights:
            out["model"] = {k: v.detach().clone() for k, v in c.base_model.state_dict().items()}
            out["optimizer"] = c.optimizer.state_dict()
        return out

    def save(self, c: Any, state: Any) -> None:
        if self.save_sharded is not None:  # every rank writes its shards
            path = self.save_sharded(c, self.contents(c, state, weights=False), self.dir, self.cfg.keep_last)
            log.info("sharded checkpoint saved at step %d: %s", state.step, path)
            return
        if not c.is_main:  # the replicas are identical: rank 0 writes
            return
        step, keep = state.step, self.cfg.keep_last
        save_atomic(self.contents(c, state), self.dir / "last.pt", also=self.dir / f"step_{step}.pt" if keep > 0 else None)
        self.saved.append(step)
        for old in [p for p in candidates(self.dir) if STEP_FILE.match(p.name)][keep:]:
            old.unlink(missing_ok=True)
        log.info("checkpoint saved at step %d: %s", step, self.dir / "last.pt")

    def set_aside_unverified(self, verified: int) -> None:
        """The run diverged: the checkpoints this attempt wrote after step `verified` hold weights whose loss
        was never seen finite (the step after one of them gave inf/NaN). Move them to checkpoints/diverged/
        (never deleted) so that resume=auto continues from the newest checkpoint that trained finitely."""
        bad = [s for s in self.saved if s > verified]
        if not bad or self.save_sharded is not None:
            return
        dest = self.dir / "diverged"
        dest.mkdir(exist_ok=True)
        for s in bad:
            if (self.dir / f"step_{s}.pt").is_file():
                os.replace(self.dir / f"step_{s}.pt", dest / f"step_{s}.pt")
        last = self.dir / "last.pt"
        if last.is_file():
            if (dest / f"step_{bad[-1]}.pt").is_file():
                last.unlink()  # a hard link of the step file just moved
            else:
                os.replace(last, dest / f"step_{bad[-1]}.pt")
        found = find_resumable(self.dir)
        log.warning("checkpoints written after step %d (steps %s) hold weights never seen to give a finite loss: moved to %s; "
                    "resume=auto continues from %s", verified, ", ".join(map(str, bad)), dest,
                    f"step {found[1]['train_state']['step']}" if found else "the start (none is left)")


def resolve_resume(resume: str | None, run_dir: Path, sharded: bool = False) -> tuple[Path, dict | None] | None:
    """What to resume from: None (fresh), `auto` (newest readable in this run) or a file path.
    Sharded (FSDP) checkpoints are directories; their weights load once the model is sharded (ckpt None)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if resume is None:
        if candidates(ckpt_dir) or sharded_complete(ckpt_dir):
            raise CheckpointError(f"{run_dir} already holds checkpoints; pass resume=auto to continue that run, "
                                  "or choose a new hydra.run.dir (nothing was overwritten)")
        return None
    if sharded:
        found_dirs = sharded_complete(ckpt_dir) if resume == "auto" else [Path(resume)]
        if not found_dirs:
            log.info("resume=auto: no sharded checkpoint in %s, starting fresh", ckpt_dir)
            return None
        if not (found_dirs[0] / ".metadata").is_file():
            raise CheckpointError(f"{found_dirs[0]} is not a complete sharded checkpoint (no .metadata)")
        return found_dirs[0], None
    if resume == "auto":
        found = find_resumable(ckpt_dir)
        if found is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", ckpt_dir)
        return found
    path = Path(resume)
    return path, load_file(path)


def apply_checkpoint(c: Any, state: Any, ckpt: dict, path: Path, config: dict) -> None:
    """Load every piece of state into the freshly built components and train state, after checking that
    it fits. A sharded checkpoint's weights and optimizer are already loaded (fsdp.load); its `ckpt` has
    neither."""
    report_config_changes(ckpt["config"], config)
    fresh = settings_of(c.optimizer, c.scheduler)  # what this run's config asks for
    if "model" in ckpt:
        check_model_fits(ckpt["model"], c.base_model, path)
        c.base_model.load_state_dict(ckpt["model"])
        c.precision.load_state_dict(ckpt["precision"])
        try:
            c.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: the optimizer state does not fit this optimizer ({e}); "
                                  "resume with the checkpoint's optimizer settings") from None
    else:  # a sharded checkpoint's precision state has no master tensors
        c.precision.load_state_dict({k: v for k, v in ckpt["precision"].items() if k != "master"})
    c.scheduler.load_state_dict(ckpt["scheduler"])
    if any(key.startswith("optimizer.") for key, _, _ in config_differences(ckpt["config"], config)):
        apply_settings(c.optimizer, c.scheduler, fresh)  # e.g. a lower optimizer.lr after a divergence
    state.load_state_dict({**ckpt.get("loop", {}), **ckpt["train_state"]})  # "loop": format of mptrain <= 0.1.0
    restore_rng(ckpt["rng"])
    log.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)


def _schedulers(scheduler: Any) -> list:
    return list(scheduler.schedulers.values()) if hasattr(scheduler, "schedulers") else [scheduler]


def settings_of(optimizer: Any, scheduler: Any) -> tuple[list[dict], list[float]]:
    """The hyperparameters of every param group (all but the tensors) and the schedules' base lrs."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return groups, [lr for s in _schedulers(scheduler) for lr in s.base_lrs]


def apply_settings(optimizer: Any, scheduler: Any, fresh: tuple[list[dict], list[float]]) -> None:
    """Resuming with changed optimizer.* settings: loading the optimizer's state_dict brought back the
    checkpoint's hyperparameters (lr, momentum, weight decay...); put this run's back. The lr keeps its
    place in the schedule: lr = new base lr x the schedule's factor at this step."""
    groups, base_lrs = fresh
    saved_base = [lr for s in _schedulers(scheduler) for lr in s.base_lrs]
    for group, new, old_base, new_base in zip(optimizer.param_groups, groups, saved_base, base_lrs):
        factor = group["lr"] / old_base if old_base else 1.0
        group.update({k: v for k, v in new.items() if k not in ("lr", "initial_lr")})
        group["initial_lr"], group["lr"] = new_base, new_base * factor
    i = 0
    for s in _schedulers(scheduler):
        n = len(s.base_lrs)
        s.base_lrs = list(base_lrs[i:i + n])
        s._last_lr = [g["lr"] for g in s.optimizer.param_groups]
        i += n
    log.info("resume: the optimizer runs with this run's optimizer.* settings (lr %.3g from here)",
             optimizer.param_groups[0]["lr"])


def config_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
