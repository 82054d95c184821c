"""Number formats: the public API for user formats (`Format`, `Element`) and the registry of every format.

    from mptrain.precision.formats import Element, Format      # define your own (docs/formats.md)
    from mptrain.precision.formats import BUILTINS, quantize   # the built-in registry; x as a format stores it
"""

from __future__ import annotations

import torch

from mptrain.precision.formats.builtin import ALIASES, BF16, FP8, FP8_RECIPES, FP8_ROW, FP16, FP32
from mptrain.precision.formats.element import E2M1, E2M3, E3M2, E4M3, E5M2, E8M0, ELEMENTS, Element, element
from mptrain.precision.formats.format import SCALINGS, Format
from mptrain.precision.formats.registry import BUILTINS, Registry, definition, user_format

FORMATS = BUILTINS  # name -> Format, the built-ins (a read-only mapping)

__all__ = [
    "ALIASES",
    "BF16",
    "BUILTINS",
    "E2M1",
    "E2M3",
    "E3M2",
    "E4M3",
    "E5M2",
    "E8M0",
    "ELEMENTS",
    "FORMATS",
    "FP8",
    "FP8_RECIPES",
    "FP8_ROW",
    "FP16",
    "FP32",
    "SCALINGS",
    "Element",
    "Format",
    "Registry",
    "accepted_names",
    "definition",
    "element",
    "get_format",
    "quantize",
    "user_format",
]


def get_format(name: str, registry: Registry | None = None) -> Format:
    """The format called `name` (or an alias) in `registry` (default: the built-ins)."""
    return (registry or BUILTINS).get(name)


def accepted_names(registry: Registry | None = None) -> str:
    return (registry or BUILTINS).accepted()


def quantize(x: torch.Tensor, name: str, registry: Registry | None = None) -> torch.Tensor:
    """`x` rounded as format `name` stores it (float32)."""
    return get_format(name, registry).quantize(x)
