"""Debug aids around the training loop: torch.profiler over a few steps, autograd anomaly detection.

Both are off unless asked for (debug=profile, debug=anomaly); neither touches the step itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from mptrain.errors import TrainingFailed
from mptrain.run.layout import PROFILE
from mptrain.train.callbacks.base import Callback

log = logging.getLogger("mptrain")


class ProfileSteps(Callback):
    """torch.profiler over optimizer steps: skip `wait`, trace-and-discard `warmup`, record `active`.

    The recorded steps go to `<run_dir>/profile/` as a Chrome trace (TensorBoard's profiler plugin or
    https://ui.perfetto.dev open it); :meth:`close` logs the most expensive ops and writes the same
    table to `<run_dir>/profile/top_ops.txt`. Call :meth:`on_step_end` after every optimizer step.
    """

    def __init__(self, cfg, run_dir: Path | str, device: torch.device | None = None):
        self.cfg = cfg
        self.dir = Path(run_dir) / PROFILE
        self.cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
        self.steps: list[int] = []  # the optimizer steps the profiler recorded
        self._seen = 0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(
            activities=activities,
            schedule=schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(self.dir)),
            record_shapes=cfg.record_shapes,
            profile_memory=cfg.profile_memory,
            with_stack=cfg.with_stack,
        )
        self.prof.start()
        self._open = True
        log.info("profiling %d steps after %d waiting and %d warm-up steps, into %s", cfg.active, cfg.wait,
                 cfg.warmup, self.dir)

    @property
    def first(self) -> int:
        """How many steps pass before recording starts."""
        return self.cfg.wait + self.cfg.warmup

    def on_step_end(self, c, state, out=None) -> None:
        """A loop callback (mptrain.train.loop.Callback): after each optimizer step."""
        self.step(state.step)

    def step(self, step: int) -> None:
        """After optimizer step `step`: advance the profiler's schedule (a no-op once it is done)."""
        if not self._open or self._seen >= self.first + self.cfg.active:
            return
        if self._seen >= self.first:
            self.steps.append(step)
        self._seen += 1
        self.prof.step()

    def close(self) -> str | None:
        """Stop the profiler (writing a trace still being recorded) and log the top ops. Returns the table,
        or None if the run ended before any step was recorded."""
        if not self._open:
            return None
        self._open = False
        self.prof.stop()
        if not self.steps:
            log.warning("profiler: the run ended after %d steps, before the %d waiting and warm-up steps were over; "
                        "raise trainer.max_steps", self._seen, self.first)
            return None
        sort_by = self.cfg.sort_by
        if sort_by == "auto":
            sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort_by, row_limit=self.cfg.row_limit)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "top_ops.txt").write_text(table + "\n")
        log.info("profiler: steps %d-%d, top ops by %s (trace in %s):\n%s", self.steps[0], self.steps[-1], sort_by,
                 self.dir, table)
        return table


@contextlib.contextmanager
def anomaly_detection(enabled: bool) -> Iterator[None]:
    """Autograd anomaly detection while the block runs (trainer.detect_anomaly): the first backward op that
    returns NaN stops the run, naming the op; PyTorch prints the forward traceback of the op that made it."""
    if not enabled:
        yield
        return
    log.warning("autograd anomaly detection is on (trainer.detect_anomaly): training runs several times slower")
    with torch.autograd.set_detect_anomaly(True, check_nan=True):
        try:
            yield
        except RuntimeError as e:
            if "returned nan values" not in str(e):
                raise
            raise TrainingFailed(f"autograd anomaly detection: {str(e).splitlines()[0]} (the forward traceback of "
                                 "the op that made it is printed above)") from e
