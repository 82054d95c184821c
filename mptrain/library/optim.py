"""Optimizer and learning-rate scheduler builders (`optimizer=` and `scheduler=` groups)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf


def build_optimizer(cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD or AdamW over `params` (the FP32 master copies in `master` mode). precision=bf16_pure builds its
    own (Precision.build_optimizer)."""
    params = list(params)

    def make(**impl) -> torch.optim.Optimizer:
        if cfg.name == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                   weight_decay=cfg.weight_decay, **impl)
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, **impl)

    if cfg.implementation == "auto" and any(hasattr(p, "device_mesh") for p in params):
        return make(foreach=True)  # FSDP2's DTensor parameters have no fused kernels
    if cfg.implementation == "auto":
        # fused kernels (one per step, CPU and CUDA) are ~3x faster than the per-tensor loop on a CPU;
        # fall back to PyTorch's own choice where a device or dtype has none
        try:
            return make(fused=True)
        except (RuntimeError, ValueError):
            return make()
    return make(**{"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[cfg.implementation])


def lr_factor(cfg: DictConfig, step: int, total_steps: int) -> float:
    """The multiplier of the peak lr after `step` applied optimizer steps."""
    if cfg.name == "none":
        return 1.0
    if step < cfg.warmup_steps:
        start = cfg.warmup_start_factor
        return start + (1.0 - start) * step / cfg.warmup_steps
    if cfg.name == "step":
        return cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
    # cosine from the end of warm-up to total_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A LambdaLR stepped once per *applied* optimizer step (skipped steps do not advance it)."""
    cfg = SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True))  # plain copy: fast, frozen
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total_steps))


class MultiOptimizer:
    """Several named optimizers behind one object for the loop and checkpoints (a GAN's two)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"checkpoint has optimizers {sorted(state)}, this run has {sorted(self.optimizers)}")
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])


class MultiScheduler:
    def __init__(self, schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]):
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers.values():
            s.step()

    def state_dict(self) -> dict:
        return {k: s.state_dict() for k, s in self.schedulers.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, s in self.schedulers.items():
            s.load_state_dict(state[k])
