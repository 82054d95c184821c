"""Precision diagnostics: what FP16 does to a run's gradients, weights updates and activations."""

from mptrain.diagnostics.collector import Diagnostics
from mptrain.diagnostics.stats import BIN_LABELS, EXPONENTS, range_stats, update_underflow
from mptrain.diagnostics.trace import trace_overflow

__all__ = ["BIN_LABELS", "EXPONENTS", "Diagnostics", "range_stats", "trace_overflow", "update_underflow"]
