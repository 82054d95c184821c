"""`mptrain-advise RUN_DIR`: from a run's gradient histograms to a precision decision (the paper's Figure 3 rule).

Reads RUN_DIR/diagnostics.jsonl (best from a short fp32 or bf16 probe run, which sees every gradient exponent),
prints the static loss scale for fp16 and the range that works, whether FP32 master weights are needed, what
fp16, bf16, fp8 e4m3 and fp8 e5m2 would lose, and the verdict with its overrides; writes RUN_DIR/advice.json.

The rule (pure functions below; docs/diagnostics.md walks through it):
- Histograms count values per binade [2^e, 2^(e+1)). Recorded values are |g| * S_run; dividing S_run out gives
  the raw exponents, so every sample of a run is comparable whatever scale it ran at.
- A scale S = 2^s works for a format when (a) the bulk of the nonzero gradients (all but TAIL of them, counted
  from the smallest) lands at or above 2^FLOOR_MARGIN times the format's smallest subnormal, and (b) the largest
  |g| observed times S stays <= the format's largest value. (a) gives s_lo, (b) gives s_hi.
  The floor margin (one binade) keeps two significant bits on the smallest kept values and leaves room for
  gradients that shrink as training goes on; the top uses the exact largest value, no margin.
- The recommended static S is the middle of [s_lo, s_hi] (rounded down): the gradients may then drift by the
  same factor either way before they underflow or overflow. Hand check: values only in binades 2^-30 .. 2^-10
  with the largest exactly 2^-10 give s_lo = -23 + 30 = 7, s_hi = 25 (2^15 <= 65504 < 2^16), S = 2^16.
- fp8 formats are judged at per-tensor scales (each tensor scaled so its largest value fits, as torchao's
  dynamic scaling does); bf16 at S = 1 (mptrain's bf16 modes use no loss scale).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import open_dict

from mptrain.diagnostics.stats import ABOVE, BELOW, EXPONENTS, INF, LOW_EXP, NAN, ZERO
from mptrain.errors import ConfigError, MptrainError
from mptrain.precision.formats import BF16, BUILTINS, FP8, FP16, FP32, Registry
from mptrain.precision.formats.builtin import FP8_E4M3, FP8_E5M2
from mptrain.precision.planner import CLEARLY_FASTER
from mptrain.run.layout import ADVICE, CONFIG, DIAGNOSTICS, OVERRIDES, SUMMARY, read_jsonl, write_json_atomic

ADVISED = "advised"  # step_times' label of the advice's own overrides
TAIL = 1e-3  # the bulk: all but this fraction of the nonzero gradients (the smallest ones)
FLOOR_MARGIN = 1  # binades the bulk must clear above the smallest subnormal
MASTER_THRESHOLD = 0.01  # more updates than this lost in 16-bit weights -> keep FP32 weights
# a layer fits a format when its shadow figures (worst over the samples) stay within these:
ERR_MAX = 0.1  # relative error of the output and of the output gradient
LOST_MAX = 0.01  # fraction of inputs (gradients) flushed to zero, and fraction saturated or overflowed
DYNAMIC_START = 16  # log2 of the dynamic scaler's default init (torch.amp.GradScaler's 2^16)
SPAN = 256  # binades -SPAN..SPAN-1 are tracked after removing the run's scale


@dataclass(frozen=True)
class Format:
    name: str
    max: float  # largest finite value
    min_normal: float
    min_subnormal: float
    scaling: str  # how mptrain would scale it: "loss" (one scale), "none", "per-tensor"

    @property
    def floor_exp(self) -> int:
        return round(math.log2(self.min_subnormal))


# the formats the gradient histograms are judged in, with the registry's numbers, and how mptrain would scale each
FORMATS = {f.name: Format(f.name, f.max, f.min_normal, f.min_subnormal, scaling) for f, scaling in (
    (FP16, "loss"), (BF16, "none"), (FP8_E4M3, "per-tensor"), (FP8_E5M2, "per-tensor"))}


class NoDiagnostics(MptrainError):
    """The directory holds no usable diagnostics."""


@dataclass
class Hist:
    """Counts of raw |g| per binade e (index e + SPAN), exact zeros, inf/nan, and the largest finite |g|."""

    counts: list[int] = field(default_factory=lambda: [0] * (2 * SPAN))
    zero: int = 0
    nonfinite: int = 0
    max_abs: float = 0.0

    @property
    def nonzero(self) -> int:
        return sum(self.counts)

    def add(self, other: Hist) -> Hist:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.zero += other.zero
        self.nonfinite += other.nonfinite
        self.max_abs = max(self.max_abs, other.max_abs)
        return self

    def binades(self):
        """(e, count) for each binade holding values, smallest first."""
        return [(i - SPAN, c) for i, c in enumerate(self.counts) if c]


def from_recorded(stat: dict, loss_scale: float) -> Hist:
    """A recorded statistic ({"hist", "headroom"} of |g| * loss_scale) as raw exponents.

    "<2^-40" counts are placed in binade -41 and ">=2^16" in binade 16 (the nearest they can be: the
    underflow they imply is a lower bound). A scale that is not a power of two is rounded to one."""
    k = round(math.log2(loss_scale))
    h = Hist()
    recorded = stat["hist"]
    for i, c in enumerate(recorded):
        if not c:
            continue
        if i in (ZERO,):
            h.zero += c
        elif i in (INF, NAN):
            h.nonfinite += c
        else:
            e = LOW_EXP - 1 if i == BELOW else EXPONENTS[-1] + 1 if i == ABOVE else EXPONENTS[i - 1]
            h.counts[min(max(e - k + SPAN, 0), 2 * SPAN - 1)] += c
    headroom = stat.get("headroom")
    if headroom is not None and h.nonzero:
        h.max_abs = 65504.0 / 2.0**headroom / loss_scale
    return h


# ---- the rule ---------------------------------------------------------------------------------------

def underflow(h: Hist, fmt: Format, s: int) -> float:
    """Fraction of the nonzero values whose whole binade lies below fmt's smallest subnormal at S = 2^s."""
    lost = sum(c for e, c in h.binades() if e + s < fmt.floor_exp)
    return lost / max(h.nonzero, 1)


def overflow(h: Hist, fmt: Format, s: int) -> float:
    """Fraction of the nonzero values whose whole binade lies above fmt's largest value at S = 2^s."""
    top = math.floor(math.log2(fmt.max))
    return sum(c for e, c in h.binades() if e + s > top) / max(h.nonzero, 1)


def s_high(max_abs: float, fmt: Format) -> int | None:
    """The largest s with max_abs * 2^s <= fmt.max (None: no values)."""
    if max_abs <= 0:
        return None
    s = math.floor(math.log2(fmt.max / max_abs))
    while max_abs * 2.0 ** (s + 1) <= fmt.max:
        s += 1
    while max_abs * 2.0**s > fmt.max:
        s -= 1
    return s


def bulk_floor(h: Hist, tail: float = TAIL) -> int | None:
    """The lowest binade of the bulk: values in binades below it are at most `tail` of the nonzero ones."""
    allowed, below = tail * h.nonzero, 0
    for e, c in h.binades():
        if below + c > allowed:
            return e
        below += c
    return None


def s_low(h: Hist, fmt: Format, tail: float = TAIL) -> int | None:
    """The smallest s that lifts the bulk to 2^FLOOR_MARGIN times fmt's smallest subnormal or above."""
    e = bulk_floor(h, tail)
    return None if e is None else fmt.floor_exp + FLOOR_MARGIN - e


def pick(s_lo: int, s_hi: int) -> int:
    """The recommended scale exponent: the middle of the workable range, rounded down."""
    return (s_lo + s_hi) // 2


def scale_plan(h: Hist, fmt: Format, s_cap: int | None = None, tail: float = TAIL) -> dict:
    """The workable range [s_lo, s_hi] of one loss scale, the pick, and what it loses.

    s_cap: an upper bound on s known from elsewhere (steps that overflowed at a recorded scale)."""
    s_lo, s_hi = s_low(h, fmt, tail), s_high(h.max_abs, fmt)
    if s_cap is not None:
        s_hi = s_cap if s_hi is None else min(s_hi, s_cap)
    if s_lo is None or s_hi is None:
        return {"s_lo": s_lo, "s_hi": s_hi, "s": 0, "workable": False, "feasible": False,
                "underflow": 0.0, "overflow": 0.0}
    workable = s_lo <= s_hi
    s = pick(s_lo, s_hi) if workable else s_hi  # out of range: the largest scale that does not overflow
    under = underflow(h, fmt, s)
    return {"s_lo": s_lo, "s_hi": s_hi, "s": s, "workable": workable, "feasible": workable or under <= tail,
            "underflow": under, "overflow": overflow(h, fmt, s)}


def per_tensor_loss(tensors: dict[str, Hist], fmt: Format) -> tuple[float, dict[str, float]]:
    """Lost fraction (underflow) when each tensor gets its own power-of-two scale that fits its largest value."""
    per, lost, total = {}, 0.0, 0
    for name, h in tensors.items():
        s = s_high(h.max_abs, fmt)
        frac = 0.0 if s is None else underflow(h, fmt, s)
        per[name] = frac
        lost += frac * h.nonzero
        total += h.nonzero
    return lost / max(total, 1), per


def update_fractions(hist: list[int]) -> dict:
    """From an update_ratio_hist: fractions of the nonzero updates below 2^-11 and 2^-8 of their weight."""
    updates = sum(hist) - hist[ZERO] - hist[NAN]
    below = lambda p: sum(hist[: p - LOW_EXP + 1])  # noqa: E731  bins "<2^-40" .. 2^(p-1)
    return {"updates": updates, FP16.name: below(-11) / max(updates, 1), BF16.name: below(-8) / max(updates, 1)}


# ---- reading a run ---------------------------------------------------------------------------------

def read_diagnostics(run_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    """(meta, sample rows with gradients, overflow rows)."""
    path = run_dir / DIAGNOSTICS
    if not path.is_file():
        raise NoDiagnostics(f"{run_dir} has no {DIAGNOSTICS}; probe it first: "
                            "mptrain precision=fp32 trainer.max_steps=50 diagnostics.every=1")
    rows = read_jsonl(path)  # a torn final line is dropped with a warning; a damaged one before it is an error
    meta = next((r for r in rows if r.get("event") == "meta"), {})
    views = [f"{r['fp16_view']} from step {r['step']}" for r in rows if r.get("event") == "fp16_view"]
    if views:  # a switch (precision.schedule, on_min=bf16) changed the view mid-run: every view, in order
        meta = {**meta, "fp16_view": ", ".join([str(meta.get("fp16_view")), *views])}
    samples = [r for r in rows if r.get("event") == "sample" and "grads" in r]
    if not samples:
        raise NoDiagnostics(f"{path} has no sampled gradients; run longer or with diagnostics.every=1")
    return meta, samples, [r for r in rows if r.get("event") == "overflow"]


def gather(samples: list[dict]) -> tuple[Hist, dict[str, Hist], list[int] | None]:
    """All samples together: the gradient population (parameter and activation gradients), per tensor
    (parameters by name, activation layers as "act:<layer>"), and the summed update-ratio histogram."""
    tensors: dict[str, Hist] = {}
    ratio = None
    for r in samples:
        scale = r.get("loss_scale") or 1.0
        parts = list(r["grads"]["params"].items()) + [(f"act:{k}", v) for k, v in r.get("activations", {}).items()]
        for name, stat in parts:
            tensors.setdefault(name, Hist()).add(from_recorded(stat, scale))
        if "update_ratio_hist" in r:
            ratio = r["update_ratio_hist"] if ratio is None else [a + b for a, b in zip(ratio, r["update_ratio_hist"])]
    overall = Hist()
    for h in tensors.values():
        overall.add(h)
    return overall, tensors, ratio


def module_ranges(samples: list[dict]) -> dict[str, dict[str, float]]:
    """Every module's largest |input|, |output|, |weight| and |output gradient| (raw) over the samples; a
    non-finite figure (recorded as null) is inf. Only modules that were recorded (runs since issue 24)."""
    out: dict[str, dict[str, float]] = {}
    for r in samples:
        for name, row in (r.get("modules") or {}).items():
            peak = out.setdefault(name, {})
            for key, v in row.items():
                peak[key] = max(peak.get(key, 0.0), math.inf if v is None else v)
    return out


def fp16_bounds(ranges: dict[str, dict[str, float]]) -> tuple[list[list], int | None, str | None]:
    """What fp16 holds: (forward offenders, the largest s the backward allows, the module that sets it).

    Forward: any input, output or weight above 65504 overflows whatever the loss scale: fp16 is not viable
    (each offender is [module, what, value], modules with parameters first, largest first). Backward: every
    output gradient times S must stay <= 65504."""
    fmt = FORMATS[FP16.name]
    bad = [[name, key, v] for name, row in ranges.items() for key in ("in", "out", "w")
           if (v := row.get(key, 0.0)) > fmt.max]
    bad.sort(key=lambda b: ("w" not in ranges[b[0]] and b[1] != "w", -b[2]))
    cap, who = None, None
    for name, row in ranges.items():
        s = s_high(row.get("grad", 0.0), fmt) if math.isfinite(row.get("grad", 0.0)) else -SPAN
        if s is not None and (cap is None or s < cap):
            cap, who = s, name
    return bad, cap, who


def shadow_figures(meta: dict, samples: list[dict]) -> dict[str, dict[str, dict]]:
    """module -> format -> the shadow figures, each the worst over the samples ("inf" -> inf; a figure never
    measured, e.g. the gradient of a layer no backward reached, stays None)."""
    fields = meta.get("shadow_fields") or ["err", "flush", "sat", "gerr", "gflush", "gsat"]
    out: dict[str, dict[str, dict]] = {}
    for r in samples:
        for module, per in (r.get("shadow") or {}).items():
            for fmt, values in per.items():
                row = out.setdefault(module, {}).setdefault(fmt, dict.fromkeys(fields))
                for key, v in zip(fields, values):
                    if v is None:
                        continue
                    v = math.inf if v == "inf" else v
                    row[key] = v if row[key] is None else max(row[key], v)
    return out


def fits(fig: dict) -> bool:
    """Within ERR_MAX and LOST_MAX, forward and backward, and a training recipe's weight gradient (wgerr) within
    ERR_MAX (a figure not measured does not count against it)."""
    limits = {"err": ERR_MAX, "gerr": ERR_MAX, "wgerr": ERR_MAX, "flush": LOST_MAX, "gflush": LOST_MAX,
              "sat": LOST_MAX, "gsat": LOST_MAX}
    return all(fig.get(k) is None or fig[k] <= lim for k, lim in limits.items())


SIXTEEN = (BF16.name, FP16.name)  # the two 16-bit formats: neither is cheaper than the other in bytes


def layer_plan(per_layer: dict[str, dict[str, dict]], fp16_viable: bool, base: str | None = None,
               registry: Registry = BUILTINS, fits: dict[str, list[str]] | None = None) -> dict[str, str]:
    """module -> the cheapest measured format that fits it (fp32 when none does; fp16 only where fp16 is viable
    for the whole run: one loss scale serves every layer). Under the verdict's 16-bit `base`, a layer leaves it
    for the other 16-bit format only where `base` was measured there and does not fit: a layer the shadow did
    not measure in `base` is covered by the whole-run verdict (a CPU probe measures only bf16; moving every
    layer to bf16 under an fp16 loss scale would leave the scale serving nothing). Cheapest is the registry's
    cost; `fits` (the diagnostics' record of the registry's module rule) drops formats a module cannot take."""
    plan = {}
    for module, per in per_layer.items():
        known = [f for f in per if f in registry or f in registry.aliases]
        can = (fits or {}).get(module)
        ok = [f for f in registry.cheapest_first(known) if per[f]["fits"] and (f != FP16.name or fp16_viable)
              and (can is None or f in can)]
        choice = ok[0] if ok else FP32.name
        if base in SIXTEEN and choice in SIXTEEN and choice != base and per.get(base, {"fits": True})["fits"]:
            choice = base
        plan[module] = choice
    return plan


def not_measured(plan: dict[str, str], per_layer: dict[str, dict[str, dict]]) -> dict[str, list[str]]:
    """module -> the formats the shadow did measure, for each module planned in a 16-bit format it did not measure
    (the verdict's, kept by layer_plan): a CPU probe measures only bf16, so an fp16 plan there rests on the
    whole-run gradient figures, not on this layer's, and the advice must say so."""
    return {m: sorted(per_layer.get(m, {})) for m, f in plan.items() if f in SIXTEEN and f not in per_layer.get(m, {})}


BASE_FORMAT = {"precision=bf16": BF16.name, "precision=static": FP16.name, "precision=dynamic": FP16.name,
               "precision=fp32": FP32.name}


def plan_override(overrides: list[str], plan: dict[str, str], fits: dict[str, list[str]] | None = None) -> list[str]:
    """The verdict's overrides plus `precision.layers` for the layers the measurements put in another format than
    the verdict's (issue 23's per-layer plans); [] when every layer stays in it. Not recommended by itself:
    verify it (mptrain-advise --verify --overrides ...). A module that cannot take the verdict's format at all
    (`fits`: a norm under bf16 autocast computes fp32 whatever the rule) needs no rule."""
    base = next((BASE_FORMAT[o] for o in overrides if o in BASE_FORMAT), None)
    takes_base = lambda m: fits is None or m not in fits or base in fits[m]  # noqa: E731
    other = {m: f for m, f in plan.items() if base is not None and f != base and m != "(model)" and takes_base(m)}
    if not other:
        return []
    return [*overrides, "precision.layers={" + ", ".join(f"{m}: {f}" for m, f in other.items()) + "}"]


def overflow_cap(events: list[dict]) -> int | None:
    """Steps skipped at scale S say S overflows: the cap is one binade below the smallest such S."""
    scales = [e["loss_scale"] for e in events if e.get("loss_scale")]
    return math.floor(math.log2(min(scales))) - 1 if scales else None


# ---- the advice ------------------------------------------------------------------------------------

def _at_risk(per: dict[str, float], top: int = 3) -> list[list]:
    worst = sorted(((v, k) for k, v in per.items() if v > TAIL), reverse=True)[:top]
    return [[k, v] for v, k in worst]


def advise(meta: dict, samples: list[dict], events: list[dict], registry: Registry = BUILTINS) -> dict:
    overall, tensors, ratio = gather(samples)
    if not overall.nonzero:
        raise NoDiagnostics("every recorded gradient is zero or non-finite, nothing to base a scale on; probe with "
                            "precision=fp32 trainer.max_steps=50 diagnostics.every=1")
    fp16 = FORMATS[FP16.name]
    ranges = module_ranges(samples)
    forward_bad, act_cap, act_who = fp16_bounds(ranges)
    event_cap = overflow_cap(events)
    caps = [c for c in (event_cap, act_cap) if c is not None]
    plan = scale_plan(overall, fp16, min(caps) if caps else None)
    formats = {}
    for name, fmt in FORMATS.items():
        if fmt.scaling == "per-tensor":
            lost, per = per_tensor_loss(tensors, fmt)
            formats[name] = {"scale": "per-tensor", "underflow": lost, "overflow": 0.0, "at_risk": _at_risk(per)}
            continue
        s = plan["s"] if fmt.scaling == "loss" else 0
        per = {k: underflow(h, fmt, s) + overflow(h, fmt, s) for k, h in tensors.items()}
        formats[name] = {"scale": 2.0**s, "underflow": underflow(overall, fmt, s),
                         "overflow": overflow(overall, fmt, s), "at_risk": _at_risk(per)}
    bounds = {"weights": s_high(overall.max_abs, fp16), "activation_gradients": act_cap, "skipped_steps": event_cap}
    top = min((k for k, v in bounds.items() if v is not None), key=lambda k: bounds[k], default=None)
    fp16_plan = {**plan, "S": 2.0 ** plan["s"], "S_lo": _pow2(plan["s_lo"]), "S_hi": _pow2(plan["s_hi"]),
                 "underflow_at_1": underflow(overall, fp16, 0), "largest_abs": overall.max_abs,
                 "s_hi_by": bounds, "top_set_by": act_who if top == "activation_gradients" else top,
                 "largest_activation_grad": max((r.get("grad", 0.0) for r in ranges.values()), default=None),
                 "forward_overflow": forward_bad[:5], "viable": not forward_bad,
                 "dynamic_start_overflows": plan["s_hi"] is not None and DYNAMIC_START > plan["s_hi"],
                 "dynamic_skips_at_start": max(0, DYNAMIC_START - plan["s_hi"]) if plan["s_hi"] is not None else None}
    if forward_bad:
        fp16_plan["feasible"] = fp16_plan["workable"] = False
    masters = master_figures(meta, samples, ratio)
    per_layer = shadow_figures(meta, samples)
    for per in per_layer.values():
        for fig in per.values():
            fig["fits"] = fits(fig)
    formats = {k: v for k, v in formats.items() if v["scale"] != "per-tensor"}  # fp8/MX: from the shadow rows
    verdict, overrides = decide(fp16_plan, formats)
    base = next((BASE_FORMAT[o] for o in overrides if o in BASE_FORMAT), None)
    plan_by_layer = layer_plan(per_layer, fp16_plan["viable"], base, registry, meta.get("fits"))
    for per in per_layer.values():  # JSON has no inf: a non-finite figure is written "inf" (null: not measured)
        for fig in per.values():
            fig.update({k: "inf" for k, v in fig.items() if isinstance(v, float) and math.isinf(v)})
    plan_by_layer_override = plan_override(overrides, plan_by_layer, meta.get("fits"))
    return {"probe": {"fp16_view": meta.get("fp16_view"), "samples": len(samples),
                      "steps": [samples[0]["step"], samples[-1]["step"]], "gradients": overall.nonzero,
                      "zero": overall.zero / max(overall.nonzero + overall.zero, 1), "nonfinite": overall.nonfinite,
                      "overflow_events": len(events), "precision": meta.get("precision"),
                      "weights": meta.get("weights")},
            "rule": {"tail": TAIL, "floor_margin_binades": FLOOR_MARGIN, "master_threshold": MASTER_THRESHOLD},
            FP16.name: fp16_plan, "master_weights": masters, "formats": formats,
            "per_layer": per_layer, "recommended_plan": plan_by_layer, "plan_overrides": plan_by_layer_override,
            "plan_not_measured": not_measured(plan_by_layer, per_layer),
            "thresholds": {"err": ERR_MAX, "lost": LOST_MAX},
            "verdict": verdict, "recommended_overrides": overrides}


def master_figures(meta: dict, samples: list[dict], ratio: list[int] | None) -> dict | None:
    """What 16-bit weights would lose. From fp32 weights, the histogram of applied updates tells it. From 16-bit
    weights (nomaster, bf16_pure) that histogram hides the loss: an update that rounded away is an exact zero
    and drops out. There the figures are the run's own: the mean of update_underflow (the summary's
    diag/update_underflow) and, for bf16_pure, of bf16_update.lost_nearest (diag/bf16_lost_nearest)."""
    sixteen = any(w in ("float16", "bfloat16") for w in meta.get("weights") or [])
    if ratio and not sixteen:
        return {**update_fractions(ratio), "source": "update_ratio_hist"}
    fp16_rows = [r["update_underflow"]["overall"] for r in samples if "update_underflow" in r]
    if not fp16_rows:
        return None
    bf16_rows = [b["lost_nearest"] for r in samples for b in _as_list(r.get("bf16_update")) if isinstance(b, dict)]
    return {"updates": None, FP16.name: sum(fp16_rows) / len(fp16_rows),
            BF16.name: sum(bf16_rows) / len(bf16_rows) if bf16_rows else None,
            "source": "update_underflow (16-bit weights: the run's own losses)"}


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _pow2(s: int | None) -> float | None:
    return None if s is None else 2.0**s


def scale_value(s: int) -> str:
    """2^s as a config value: an integer from 1 up, else the exact decimal."""
    return str(2**s) if s >= 0 else repr(2.0**s)


def decide(fp16: dict, formats: dict) -> tuple[str, list[str]]:
    """The verdict and the overrides that run it."""
    s = fp16["s"]
    bf16 = formats[BF16.name]
    bf16_holds = bf16["underflow"] + bf16["overflow"] <= TAIL
    if not fp16["viable"]:
        name, what, value = fp16["forward_overflow"][0]
        why = {"in": "input", "out": "output", "w": "weight"}[what]
        verdict = f"fp16 is not viable: {name}'s {why} reaches {value:.3g} > 65504 in the forward (no loss scale helps)"
        if bf16_holds:
            return verdict + "; train in bf16", ["precision=bf16"]
        return verdict + "; stay in fp32", ["precision=fp32"]
    if fp16["workable"] and fp16["s_lo"] <= 0:
        overrides = ["precision=dynamic"]
        if fp16["dynamic_start_overflows"]:
            overrides.append(f"precision.loss_scale.init={scale_value(s)}")
        if s < 0:
            overrides.append(f"precision.loss_scale.min={scale_value(s)}")
        return "fp16 is safe with dynamic loss scaling", overrides
    if fp16["feasible"]:
        # dynamic scaling started at S and never backing off below the range's floor holds wherever one static S
        # does, and follows the gradients if they drift: preferred (a static scale is the paper's ablation)
        tight = "" if fp16["workable"] else " (tight: no margin left at either end)"
        floor = max(fp16["s_lo"], min(s, 0))
        overrides = ["precision=dynamic", f"precision.loss_scale.init={scale_value(s)}",
                     f"precision.loss_scale.min={scale_value(floor)}"]
        return (f"fp16 needs a loss scale: S = 2^{s}{tight}; dynamic scaling from S, never below 2^{floor} "
                "(static S holds too)"), overrides
    if bf16_holds:
        return "fp16 cannot hold these gradients with any one loss scale: train in bf16", ["precision=bf16"]
    return "neither fp16 nor bf16 holds these gradients: stay in fp32", ["precision=fp32"]


# ---- output ---------------------------------------------------------------------------------------

def _p2(x: float | None) -> str:
    return "n/a" if x is None else f"2^{round(math.log2(x))}"


def _fig(v: float | None) -> str:
    return "   n/a" if v is None else "   inf" if v in ("inf", math.inf) else f"{v:6.2%}"


def render(advice: dict, command: str | None = None) -> list[str]:
    p, f, m = advice["probe"], advice[FP16.name], advice["master_weights"]
    lines = [f"probe: {p['samples']} sampled steps ({p['steps'][0]}..{p['steps'][1]}), {p['gradients']} nonzero "
             f"gradient values, fp16 view {p['fp16_view']}, {p['overflow_events']} skipped steps"]
    if "actual" in str(p["fp16_view"]):
        part = "" if p["fp16_view"] == "actual" else " in the steps of the actual view"
        lines.append(f"  note: this run computed in fp16{part}, so gradients it flushed to zero are not seen; "
                     "an fp32 or bf16 probe sees them all")
        if p["overflow_events"]:
            lines.append("  note: gradients that overflowed were inf and are not seen either: the top of the "
                         "range is an upper estimate")
    lines.append("fp16 loss scale")
    lines.append(f"  largest |g| observed: {f['largest_abs']:.3g}; without scaling (S=1) {f['underflow_at_1']:.2%} "
                 f"of the nonzero gradients underflow (< 2^-24)")
    lines.append(f"  workable S: {_p2(f['S_lo'])} .. {_p2(f['S_hi'])}  (bottom: all but {TAIL:.1%} of gradients "
                 f">= 2^{-24 + FLOOR_MARGIN}; top: largest |g| * S <= 65504"
                 + (", below every scale that skipped a step)" if p["overflow_events"] else ")"))
    by = f["s_hi_by"]
    lines.append(f"  top bounds: weight gradients {_p2(_pow2(by['weights']))}, activation gradients "
                 f"{_p2(_pow2(by['activation_gradients']))}, skipped steps {_p2(_pow2(by['skipped_steps']))}; "
                 f"set by {f['top_set_by']}")
    for name, what, value in f["forward_overflow"]:
        lines.append(f"  forward: {name} {dict(zip(('in', 'out', 'w'), ('input', 'output', 'weight')))[what]} "
                     f"reaches {value:.3g} > 65504: fp16 overflows whatever the loss scale")
    how = "middle of the range" if f["workable"] else "largest S without overflow; the range is empty"
    lines.append(f"  S = {_p2(f['S'])} = {scale_value(f['s'])} ({how}): {f['underflow']:.3%} would underflow, "
                 f"{f['overflow']:.3%} overflow; headroom {f['s_hi'] - f['s'] if f['s_hi'] is not None else 'n/a'} "
                 f"binades above, {f['s'] - f['s_lo'] if f['s_lo'] is not None else 'n/a'} above the floor")
    if f["dynamic_start_overflows"]:
        lines.append(
            f"  dynamic scaling from 2^{DYNAMIC_START} overflows at first: about {f['dynamic_skips_at_start']} "
            "skipped steps before it backs off into range"
        )
    else:
        lines.append(f"  dynamic scaling from 2^{DYNAMIC_START} does not overflow at first")
    lines.append("master weights")
    if m is None:
        lines.append("  no update statistics recorded (no applied sampled step)")
    else:
        need16 = (
            "lost in fp16 weights (nomaster): keep FP32 master weights"
            if m[FP16.name] > MASTER_THRESHOLD
            else "fp16 weights would keep them"
        )
        lines.append(f"  updates below 2^-11 of their weight: {m[FP16.name]:.2%}: {need16}")
        if m[BF16.name] is not None:
            need = ("lost in bf16 weights (bf16_pure, update=nearest): use update=stochastic|kahan or FP32 weights"
                    if m[BF16.name] > MASTER_THRESHOLD else "bf16 weights (bf16_pure) would keep them")
            lines.append(f"  updates below 2^-8 of their weight:  {m[BF16.name]:.2%}: {need}")
    lines.append("formats (lost = underflow + overflow at the format's scale; most at risk: keep in higher precision)")
    for name, r in advice["formats"].items():
        scale = r["scale"] if isinstance(r["scale"], str) else _p2(r["scale"])
        risk = ", ".join(f"{k} {v:.1%}" for k, v in r["at_risk"]) or "-"
        lines.append(f"  {name:<9} scale {scale:<10} underflow {r['underflow']:7.3%}  overflow {r['overflow']:7.3%}  "
                     f"most at risk: {risk}")
    if advice["per_layer"]:
        lines.append(f"per layer (shadow execution, worst sample; fits: error <= {ERR_MAX:g}, flushed and saturated "
                     f"<= {LOST_MAX:.0%}; forward err/flush/sat | gradient err/flush/sat)")
        for module, per in advice["per_layer"].items():
            planned = advice["recommended_plan"][module]
            unmeasured = advice.get("plan_not_measured", {}).get(module)
            if unmeasured is not None:  # kept at the verdict's format: nothing measured this layer in it
                planned += (f" (the verdict's format, not measured for this layer; measured: "
                            f"{', '.join(unmeasured) or 'nothing'})")
            lines.append(f"  {module}: planned {planned}")
            for fmt, fig in per.items():
                cells = " ".join(_fig(fig[k]) for k in ("err", "flush", "sat")) + " | " + " ".join(
                    _fig(fig[k]) for k in ("gerr", "gflush", "gsat"))
                if fig.get("wgerr") is not None:  # a training recipe's weight-gradient GEMM
                    cells += f" | wgrad {_fig(fig['wgerr']).strip()}"
                lines.append(f"    {fmt:<10} {cells}  {'fits' if fig['fits'] else 'out'}")
    else:
        lines.append("per layer: not measured (the probe ran without shadow execution: rerun it with "
                     "diagnostics.shadow=null to measure each layer in this device's formats)")
    lines.append(f"verdict: {advice['verdict']}")
    lines.append("recommended overrides:")
    lines.extend(advice["recommended_overrides"])
    if advice.get("plan_overrides"):
        lines.append("per-layer plan from the shadow figures (not verified; mptrain-advise --verify --overrides ...):")
        lines.append("  " + " ".join(shlex.quote(o) for o in advice["plan_overrides"]))
    if advice.get("rejected_overrides"):
        lines.append(
            f"  not recommended (the verification failed): {' '.join(map(shlex.quote, advice['rejected_overrides']))}"
        )
    if command:
        lines.append("run:")
        lines.append(command)
    return lines


def own_overrides(run_dir: Path) -> list[str] | None:
    """The run's own overrides, less precision, diagnostics, hydra and resume (None: not recorded)."""
    path = run_dir / OVERRIDES
    if not path.is_file():
        return None
    own = yaml.safe_load(path.read_text()) or []
    drop = ("precision", "diagnostics", "hydra", "resume")
    return [o for o in own if o.lstrip("+~").split("=")[0].split(".")[0] not in drop]


def run_command(run_dir: Path, overrides: list[str]) -> str | None:
    """`mptrain` with the run's own overrides (less precision, diagnostics, hydra, resume) plus the advice."""
    keep = own_overrides(run_dir)
    if keep is None:
        return None
    return " ".join(["mptrain", *(shlex.quote(o) for o in [*keep, *overrides])])  # pasted into a shell as it is


def step_times(run_dir: Path, options: dict[str, list[str]], repeats: int = 5) -> dict[str, float]:
    """Each option's (label -> overrides) training step time on this device, the run's own config under it: the
    components built as mptrain-estimate builds them, each warmed by two steps, then timed in interleaved rounds
    (a, b, c, a, b, c, ...: a change of load falls on each alike), the median per option. An option the run
    refuses, or a run whose config cannot be rebuilt here, is left out."""
    from mptrain.precision import timing
    from mptrain.tools import estimate
    from mptrain.train.recipe import build
    from mptrain.train.step import train_step

    own = own_overrides(run_dir)
    if own is None:
        return {}
    steps, device = {}, None
    for label, overrides in options.items():
        try:
            c = build(estimate.composed([*own, *overrides]))
        except MptrainError:
            continue
        batches = estimate.endless(c.train_loader)
        steps[label] = lambda c=c, batches=batches: train_step(c, batches, 2)
        steps[label]()  # the second warm-up step (interleaved_medians runs the first)
        device = c.device
    return timing.interleaved_medians(steps, device, repeats) if steps else {}


def fastest_here(run_here: list[str], times: dict[str, float]) -> tuple[list[str], str | None]:
    """The run: line's overrides: the advice's own, unless fp32 (which always holds) measured clearly faster here
    (then fp32, and why)."""
    if ADVISED in times and FP32.name in times and times[FP32.name] < CLEARLY_FASTER * times[ADVISED]:
        return [f"precision={FP32.name}"], (f"fp32 runs a step in {times[FP32.name] * 1e3:.3g} ms here, "
                                            f"{' '.join(run_here)} in {times[ADVISED] * 1e3:.3g} ms: fp32 is "
                                            "faster on this device, and holds")
    return run_here, None


def speed_line(times: dict[str, float], label: str) -> str | None:
    """The predicted speed of the run: line's precision against bf16's and fp32's, measured here."""
    if label not in times:
        return None
    mine = times[label]
    against = ", ".join(f"{times[k] / mine:.2f}x {k}'s speed" for k in (BF16.name, FP32.name) if k in times)
    return f"predicted here: {mine * 1e3:.3g} ms a training step ({against}; measured as mptrain-estimate does)"


FP16_PRESETS = ("dynamic", "static", "master", "noscale", "nomaster")


def run_device(run_dir: Path) -> str | None:
    """The device the probe run trained on (its summary.json), if recorded."""
    try:
        return json.loads((run_dir / SUMMARY).read_text()).get("device")
    except (OSError, ValueError, AttributeError):
        return None


def is_fp16(overrides: list[str]) -> bool:
    return any(o.startswith("precision=") and o.split("=", 1)[1] in FP16_PRESETS for o in overrides)


def device_note(overrides: list[str], device: str | None, slowdown: float | None = None) -> str | None:
    """fp16 advice for a run on a CPU: the numerics hold, but a CPU emulates float16 (several times slower)."""
    if not is_fp16(overrides) or device is None or not device.startswith("cpu"):
        return None
    measured = (f"measured here: {slowdown:.1f}x fp32's time for a Linear's forward+backward"
                if slowdown is not None else "4-15x slower than fp32 or bf16")
    return (f"fp16 numerics are safe for these gradients, but this run was on a CPU, where float16 is emulated "
            f"({measured}): it is not faster here; train in fp16 on a GPU, or use precision=bf16 "
            "(or amp, which picks bf16) on a CPU")


def fp16_slowdown_here() -> float | None:
    """fp16 autocast's forward+backward time over fp32's for a 256-wide Linear on this machine's CPU (the
    advisor's word on emulation is measured, not assumed); None where a GPU is present (the probe's CPU is not
    this one to measure)."""
    import torch

    if torch.cuda.is_available():
        return None
    from mptrain.precision import timing

    layer, x = torch.nn.Sequential(torch.nn.Linear(256, 256)), torch.randn(256, 256)

    def run(dtype):  # the forward+backward precision=auto times, under fp16 autocast or none
        return timing.forward_backward(layer, x, lambda: torch.autocast("cpu", dtype=dtype, enabled=dtype is not None))

    t = timing.interleaved_medians({FP32.name: run(None), FP16.name: run(torch.float16)}, torch.device("cpu"), 5)
    return t[FP16.name] / t[FP32.name]


def emulated_in_plan(run_dir: Path, plan: dict[str, str]) -> dict[str, float]:
    """format -> its slowdown over fp32 measured on this machine, for each format of the per-layer plan that a CPU
    emulates (the run's own formats included); {} where a GPU is present (the probe's CPU is not this one) or the
    formats cannot be built here."""
    import torch

    from mptrain.precision import Precision
    from mptrain.tools import estimate

    if torch.cuda.is_available():
        return {}
    cpu, registry = torch.device("cpu"), run_registry(run_dir)
    fmts = [f for f in dict.fromkeys(plan.values()) if f != FP32.name and f in registry
            and registry.execution(registry.get(f), cpu) == "emulated"]
    if not fmts:
        return {}
    try:
        cfg = estimate.composed([f"precision={BF16.name}"]).precision
        own = run_formats(run_dir)
        if own:
            with open_dict(cfg):
                cfg.formats = own
        return Precision(cfg, cpu).emulated_slowdown(fmts)
    except MptrainError:
        return {}


def here_overrides(advice: dict) -> list[str]:
    """On a CPU, where fp16 is emulated, what runs fastest and holds: bf16 where its figures hold, else fp32."""
    bf16 = advice["formats"][BF16.name]
    return ["precision=bf16"] if bf16["underflow"] + bf16["overflow"] <= TAIL else ["precision=fp32"]


def layers_over(run_dir: Path, fmt: str) -> list[dict]:
    """The layers of a run whose shadow figures in `fmt` exceed the thresholds the advice uses (fits)."""
    meta, samples, _ = read_diagnostics(run_dir)
    return [{"module": module, "format": fmt, **per[fmt]}
            for module, per in shadow_figures(meta, samples).items() if fmt in per and not fits(per[fmt])]


def advise_run(run_dir: Path, verify_steps: int | None = None, overrides: list[str] | None = None,
               timed: bool = False) -> tuple[dict, list[str]]:
    """Advice for one run directory; writes RUN_DIR/advice.json and returns (advice, printed lines).

    `timed`: measure the run's step time on this device in the advised precision, bf16 and fp32 (the run: line
    is then the fastest that holds, with its predicted speed-up against bf16 and fp32).

    `verify_steps`: prove the advised overrides (or `overrides`) by a trial of that many steps from the
    probe's checkpoint (tools/verify.py); a failure moves them to `rejected_overrides`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NoDiagnostics(f"{run_dir} is not a directory; pass a run directory, e.g. outputs/<date>/<time>-<id>")
    advice = advise(*read_diagnostics(run_dir), registry=run_registry(run_dir))
    advice["verified"] = None  # not tried
    trial_lines: list[str] = []
    if verify_steps is not None:
        from mptrain.tools import verify

        tried = list(overrides) if overrides else list(advice["recommended_overrides"])
        v = verify.verify(run_dir, advice, tried, layers_over, verify_steps)
        advice["verification"] = {**v, "overrides": tried}  # what the trial ran
        trial_lines = verify.render(v)
        recommended = advice["recommended_overrides"]
        if not v["verified"]:
            advice["rejected_overrides"] = tried
            if tried == recommended:
                advice["recommended_overrides"] = []
                advice["verified"] = False
            # else: other overrides failed; the recommendation itself stays unverified (None)
        else:
            advice["recommended_overrides"] = tried  # what passed (the advice's own, or --overrides)
            advice["verified"] = True
    advice["device"] = run_device(run_dir)
    recommended = advice["recommended_overrides"]
    on_cpu = advice["device"] is not None and advice["device"].startswith("cpu")
    run_here = here_overrides(advice) if on_cpu and is_fp16(recommended) else recommended
    # the run: line is what holds and runs fastest where the probe ran; fp16 advice on a CPU is for a GPU
    speed, why_fp32 = None, None
    if timed and run_here:
        options = {ADVISED: run_here, BF16.name: [f"precision={BF16.name}"], FP32.name: [f"precision={FP32.name}"]}
        if here_overrides(advice) != options[BF16.name] or run_here == options[BF16.name]:
            options.pop(BF16.name)  # bf16 does not hold here (not a choice), or is the advice itself
        times = step_times(run_dir, options)
        if run_here == [f"precision={BF16.name}"] and ADVISED in times:
            times[BF16.name] = times[ADVISED]
        advice["step_time_s"] = times
        run_here, why_fp32 = fastest_here(run_here, times)
        speed = speed_line(times, FP32.name if why_fp32 else ADVISED)
    advice["command"] = run_command(run_dir, run_here) if run_here else None
    if run_here is not recommended:
        advice["command_gpu"] = run_command(run_dir, recommended)
    slowdown = fp16_slowdown_here() if on_cpu and is_fp16(recommended) else None
    advice["fp16_slowdown_here"] = slowdown
    advice["device_note"] = device_note(recommended, advice["device"], slowdown)
    advice["emulated_slowdown_vs_fp32"] = emulated_in_plan(run_dir, advice["recommended_plan"]) if on_cpu else {}
    lines = render(advice, advice["command"]) + trial_lines
    if why_fp32:
        lines.append(f"  ({why_fp32})")
    if speed:
        lines.append(speed)
    if advice.get("command_gpu"):
        lines.append("on a GPU (fp16 is emulated on this CPU):")
        lines.append(advice["command_gpu"])
    if advice["device_note"]:
        lines.append(f"note: {advice['device_note']}")
    for fmt, x in advice["emulated_slowdown_vs_fp32"].items():
        if fmt != FP16.name:  # fp16's own note is the device note
            lines.append(f"note: {fmt} in the per-layer plan is emulated on this CPU (measured here: {x:.1f}x fp32's "
                         "time for a 256-wide Linear's forward+backward): its numerics, not its speed; it pays only "
                         "where it has kernels")
    if advice["verified"] is None:
        lines.append("not verified: mptrain-advise --verify RUN_DIR trains a short trial of these overrides first")
    write_json_atomic(run_dir / ADVICE, advice)
    return advice, lines


def run_precision(run_dir: Path) -> dict | None:
    """The run's precision config as recorded (.hydra/config.yaml); None when unreadable."""
    try:
        precision = (yaml.safe_load((run_dir / CONFIG).read_text()) or {}).get("precision") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return precision if isinstance(precision, dict) else None


def run_formats(run_dir: Path) -> dict | None:
    """The run's own precision.formats (None: none)."""
    return (run_precision(run_dir) or {}).get("formats")


def run_registry(run_dir: Path) -> Registry:
    """The formats the run could name: the built-ins plus its own precision.formats (.hydra/config.yaml)."""
    precision = run_precision(run_dir)
    if precision is None:
        return BUILTINS
    formats = precision.get("formats")
    if formats is not None and not isinstance(formats, dict):
        raise ConfigError(f"{run_dir / CONFIG}: precision.formats is {formats!r}, not a mapping of format names; "
                          "fix the recorded config or advise a run that recorded it")
    return Registry.from_config(precision.get("formats"), (precision.get(FP8.name) or {}).get("recipe"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mptrain-advise", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help=f"a run directory with {DIAGNOSTICS}")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="train a short trial of the advice from the probe's last checkpoint before recommending it",
    )
    parser.add_argument("--steps", type=int, default=None, help="steps of the --verify trial (default 50)")
    parser.add_argument("--no-time", action="store_true",
                        help="skip timing the advised precision, bf16 and fp32 on this device (a few steps each)")
    parser.add_argument("--overrides", nargs="+", default=None,
                        help="verify these overrides instead of the advised ones (implies --verify)")
    args = parser.parse_args(argv)
    steps = None
    if args.verify or args.overrides or args.steps is not None:
        from mptrain.tools.verify import DEFAULT_STEPS

        steps = args.steps if args.steps is not None else DEFAULT_STEPS
        if steps < 1:
            parser.error("--steps must be >= 1")
    try:
        advice, lines = advise_run(args.run_dir, steps, args.overrides, timed=not args.no_time)
    except MptrainError as e:
        print(f"mptrain-advise: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print("\n".join(lines))
    if advice.get("verification", {}).get("verified") is False:  # the trial failed (the advice's or --overrides)
        sys.exit(3)


if __name__ == "__main__":
    main()
