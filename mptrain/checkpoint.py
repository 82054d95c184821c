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
from .distributed import any_rank
from .errors import MptrainError
from .loop import Callback

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


# ---- writing -------------------------------------------------------------------------------------

def save_atomic(obj: Any, path: Path, also: Path | None = None) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over `path` (and hard-link it as
    `also`). On any failure the temp file is removed and the old `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; the previous "
                                  "checkpoint is intact. Free disk space or fix permissions, then resume=auto") from e
        raise


# ---- reading -------------------------------------------------------------------------------------

def load_file(path: Path) -> dict:
    """Read a checkpoint with weights_only=True; any fault becomes one clear CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing file or resume=auto")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):  # a reference to a callable
            raise CheckpointError(f"refused to load {path}: it holds Python objects that would run code when "
                                  "loaded (weights_only=True); mptrain checkpoints never do. Use a checkpoint "
                                  "written by mptrain") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (unreadable pickle); use an older "
                              "step_<N>.pt or resume=auto, which picks the newest readable one") from None
    except Exception as e:  # a damaged file can fail in many ways inside the unpickler
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first}); use an older step_<N>.pt "
                              "or resume=auto, which picks the newest readable one") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path} is not an mptrain checkpoint (no format_version)")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {ckpt['format_version']}, newer than this "
                              f"mptrain ({__version__}) reads ({FORMAT_VERSION}); upgrade mptrain")
    return ckpt


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in a run, newest first: last.pt, then step_<N>.pt by N descending."""
    if not ckpt_dir.is_dir():
        return []
    steps = sorted((p for p in ckpt_dir.iterdir() if STEP_FILE.match(p.name)),
                   key=lambda p: int(STEP_FILE.match(p.name).group(1)), reverse=True)
    last = ckpt_dir / "last.pt"
    return ([last] if last.is_file() else []) + steps


def find_resumable(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint (a damaged last.pt falls back to the newest step file)."""
    best = None
    for path in candidates(ckpt_dir):
        try:
            ckpt = load_file(path)
        except CheckpointError as e:
            log.warning("skipping unreadable checkpoint: %s", e)
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


class Checkpointer(Callback):
    """Saves last.pt (+ step_<N>.pt) every `every_steps` steps, every `every_epochs` epochs, at the end
    of the run and on a stop signal; best.pt whenever the monitored validation metric improves.

    `save_sharded(c, extra, ckpt_dir, keep)` (FSDP): every rank writes its shards; given by the recipe."""

    def __init__(self, cfg: DictConfig, run_dir: Path, config: dict, signals: StopSignals, log_every: int = 1,
                 save_sharded=None):
        self.cfg, self.config, self.signals, self.log_every = cfg, config, signals, log_every
        self.save_sharded = save_sharded
        self.dir = Path(run_dir) / "checkpoints"

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

    def _update_best(self, state: Any) -> bool:
        monitor, val = self.cfg.monitor, state.last_val
        if monitor is None or val.get("step") != state.step or monitor not in val:
            return False
        value, best = val[monitor], state.best_metric
        if not math.isfinite(value):
            return False  # a diverged validation is never "best"
        if best is None or (value > best if self.cfg.mode == "max" else value < best):
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
        for old in [p for p in candidates(self.dir) if STEP_FILE.match(p.name)][keep:]:
            old.unlink(missing_ok=True)
        log.info("checkpoint saved at step %d: %s", step, self.dir / "last.pt")


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
    state.load_state_dict({**ckpt.get("loop", {}), **ckpt["train_state"]})  # "loop": format of mptrain <= 0.1.0
    restore_rng(ckpt["rng"])
    log.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)


def config_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
