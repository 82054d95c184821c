"""Optional dependencies (pyproject extras): import one, or say in one line how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType

from mptrain.errors import ConfigError

TORCHAO = "fp8"  # pyproject's extra that installs torchao (named after precision=fp8, its first user)


class MissingExtra(ConfigError):
    """An optional dependency a config needs is not installed."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """`import module`, or MissingExtra naming `pip install mptrain[extra]`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs {module.split('.')[0]}: pip install mptrain[{extra}]") from None
