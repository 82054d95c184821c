"""Elements: sign-exponent-mantissa encodings, each with an exact round-to-nearest-even `quantize`.

Rounding is computed exactly in float32 arithmetic (scaling by powers of two, one rounding), so it is bit-exact
against PyTorch's own casts (`x.to(torch.float8_e4m3fn).float()`, ...). Overflow follows each element: IEEE-like
ones with an infinity (fp16, bf16, e5m2) round past their max to inf; e4m3 and the MX/NV element types have none
and saturate to +-max (as PyTorch's e4m3 cast and the OCP spec's conversion do). NaN stays NaN.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from mptrain.errors import ConfigError

OVERFLOWS = ("saturate", "inf")


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

    def quantize(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Round float32 `x` to this element, to nearest, ties to even; float32 out. `noise` (uniform in [0, 1),
        x's shape): round stochastically instead, up with probability equal to the fraction of the step that
        |x| lies above the grid point below it (each value lands on one of its two neighbours; unbiased)."""
        x = x.float()
        if (self.ebits, self.mbits) == (8, 23):  # float32 itself
            return x.clone()
        native = _native(self)
        if native is not None and noise is None:  # the same values as below, in one kernel (the shadow's cost); a
            # NaN stays NaN, with the sign and payload PyTorch's cast gives it (nothing here reads a NaN's bits)
            return x.to(native).float()
        return self.rounded(x, noise)

    def rounded(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """`quantize` computed in float32 arithmetic for any element (bit-exact against PyTorch's casts where
        PyTorch has the dtype: tests/test_formats.py)."""
        x = x.float()
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
        if noise is None:
            y = torch.round(a / quantum) * quantum  # a / quantum is exact (power of two); round() ties to even
        else:  # the fraction r - floor(r) is exact, so P(up) is it to within noise's resolution (2^-24)
            r = a / quantum
            low = torch.floor(r)
            y = (low + (noise < r - low).float()) * quantum
        if self.overflow == "saturate":
            y = torch.where(y > self.max, torch.full_like(y, self.max), y)
        else:
            y = torch.where(y > self.max, torch.full_like(y, math.inf), y)
        y = torch.where(torch.isnan(a), a, y)
        return torch.copysign(y, x)


@functools.cache
def _native(e: Element) -> torch.dtype | None:
    """PyTorch's dtype of exactly this encoding (its cast rounds to nearest even and overflows as `e` does)."""
    for dtype, (ebits, mbits, overflow) in NATIVE.items():
        if (e.ebits, e.mbits, e.overflow) == (ebits, mbits, overflow) and e.bias == (1 << (ebits - 1)) - 1 \
                and e.max == torch.finfo(dtype).max:
            return dtype
    return None


def default_max(ebits: int, mbits: int, bias: int, overflow: str) -> float:
    """The largest finite value when none is given: OCP's rule for `saturate` (every exponent code holds finite
    values: e2m1 6, e3m2 28, e2m3 7.5), IEEE's for `inf` (the top exponent code is inf/NaN: fp16 65504, e5m2
    57344)."""
    top = (1 << ebits) - (1 if overflow == "saturate" else 2)
    return math.ldexp(2.0 - math.ldexp(1.0, -mbits), top - bias)


def element(name: str, ebits: int, mbits: int, bias: int | None = None, max: float | None = None,
            overflow: str = "saturate", signed: bool = True) -> Element:
    """An Element with the documented defaults: bias 2^(ebits-1) - 1, max by `default_max`; checked (ConfigError)."""
    if not (isinstance(ebits, int) and isinstance(mbits, int) and 1 <= ebits <= 8 and 0 <= mbits <= 23):
        raise ConfigError(f"element {name!r}: ebits must be an integer in [1, 8] and mbits in [0, 23] "
                          f"(got ebits={ebits!r}, mbits={mbits!r})")
    if overflow not in OVERFLOWS:
        raise ConfigError(f"element {name!r}: overflow={overflow!r}; choose saturate or inf")
    bias = (1 << (ebits - 1)) - 1 if bias is None else int(bias)
    top = default_max(ebits, mbits, bias, overflow)
    max = top if max is None else float(max)
    if not 0 < max <= top:
        raise ConfigError(f"element {name!r}: max={max!r} must be positive and at most {top!r}, the largest value "
                          f"e{ebits}m{mbits} with bias {bias} can encode")
    return Element(name, ebits, mbits, bias, max, overflow, signed)


# The elements (bias = 2^(ebits-1) - 1 throughout; the fp8/fp6/fp4 values follow the OCP MX spec v1.0 and the OCP
# 8-bit floating point spec; e4m3 is the "fn" variant: no inf, one NaN, so its max is 448, not OCP's rule's 480)
FP32 = Element("fp32", 8, 23, 127, torch.finfo(torch.float32).max, "inf")
BF16 = Element("bf16", 8, 7, 127, torch.finfo(torch.bfloat16).max, "inf")
FP16 = Element("fp16", 5, 10, 15, 65504.0, "inf")
E4M3 = Element("e4m3", 4, 3, 7, 448.0, "saturate")
E5M2 = Element("e5m2", 5, 2, 15, 57344.0, "inf")
E3M2 = Element("e3m2", 3, 2, 3, 28.0, "saturate")
E2M3 = Element("e2m3", 2, 3, 1, 7.5, "saturate")
E2M1 = Element("e2m1", 2, 1, 1, 6.0, "saturate")
E8M0 = Element("e8m0", 8, 0, 127, 2.0 ** 127, "saturate", signed=False)
# PyTorch's own dtypes of the same encodings (`_native`): e4m3fn's cast saturates, as E4M3 does
NATIVE = {torch.bfloat16: (8, 7, "inf"), torch.float16: (5, 10, "inf"), torch.float8_e4m3fn: (4, 3, "saturate"),
          torch.float8_e5m2: (5, 2, "inf")}
ELEMENTS = {e.name: e for e in (FP32, BF16, FP16, E4M3, E5M2, E3M2, E2M3, E2M1, E8M0)}
