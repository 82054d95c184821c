"""Checkpoint files: how they are written (atomically, finite only, through the run's one atomic writer) and
read (weights_only=True, with every field resume uses checked), and which ones a run holds.

Files in <run>/checkpoints/: last.pt (newest), step_<N>.pt (the newest `keep_last`), best.pt (by
`checkpoint.monitor`); sharded/step_<N>/ under FSDP. A save writes a temp file in the same directory, fsyncs it
and renames it over the old one, so a crash or `kill -9` at any moment leaves the previous checkpoint readable.
What a checkpoint holds is contents.py's; when to save is callback.py's; resume is resume.py's.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from mptrain import __version__
from mptrain.checkpoint.contents import FORMAT_VERSION, check_structure
from mptrain.errors import CheckpointError, MptrainError
from mptrain.library.optim import LOW_BIT_STATES, allow_low_bit_states
from mptrain.run.layout import CHECKPOINTS, LAST, SHARDED, SHARDED_STEP_RE, STEP_CKPT_RE, write_atomic

log = logging.getLogger("mptrain")





def _float_tensors(tree: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor) and type(tree) is not torch.Tensor and hasattr(tree, "__tensor_flatten__"):
        # a tensor subclass (torchao's low-bit optimizer state): its inner tensors (codes, scales) hold the values
        inner = [(name, getattr(tree, name)) for name in tree.__tensor_flatten__()[0]]
        inner = [
            (n, t.float() if t.is_floating_point() and t.element_size() == 1 else t) for n, t in inner
        ]  # fp8: no norm
        return [pair for name, t in inner for pair in _float_tensors(t, f"{prefix}.{name}")]
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
    try:
        write_atomic(path, lambda f: torch.save(obj, f), also=also)
    except BaseException as e:
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and isinstance(cause, OSError)):
            reason = getattr(cause, "strerror", None) or str(e).splitlines()[0]
            raise CheckpointError(
                f"could not write checkpoint {path}: {reason}; the previous "
                "checkpoint is intact. Free disk space or fix permissions, then resume=auto"
            ) from None
        raise


def link_atomic(src: Path, dst: Path) -> None:
    """Make `dst` a hard link of `src` (best.pt of last.pt when they hold the same step: no second write of
    the same bytes). Atomic: a link under a temp name renamed over `dst`. A later save of `src` renames a new
    file over it, so `dst` keeps its own contents."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {dst}: {e.strerror or e}") from None


# ---- reading -------------------------------------------------------------------------------------

def load_file(path: Path) -> dict:
    """Read a checkpoint with weights_only=True; any fault becomes one clear CheckpointError."""
    path = Path(path)
    if path.is_dir():
        inside = path / LAST if (path / LAST).is_file() else path / CHECKPOINTS / LAST  # a checkpoints/ or a run dir
        raise CheckpointError(f"checkpoint {path} is a directory; pass a checkpoint file (e.g. {inside}), or "
                              f"resume=auto hydra.run.dir=<the run directory>")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing file or resume=auto")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if _code_reference(path) not in LOW_BIT_STATES:
                raise
            allow_low_bit_states()  # torchao's optimizer state: safe tensor subclasses, once torchao says so
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except MptrainError:  # torchao missing for a low-bit optimizer state: its one-line install hint
        raise
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
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects that would run code when loaded ({name}); "
            "mptrain checkpoints never hold code. Use a checkpoint written by mptrain"
        )


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in a run, newest first: last.pt, then step_<N>.pt by N descending."""
    if not ckpt_dir.is_dir():
        return []
    steps = sorted((p for p in ckpt_dir.iterdir() if STEP_CKPT_RE.match(p.name)),
                   key=lambda p: int(STEP_CKPT_RE.match(p.name).group(1)), reverse=True)
    last = ckpt_dir / LAST
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




def sharded_complete(ckpt_dir: Path) -> list[Path]:
    """Committed sharded (FSDP) checkpoints (those with DCP's .metadata), newest first."""
    root = ckpt_dir / SHARDED
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if SHARDED_STEP_RE.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(SHARDED_STEP_RE.match(p.name).group(1)), reverse=True)
