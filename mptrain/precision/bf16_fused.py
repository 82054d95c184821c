"""precision=bf16_pure's per-tensor update as one function for torch.compile (`compile=True` optimizers).

Each function reads a bf16 weight, its gradient and state, computes the update in fp32 as
`bf16_pure.PureBf16SGD`/`PureBf16AdamW` do (the same ops in the same order) and writes weight and state
back: compiled, that is one pass over memory instead of ~20. Results may differ from the eager update in
the last bit of an fp32 intermediate (the compiler may contract a*b+c into one rounding), so a weight can
land one bf16 ulp apart, rarely. Stochastic noise is drawn outside, by the optimizer's generator, so the
random stream is the eager one.

Scalars arrive as one float32 tensor on the weight's device: Python floats would be compiled in as
constants (a recompile whenever the learning rate or the bias correction changes).
"""

from __future__ import annotations

import functools

import torch

LOW16 = -65536  # int32 mask 0xFFFF0000: keeps sign, exponent and bf16's 7 stored mantissa bits


def write(p: torch.Tensor, p32: torch.Tensor, delta: torch.Tensor, rule: str, extra: torch.Tensor | None) -> None:
    """p <- p32 + delta rounded by `rule`; `extra`: int32 noise (stochastic) or the compensation (kahan)."""
    if rule == "nearest":
        p.copy_(p32 + delta)
    elif rule == "stochastic":
        x = p32 + delta
        rounded = ((x.view(torch.int32) + extra) & LOW16).view(torch.float32)
        p.copy_(torch.where(torch.isfinite(x), rounded, x))
    else:
        y = delta + extra.float()
        x = p32 + y
        # round to nearest even on the bits: the compiler may drop a float -> bf16 -> float round trip
        # (`new.to(bf16).float()` read as `new`), which would zero the compensation
        bits = x.view(torch.int32)
        new = ((bits + (0x7FFF + ((bits >> 16) & 1))) & LOW16).view(torch.float32)
        new = torch.where(torch.isfinite(x), new, x)
        p.copy_(new)  # exact: `new` is a bf16 value
        extra.copy_(y - (new - p32))


def adamw_update(p, g, m, v, extra, s, rule: str, decay: bool) -> None:
    """s = [1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), eps, -lr / (1 - beta1^t), -lr * weight_decay]."""
    g32 = g.float()
    m32 = m.float().lerp(g32, s[0])
    v32 = v.float() * s[1] + g32 * g32 * s[2]
    m.copy_(m32)
    v.copy_(v32)
    delta = m32 / (v32.sqrt() / s[3] + s[4]) * s[5]
    p32 = p.float()
    if decay:
        delta = delta + p32 * s[6]
    write(p, p32, delta, rule, extra)


def sgd_update(p, g, buf, extra, s, rule: str, decay: bool, nesterov: bool) -> None:
    """s = [weight_decay, momentum, -lr, buffer factor: momentum, or 0 on the first step (buf is then zeros, so
    the buffer becomes the gradient)]; `buf` None without momentum."""
    p32 = p.float()
    g32 = g.float()
    if decay:
        g32 = g32 + p32 * s[0]
    if buf is not None:
        b32 = buf.float() * s[3] + g32
        buf.copy_(b32)
        g32 = g32 + b32 * s[1] if nesterov else b32
    write(p, p32, g32 * s[2], rule, extra)


@functools.cache
def compiled(name: str):
    """The compiled update (built on first use; dynamic shapes: one graph serves every tensor size)."""
    return torch.compile({"adamw": adamw_update, "sgd": sgd_update}[name], dynamic=True)


def flat(tensors: list) -> list:
    """1-D views when every tensor is contiguous (one graph for every shape), else the tensors as they are."""
    if all(t is None or t.is_contiguous() for t in tensors):
        return [None if t is None else t.view(-1) for t in tensors]
    return tensors
