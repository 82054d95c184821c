"""A number format: an element and how it is scaled, with an exact `quantize(x)`.

A `Format` is an element plus its scaling: none (fp32, bf16, fp16, the fp8 dtypes), per tensor, per row, or per
block of N values sharing a scale that has its own element (the OCP MX formats: an e8m0 power-of-two scale per 32
values; NVIDIA's nvfp4: an e4m3 scale per 16 values times one fp32 scale per tensor). Beside the numbers it says
how it trains: the format of its gradients, how it executes (native, torchao, emulated) and its hardware rate.

`quantize(x)` returns, in float32, the value each element of `x` takes once stored in the format and read back,
bit-exact against PyTorch's casts and, for the block formats, against torchao's MX and NVFP4 casts
(tests/test_formats.py checks both). One `quantize` serves diagnostics, the advisor and emulated training. A
user's format may subclass `Format` and override `quantize` (int8 per row, posits, log formats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mptrain.precision.formats.element import E8M0, Element

SCALINGS = ("none", "tensor", "row", "block")
EXECUTORS = ("native", "torchao", "emulated")


@dataclass(frozen=True)
class Format:
    """An element and its scaling: none | tensor | row (an fp32 scale each) | block (`block` values share a
    scale in `scale_element`; `tensor_scale`: plus one fp32 scale per tensor, as nvfp4)."""

    name: str
    element: Element
    scaling: str = "none"
    block: int | None = None
    scale_element: Element | None = None
    tensor_scale: bool = False
    torch_dtype: torch.dtype | None = None  # PyTorch's own dtype for the element, where it has one
    doc: str = ""
    # --- how it trains (the registry's facts; every field has a default, so Format(name, element) is a format
    # that runs emulated on Linear and Conv2d layers, its gradients in itself)
    grad: Format | None = None  # the format of the module's output gradients (None: this format)
    executor: str = "emulated"  # native (PyTorch's own dtype) | torchao (Float8Linear) | emulated (quantize)
    recipe: str | None = None  # torchao's float8 recipe (executor torchao): tensorwise | rowwise | rowwise_with_gw_hp
    # the hardware's throughput class for the time model: fp32 | bf16 | fp8 | fp6 | fp4 (None: no hardware runs
    # it natively; every device emulates it)
    rate: str | None = None

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, not {self.scaling!r}")
        if (self.scaling == "block") != (self.block is not None and self.scale_element is not None):
            raise ValueError("a block-scaled format needs block and scale_element; other scalings take neither")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, not {self.executor!r}")
        if (self.executor == "torchao") != (self.recipe is not None):
            raise ValueError("a torchao format names its recipe; other executors take none")

    @property
    def grad_format(self) -> Format:
        """The format of the output gradients."""
        return self if self.grad is None else self.grad

    @property
    def bits(self) -> int:
        """Bits per element (the shared scales come on top: `bits_per_value`)."""
        return int(self.element.signed) + self.element.ebits + self.element.mbits

    @property
    def bits_per_value(self) -> float:
        if self.scaling != "block":
            return float(self.bits)
        s = self.scale_element
        return self.bits + (int(s.signed) + s.ebits + s.mbits) / self.block

    @property
    def max(self) -> float:
        return self.element.max

    @property
    def min_normal(self) -> float:
        return self.element.min_normal

    @property
    def min_subnormal(self) -> float:
        return self.element.min_subnormal

    @property
    def scaled(self) -> bool:
        return self.scaling != "none"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as stored in this format and read back, float32, same shape. Rows and blocks run along the
        last dimension; a last dimension that is not a multiple of the block is padded with zeros, which
        leave every block's maximum unchanged."""
        if self.scaling == "none":
            return self.element.quantize(x)
        x = x.float()
        if x.numel() == 0:
            return x.clone()
        if self.scaling == "tensor":
            return _amax_scaled(self.element, x, x.abs().amax())
        if self.scaling == "row":
            return _amax_scaled(self.element, x, x.abs().amax(dim=-1, keepdim=True))
        shape, last = x.shape, (x.shape[-1] if x.dim() else 1)
        flat = x.reshape(-1, last)
        pad = (-flat.shape[-1]) % self.block
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        blocks = flat.reshape(flat.shape[0], -1, self.block)
        if self.scale_element.mbits == 0:  # a power-of-two scale (e8m0): OCP MX
            out = _mx_blocks(self.element, blocks)
        else:
            out = _nv_blocks(self.element, self.scale_element, blocks, self.tensor_scale)
        out = out.reshape(flat.shape)
        if pad:
            out = out[:, :last]
        return out.reshape(shape)


def _amax_scaled(element: Element, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """torchao float8's dynamic scaling: scale = max / amax in fp32, x * scale cast (saturated), divided back."""
    scale = element.max / torch.clamp(amax.float(), min=1e-12)
    return element.quantize(torch.clamp(x * scale, -element.max, element.max)) / scale


def _mx_blocks(element: Element, blocks: torch.Tensor) -> torch.Tensor:
    """OCP MX v1.0, section 6.3: the shared scale is 2^(floor(log2(block amax)) - emax of the element),
    clamped to e8m0's range; elements are x / scale rounded to the element, saturating (e5m2 too: its
    infinity is not used inside a block, as in torchao)."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    _, e = torch.frexp(amax)
    shared = torch.clamp(e - 1 - element.emax, min=-E8M0.bias, max=E8M0.bias)
    scale = torch.ldexp(torch.ones_like(amax), shared)
    data = torch.clamp(blocks / scale, -element.max, element.max)
    out = element.quantize(data) * scale  # both by powers of two: exact
    return torch.where(torch.isfinite(amax), out, torch.full_like(out, math.nan))  # the NaN scale (0xFF)


def _nv_blocks(element: Element, scale_element: Element, blocks: torch.Tensor, tensor_scale: bool) -> torch.Tensor:
    """NVIDIA's NVFP4: an fp32 per-tensor scale amax / (448 * 6) and, per 16 values, an e4m3 scale
    (block amax / 6) / tensor scale. The arithmetic (multiply by the reciprocal, the order of the products)
    follows torchao's `nvfp4_quantize` and `NVFP4Tensor.dequantize`, and so NVIDIA's kernels, so that the
    values match bitwise."""
    block_scale = blocks.abs().amax(dim=-1, keepdim=True) / element.max
    per_tensor = torch.ones((), dtype=torch.float32)
    if tensor_scale:
        amax = blocks.abs().amax()
        if amax == 0:
            return torch.zeros_like(blocks)
        per_tensor = amax / (scale_element.max * element.max)
        block_scale = block_scale / per_tensor
    s = scale_element.quantize(torch.clamp(block_scale, min=scale_element.min_normal, max=scale_element.max))
    data = torch.clamp(blocks * ((1.0 / per_tensor) / s), -element.max, element.max)
    return element.quantize(data) * (per_tensor * s)
