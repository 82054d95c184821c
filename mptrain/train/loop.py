"""The training loop and validation: free functions over ready-built components and the train state.

What happens around a step (metric rows, checkpoints, stop signals, the console) is done by callbacks,
each with the small interface of `Callback` (train/callbacks/base.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from mptrain.errors import MptrainError, TaskError
from mptrain.library.tasks import batch_size, checked_loss, checked_sums
from mptrain.parallel.distributed import sum_across_ranks
from mptrain.train.callbacks.base import Callback
from mptrain.train.components import Components
from mptrain.train.state import TrainState
from mptrain.train.step import train_step


def fit(c: Components, state: TrainState, callbacks: Sequence[Callback] = (), diagnostics=None,
        log_every: int = 10, eval_every: int | None = None) -> None:
    """Train until c.total_steps optimizer steps have been taken, continuing from `state`.
    Validation runs at the end of every epoch (or every `eval_every` steps) and at the end.

    Timing (state.train_time, summary.json's samples_per_s): the clock starts after this attempt's first step
    (torch.compile, cuDNN autotuning and allocator growth happen there), stops around validations, and the
    device is synchronised before each reading, so queued kernels count where they ran."""
    c.model.train()
    warmed_up = False  # the attempt's first step is warm-up: not timed, its samples not counted
    state.train_started = None
    while state.step < c.total_steps and state.stop_reason is None:
        # the epoch's order depends on (seed, epoch) only; skip what this epoch already trained on
        c.train_loader.sampler.set_epoch(
            state.epoch, start=state.step_in_epoch * c.accumulate * c.train_loader.batch_size
        )
        batches = iter(c.train_loader)
        epoch = state.epoch
        while state.epoch == epoch and state.step < c.total_steps and state.stop_reason is None:
            step_no = state.step + 1
            logged = step_no % log_every == 0 or step_no == c.total_steps  # a metrics row reads the grad norm
            state.memory.before_step(c.device)
            out = train_step(c, batches, step_no, diagnostics, measure_norm=logged)
            state.memory.after_step(diagnostics is not None and diagnostics.sampled(step_no))
            if out.applied:
                c.scheduler.step()  # only applied steps advance the schedule
                if c.ema is not None:  # trainer.ema: the average follows applied steps too
                    c.ema.update()
            epoch_end = state.record_step(out.applied, out.loss, out.samples, c.steps_per_epoch)
            if not warmed_up:  # the warm-up step ends here: the clock starts now
                warmed_up = True
                state.untimed_samples += out.samples
                state.train_started = _clock(c.device)
            if out.event is not None:
                state.events.append({"step": state.step, **out.event})
            scheduled = epoch_end if eval_every is None else state.step % eval_every == 0
            if c.val_loader is not None and (scheduled or state.step == c.total_steps):  # always validate the end
                state.train_time += _clock(c.device) - state.train_started  # validation is not training time
                state.train_started = None
                metrics = validate(c)
                state.last_val = {"step": state.step, **metrics}
                for cb in callbacks:
                    cb.on_validation_end(c, state, metrics)
                state.train_started = _clock(c.device)
            for cb in callbacks:
                cb.on_step_end(c, state, out)
    if state.train_started is not None:
        state.train_time += _clock(c.device) - state.train_started
    state.train_started = None


def _clock(device: torch.device) -> float:
    """The host clock once the device has finished what was queued (CUDA runs ahead of the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def validate(c: Components) -> dict:
    """The task's validation metrics over the whole validation set (and every rank): sums stay on the
    device and are read once. The global RNG is left as it was, so validation never changes training."""
    was_training = c.model.training
    c.model.eval()
    task, keys, sums = c.task, None, None
    # a task's tensor "count" stays on the device; plain numbers add up on the host (no host-to-device copy each)
    count = torch.zeros((), dtype=torch.float64, device=c.device)
    host_count = 0
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state(c.device) if c.device.type == "cuda" else None)
    for batch in c.val_loader:
        with c.precision.autocast():
            out = task.validation_sums(c.model, c.to_device(batch))
        n = out.pop("count", None) if isinstance(out, dict) else None
        n = n if n is not None else batch_size(batch)
        if isinstance(n, torch.Tensor):
            count += n.to(c.device, torch.float64).reshape(())
        else:
            host_count += n
        values = checked_sums(out, keys, task, c.device)
        if keys is None:
            keys = list(out)
            sums = torch.zeros(len(keys), dtype=torch.float64, device=c.device)
        sums += values
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], c.device)
    packed = torch.cat([sums if sums is not None else torch.zeros(0, dtype=torch.float64, device=c.device),
                        (count + host_count).reshape(1)])
    values = sum_across_ranks(packed, c.dist).tolist()  # the one host read of the validation
    totals = {**dict(zip(keys or [], values[:-1])), "count": values[-1]}
    metrics = task.validation_metrics(totals)
    c.model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


def probe_task(c: Components) -> tuple[str, ...] | None:
    """The task's contract checked on one validation batch before the run directory changes: loss() for each
    part and validation_sums()/validation_metrics(), in eval mode (no batch-norm update, no dropout), the RNG
    restored, no backward: the run trains exactly as without it. Returns the metric names (checkpoint.monitor
    is checked against them), or None where it cannot run (no validation data, several processes)."""
    if c.val_loader is None or c.dist.enabled:
        return None
    batch = next(iter(c.val_loader), None)
    if batch is None:
        return None
    was_training = c.model.training
    c.model.eval()  # first: the probe's batch is a validation batch, moved to the device as one
    task, batch = c.task, c.to_device(batch)
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state(c.device) if c.device.type == "cuda" else None)

    def call(method: str, *args):
        try:
            return getattr(task, method)(*args)
        except MptrainError:
            raise
        except Exception as e:  # the user's code: one line naming the method, not a traceback
            raise TaskError(f"task {task.name}: {method}() raised {type(e).__name__}: {e}".split("\n")[0]) from e

    try:
        with torch.enable_grad(), c.precision.autocast():
            for part in c.parts:
                checked_loss(call("loss", c.model, batch) if len(c.parts) == 1 else
                             call("loss", c.model, batch, part.name), task)
        with torch.no_grad(), c.precision.autocast():
            out = call("validation_sums", c.model, batch)
        n = out.pop("count", None) if isinstance(out, dict) else None
        values = checked_sums(out, None, task, c.device).tolist()
        totals = {**dict(zip(out, values)), "count": float(n if n is not None else batch_size(batch))}
        metrics = call("validation_metrics", totals)
        if not isinstance(metrics, dict):
            raise TaskError(f"task {task.name}: validation_metrics() returned a {type(metrics).__name__}, not a dict "
                            "of {'val/<name>': number}")
    finally:
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], c.device)
        c.model.train(was_training)
        c.base_model.zero_grad(set_to_none=True)
    return tuple(metrics)
