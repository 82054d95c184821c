"""The training step: one function for every task and every caller (the loop, benchmarks, tests).

    for each part (the model; a GAN's discriminator, then its generator):
        for each micro-batch: forward in the compute dtype, float32 loss, scaled backward
        precision.step: unscale once, overflow check, clip, step or skip, copy masters back
    update the loss scale once

Diagnostics, when given, hook the sampled steps only. Nothing here reads the device: the loss stays
a device tensor (the loop reads it every log_every steps); the only host synchronisation is the
precision step's overflow check, which the skip decision needs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mptrain.library.tasks import batch_size, checked_loss
from mptrain.train.components import Components

log = logging.getLogger("mptrain")


@dataclass
class StepOutput:
    applied: bool  # False when a part's step was skipped for non-finite gradients
    loss: torch.Tensor  # the step's mean training loss over micro-batches and parts, on the device
    samples: int
    grad_norm: torch.Tensor | None  # total norm of the unscaled gradients over every part, on the device
    event: dict | None = None  # something that changed the run's course (on_min=bf16's switch)


def train_step(c: Components, batches: Iterator, step_no: int, diagnostics=None,
               measure_norm: bool = False) -> StepOutput:
    """One optimizer step (per part) over `c.accumulate` micro-batches drawn from `batches`.
    `measure_norm`: also return the gradient norm (clipping measures it anyway)."""
    p, task = c.precision, c.task
    micro = [c.to_device(next(batches)) for _ in range(c.accumulate)]
    inspect = diagnostics.begin_step(step_no) if diagnostics is not None else None
    p.begin_step(step_no, c.base_model)  # precision=auto's shadow measurement; precision.schedule's switches
    if p.params_changed:  # a switch into master weights: the optimizer updates the masters from now on
        c.rebuild_optimizer(c)
    sampled = diagnostics is not None and diagnostics.sampled(step_no)
    weight = c.loss_weight / c.accumulate
    single = len(c.parts) == 1
    model = c.model
    if sampled and hasattr(model, "_orig_mod"):
        # torch.compile: the hooks diagnostics add for this step would go stale in (or recompile) the compiled
        # graph; a sampled step runs the same modules eagerly, so its figures are those of the uncompiled model
        model = model._orig_mod
    total, applied, norms = None, True, []
    for part in c.parts:
        for i, batch in enumerate(micro):
            # DDP: all-reduce the gradients only on the last micro-batch
            sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with p.autocast():
                    loss = task.loss(model, batch) if single else task.loss(model, batch, part.name)
                loss = checked_loss(loss, task)
                p.backward(loss * weight if weight != 1.0 else loss)  # no extra op (and autograd node) when 1
            total = loss.detach() if total is None else total + loss.detach()
        rounding = sampled and p.request_update_stats(part.optimizer)  # bf16_pure: what rounding did
        result = p.step(part.optimizer, c.clip_grad_norm, inspect, params=part.params, update=False,
                        measure_norm=measure_norm)
        stats = p.update_stats(part.optimizer) if rounding else None
        if stats is not None:
            diagnostics.record("bf16_update", stats)
        applied = applied and result.applied
        if result.grad_norm is not None:  # FSDP: a DTensor norm over the shards, made whole (a collective)
            norm = result.grad_norm
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not applied and diagnostics is not None and not diagnostics.traced and p.at_min_scale:
        # an overflow at the minimum scale stops the run (on_min=raise) or switches it to bf16: name its source
        # first, while the run still computes as it did
        trace(c, micro[-1], step_no, diagnostics, "loss scale reached its minimum")
    # the loss scale advances once per iteration, whatever the number of parts (may raise LossScalingError);
    # then precision=auto plans or re-checks: a new plan takes effect from the next step
    event = p.end_step(step_no, c.base_model, not applied)
    if diagnostics is not None:
        diagnostics.end_step(step_no, applied)
        if diagnostics.should_trace():
            trace(c, micro[-1], step_no, diagnostics, f"{diagnostics.consecutive_skips} consecutive skipped steps")
    n = len(micro) * len(c.parts)
    grad_norm = norms[0] if len(norms) == 1 else torch.stack(norms).norm() if norms else None
    return StepOutput(applied, total / n if n > 1 else total, sum(batch_size(b) for b in micro), grad_norm, event)


def trace(c: Components, batch, step_no: int, diagnostics, reason: str) -> None:
    """Re-run a micro-batch with hooks to name the module where the overflow starts. Under DDP diagnostics live
    on rank 0 only, so the re-run must not reach the other ranks: it runs in no_sync (no gradient all-reduce).
    Under FSDP2 the re-run's forward and backward would all-gather and reduce-scatter outside the step, so there
    it is left out."""
    task, p = c.task, c.precision
    if c.strategy == "fsdp":
        diagnostics.traced = True  # once: say why there is no trace
        log.warning("overflow trace (%s) left out under trainer.strategy=fsdp: its re-run would start FSDP's "
                    "collectives outside the step",
                    reason)
        return

    def run_batch() -> torch.Tensor:
        with p.autocast():
            loss = task.loss(c.model, batch) if len(c.parts) == 1 else task.loss(c.model, batch, c.parts[0].name)
        return checked_loss(loss, task) * c.loss_weight

    with c.model.no_sync() if hasattr(c.model, "no_sync") else contextlib.nullcontext():
        diagnostics.run_trace(step_no, run_batch, p.backward, reason)
    c.optimizer.zero_grad(set_to_none=True)
    c.base_model.zero_grad(set_to_none=True)
