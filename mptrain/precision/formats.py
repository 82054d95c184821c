"""Number formats as data, and an exact `quantize(x)` for each.

An `Element` is a minifloat encoding (exponent and mantissa bits, bias, the largest finite value, what happens
past it). A `Format` is an element plus how it is scaled: not at all (fp32, bf16, fp16, the fp8 dtypes), per
tensor, per row, or per block of N values sharing a scale that has its own element format (the OCP MX formats:
an e8m0 power-of-two scale per 32 values; NVIDIA's nvfp4: an e4m3 scale per 16 values times one fp32 scale per
tensor).

`quantize(x)` returns, in float32, the value each element of `x` takes once stored in the format and read back.
Rounding is to nearest, ties to even, computed exactly in float32 arithmetic (scaling by powers of two, one
rounding), so it is bit-exact against PyTorch's own casts (`x.to(torch.float8_e4m3fn).float()`, ...) and, for
the block formats, against torchao's MX and NVFP4 casts (tests/test_formats.py checks both). One `quantize`
serves diagnostics, the advisor and emulated training.

Overflow follows each format: IEEE-like formats with an infinity (fp16, bf16, e5m2) round past their max to
inf; e4m3 and the MX/NV element types have none and saturate to +-max (as PyTorch's e4m3 cast and the OCP
spec's conversion do). NaN stays NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mptrain.errors import ConfigError

SCALINGS = ("none", "tensor", "row", "block")


@dataclass(frozen=True)
class Element:
    """A sign-exponent-mantissa encoding (e8m0 is the unsigned power-of-two scale of the MX formats)."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float  # the largest finite value
    overflow: str  # "inf": past max rounds to inf; "saturate": clamps to +-max
    signed: bool = True

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, 1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """The smallest positive value (e8m0 has no mantissa, so no subnormals: its smallest is 2^-bias)."""
        if self.mbits == 0:
            return math.ldexp(1.0, -self.bias)
        return math.ldexp(1.0, 1 - self.bias - self.mbits)

    @property
    def emax(self) -> int:
        """The exponent of the largest power of two the element holds (floor(log2(max)))."""
        return math.frexp(self.max)[1] - 1

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Round float32 `x` to this element, to nearest, ties to even; float32 out."""
        x = x.float()
        if self.name == "fp32":
            return x.clone()
        if self.mbits == 0:  # e8m0 (a scale, never data): the nearest power of two, ties up; 0 -> 2^-127
            m, e = torch.frexp(x.abs())
            k = torch.clamp(torch.where(m >= 0.75, e, e - 1), min=-self.bias, max=self.emax)
            k = torch.where(x == 0, -self.bias, torch.where(torch.isinf(x), self.emax, k))
            y = torch.ldexp(torch.ones_like(x), k)
            return torch.where(torch.isnan(x) | (x < 0), torch.full_like(x, math.nan), y)
        a = x.abs()
        _, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1): floor(log2 a) = e - 1, exact for subnormals too
        exp = torch.clamp(e - 1, min=1 - self.bias)  # below the normal range the step stays the subnormal one
        quantum = torch.ldexp(torch.ones_like(a), exp - self.mbits)
        y = torch.round(a / quantum) * quantum  # a / quantum is exact (power of two); round() ties to even
        if self.overflow == "saturate":
            y = torch.where(y > self.max, torch.full_like(y, self.max), y)
        else:
            y = torch.where(y > self.max, torch.full_like(y, math.inf), y)
        y = torch.where(torch.isnan(a), a, y)
        return torch.copysign(y, x)


# The elements (bias = 2^(ebits-1) - 1 throughout; the fp8/fp6/fp4 values follow the OCP MX spec v1.0 and
# the OCP 8-bit floating point spec; e4m3 is the "fn" variant: no inf, one NaN, max 448)
FP32 = Element("fp32", 8, 23, 127, torch.finfo(torch.float32).max, "inf")
BF16 = Element("bf16", 8, 7, 127, torch.finfo(torch.bfloat16).max, "inf")
FP16 = Element("fp16", 5, 10, 15, 65504.0, "inf")
E4M3 = Element("e4m3", 4, 3, 7, 448.0, "saturate")
E5M2 = Element("e5m2", 5, 2, 15, 57344.0, "inf")
E3M2 = Element("e3m2", 3, 2, 3, 28.0, "saturate")
E2M3 = Element("e2m3", 2, 3, 1, 7.5, "saturate")
E2M1 = Element("e2m1", 2, 1, 1, 6.0, "saturate")
E8M0 = Element("e8m0", 8, 0, 127, 2.0 ** 127, "saturate", signed=False)


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

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, not {self.scaling!r}")
        if (self.scaling == "block") != (self.block is not None and self.scale_element is not None):
            raise ValueError("a block-scaled format needs block and scale_element; other scalings take neither")

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
        if self.scale_element is E8M0:
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


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("fp32", FP32, torch_dtype=torch.float32, doc="IEEE single"),
    Format("bf16", BF16, torch_dtype=torch.bfloat16, doc="bfloat16: fp32's range, 8 significant bits"),
    Format("fp16", FP16, torch_dtype=torch.float16, doc="IEEE half: max 65504, needs loss scaling"),
    Format("fp8_e4m3", E4M3, torch_dtype=torch.float8_e4m3fn, doc="OCP fp8 e4m3fn, unscaled"),
    Format("fp8_e5m2", E5M2, torch_dtype=torch.float8_e5m2, doc="OCP fp8 e5m2, unscaled"),
    Format("mxfp8", E4M3, "block", 32, E8M0, doc="OCP MX: e4m3, e8m0 scale per 32"),
    Format("mxfp8_e5m2", E5M2, "block", 32, E8M0, doc="OCP MX: e5m2, e8m0 scale per 32"),
    Format("mxfp6_e2m3", E2M3, "block", 32, E8M0, doc="OCP MX: e2m3, e8m0 scale per 32"),
    Format("mxfp6_e3m2", E3M2, "block", 32, E8M0, doc="OCP MX: e3m2, e8m0 scale per 32"),
    Format("mxfp4", E2M1, "block", 32, E8M0, doc="OCP MX: e2m1, e8m0 scale per 32"),
    Format("nvfp4", E2M1, "block", 16, E4M3, tensor_scale=True,
           doc="NVIDIA: e2m1, e4m3 scale per 16, fp32 scale per tensor"),
)}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2",
           "mxfp6": "mxfp6_e2m3"}


def accepted_names(*extra: str) -> str:
    """Every name get_format takes (and `extra` ones a caller adds), for an error message: "fp32, ..., nvfp4
    (aliases: float32 = fp32, ...)"."""
    aliases = ", ".join(f"{a} = {f}" for a, f in ALIASES.items())
    return f"{', '.join([*extra, *FORMATS])} (aliases: {aliases})"


def get_format(name: str) -> Format:
    """The format called `name` (or an alias: float32, bfloat16, float16, e4m3, e5m2, mxfp6)."""
    key = ALIASES.get(name, name)
    if key not in FORMATS:
        raise ConfigError(f"unknown number format {name!r}; known: {accepted_names()}")
    return FORMATS[key]


def quantize(x: torch.Tensor, name: str) -> torch.Tensor:
    """`x` rounded as format `name` stores it (float32)."""
    return get_format(name).quantize(x)
