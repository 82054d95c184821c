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
WEIGHT_SCALINGS = ("1d", "2d")
GRAD_ROUNDINGS = ("nearest", "stochastic")


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
    # --- the training recipe (docs/precision.md "4-bit training"). At these defaults a format is plain: one
    # quantization of the input, the weight and the output gradient serves all three GEMMs. Set any of them and
    # the emulated Linear runs the three GEMMs (output, input gradient, weight gradient) each with its own
    # operands quantized along that GEMM's reduction dimension (precision/gemms.py).
    weight_scaling: str = "1d"  # 2d: block x block tiles, the same quantized weight in forward and backward
    wgrad_hadamard: int = 0  # n > 0: a random n x n Hadamard transform on both inputs of the weight-gradient GEMM
    grad_rounding: str = "nearest"  # stochastic: the gradient operands of the backward GEMMs round stochastically

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, not {self.scaling!r}")
        if (self.scaling == "block") != (self.block is not None and self.scale_element is not None):
            raise ValueError("a block-scaled format needs block and scale_element; other scalings take neither")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, not {self.executor!r}")
        if (self.executor == "torchao") != (self.recipe is not None):
            raise ValueError("a torchao format names its recipe; other executors take none")
        if self.weight_scaling not in WEIGHT_SCALINGS:
            raise ValueError(f"weight_scaling must be one of {WEIGHT_SCALINGS}, not {self.weight_scaling!r}")
        if self.weight_scaling == "2d" and self.scaling != "block":
            raise ValueError("weight_scaling=2d tiles the weight in block x block scale groups: it needs "
                             "scaling=block")
        n = self.wgrad_hadamard
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n & (n - 1):
            raise ValueError(f"wgrad_hadamard must be 0 (off) or a power of two (the transform's size), not {n!r}")
        if self.grad_rounding not in GRAD_ROUNDINGS:
            raise ValueError(f"grad_rounding must be one of {GRAD_ROUNDINGS}, not {self.grad_rounding!r}")
        if self.three_gemms and self.executor != "emulated":
            raise ValueError("weight_scaling, wgrad_hadamard and grad_rounding are emulated: executor=emulated")

    @property
    def three_gemms(self) -> bool:
        """A training recipe: each GEMM quantizes its own operands (any recipe field off its default)."""
        return self.weight_scaling != "1d" or self.wgrad_hadamard > 0 or self.grad_rounding != "nearest"

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
        return self._quantize(x, None)

    def quantize_stochastic(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`quantize` with the elements rounded stochastically, the noise drawn from `generator` (on x's
        device); the scales are computed as `quantize` computes them."""
        return self._quantize(x, generator)

    def quantize_tiles(self, w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A 2-D `w` with one scale per block x block tile (NVIDIA's 2D weight scaling): a tile is quantized as
        one block of block^2 values would be. Rows and columns are padded with zeros to whole tiles."""
        if self.scaling != "block" or w.dim() != 2:
            raise ValueError("quantize_tiles takes a 2-D tensor and a block-scaled format")
        b = self.block
        rows, cols = w.shape
        padded = torch.nn.functional.pad(w.float(), (0, (-cols) % b, 0, (-rows) % b))
        r, c = padded.shape
        tiles = padded.reshape(r // b, b, c // b, b).transpose(1, 2).reshape(1, -1, b * b)
        out = self._blocks(tiles, generator)
        return out.reshape(r // b, c // b, b, b).transpose(1, 2).reshape(r, c)[:rows, :cols]

    def _blocks(self, blocks: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.scale_element.mbits == 0:  # a power-of-two scale (e8m0): OCP MX
            return _mx_blocks(self.element, blocks, generator)
        return _nv_blocks(self.element, self.scale_element, blocks, self.tensor_scale, generator)

    def _quantize(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.scaling == "none":
            return self.element.quantize(x, _rand(x, generator))
        x = x.float()
        if x.numel() == 0:
            return x.clone()
        if self.scaling == "tensor":
            return _amax_scaled(self.element, x, x.abs().amax(), generator)
        if self.scaling == "row":
            return _amax_scaled(self.element, x, x.abs().amax(dim=-1, keepdim=True), generator)
        shape, last = x.shape, (x.shape[-1] if x.dim() else 1)
        flat = x.reshape(-1, last)
        pad = (-flat.shape[-1]) % self.block
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        blocks = flat.reshape(flat.shape[0], -1, self.block)
        out = self._blocks(blocks, generator).reshape(flat.shape)
        if pad:
            out = out[:, :last]
        return out.reshape(shape)


def _rand(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
    """Uniform [0, 1) noise of x's shape for stochastic rounding (None: round to nearest)."""
    if generator is None:
        return None
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def _amax_scaled(element: Element, x: torch.Tensor, amax: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """torchao float8's dynamic scaling: scale = max / amax in fp32, x * scale cast (saturated), divided back."""
    scale = element.max / torch.clamp(amax.float(), min=1e-12)
    data = torch.clamp(x * scale, -element.max, element.max)
    return element.quantize(data, _rand(data, generator)) / scale


def _mx_blocks(element: Element, blocks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """OCP MX v1.0, section 6.3: the shared scale is 2^(floor(log2(block amax)) - emax of the element),
    clamped to e8m0's range; elements are x / scale rounded to the element, saturating (e5m2 too: its
    infinity is not used inside a block, as in torchao)."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    _, e = torch.frexp(amax)
    shared = torch.clamp(e - 1 - element.emax, min=-E8M0.bias, max=E8M0.bias)
    scale = torch.ldexp(torch.ones_like(amax), shared)
    data = torch.clamp(blocks / scale, -element.max, element.max)
    out = element.quantize(data, _rand(data, generator)) * scale  # both by powers of two: exact
    return torch.where(torch.isfinite(amax), out, torch.full_like(out, math.nan))  # the NaN scale (0xFF)


def _nv_blocks(element: Element, scale_element: Element, blocks: torch.Tensor, tensor_scale: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
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
    return element.quantize(data, _rand(data, generator)) * (per_tensor * s)
