"""Optimizer and learning-rate scheduler builders (`optimizer=` and `scheduler=` groups)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf


def build_optimizer(cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD or AdamW over `params` (the FP32 master copies in `master` mode)."""
    params = list(params)
    impl = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[cfg.implementation]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **impl)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, **impl)


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
