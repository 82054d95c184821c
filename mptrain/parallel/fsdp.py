"""FSDP2 (`trainer.strategy=fsdp`): sharded parameters, gradients and optimizer state, with PyTorch's
MixedPrecisionPolicy. Its checkpoints (torch.distributed.checkpoint) are mptrain/checkpoint/sharded.py's.

FSDP2 keeps each rank's parameter shard in float32 and casts it to `param_dtype` for compute, so it is
itself the paper's master-weights scheme: the fp16/bf16 modes map to param_dtype = the compute dtype
with reduce_dtype = float32; loss scaling runs on the local gradient shards and the overflow flag is
all-reduced (precision engine), so every rank skips together.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mptrain.errors import ConfigError
from mptrain.parallel.distributed import max_across_ranks

log = logging.getLogger("mptrain")

def shard(model: nn.Module, precision: Any) -> nn.Module:
    """fully_shard every top-level child that holds parameters, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision.mode in ("master", "nomaster"):
        raise ConfigError(f"precision={precision.mode} with trainer.strategy=fsdp: FSDP2 already keeps float32 "
                          "shards as master weights; use precision=dynamic (fp16) or bf16 instead")
    low = precision.compute_dtype if precision.use_autocast else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # each rank unscales only its gradient shard: every rank must take the same skip decision
    precision.agree_on_overflow = max_across_ranks
    return model


def save_shards(model: nn.Module, optimizer: Any, target: Path) -> None:
    """Every rank writes its shards of the model and optimizer state to `target` (DCP), between barriers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dist.barrier()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(target))
    dist.barrier()


def load_shards(model: nn.Module, optimizer: Any, path: Path) -> None:
    """Load DCP shards into the already sharded model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
