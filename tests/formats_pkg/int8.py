"""int8 with one scale per row: not a minifloat, so a Format subclass with its own quantize."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mptrain.precision.formats import Element, Format


@dataclass(frozen=True)
class Int8Row(Format):
    """Symmetric int8, scale = row amax / 127, round half to even."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.dim() == 0 or x.numel() == 0:
            return x.clone()
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
        return torch.round(x / scale).clamp(-127, 127) * scale


def int8_row(name: str = "int8_row") -> Int8Row:
    # the element says 8 bits per value (sign + 7); its range is the scaled grid's
    return Int8Row(name, Element("int8", 0, 7, 0, 127.0, "saturate"), scaling="row", doc="int8, a scale per row")
