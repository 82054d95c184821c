"""What FP16 does to a set of tensors: exponent histograms and range fractions, on the device.

All tensors of a set are concatenated once, so a handful of kernels (frexp, bincount, scatter_reduce)
cover every tensor and the overall figures together; the caller reads the result with one copy to
the host. Values are taken as FP16 would hold them at loss scale S: |x| * S.

FP16 facts used here: largest finite 65504; smallest normal 2^-14; smallest subnormal 2^-24.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
FP16_MIN_SUBNORMAL = 2.0**-24
UPDATE_RESOLUTION = 2.0**-11  # an update below |w| * 2^-11 cannot change an FP16 weight

# Histogram bins: "below" (0 < |x| < 2^-40), one bin per binade [2^e, 2^(e+1)) for e = -40..15,
# "above" (|x| >= 2^16, finite), then zero, inf and nan.
LOW_EXP, HIGH_EXP = -40, 16
EXPONENTS = list(range(LOW_EXP, HIGH_EXP))
BIN_LABELS = ["<2^-40"] + [f"2^{e}" for e in EXPONENTS] + [">=2^16", "zero", "inf", "nan"]
N_BINS = len(BIN_LABELS)
BELOW, ABOVE, ZERO, INF, NAN = 0, len(EXPONENTS) + 1, len(EXPONENTS) + 2, len(EXPONENTS) + 3, len(EXPONENTS) + 4


@dataclass
class RangeStats:
    """Per-tensor rows and the overall row of one tensor set, as plain Python numbers."""

    names: list[str]
    hist: list[list[int]]  # [tensor][bin]
    count: list[int]
    zero: list[float]
    underflow: list[float]  # 0 < |x|*S < 2^-24: FP16 flushes these to zero
    subnormal: list[float]  # 2^-24 <= |x|*S < 2^-14: kept with reduced precision
    overflow: list[float]  # |x|*S > 65504 (inf included): FP16 cannot hold these
    nonfinite: list[float]  # inf or nan already
    headroom: list[float]  # log2(65504 / max finite |x|*S); inf when all are zero
    overall: dict

    def row(self, i: int) -> dict:
        return {"hist": self.hist[i], "count": self.count[i], "zero": self.zero[i], "underflow": self.underflow[i],
                "subnormal": self.subnormal[i], "overflow": self.overflow[i], "nonfinite": self.nonfinite[i],
                "headroom": self.headroom[i]}

    def per_tensor(self) -> dict[str, dict]:
        return {name: self.row(i) for i, name in enumerate(self.names)}


def bin_index(a: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each |x| (a: float32, non-negative or inf/nan)."""
    _, exp = torch.frexp(a)  # a = m * 2^exp with m in [0.5, 1): floor(log2 a) = exp - 1
    binade = (exp - 1).clamp(LOW_EXP - 1, HIGH_EXP) - (LOW_EXP - 1)  # 0 = below, ..., ABOVE = >= 2^16
    idx = torch.where(a == 0, ZERO, binade)
    idx = torch.where(torch.isinf(a), INF, idx)
    return torch.where(torch.isnan(a), NAN, idx)


def range_stats(tensors: list[torch.Tensor], names: list[str], scale: float = 1.0) -> RangeStats:
    """Histogram and fractions of |x| * scale for each tensor and for all of them together."""
    device = tensors[0].device
    sizes = torch.tensor([t.numel() for t in tensors], device=device)
    a = torch.cat([t.detach().reshape(-1).float() for t in tensors]).abs_()
    if scale != 1.0:
        a.mul_(scale)
    n = len(tensors)
    seg = torch.repeat_interleave(torch.arange(n, device=device), sizes)
    idx = bin_index(a)
    hist = torch.bincount(seg * N_BINS + idx, minlength=n * N_BINS).view(n, N_BINS)
    over = torch.zeros(n, device=device).index_add_(0, seg, (a > FP16_MAX).float())
    finite = torch.where(torch.isfinite(a), a, torch.zeros((), device=device))
    peak = torch.zeros(n, device=device).scatter_reduce_(0, seg, finite, "amax")
    # one copy to the host for everything
    hist_h, over_h, peak_h = hist.cpu(), over.cpu(), peak.cpu()

    def fractions(h: torch.Tensor, count: float, over_count: float, max_value: float) -> dict:
        count = max(count, 1.0)
        # underflow: binades below 2^-24 (bin of 2^-25 and lower, and "below")
        under_hi = (-24) - LOW_EXP + 1  # bin index of 2^-24
        normal_lo = (-14) - LOW_EXP + 1  # bin index of 2^-14
        return {
            "zero": h[ZERO].item() / count,
            "underflow": h[:under_hi].sum().item() / count,
            "subnormal": h[under_hi:normal_lo].sum().item() / count,
            "overflow": over_count / count,
            "nonfinite": (h[INF] + h[NAN]).item() / count,
            "headroom": math.log2(FP16_MAX / max_value) if max_value > 0 else math.inf,
        }

    rows = [fractions(hist_h[i], float(sizes[i]), over_h[i].item(), peak_h[i].item()) for i in range(n)]
    total = hist_h.sum(0)
    overall = fractions(total, float(a.numel()), over_h.sum().item(), peak_h.max().item())
    overall.update(hist=total.tolist(), count=int(a.numel()))
    return RangeStats(
        names=list(names), hist=hist_h.tolist(), count=[int(s) for s in sizes.tolist()],
        zero=[r["zero"] for r in rows], underflow=[r["underflow"] for r in rows],
        subnormal=[r["subnormal"] for r in rows], overflow=[r["overflow"] for r in rows],
        nonfinite=[r["nonfinite"] for r in rows], headroom=[r["headroom"] for r in rows], overall=overall,
    )


def update_underflow(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[list[float], float]:
    """Fraction of elements whose applied update |w1 - w0| is below |w0| * 2^-11 (too small to
    change an FP16 weight), per tensor and overall."""
    small, sizes = [], []
    for w0, w1 in zip(before, after):
        w0f, w1f = w0.float(), w1.detach().float()
        small.append(((w1f - w0f).abs() < w0f.abs() * UPDATE_RESOLUTION).sum())
        sizes.append(w0.numel())
    counts = torch.stack(small).cpu().tolist()
    per = [c / max(s, 1) for c, s in zip(counts, sizes)]
    return per, sum(counts) / max(sum(sizes), 1)
