"""Checkpoint files: what is in them, how they are written (atomically, finite only, with the user's umask)
and read (weights_only=True, with every field resume uses checked), and which ones a run holds.

Files in <run>/checkpoints/: last.pt (newest), step_<N>.pt (the newest `keep_last`), best.pt (by
`checkpoint.monitor`); sharded/step_<N>/ under FSDP. A save writes a temp file in the same directory, fsyncs it
and renames it over the old one, so a crash or `kill -9` at any moment leaves the previous checkpoint readable.
The checkpointer that decides when to save, and resume, live in checkpoint.py.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mptrain import __version__
from mptrain.errors import MptrainError
from mptrain.run.directory import umask_mode

log = logging.getLogger("mptrain")

FORMAT_VERSION = 1
STEP_FILE = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(MptrainError):
    """A checkpoint cannot be read, does not fit, or cannot be written."""



# ---- RNG -----------------------------------------------------------------------------------------

def capture_rng(device: torch.device | None = None) -> dict:
    """Python, numpy, torch CPU and this process's CUDA generator states, as plain containers."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {
        "python": [version, list(state), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)  # the generator this process draws from
    elif device is None and torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict, device: torch.device | None = None) -> None:
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, torch.Tensor):  # one device's state
        if device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda, device)
    elif len(cuda) == torch.cuda.device_count():  # every device's (checkpoints of mptrain <= 0.1.0)
        torch.cuda.set_rng_state_all(cuda)


def rank_rngs(c: Any) -> list[dict]:
    """Every rank's generator states, in rank order (a collective: every rank calls it); one process: its own."""
    mine = capture_rng(c.device)
    if not c.dist.enabled:
        return [mine]
    import torch.distributed as dist

    out: list = [None] * c.dist.world_size
    dist.all_gather_object(out, mine)
    return out


def own_rng(ckpt: dict, c: Any) -> dict:
    """This rank's generator states from a checkpoint (rank 0's where it was written by another world size)."""
    ranks = ckpt.get("rng_ranks")
    if ranks is not None and len(ranks) == c.dist.world_size:
        return ranks[c.dist.rank]
    return ckpt["rng"]


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


SHARDED_DIR = "sharded"
STEP_DIR = re.compile(r"step_(\d+)$")


def sharded_complete(ckpt_dir: Path) -> list[Path]:
    """Committed sharded (FSDP) checkpoints (those with DCP's .metadata), newest first."""
    root = ckpt_dir / SHARDED_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)
