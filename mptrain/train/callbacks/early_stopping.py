"""trainer.early_stopping: stop when the monitored validation metric has not improved by more than min_delta
for `patience` validations in a row (Lightning's and Keras's rule). The count lives in TrainState, so a
resumed run stops where the straight run would.

The state also keeps every validation's metrics (`history`), so that a resume under another rule (patience,
min_delta, monitor, mode; or early stopping turned off) replays the run's own validations under that rule: the
run continues if the new rule would not have stopped it, and is finished where it still says stop."""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig

from mptrain.train.components import Components
from mptrain.train.loop import Callback
from mptrain.train.state import TrainState

log = logging.getLogger("mptrain")

PREFIX = "early_stopping:"  # how every stop_reason this rule writes begins


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


def stopped_early(state: TrainState) -> bool:
    return state.stop_reason is not None and state.stop_reason.startswith(PREFIX)


class EarlyStopping(Callback):
    def __init__(self, cfg: DictConfig, monitor: str, mode: str):
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, cfg.patience, cfg.min_delta

    def on_validation_end(self, c: Components, state: TrainState, metrics: dict) -> None:
        state.early_stopping.setdefault("history", []).append({"step": state.step, **metrics})
        if self._observe(state.early_stopping, state.step, metrics):
            state.stop_reason = self._reason(state.early_stopping)
            log.info("%s; stopping at step %d", state.stop_reason, state.step)

    def _observe(self, es: dict, step: int, metrics: dict) -> bool:
        """One validation under this rule; True when it says stop."""
        if self.monitor not in metrics:
            return False
        value = metrics[self.monitor]
        if improved(value, es.get("best"), self.mode, self.min_delta):
            es.update(best=value, best_step=step, bad=0)
            return False
        es["bad"] = es.get("bad", 0) + 1
        return es["bad"] >= self.patience

    def _reason(self, es: dict) -> str:
        return (f"{PREFIX} {self.monitor} did not improve by more than {self.min_delta} for {self.patience} "
                f"validations (best {es.get('best')} at step {es.get('best_step')})")

    def reconsider(self, state: TrainState) -> None:
        """On resume: the count and the stop under this rule, from the run's validations so far."""
        es = state.early_stopping
        history = es.get("history")
        if history is None:  # a checkpoint from before the history was kept: its count is all there is
            if stopped_early(state) and es.get("bad", 0) < self.patience:
                state.stop_reason = None
            return
        replayed: dict = {"history": history}
        stop_step = None
        for row in history:
            if self._observe(replayed, row["step"], row):
                stop_step = row["step"]
                break
        state.early_stopping = replayed
        was = state.stop_reason
        if stop_step is None:
            state.stop_reason = None if stopped_early(state) else was
        elif was is None or stopped_early(state):
            state.stop_reason = self._reason(replayed)
            if stop_step < state.step:  # a stricter rule than the one this run trained under
                state.stop_reason += f"; met at step {stop_step}, the run had trained to step {state.step}"
        if was is not None and state.stop_reason is None:
            log.info("trainer.early_stopping under this config no longer stops the run: it continues from step %d",
                     state.step)
