"""What a run builds once (docs/design.md): the model, its precision, optimizers, loaders, device.

Nothing here changes during the run (but the optimizer after a switch into master weights: rebuild_optimizer);
counters, windows and metrics live in TrainState.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from mptrain.library.tasks import Task
from mptrain.parallel.distributed import DistInfo
from mptrain.precision import Precision


@dataclass
class Part:
    """A network with an optimizer of its own: the whole model for most tasks, a GAN's two halves."""

    name: str
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # the tensors it updates (FP32 masters in master mode)


@dataclass
class Components:
    model: nn.Module  # as trained: possibly DDP-wrapped and/or compiled
    task: Task
    precision: Precision
    optimizer: torch.optim.Optimizer  # one optimizer, or a MultiOptimizer over the task's parts
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per applied step
    parts: list[Part]
    train_loader: DataLoader
    val_loader: DataLoader | None
    device: torch.device
    total_steps: int
    steps_per_epoch: int
    accumulate: int = 1
    clip_grad_norm: float | None = None
    loss_weight: float = 1.0
    channels_last: bool = False
    dist: DistInfo = field(default_factory=DistInfo)  # this process's place under torchrun
    ema: object | None = None  # trainer.ema: the fp32 average of the weights (mptrain/train/ema.py)
    tokenizer: object | None = None  # what decodes a language model's tokens (saved in the run directory)
    strategy: str = "single"  # single | ddp | fsdp
    model_facts: dict = field(default_factory=dict)  # model keys the data filled in (e.g. vocab_size)
    vocab: dict | None = None  # a text dataset's vocabulary: written to the run directory as vocab.json
    callbacks: list = field(default_factory=list)  # the user's (config `callbacks`, or passed to mptrain.train)
    # a new optimizer (and schedule) over the precision's tensors, its state carried: after a precision.schedule
    # switch into master weights (recipe.rebuild_optimizer); the one thing here a run changes after it is built
    rebuild_optimizer: Callable[[Components], None] | None = None

    @property
    def base_model(self) -> nn.Module:
        """The plain module: no torch.compile wrapper, no DDP (what checkpoints and hooks see)."""
        model = getattr(self.model, "_orig_mod", self.model)
        return getattr(model, "module", model)

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def to_device(self, batch):
        """Move a batch (tensors, or tuples/lists/dicts of them) to the device, non-blocking from pinned
        memory; 4-d image tensors in channels_last when asked."""
        if isinstance(batch, torch.Tensor):
            batch = batch.to(self.device, non_blocking=True)
            if self.channels_last and batch.dim() == 4:
                batch = batch.contiguous(memory_format=torch.channels_last)
            return batch
        if isinstance(batch, (tuple, list)):
            moved = [self.to_device(b) for b in batch]
            return moved if isinstance(batch, list) else tuple(moved)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        return batch
