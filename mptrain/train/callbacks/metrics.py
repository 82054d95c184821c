"""Metric rows: one every log_every steps and one per validation, with the divergence check."""

from __future__ import annotations

import logging
import math
import time

import torch

from mptrain.errors import Diverged
from mptrain.run.writer import RunWriter
from mptrain.train.callbacks.base import Callback
from mptrain.train.callbacks.console import Console
from mptrain.train.components import Components
from mptrain.train.state import TrainState
from mptrain.train.step import StepOutput

log = logging.getLogger("mptrain")


def divergence_advice(compute_dtype: torch.dtype) -> str:
    """What to change after a divergence with no loss scaler. Loss scaling only helps float16 compute
    (its gradients underflow or overflow); an fp32 or bf16 run diverged through its lr or its gradients."""
    advice = "Try a lower optimizer.lr or trainer.clip_grad_norm=1.0"
    if compute_dtype == torch.float16:
        advice += ", or a loss-scaled mode (precision=dynamic)"
    return advice


class CompileNotice(Callback):
    """trainer.compile=true: torch.compile compiles at the first step, which then takes seconds to minutes.
    Say so before it starts, and how long it took once it is done."""

    def __init__(self) -> None:
        log.info("compiling the model (trainer.compile=true): the first step waits for it...")
        self.start: float | None = time.perf_counter()

    def on_step_end(self, c: Components, state: TrainState, out: StepOutput) -> None:
        if self.start is not None:
            log.info("compiled: the first step took %.1f s (trainer.compile=true)", time.perf_counter() - self.start)
            self.start = None


class MetricsLogger(Callback):
    """Writes a metrics row every `log_every` steps and at the end, and a row per validation. The row is
    the one host read of the step's loss (and gradient norm). Without a loss scaler nothing skips bad
    steps: a non-finite loss stops the run there, before the weights are poisoned further (the check reads
    only the row's loss: no extra host synchronisation)."""

    def __init__(self, writer: RunWriter, log_every: int, console: Console | None = None):
        self.writer, self.log_every, self.console = writer, log_every, console

    def on_step_end(self, c: Components, state: TrainState, out: StepOutput) -> None:
        if out.event is not None:
            self.writer.log({"step": state.step, "epoch": state.epoch, **out.event})
        if state.step % self.log_every and state.step != c.total_steps and state.stop_reason is None:
            return
        p = c.precision
        norm = out.grad_norm if out.grad_norm is not None else torch.full((), math.nan, device=c.device)
        window_loss, grad_norm = torch.stack([state.window_loss.float(), norm.float().to(c.device)]).tolist()
        applied, skipped = state.window_applied, state.window_skipped
        state.window_loss.zero_()
        state.window_applied = state.window_skipped = 0
        mean_loss = window_loss / applied if applied else math.nan
        if applied and not math.isfinite(mean_loss) and not p.scaler.enabled:
            raise Diverged(
                f"loss is {mean_loss} at step {state.step} with precision={p.mode}"
                f"{' and no loss scaling' if p.compute_dtype == torch.float16 else ''}: the run diverged. "
                f"{divergence_advice(p.compute_dtype)}; resume=auto continues from the last finite checkpoint")
        if out.applied and out.grad_norm is not None:  # this row read a gradient norm
            state.gradient_read = True
            state.gradient_seen = state.gradient_seen or (math.isfinite(grad_norm) and grad_norm > 0)
        if math.isfinite(mean_loss):
            state.train_loss = mean_loss
            state.verified_step = state.step - 1  # every loss of the window was finite: so were the weights before
        row = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": mean_loss,
            "lr": float(c.optimizer.param_groups[0]["lr"]),  # a CPU tensor in torchao's optimizers
            "loss_scale": p.loss_scale,
            "skipped": skipped,
            "skipped_total": p.skipped_steps,
            "grad_norm": grad_norm if out.applied and math.isfinite(grad_norm) else None,
        }
        self.writer.log(row)
        if self.console is not None:
            self.console.row(row)

    def on_validation_end(self, c: Components, state: TrainState, metrics: dict) -> None:
        self.writer.log({"step": state.step, "epoch": state.epoch, **metrics})
        log.info("step %d  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), state.step)
        run_dir = self.writer.run_dir if self.writer.enabled else None
        with c.precision.autocast():
            c.task.after_validation(c.base_model, run_dir, state.step)
