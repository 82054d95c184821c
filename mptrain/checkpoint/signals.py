"""Stop signals: finish the step, checkpoint, stop (and pass the signal on, e.g. to submitit)."""

from __future__ import annotations

import logging
import signal
from typing import Any

from mptrain.errors import MptrainError

log = logging.getLogger("mptrain")


class StopSignals:
    """SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 set a flag; the loop finishes its step, checkpoints and stops.

    A second SIGINT (Ctrl-C twice) stops at once. The previous handlers come back on exit, so
    Hydra multirun jobs in the same process do not inherit them.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # USR2: submitit on SLURM

    def __init__(self) -> None:
        self.received: int | None = None
        self._saved: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        try:
            for s in self.SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals to the host program
            self._saved.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)

    def forward(self) -> None:
        """Pass the signal on to the handler that was there before (e.g. submitit's requeue on SLURM)."""
        previous = self._saved.get(self.received)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.received, None)


class Interrupted(MptrainError):
    """Stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, step: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after saving a checkpoint; "
                         "continue with resume=auto in the same run directory")
