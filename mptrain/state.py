"""The training state: counters the loop advances and a checkpoint restores."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped ones count)
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps taken in the current epoch
    samples: int = 0  # training samples seen
    best_metric: float | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
