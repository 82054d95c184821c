"""Precision: the paper's three techniques (FP32 master weights, loss scaling, FP32 accumulation), the format
registry (formats/), the plan and its applier, the planner of precision=auto, and the same judgement for your own
loop (`mptrain.precision.measure` / `apply`, judge.py).

The names below load on first use: the subpackages (formats, plan, scaler ...) import without the engine, so that
diagnostics can use the registry while the engine uses diagnostics' shadow measurement.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "PRESETS": "families", "SHORT_DTYPE": "engine", "Precision": "engine", "StepResult": "engine",
    "resolve_device": "engine", "resolve_dtype": "engine", "HardwareError": "engine", "MasterWeights": "master",
    "cast_model": "master", "LossScaler": "scaler", "LossScalingError": "scaler", "SwitchToBF16": "scaler",
    "NoScaler": "scaler", "measure": "judge", "apply": "judge", "Report": "judge",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mptrain.precision' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mptrain.precision.{_WHERE[name]}"), name)
