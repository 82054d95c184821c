"""The training loop and validation: free functions over ready-built objects."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .diagnostics import Diagnostics
from .distributed import DistInfo
from .errors import TrainingFailed
from .outputs import RunWriter
from .precision import Precision
from .state import TrainState
from .tasks import Task

log = logging.getLogger("mptrain")


@dataclass
class Loop:
    """Everything the loop touches, built by the recipe."""

    model: nn.Module
    precision: Precision
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    val_loader: DataLoader | None
    device: torch.device
    writer: RunWriter | None
    state: TrainState
    total_steps: int
    steps_per_epoch: int
    accumulate: int = 1
    clip_grad_norm: float | None = None
    loss_weight: float = 1.0
    log_every: int = 10
    eval_every: int | None = None
    channels_last: bool = False
    progress_bar: bool = True
    after_step: list[Callable[[Loop], None]] = field(default_factory=list)  # e.g. checkpointing
    diagnostics: Diagnostics | None = None
    last_val: dict = field(default_factory=dict)
    train_loss: float = math.nan  # mean loss of the last logged window
    train_time: float = 0.0  # seconds spent in training steps (validation excluded)
    # the current logging window, summed on the device
    window_loss: torch.Tensor | None = None
    window_applied: int = 0
    window_skipped: int = 0

    task: Task = field(default_factory=Task)
    dist: DistInfo = field(default_factory=DistInfo)  # this process's place under torchrun
    strategy: str = "single"  # single | ddp | fsdp

    def __post_init__(self) -> None:
        if self.window_loss is None:
            self.window_loss = torch.zeros((), device=self.device)

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def to_device(self, batch: tuple) -> tuple:
        """Move a batch to the device (non-blocking from pinned memory), in the model's input dtype."""
        x, *rest = batch
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return (self.precision.cast_inputs(x), *(t.to(self.device, non_blocking=True) for t in rest))

    def reduce_sums(self, a: torch.Tensor, b: torch.Tensor | None, count: int) -> tuple[float, float]:
        """(a / count, b / count) over every rank's validation shard: one all-reduce, one host read."""
        packed = torch.stack([a.float(), (b if b is not None else torch.zeros_like(a)).float(),
                              torch.tensor(float(count), device=a.device)])
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(packed)
        a_sum, b_sum, n = packed.tolist()
        return a_sum / max(n, 1), b_sum / max(n, 1)

    def progress_state(self) -> dict:
        """What a checkpoint needs beyond TrainState to continue the metrics rows exactly."""
        return {"window_loss": self.window_loss.detach().cpu().clone(), "window_applied": self.window_applied,
                "window_skipped": self.window_skipped, "train_loss": self.train_loss, "last_val": dict(self.last_val)}

    def load_progress_state(self, state: dict) -> None:
        self.window_loss = state["window_loss"].to(self.device)
        self.window_applied, self.window_skipped = state["window_applied"], state["window_skipped"]
        self.train_loss, self.last_val = state["train_loss"], dict(state["last_val"])


def fit(loop: Loop) -> None:
    """Train until loop.total_steps optimizer steps have been taken (continuing from loop.state)."""
    s = loop.state
    loop.model.train()
    bar = tqdm(total=loop.total_steps, initial=s.step, disable=not loop.progress_bar, dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    while s.step < loop.total_steps:
        # the epoch's order depends on (seed, epoch) only; skip what this epoch already trained on
        loop.train_loader.sampler.set_epoch(s.epoch, start=s.step_in_epoch * loop.accumulate * loop.train_loader.batch_size)
        batches = iter(loop.train_loader)
        epoch = s.epoch
        while s.epoch == epoch and s.step < loop.total_steps:
            out = loop.task.train_step(loop, batches, s.step + 1)
            s.samples += out.samples
            if out.applied:
                loop.scheduler.step()  # only applied steps advance the schedule
                loop.window_loss += out.loss
                loop.window_applied += 1
            else:
                loop.window_skipped += 1
            s.step += 1
            s.step_in_epoch += 1
            epoch_end = s.step_in_epoch == loop.steps_per_epoch
            if epoch_end:
                s.epoch += 1
                s.step_in_epoch = 0
            bar.update(1)
            if s.step % loop.log_every == 0 or s.step == loop.total_steps:
                _log_row(loop, bar)
            scheduled = epoch_end if loop.eval_every is None else s.step % loop.eval_every == 0
            if loop.val_loader is not None and (scheduled or s.step == loop.total_steps):  # always validate the end
                loop.train_time += time.perf_counter() - t0  # validation is not training time
                _validate(loop)
                t0 = time.perf_counter()
            for hook in loop.after_step:
                hook(loop)
    if loop.device.type == "cuda":
        torch.cuda.synchronize(loop.device)
    loop.train_time += time.perf_counter() - t0
    bar.close()


def _log_row(loop: Loop, bar: tqdm) -> None:
    s, p = loop.state, loop.precision
    # the one read of the accumulated loss per log_every steps (a host sync)
    mean_loss = loop.window_loss.item() / loop.window_applied if loop.window_applied else math.nan
    skipped = loop.window_skipped
    loop.window_loss.zero_()
    loop.window_applied = loop.window_skipped = 0
    if not math.isfinite(mean_loss) and p.scaler is None:
        # Without a loss scaler nothing skips bad steps: stop before the weights are poisoned further.
        raise TrainingFailed(
            f"loss is {mean_loss} at step {s.step} with precision={p.mode} and no loss scaling: the run diverged. "
            "Try a lower optimizer.lr, trainer.clip_grad_norm=1.0, or a loss-scaled mode (precision=dynamic)."
        )
    if math.isfinite(mean_loss):
        loop.train_loss = mean_loss
    lr = loop.optimizer.param_groups[0]["lr"]
    row = {"step": s.step, "epoch": s.epoch, "loss": mean_loss, "lr": lr, "loss_scale": p.loss_scale,
           "skipped": skipped, "skipped_total": p.scaler.skipped if p.scaler is not None else 0}
    loop.writer.log(row)
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}", scale=f"{p.loss_scale:g}", refresh=False)
    log.debug("step %d loss %.4f lr %.3g scale %g", s.step, mean_loss, lr, p.loss_scale)


def _validate(loop: Loop) -> None:
    metrics = loop.task.evaluate(loop)
    loop.model.train()
    loop.last_val = {"step": loop.state.step, **metrics}
    loop.writer.log({"step": loop.state.step, "epoch": loop.state.epoch, **metrics})
    log.info("step %d  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), loop.state.step)
