"""Precision diagnostics: what FP16 does to a run's gradients, weights updates and activations."""

from .collector import Diagnostics
from .stats import BIN_LABELS, EXPONENTS, range_stats, update_underflow
from .trace import trace_overflow

__all__ = ["BIN_LABELS", "EXPONENTS", "Diagnostics", "range_stats", "trace_overflow", "update_underflow"]
