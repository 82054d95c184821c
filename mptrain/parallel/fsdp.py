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

from mptrain.parallel.distributed import max_across_ranks

log = logging.getLogger("mptrain")

def units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards as units of their own (each all-gathers its parameters just before it runs and
    frees them after, overlapping the next unit's gather): every block of a model's repeated stack (a
    Sequential/ModuleList child of blocks of one class: a transformer's layers), each stage where a model has
    several such stacks (ResNet's layer1..4), and every other top-level child that holds parameters of its own.
    Parameters shared between children (a head tied to the embedding) stay in the root unit."""
    children = [(n, m) for n, m in model.named_children() if any(p.requires_grad for p in m.parameters())]
    owners: dict[int, set[str]] = {}
    for name, child in children:
        for p in child.parameters():
            owners.setdefault(id(p), set()).add(name)

    def stack(m: nn.Module) -> bool:
        parts = list(m.children())
        return (isinstance(m, (nn.Sequential, nn.ModuleList)) and len(parts) > 1
                and len({type(b) for b in parts}) == 1 and all(any(True for _ in b.parameters()) for b in parts))

    stacks = [n for n, m in children if stack(m)]
    out = []
    for name, child in children:
        if any(len(owners[id(p)]) > 1 for p in child.parameters()):
            continue  # tied to another child: the root holds it
        out += list(child.children()) if stacks == [name] else [child]
    return out


def shard(model: nn.Module, precision: Any) -> nn.Module:
    """fully_shard every unit (units()), then the root."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    precision.check_strategy("fsdp")  # master weights: FSDP2 keeps float32 shards itself
    low = precision.gather_dtype  # float32 under a per-layer plan: each module casts as its format says
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    if low != torch.float32:
        # batch norm keeps float32 parameters beside its float32 running statistics (the kernels refuse bf16
        # weights with fp32 statistics): each its own small float32 unit, inside the units below
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(True for _ in m.parameters()):
                fully_shard(m, mp_policy=fp32)
    for unit in units(model):
        if not isinstance(unit, FSDPModule):  # a top-level batch norm is its own unit already
            fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # each rank unscales only its gradient shard: every rank must take the same skip decision
    precision.agree_on_overflow(max_across_ranks)
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
