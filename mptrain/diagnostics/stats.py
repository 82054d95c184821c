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


# float32 bit patterns (for non-negative floats the integer order is the numeric order)
_INF_BITS = 0x7F800000
_FP16_MAX_BITS = 0x477FE000  # 65504.0
_TWO16_BITS = 0x47800000  # 65536.0
_JUST_OVER = N_BINS  # a hidden bin: (65504, 65536), merged into 2^15 after counting overflow


def bin_index(a: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each |x| (a: float32 >= 0, or inf/nan), from the float's exponent bits.

    int32 arithmetic only: floor(log2 a) of a normal float32 is its biased exponent minus 127;
    zero and float32 subnormals (< 2^-126) have exponent bits 0 and land in "zero" / "below".
    Values in (65504, 65536) get the hidden bin _JUST_OVER so that overflow can be counted."""
    bits = a.view(torch.int32)
    idx = ((bits >> 23) - 127).clamp_(LOW_EXP - 1, HIGH_EXP).sub_(LOW_EXP - 1)
    idx.masked_fill_(bits == 0, ZERO)
    idx.masked_fill_((bits > _FP16_MAX_BITS) & (bits < _TWO16_BITS), _JUST_OVER)
    idx.masked_fill_(bits == _INF_BITS, INF)
    idx.masked_fill_(bits > _INF_BITS, NAN)
    return idx


def fold_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N_BINS + 1) raw counts -> (histogram with (65504, 65536) back in 2^15, overflow count)."""
    hist = counts[..., :N_BINS].clone()
    just_over = counts[..., _JUST_OVER]
    hist[..., ABOVE - 1] += just_over
    overflow = just_over + counts[..., ABOVE] + counts[..., INF]
    return hist, overflow


def fractions(hist: list[int], overflow: float, max_value: float) -> dict:
    """The range fractions of one histogram (hist: N_BINS counts)."""
    count = max(sum(hist), 1)
    under_hi = (-24) - LOW_EXP + 1  # bin index of [2^-24, 2^-23)
    normal_lo = (-14) - LOW_EXP + 1  # bin index of [2^-14, 2^-13)
    return {
        "zero": hist[ZERO] / count,
        "underflow": sum(hist[:under_hi]) / count,
        "subnormal": sum(hist[under_hi:normal_lo]) / count,
        "overflow": overflow / count,
        "nonfinite": (hist[INF] + hist[NAN]) / count,
        "headroom": math.log2(FP16_MAX / max_value) if max_value > 0 else math.inf,
    }


def max_finite_abs(tensors: list[torch.Tensor]) -> list[float]:
    """Largest finite |x| of each tensor: one foreach kernel; a slower pass only for tensors with inf/nan."""
    peaks = torch.stack(torch._foreach_norm([t.detach() for t in tensors], ord=math.inf)).float().cpu().tolist()
    for i, p in enumerate(peaks):
        if not math.isfinite(p):
            t = tensors[i].detach().float().abs()
            finite = t[torch.isfinite(t)]
            peaks[i] = finite.max().item() if finite.numel() else 0.0
    return peaks


def count_bins(idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Add the histogram of bin indices `idx` into `out` (int64). Unlike torch.bincount, which reads the
    largest index back to size its output, this never waits for the device."""
    idx = idx.reshape(-1).long()
    return out.scatter_add_(0, idx, torch.ones((), dtype=out.dtype, device=out.device).expand(idx.numel()))


def range_stats(tensors: list[torch.Tensor], names: list[str], scale: float = 1.0) -> RangeStats:
    """Histogram and fractions of |x| * scale for each tensor and for all of them together.

    Binned tensor by tensor into one (tensors, bins) table: the only temporary is the largest tensor's
    float32 copy (no concatenation of every gradient, no per-element tensor index kept for the run)."""
    device = tensors[0].device
    n = len(tensors)
    sizes = [t.numel() for t in tensors]
    raw = torch.zeros(n, N_BINS + 1, dtype=torch.int64, device=device)
    for i, t in enumerate(tensors):
        a = t.detach().reshape(-1).float().abs()
        if scale != 1.0:
            a.mul_(scale)
        count_bins(bin_index(a), raw[i])
    hist, over = fold_counts(raw.cpu())  # the one copy to the host
    peaks = [p * scale for p in max_finite_abs(tensors)]
    hist_l, over_l = hist.tolist(), over.tolist()
    rows = [fractions(hist_l[i], over_l[i], peaks[i]) for i in range(n)]
    total = hist.sum(0).tolist()
    overall = fractions(total, sum(over_l), max(peaks))
    overall.update(hist=total, count=int(sum(sizes)))
    return RangeStats(
        names=list(names), hist=hist_l, count=sizes,
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


def merge_overall(a: dict | None, b: dict) -> dict:
    """The overall row of two tensor sets together (a GAN step inspects its two networks in turn)."""
    if a is None:
        return b
    hist = [x + y for x, y in zip(a["hist"], b["hist"])]
    overflow = a["overflow"] * max(sum(a["hist"]), 1) + b["overflow"] * max(sum(b["hist"]), 1)
    headroom = min(a["headroom"], b["headroom"])
    peak = FP16_MAX / 2.0**headroom if math.isfinite(headroom) else 0.0
    out = fractions(hist, overflow, peak)
    out.update(hist=hist, count=a["count"] + b["count"])
    return out


def update_ratio_hist(before: list[torch.Tensor], after: list[torch.Tensor]) -> list[int]:
    """Histogram (BIN_LABELS' bins) of |w1 - w0| / |w0| over every element of the applied update.

    A 16-bit weight keeps an update only if the ratio reaches its resolution: 2^-11 for fp16 (10 mantissa
    bits), 2^-8 for bf16 (7). "zero" = no update; "inf" = an update of a weight that was 0 (always kept)."""
    ratios = torch.cat([((w1.detach().float() - w0.float()).abs_() / w0.float().abs()).reshape(-1)
                        for w0, w1 in zip(before, after)])
    counts = count_bins(bin_index(ratios), torch.zeros(N_BINS + 1, dtype=torch.int64, device=ratios.device))
    hist, _ = fold_counts(counts.cpu())
    return hist.tolist()
