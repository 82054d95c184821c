"""The checkpointer callback: when to save last.pt / step_<N>.pt / best.pt, and setting aside the checkpoints
a diverged run never verified. What a checkpoint holds is contents.py's; files.py writes and reads them."""

from __future__ import annotations

import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mptrain.checkpoint.contents import gather, rank_rngs
from mptrain.checkpoint.files import candidates, find_resumable, link_atomic, save_atomic
from mptrain.checkpoint.signals import Interrupted, StopSignals
from mptrain.config import check_monitor
from mptrain.parallel.distributed import any_rank
from mptrain.run.layout import BEST, CHECKPOINTS, DIVERGED, LAST, STEP_CKPT, STEP_CKPT_RE

log = logging.getLogger("mptrain")


DEFAULT_MONITOR = "val/acc"  # checkpoint.monitor's default: classification's metric


def pick_monitor(monitor: str | None, mode: str, reported) -> tuple[str | None, str]:
    """The metric best.pt follows, given the names a task reports. The default (val/acc) falls back to the
    task's val/loss (min) where the task has no accuracy; any other unknown name is refused."""
    if monitor is None or monitor in reported:
        return monitor, mode
    if monitor == DEFAULT_MONITOR and "val/loss" in reported:
        log.info("checkpoint.monitor: this task reports no %s; best.pt follows val/loss (min)", monitor)
        return "val/loss", "min"
    if monitor == DEFAULT_MONITOR:  # a default the user never chose: no best.pt rather than a refusal
        log.warning("checkpoint.monitor: this task reports no %s and no val/loss, so no best.pt is written; set "
                    "checkpoint.monitor to one of %s (and checkpoint.mode)", monitor, ", ".join(reported) or "none")
        return None, mode
    check_monitor(monitor, list(reported))  # raises, naming what the task reports
    return monitor, mode


class Checkpointer:
    """Saves last.pt (+ step_<N>.pt) every `every_steps` steps, every `every_epochs` epochs, at the end
    of the run and on a stop signal; best.pt whenever the monitored validation metric improves.
    checkpoint.enabled=false: only a stop signal saves, last.pt alone (an interrupted run can still resume).

    `save_sharded(c, extra, ckpt_dir, keep)` (FSDP): every rank writes its shards; given by the recipe.
    A train callback (train/callbacks/base.py's interface, every method defined: this layer sits below train)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, config: dict, signals: StopSignals, log_every: int = 1,
                 save_sharded=None, metrics: tuple[str, ...] | None = None, validated: bool = True):
        """`metrics`: the validation metrics the task declares it reports (None: known at the first validation).
        `validated`: False where the run has no validation data, so no best.pt (and nothing said about one)."""
        self.cfg, self.config, self.signals, self.log_every = cfg, config, signals, log_every
        self.save_sharded = save_sharded
        self.monitor, self.mode = cfg.monitor, cfg.mode
        self.monitor_checked = metrics is not None or not validated
        if not validated:
            self.monitor = None
        elif metrics is not None:
            self.monitor, self.mode = pick_monitor(self.monitor, self.mode, metrics)
        self.dir = Path(run_dir) / CHECKPOINTS
        self.saved: list[int] = []  # the steps of the last.pt this attempt wrote, oldest first

    def on_step_end(self, c: Any, state: Any, out: Any = None) -> None:
        cfg = self.cfg
        improved = self._update_best(state)
        stop = self.signals.received is not None
        if c.world_size > 1:
            # every rank must stop after the same step; asking the others is an all-reduce and a host sync,
            # so it happens only every log_every steps (where the loop reads the loss anyway)
            stop = state.step % self.log_every == 0 and any_rank(stop, c.dist, c.device)
        due = cfg.enabled and (
            (cfg.every_steps is not None and state.step % cfg.every_steps == 0)
            or (cfg.every_epochs is not None and state.step_in_epoch == 0 and state.epoch % cfg.every_epochs == 0)
            or state.step == c.total_steps or state.stop_reason is not None)
        saved = stop or due or (cfg.enabled and out is not None and out.event is not None)  # a change of course: save
        if saved:
            self.save(c, state)
        if improved and cfg.enabled and cfg.save_best and self.save_sharded is None:
            # decided alike on every rank: rank_rngs is a collective (the same validation improved everywhere)
            rngs = None if saved else rank_rngs(c)
            if c.is_main:
                if saved and (self.dir / LAST).is_file():  # the same contents: one file, two names
                    link_atomic(self.dir / LAST, self.dir / BEST)
                else:
                    save_atomic(gather(c, state, self.config, rngs=rngs), self.dir / BEST)
        if stop:
            raise Interrupted(self.signals.received or signal.SIGTERM, state.step)

    def on_validation_end(self, c: Any, state: Any, metrics: dict) -> None:
        if not self.monitor_checked:  # a task that does not declare its metrics: check the name now
            self.monitor, self.mode = pick_monitor(self.monitor, self.mode, metrics)
            self.monitor_checked = True

    def _update_best(self, state: Any) -> bool:
        monitor, val = self.monitor, state.last_val
        if monitor is None or val.get("step") != state.step or monitor not in val:
            return False
        value, best = val[monitor], state.best_metric
        if not all(math.isfinite(v) for k, v in val.items() if k != "step"):
            return False  # a diverged validation (any metric inf or NaN, e.g. val/loss beside val/acc) is never "best"
        if best is None or (value > best if self.mode == "max" else value < best):
            state.best_metric = value
            return True
        return False

    def save(self, c: Any, state: Any) -> None:
        rngs = rank_rngs(c)  # a collective: before rank 0 goes on alone
        if self.save_sharded is not None:  # every rank writes its shards
            path = self.save_sharded(c, gather(c, state, self.config, weights=False, rngs=rngs), self.dir,
                                     self.cfg.keep_last)
            log.info("sharded checkpoint saved at step %d: %s", state.step, path)
            return
        if not c.is_main:  # the replicas are identical: rank 0 writes
            return
        # checkpoint.enabled=false: a stop signal writes last.pt alone, and leaves step files of earlier attempts be
        step, keep = state.step, self.cfg.keep_last if self.cfg.enabled else None
        save_atomic(
            gather(c, state, self.config, rngs=rngs),
            self.dir / LAST,
            also=self.dir / STEP_CKPT.format(step) if keep else None,
        )
        self.saved.append(step)
        for old in [p for p in candidates(self.dir) if STEP_CKPT_RE.match(p.name)][keep:] if keep is not None else []:
            old.unlink(missing_ok=True)
        log.info("checkpoint saved at step %d: %s", step, self.dir / LAST)

    def set_aside_unverified(self, verified: int) -> None:
        """The run diverged: the checkpoints this attempt wrote after step `verified` hold weights whose loss
        was never seen finite (the step after one of them gave inf/NaN). Move them to checkpoints/diverged/
        (never deleted) so that resume=auto continues from the newest checkpoint that trained finitely."""
        bad = [s for s in self.saved if s > verified]
        if not bad or self.save_sharded is not None:
            return
        dest = self.dir / DIVERGED
        dest.mkdir(exist_ok=True)
        for s in bad:
            if (self.dir / STEP_CKPT.format(s)).is_file():
                os.replace(self.dir / STEP_CKPT.format(s), dest / STEP_CKPT.format(s))
        last = self.dir / LAST
        if last.is_file():
            if (dest / STEP_CKPT.format(bad[-1])).is_file():
                last.unlink()  # a hard link of the step file just moved
            else:
                os.replace(last, dest / STEP_CKPT.format(bad[-1]))
        found = find_resumable(self.dir)
        log.warning(
            "checkpoints written after step %d (steps %s) hold weights never seen to give a finite loss: moved to %s; "
            "resume=auto continues from %s",
            verified,
            ", ".join(map(str, bad)),
            dest,
            f"step {found[1]['train_state']['step']}" if found else "the start (none is left)",
        )

    def close(self) -> None:
        """Nothing to release: every save is complete when it returns."""
