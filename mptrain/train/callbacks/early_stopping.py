"""trainer.early_stopping: stop when the monitored validation metric has not improved by more than min_delta
for `patience` validations in a row (Lightning's and Keras's rule). The count lives in TrainState, so a
resumed run stops where the straight run would."""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig

from mptrain.train.components import Components
from mptrain.train.loop import Callback
from mptrain.train.state import TrainState

log = logging.getLogger("mptrain")


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping(Callback):
    def __init__(self, cfg: DictConfig, monitor: str, mode: str):
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, cfg.patience, cfg.min_delta

    def on_validation_end(self, c: Components, state: TrainState, metrics: dict) -> None:
        if self.monitor not in metrics:
            return
        es = state.early_stopping
        value = metrics[self.monitor]
        if improved(value, es.get("best"), self.mode, self.min_delta):
            es.update(best=value, best_step=state.step, bad=0)
            return
        es["bad"] = es.get("bad", 0) + 1
        if es["bad"] >= self.patience:
            state.stop_reason = (f"early_stopping: {self.monitor} did not improve by more than {self.min_delta} for "
                                 f"{self.patience} validations (best {es.get('best')} at step {es.get('best_step')})")
            log.info("%s; stopping at step %d", state.stop_reason, state.step)
