"""Precision: the paper's three techniques (FP32 master weights, loss scaling, FP32 accumulation)."""

from mptrain.errors import HardwareError
from mptrain.precision.engine import SHORT_DTYPE, Precision, StepResult, resolve_device, resolve_dtype
from mptrain.precision.families import PRESETS
from mptrain.precision.master import MasterWeights, cast_model
from mptrain.precision.scaler import LossScaler, LossScalingError, SwitchToBF16

__all__ = [
    "PRESETS", "SHORT_DTYPE", "HardwareError", "LossScaler", "LossScalingError", "MasterWeights", "Precision", "StepResult",
    "SwitchToBF16", "cast_model", "resolve_device", "resolve_dtype",
]
