"""The training loop and validation: free functions over ready-built objects."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .errors import TrainingFailed
from .outputs import RunWriter
from .precision import Precision
from .state import TrainState

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
    writer: RunWriter
    state: TrainState
    total_steps: int
    steps_per_epoch: int
    accumulate: int = 1
    clip_grad_norm: float | None = None
    log_every: int = 10
    eval_every: int | None = None
    channels_last: bool = False
    progress_bar: bool = True
    after_step: list[Callable[[Loop], None]] = field(default_factory=list)  # e.g. checkpointing
    last_val: dict = field(default_factory=dict)
    train_loss: float = math.nan
    train_time: float = 0.0  # seconds spent in training steps (validation excluded)


def to_device(batch: tuple[torch.Tensor, torch.Tensor], loop: Loop) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    x = x.to(loop.device, non_blocking=True)
    if loop.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return loop.precision.cast_inputs(x), y.to(loop.device, non_blocking=True)


@torch.no_grad()
def validate(loop: Loop) -> dict:
    """Mean loss and accuracy over the validation loader (summed on the device, read once)."""
    model, precision = loop.model, loop.precision
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=loop.device)
    correct = torch.zeros((), device=loop.device, dtype=torch.long)
    count = 0
    for batch in loop.val_loader:
        x, y = to_device(batch, loop)
        with precision.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
        count += y.numel()
    model.train(was_training)
    return {"val/loss": loss_sum.item() / max(count, 1), "val/acc": correct.item() / max(count, 1)}


def fit(loop: Loop) -> None:
    """Train until loop.total_steps optimizer steps have been taken."""
    s, p = loop.state, loop.precision
    loop.model.train()
    window_loss = torch.zeros((), device=loop.device)  # summed on the device, read every log_every steps
    window_applied = window_skipped = 0
    bar = tqdm(total=loop.total_steps, initial=s.step, disable=not loop.progress_bar, dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    while s.step < loop.total_steps:
        sampler = loop.train_loader.sampler
        sampler.set_epoch(s.epoch, start=s.step_in_epoch * loop.accumulate * loop.train_loader.batch_size)
        batches = iter(loop.train_loader)
        while s.step_in_epoch < loop.steps_per_epoch and s.step < loop.total_steps:
            step_loss = torch.zeros((), device=loop.device)
            for _ in range(loop.accumulate):
                x, y = to_device(next(batches), loop)
                with p.autocast():
                    logits = loop.model(x)
                loss = F.cross_entropy(logits.float(), y)  # the loss in fp32, whatever the compute dtype
                p.backward(loss / loop.accumulate)
                step_loss += loss.detach()
                s.samples += y.numel()
            result = p.step(loop.optimizer, loop.clip_grad_norm)
            if result.applied:
                loop.scheduler.step()  # only applied steps advance the schedule
                window_loss += step_loss / loop.accumulate
                window_applied += 1
            else:
                window_skipped += 1
            s.step += 1
            s.step_in_epoch += 1
            bar.update(1)
            if s.step % loop.log_every == 0 or s.step == loop.total_steps:
                mean = window_loss.item() / window_applied if window_applied else math.nan  # host sync
                _log_row(loop, mean, window_skipped, bar)
                window_loss.zero_()
                window_applied = window_skipped = 0
            if loop.eval_every is not None and s.step % loop.eval_every == 0 and loop.val_loader is not None:
                loop.train_time += time.perf_counter() - t0
                _validate(loop)
                t0 = time.perf_counter()
            for hook in loop.after_step:
                hook(loop)
        if s.step_in_epoch >= loop.steps_per_epoch:  # the epoch is complete
            s.epoch += 1
            s.step_in_epoch = 0
            if loop.eval_every is None and loop.val_loader is not None:
                loop.train_time += time.perf_counter() - t0
                _validate(loop)
                t0 = time.perf_counter()
    if loop.device.type == "cuda":
        torch.cuda.synchronize(loop.device)
    loop.train_time += time.perf_counter() - t0
    bar.close()
    if loop.val_loader is not None and loop.last_val.get("step") != s.step:
        _validate(loop)


def _log_row(loop: Loop, mean_loss: float, skipped: int, bar: tqdm) -> None:
    s, p = loop.state, loop.precision
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
    metrics = validate(loop)
    loop.last_val = {"step": loop.state.step, **metrics}
    loop.writer.log({"step": loop.state.step, "epoch": loop.state.epoch, **metrics})
    log.info("step %d  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), loop.state.step)
