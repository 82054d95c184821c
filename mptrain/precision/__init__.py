"""Precision: the paper's three techniques (FP32 master weights, loss scaling, FP32 accumulation)."""

from ..errors import HardwareError
from .engine import MODES, SHORT_DTYPE, Precision, StepResult, resolve_device, resolve_dtype
from .master import MasterWeights, cast_model
from .scaler import LossScaler, LossScalingError, SwitchToBF16

__all__ = [
    "MODES", "SHORT_DTYPE", "HardwareError", "LossScaler", "LossScalingError", "MasterWeights", "Precision", "StepResult",
    "SwitchToBF16", "cast_model", "resolve_device", "resolve_dtype",
]
