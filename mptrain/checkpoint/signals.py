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

    Entered before set-up: until `defer()` (called when the run directory is committed, so that a checkpoint
    and a summary can follow) a signal stops at once with `Interrupted(..., during_setup=True)`: there is
    nothing to save yet, and waiting for a step that has not begun would hold the job up.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # USR2: submitit on SLURM

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferred = False
        self._saved: dict = {}

    def defer(self) -> None:
        """From now on a signal is honoured after the current step, with a checkpoint."""
        self.deferred = True

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.deferred:
            raise Interrupted(signum, 0, during_setup=True)
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise InterruptedTwice
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
    """Stopped by a signal after saving a checkpoint (or during set-up, with nothing to save)."""

    def __init__(self, signum: int, step: int, during_setup: bool = False):
        self.signum, self.during_setup = signum, during_setup
        self.exit_code = 128 + signum
        if during_setup:
            message = (f"stopped by {signal.Signals(signum).name} during set-up, before the first step: nothing "
                       "was trained or saved; run the same command again")
        else:
            message = (f"stopped by {signal.Signals(signum).name} at step {step} after saving a checkpoint; "
                       "continue with resume=auto in the same run directory")
        super().__init__(message)


class InterruptedTwice(KeyboardInterrupt):
    """A second Ctrl-C while a stop was under way: stopped at once, without the stop checkpoint."""
