"""Forward+backward time of a layer in a format on a named target GPU (formats/targets.py): a roofline model, no
hardware needed. What precision=auto's `target`, the advisor and `mptrain-estimate --target` ask.

    layer_times(linear, (8192, 4096), [BF16.name, FP8.name], "h100")   # {"bf16": 1.1e-3, "fp8": 0.8e-3}

A Linear (input M x K, weight K x N) runs three GEMMs: the output (M x K @ K x N), the input gradient
(M x N @ N x K) and the weight gradient (K x M @ M x N). Each takes max(flops / peak, bytes / bandwidth), the peak
of the slower of its two operands' rate classes, the bytes its operands in their formats plus its output in the
high-precision dtype. A scaled or low-bit format adds its cast kernels, each max(bytes / bandwidth, a launch):
  - per tensor (torchao tensorwise): an amax pass (a read, and a second tiny kernel), then one cast that writes
    both layouts for the input and the output gradient, two casts (forward, backward) for the weight;
  - per row (torchao rowwise): the transpose is materialised in high precision and cast again;
    rowwise_with_gw_hp casts once and keeps the weight-gradient GEMM in bf16;
  - per block (MX, nvfp4): one cast per layout (and an amax pass for nvfp4's tensor scale).
This is torchao's accounting (torchao/testing/training/roofline_utils.py, read, not copied; its fusion option off):
the casts read a bf16 copy, attention, norms and pointwise ops are not modeled, and GEMMs reach 78% of the peak
and memory kernels 92% of the bandwidth, the fractions torchao measured on an H100 (applied to every target, as
torchao does). tests/test_roofline.py checks the model against torchao's own functions.

A format emulated on this machine (fp8 on a CPU) is modeled at the target's native rate for its class: the time
is what the target would take, not what this run takes (`Registry.execution` says how the run executes). A
format whose class the target lacks (fp8 on an A100, fp4 on an H100) has no time there: `math.inf`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from mptrain.errors import ConfigError
from mptrain.precision.formats import BF16, BUILTINS, FP32, Format, Registry
from mptrain.precision.formats.builtin import FP8_ROW_HP
from mptrain.precision.formats.targets import TARGETS, TF32, Target

GEMM_EFFICIENCY = 0.78  # of the dense peak a large GEMM reaches (torchao's measurement on an H100)
MEMORY_EFFICIENCY = 0.92  # of the bandwidth a large pointwise kernel reaches (likewise)
LAUNCH_S = 2e-6  # the least time a kernel takes (torchao: a one-element Triton kernel on an H100)


@dataclass(frozen=True)
class Shape:
    """A layer as GEMMs: M x K @ K x N, `groups` times; `x` the input's elements per group (a Conv2d's implicit
    GEMM reads its input, not the M x K unfolding of it)."""

    M: int
    K: int
    N: int
    groups: int = 1
    x: int | None = None

    @property
    def input_numel(self) -> int:
        return self.M * self.K if self.x is None else self.x


def targets() -> list[str]:
    """The names `target` takes."""
    return list(TARGETS)


def target(name: str | Target) -> Target:
    """The target called `name`; a one-line ConfigError naming the known ones."""
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]


def shape_of(module: nn.Module, input_shape: Sequence[int]) -> Shape | None:
    """`module` as GEMMs on an input of `input_shape` (None: not modeled: only Linear and Conv2d are)."""
    if isinstance(module, nn.Linear):
        return Shape(math.prod(input_shape[:-1]), module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d) and isinstance(module.padding, tuple):
        n, _, h, w = (1, *input_shape) if len(input_shape) == 3 else input_shape
        out = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
               zip((h, w), module.padding, module.dilation, module.kernel_size, module.stride, strict=True)]
        g = module.groups
        return Shape(n * out[0] * out[1], module.in_channels // g * math.prod(module.kernel_size),
                     module.out_channels // g, g, math.prod(input_shape) // g)
    return None


def rate(fmt: Format, tf32: bool = False) -> str | None:
    """The rate class `fmt`'s GEMMs run at (None: no hardware runs it natively)."""
    return TF32 if tf32 and fmt == FP32 else fmt.rate


def why_not(fmt: Format, where: str | Target, tf32: bool = False) -> str | None:
    """Why `where` cannot run `fmt`'s GEMMs (None: it can)."""
    t, r = target(where), rate(fmt, tf32)
    if r is None:
        return f"{fmt.name} has no hardware rate: no GPU runs it natively, so no target models it"
    if r in t.peak and (fmt.grad_format == fmt or rate(fmt.grad_format) in t.peak):
        return None
    return f"{t.name} has no {r} rate (it has {', '.join(t.peak)})"


def _gemm_s(m: int, k: int, n: int, a: Format, b: Format, a_numel: int, out_numel: int, out_bytes: float,
            t: Target, tf32: bool) -> float:
    """One GEMM (m x k @ k x n): compute-bound or memory-bound, whichever is slower, at least one launch."""
    peak = min(t.peak[rate(a, tf32)], t.peak[rate(b, tf32)])
    moved = a_numel * a.bits_per_value / 8 + k * n * b.bits_per_value / 8 + out_numel * out_bytes
    return max(2 * m * k * n / (peak * GEMM_EFFICIENCY), moved / (t.bandwidth * MEMORY_EFFICIENCY), LAUNCH_S)


def cast_bytes(fmt: Format, numel: int, weight: bool, hp: float, hp_wgrad: bool = False) -> list[float]:
    """Bytes each cast kernel moves to bring one operand (`numel` values read in `hp` bytes) into `fmt`, in every
    layout the three GEMMs need (`hp_wgrad`: the weight-gradient GEMM is in bf16, so one layout); [] for a native
    format (autocast's own dtypes cast nothing here)."""
    if fmt.executor == "native":
        return []
    lp = fmt.bits_per_value / 8
    amax = [hp * numel, 0.0] if fmt.scaling == "tensor" or fmt.tensor_scale else []  # the reduction's 2 stages
    if fmt.scaling == "row":
        if hp_wgrad:  # one layout; the weight's scale made tensorwise for its transpose
            return [(hp + lp) * numel, 0.0, (hp + lp) * numel] if weight else [(hp + lp) * numel]
        if weight:  # cast, transpose in high precision, cast the transpose
            return [(hp + lp) * numel, 2 * hp * numel, (hp + lp) * numel]
        return [(2 * hp + lp) * numel, (hp + lp) * numel]  # cast + transposed copy, then cast the copy
    if fmt.scaling == "block":  # a scale per block along each layout's reduction dim: one cast per layout
        return amax + [(hp + lp) * numel] * 2
    # unscaled or one scale per tensor: activations write both layouts in one pass; the weight casts per pass
    return amax + ([(hp + lp) * numel] * 2 if weight else [(hp + 2 * lp) * numel])


def seconds(shape: Shape, fmt: Format, where: str | Target, tf32: bool = False) -> float:
    """Forward+backward seconds of a layer of `shape` in `fmt` on the target (math.inf where it lacks the rate)."""
    t = target(where)
    if why_not(fmt, t, tf32) is not None:
        return math.inf
    g, hp = fmt.grad_format, (4.0 if fmt == FP32 else BF16.bits / 8)  # what the casts read, the GEMMs write
    m, k, n, x = shape.M, shape.K, shape.N, shape.input_numel
    hp_wgrad = fmt.recipe == FP8_ROW_HP.recipe
    wa, wb = (BF16, BF16) if hp_wgrad else (fmt, g)  # the weight-gradient GEMM's operands
    gemms = (_gemm_s(m, k, n, fmt, fmt, x, m * n, hp, t, tf32)  # output = input @ weight
             + _gemm_s(m, n, k, g, fmt, m * n, x, hp, t, tf32)  # grad input = grad output @ weight^T
             + _gemm_s(k, m, n, wa, wb, x, k * n, hp, t, tf32))  # grad weight = input^T @ grad output
    kernels = (cast_bytes(fmt, x, False, hp, hp_wgrad) + cast_bytes(fmt, k * n, True, hp, hp_wgrad)
               + cast_bytes(g, m * n, False, hp, hp_wgrad))
    casts = sum(max(b / (t.bandwidth * MEMORY_EFFICIENCY), LAUNCH_S) for b in kernels)
    return shape.groups * (gemms + casts)


def layer_times(module: nn.Module, input_shape: Sequence[int], formats: Sequence[str], where: str | Target,
                registry: Registry = BUILTINS, tf32: bool = False) -> dict[str, float]:
    """Forward+backward seconds of `module` (its input of `input_shape`) in each of `formats` on the target;
    {} for a module the model does not cover (only Linear and Conv2d are), math.inf for a format the target
    lacks the rate of. `tf32`: fp32 GEMMs on tensor cores (trainer.allow_tf32)."""
    t = target(where)
    shape = shape_of(module, input_shape)
    if shape is None:
        return {}
    return {name: seconds(shape, registry.get(name), t, tf32) for name in formats}
