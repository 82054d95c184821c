"""FSDP2 (`trainer.strategy=fsdp`): sharded parameters, gradients and optimizer state, with PyTorch's
MixedPrecisionPolicy, and sharded checkpoints through torch.distributed.checkpoint.

FSDP2 keeps each rank's parameter shard in float32 and casts it to `param_dtype` for compute, so it is
itself the paper's master-weights scheme: the fp16/bf16 modes map to param_dtype = the compute dtype
with reduce_dtype = float32; loss scaling runs on the local gradient shards and the overflow flag is
all-reduced (precision engine), so every rank skips together.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mptrain.checkpoint.files import load_file, save_atomic, sharded_complete
from mptrain.parallel.distributed import max_across_ranks

log = logging.getLogger("mptrain")

def shard(model: nn.Module, precision: Any) -> nn.Module:
    """fully_shard every top-level child that holds parameters, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    precision.check_strategy("fsdp")  # master weights: FSDP2 keeps float32 shards itself
    low = precision.compute_dtype if precision.use_autocast else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # each rank unscales only its gradient shard: every rank must take the same skip decision
    precision.agree_on_overflow = max_across_ranks
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a plain tensor stays as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


# ---- sharded checkpoints ---------------------------------------------------------------------------

def save(c: Any, extra: dict, ckpt_dir: Path, keep: int) -> Path:
    """Every rank writes its shards to <ckpt_dir>/sharded/step_<N>/; DCP writes `.metadata` last, so a
    directory without it is an interrupted save and is ignored on resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(c.model, c.optimizer)
    target = ckpt_dir / "sharded" / f"step_{extra['train_state']['step']}"
    if c.is_main:  # the plain-container part (train state, scaler, RNG, config), before the commit marker
        save_atomic(extra, target / "extra.pt")
    dist.barrier()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(target))
    dist.barrier()
    if c.is_main:
        for old in sharded_complete(ckpt_dir)[max(keep, 1):]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load(c: Any, path: Path) -> dict:
    """Load the shards into the already sharded model and optimizer; return the plain-container state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(c.model, c.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(c.model, c.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return load_file(path / "extra.pt")
