"""Data parallel training under torchrun or SLURM: process group, DDP wrapping, checks that fail early.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and TORCHELASTIC_RUN_ID, which names the shared run
directory). Without torchrun, SLURM's srun (or the submitit launcher's multi-task jobs) gives SLURM_PROCID,
SLURM_NTASKS and SLURM_LOCALID, and the rendezvous is MASTER_ADDR:MASTER_PORT, or the first host of
SLURM_JOB_NODELIST and a port derived from SLURM_JOB_ID. Every rank runs the same recipe; only rank 0 writes
the run directory.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from mptrain.config import global_batch
from mptrain.errors import ConfigError, HardwareError
from mptrain.parallel.launch import DistInfo, env_info, first_host, rendezvous_env  # noqa: F401 (re-exported)
from mptrain.precision.formats import BF16, FP16

log = logging.getLogger("mptrain")


def setup(t: DictConfig, device: torch.device) -> DistInfo:
    """Join the process group torchrun prepared (gloo on CPU, nccl on CUDA). One process: nothing."""
    info = env_info()
    if not info.enabled:
        return info
    backend = t.dist_backend if t.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise HardwareError("trainer.dist_backend=nccl needs CUDA GPUs and none is visible; use "
                            "trainer.dist_backend=gloo (or auto) on CPU")
    if global_batch(t, info.world_size) % info.world_size:
        raise ConfigError(f"trainer.batch_size={global_batch(t, info.world_size)} (the global batch) is not divisible "
                          f"by the {info.world_size} processes; choose a multiple of {info.world_size}, or set "
                          "trainer.per_device_batch_size instead")
    if not dist.is_initialized():
        rendezvous_env(info)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # device_id binds the process group to this rank's GPU (NCCL connects eagerly; no guessing later)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    log.info("data parallel: rank %d of %d (%s)", info.rank, info.world_size, backend)
    return info


def device_for(name: str, info: DistInfo) -> str:
    """Under torchrun or SLURM each rank takes its own GPU (ranks beyond the node's GPUs share them in turn)."""
    if info.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{info.local_rank % torch.cuda.device_count()}"
    return name


def check_same_config(config: dict, info: DistInfo) -> None:
    """Every rank must run the same config: compare digests, name the differing ranks."""
    if not info.enabled:
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    digests: list[str | None] = [None] * info.world_size
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ConfigError(f"ranks run different configs (ranks {odd} differ from rank 0); start every rank with "
                          "the same overrides")


def wrap(model: nn.Module, t: DictConfig, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP, with optional fp16/bf16 gradient compression of the all-reduce."""
    if not info.enabled:
        if t.grad_compression != "none":
            raise ConfigError(f"trainer.grad_compression={t.grad_compression} compresses the data-parallel "
                              "all-reduce; it needs torchrun with more than one process")
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.grad_compression != "none":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        backend = dist.get_backend()
        if t.grad_compression == BF16.name and backend != "nccl":
            raise ConfigError(f"trainer.grad_compression=bf16 needs the nccl backend ({backend} cannot all-reduce "
                              "bfloat16); use trainer.grad_compression=fp16 or none")
        hook = default_hooks.fp16_compress_hook if t.grad_compression == FP16.name else default_hooks.bf16_compress_hook
        ddp.register_comm_hook(state=None, hook=hook)
    return ddp


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if it is true on any (one tiny all-reduce)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_across_ranks(flag: torch.Tensor) -> torch.Tensor:
    """The largest value of a 0-dim flag over every rank (the FSDP overflow agreement): one all-reduce."""
    t = flag.reshape(1).float()
    t = t.cpu() if dist.get_backend() == "gloo" else t
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj` (picklable), in rank order; a collective. One process: [obj]."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class Ranks:
    """What a component run on every rank (FSDP2's diagnostics) needs of the process group: every rank's copy
    of an object (a collective), how many ranks there are, and whether this one writes (rank 0)."""

    def __init__(self, info: DistInfo):
        self.info, self.world_size, self.writes = info, info.world_size, info.is_main

    def gather(self, obj) -> list:
        return all_gather_objects(obj, self.info)


def sum_across_ranks(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise sum over every rank (validation sums); the tensor itself in one process."""
    if info.enabled:
        t = t.cpu() if dist.get_backend() == "gloo" else t
        dist.all_reduce(t)
    return t


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
