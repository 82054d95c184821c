"""The interface of what runs around the training step (metric rows, the console, checkpoints, the profiler).

The loop calls every callback's methods in the order given; the recipe closes them all when the run ends,
whatever the outcome. Subclasses override what they need. (The checkpointer, one layer down in
mptrain/checkpoint, defines all three methods itself rather than import this.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mptrain.train.components import Components
    from mptrain.train.state import TrainState
    from mptrain.train.step import StepOutput


class Callback:
    def on_step_end(self, c: Components, state: TrainState, out: StepOutput) -> None:
        """After every optimizer step (counters already advanced)."""

    def on_validation_end(self, c: Components, state: TrainState, metrics: dict) -> None:
        """After a validation; `state.last_val` already holds `metrics`."""

    def close(self) -> None:
        """The run has ended (completed, interrupted or failed): release what the callback holds."""
