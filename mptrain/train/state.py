"""The training state: everything that changes during a run, with one state_dict() for checkpoints.

Components (model, precision, optimizers, loaders) are built once and hold none of this; a resume
rebuilds them from the config and loads this state back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch


class PeakMemory:
    """CUDA allocator peaks per kind of step: unsampled steps (training alone) and steps diagnostics sample
    (their fp32 gradient copies, histograms and parameter clones on top), so that peak_memory_mb compares
    precision modes and the diagnostics' own cost is reported beside it. Host-side allocator counters: no sync."""

    def __init__(self) -> None:
        self.train = self.sampled = self.reserved = 0
        self.device: torch.device | None = None

    def before_step(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.device = device
            torch.cuda.reset_peak_memory_stats(device)

    def after_step(self, sampled: bool) -> None:
        if self.device is None:
            return
        peak = torch.cuda.max_memory_allocated(self.device)
        if sampled:
            self.sampled = max(self.sampled, peak)
        else:
            self.train = max(self.train, peak)
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device))

    def summary(self) -> dict:
        """summary.json's figures (MiB); empty off CUDA."""
        if self.device is None:
            return {}
        mib = 2.0**20
        out = {"peak_memory_mb": round((self.train or self.sampled) / mib, 1),
               "peak_memory_kind": "cuda_max_allocated" if self.train else "cuda_max_allocated_with_diagnostics",
               "peak_memory_reserved_mb": round(self.reserved / mib, 1)}
        if self.train and self.sampled:
            out["diagnostics_memory_mb"] = round(max(self.sampled - self.train, 0) / mib, 1)
        return out


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped ones count)
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps taken in the current epoch
    samples: int = 0  # training samples seen (this rank)
    best_metric: float | None = None  # the best value of checkpoint.monitor so far
    train_loss: float = math.nan  # mean loss of the last logged window
    # seconds spent in this attempt's timed training steps (its first step and validations excluded: loop.fit),
    # and the samples of the steps left untimed (each attempt's first): wall-time bookkeeping, so kept beside the
    # checkpointed state (timing()), not in it (a resumed run must equal a straight one bit for bit)
    train_time: float = 0.0
    untimed_samples: int = 0
    past_untimed_samples: int = 0
    # the newest step whose weights were seen to give a finite loss (the next step's, read on a metrics row):
    # checkpoints after it may hold weights that already diverged. Per attempt, not checkpointed
    verified_step: int = -1
    memory: PeakMemory = field(default_factory=PeakMemory)  # this attempt's CUDA peaks (not checkpointed)
    last_val: dict = field(default_factory=dict)  # the newest validation metrics, with their "step"
    events: list = field(default_factory=list)  # things that changed the run's course (e.g. a switch to bf16)
    early_stopping: dict = field(default_factory=dict)  # trainer.early_stopping: best, best_step, bad (validations),
    # history (every validation's metrics: a resume under another rule replays them)
    stop_reason: str | None = None  # why the run ended before trainer.max_steps (early stopping)
    # a logged step applied a non-zero gradient: a run without one did not train (all skipped, or a loss that does
    # not depend on the parameters), which is not `completed`
    gradient_seen: bool = False
    gradient_read: bool = False  # a logged row read the gradient norm (an early stop may end a run before one)
    # summary.json describes the whole run: the diagnostics' sums and the time of earlier attempts (each up to the
    # checkpoint this attempt continues from) are checkpointed; the work an attempt redid is not counted twice
    diag_totals: dict = field(default_factory=dict)
    past_wall_s: float = 0.0
    past_train_s: float = 0.0
    attempt_start: float = field(default_factory=time.perf_counter)  # this attempt's start (not checkpointed)
    train_started: float | None = None  # when the current stretch of training steps began (fit), else None
    # the current logging window: the loss is summed on the device and read once per log_every steps
    window_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    window_applied: int = 0
    window_skipped: int = 0

    def to(self, device: torch.device) -> TrainState:
        self.window_loss = self.window_loss.to(device)
        return self

    def record_step(self, applied: bool, loss: torch.Tensor, samples: int, steps_per_epoch: int) -> bool:
        """Advance the counters after one optimizer step; True when it ended an epoch."""
        self.samples += samples
        if applied:
            self.window_loss += loss
            self.window_applied += 1
        else:
            self.window_skipped += 1
        self.step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "samples": self.samples,
            "best_metric": self.best_metric, "train_loss": self.train_loss,
            "last_val": dict(self.last_val), "events": [dict(e) for e in self.events],
            "window_loss": self.window_loss.detach().cpu().clone(), "window_applied": self.window_applied,
            "window_skipped": self.window_skipped, "early_stopping": dict(self.early_stopping),
            "stop_reason": self.stop_reason, "gradient_seen": self.gradient_seen, "gradient_read": self.gradient_read,
            "diag_totals": dict(self.diag_totals),
        }

    def timing(self) -> dict:
        """The run's time so far, saved beside the state (a checkpoint's `timing`): it differs between a straight
        and a resumed run, whose states are otherwise equal bit for bit."""
        return {"wall_s": self.wall_s(), "train_s": self.train_s(), "untimed_samples": self.all_untimed_samples()}

    def load_timing(self, timing: dict) -> None:
        self.past_wall_s = float(timing.get("wall_s", 0.0))
        self.past_train_s = float(timing.get("train_s", 0.0))
        self.past_untimed_samples = int(timing.get("untimed_samples", 0))

    def all_untimed_samples(self) -> int:
        """Samples of the steps train_s() leaves out (every attempt's warm-up step), over the run."""
        return self.past_untimed_samples + self.untimed_samples

    def wall_s(self) -> float:
        """Wall time of the run: earlier attempts (to their checkpoints) plus this one so far."""
        return self.past_wall_s + time.perf_counter() - self.attempt_start

    def train_s(self) -> float:
        """Time in training steps (validation excluded) over the run, as wall_s."""
        running = time.perf_counter() - self.train_started if self.train_started is not None else 0.0
        return self.past_train_s + self.train_time + running

    def load_state_dict(self, state: dict) -> None:
        device = self.window_loss.device
        for key, value in state.items():
            if key in self.__dataclass_fields__ and key not in (
                "train_time",
                "untimed_samples",
                "past_untimed_samples",
                "verified_step",
                "memory",
                "attempt_start",
                "train_started",
                "past_wall_s",
                "past_train_s",
            ):
                setattr(self, key, value)
        self.verified_step = self.step - 1  # the checkpoint's own weights are checked by the next step's loss
        self.window_loss = torch.as_tensor(self.window_loss, dtype=torch.float32).to(device)
        self.last_val = dict(self.last_val)
        self.events = [dict(e) for e in self.events]
        self.early_stopping = dict(self.early_stopping)
        self.gradient_seen = bool(state.get("gradient_seen", True))  # older checkpoints: assume it trained
        self.gradient_read = bool(state.get("gradient_read", True))
        self.diag_totals = dict(self.diag_totals)
