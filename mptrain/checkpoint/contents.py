"""What a checkpoint holds, stated once: the components' own state_dict()s plus a few plain fields.

`gather` writes it, `check_structure` checks a file before anything reads it, and `load_into` loads it back
(resume.py), all from the same lists. Everything is a plain container (tensors, numbers, strings, dicts), so
`torch.load(..., weights_only=True)` reads it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mptrain import __version__
from mptrain.errors import CheckpointError
from mptrain.parallel.distributed import all_gather_objects

FORMAT_VERSION = 1
# the parts saved as their state_dict(), in the order a resume loads them (the model before the precision
# state, whose fp32 master copy must replace the one cloned from the fresh model)
PARTS = ("model", "precision", "optimizer", "scheduler", "train_state")
WEIGHTS = ("model", "optimizer")  # a sharded (FSDP) checkpoint writes these through DCP instead
STATEFUL = tuple(k for k in PARTS if k not in WEIGHTS)
# plain fields, with the types a resume needs
FIELDS = {"format_version": int, "config": dict, "rng": dict}
TRAIN_STATE = {"step": int, "epoch": int, "step_in_epoch": int, "samples": int}


def stateful(c: Any, state: Any) -> dict[str, Any]:
    """Each checkpointed part of a run, by its key."""
    return {"model": c.base_model, "optimizer": c.optimizer, "precision": c.precision, "scheduler": c.scheduler,
            "train_state": state}


def gather(c: Any, state: Any, config: dict, weights: bool = True, rngs: list[dict] | None = None) -> dict:
    """Everything a resume needs; `weights=False` leaves out the model and optimizer (FSDP saves those sharded).
    `rngs`: every rank's generator states (rank_rngs, a collective), else this process's."""
    parts = stateful(c, state)
    rngs = rngs if rngs is not None else [capture_rng(c.device)]
    out: dict = {"format_version": FORMAT_VERSION, "mptrain_version": __version__,
                 "torch_version": str(torch.__version__), "rng": rngs[0], "config": config}
    if len(rngs) > 1:  # each rank restores its own (dropout draws differ by rank)
        out["rng_ranks"] = rngs
    out.update({k: parts[k].state_dict() for k in STATEFUL})
    if getattr(c, "ema", None) is not None:  # trainer.ema
        out["ema"] = c.ema.state_dict()
    order = getattr(getattr(getattr(c, "train_loader", None), "sampler", None), "order", None)
    if isinstance(order, str):  # the data order's kind (EpochSampler.order): a mid-epoch resume needs the same
        out["data_order"] = order
    out["timing"] = state.timing()  # beside the state: a summary's wall_s and samples/s cover every attempt
    if weights:
        out["model"] = {k: v.detach().clone() for k, v in c.base_model.state_dict().items()}
        out["optimizer"] = c.optimizer.state_dict()
    return out


def check_structure(ckpt: dict, path: Path) -> None:
    """The fields resume uses exist and have the right types; model/optimizer hold tensors."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is malformed: {what}; it was not written by this mptrain "
                               "or was edited. Use another checkpoint or resume=auto")

    for key, kind in {**FIELDS, **dict.fromkeys(STATEFUL, dict)}.items():
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
        if not is_optimizer_state(ckpt.get("optimizer")):
            raise bad("'optimizer' is not an optimizer state_dict (state, param_groups), nor one per named part")


def _one_optimizer(opt: Any) -> bool:
    return isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)


def is_optimizer_state(opt: Any) -> bool:
    """One optimizer's state_dict, or MultiOptimizer's: one per part of a task with several (a GAN's
    {discriminator, generator})."""
    if _one_optimizer(opt):
        return True
    return (isinstance(opt, dict) and bool(opt)
            and all(isinstance(k, str) and _one_optimizer(v) for k, v in opt.items()))


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
    return all_gather_objects(capture_rng(c.device), c.dist)


def written_by(ckpt: dict) -> int:
    """How many processes wrote the checkpoint (one generator state per rank is kept when there were several)."""
    return len(ckpt.get("rng_ranks") or [ckpt.get("rng")])


def own_rng(ckpt: dict, c: Any) -> dict:
    """This rank's generator states from a checkpoint (rank 0's where another world size wrote it)."""
    ranks = ckpt.get("rng_ranks")
    if ranks is not None and len(ranks) == c.dist.world_size:
        return ranks[c.dist.rank]
    return ckpt["rng"]


# ---- finiteness ----------------------------------------------------------------------------------
