"""Errors a user can fix. The CLI prints these as one line (no traceback) and exits non-zero."""


class MptrainError(Exception):
    """Base class: the message names the problem and the fix."""

    exit_code = 2


class ConfigError(MptrainError, ValueError):
    """A config value is invalid or contradicts another."""


class HardwareError(MptrainError, RuntimeError):
    """The requested device or dtype is not available here."""


class TaskError(MptrainError, TypeError):
    """A task's method returned something mptrain cannot train on (docs/tasks.md, "The contract")."""


class CheckpointError(MptrainError):
    """A checkpoint cannot be read, does not fit, or cannot be written."""


class TrainingFailed(MptrainError, RuntimeError):
    """The run cannot go on (e.g. non-finite loss, loss scale at its minimum)."""

    exit_code = 1


class Diverged(TrainingFailed):
    """The training loss became inf or NaN in a run that has no loss scaler to skip such steps."""
