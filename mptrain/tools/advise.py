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
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mptrain.diagnostics.stats import ABOVE, BELOW, EXPONENTS, INF, LOW_EXP, NAN, ZERO
from mptrain.errors import MptrainError
from mptrain.run.layout import ADVICE, DIAGNOSTICS, OVERRIDES, SUMMARY, read_jsonl, write_json_atomic

TAIL = 1e-3  # the bulk: all but this fraction of the nonzero gradients (the smallest ones)
FLOOR_MARGIN = 1  # binades the bulk must clear above the smallest subnormal
MASTER_THRESHOLD = 0.01  # more updates than this lost in 16-bit weights -> keep FP32 weights
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


FORMATS = {
    "fp16": Format("fp16", 65504.0, 2.0**-14, 2.0**-24, "loss"),
    "bf16": Format("bf16", (2 - 2.0**-7) * 2.0**127, 2.0**-126, 2.0**-133, "none"),
    "fp8_e4m3": Format("fp8_e4m3", 448.0, 2.0**-6, 2.0**-9, "per-tensor"),
    "fp8_e5m2": Format("fp8_e5m2", 57344.0, 2.0**-14, 2.0**-16, "per-tensor"),
}


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
    return {"updates": updates, "fp16": below(-11) / max(updates, 1), "bf16": below(-8) / max(updates, 1)}


# ---- reading a run ---------------------------------------------------------------------------------

def read_diagnostics(run_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    """(meta, sample rows with gradients, overflow rows)."""
    path = run_dir / DIAGNOSTICS
    if not path.is_file():
        raise NoDiagnostics(f"{run_dir} has no {DIAGNOSTICS}; probe it first: "
                            "mptrain precision=fp32 trainer.max_steps=50 diagnostics.every=1")
    rows = read_jsonl(path)  # a torn final line is dropped with a warning; a damaged one before it is an error
    meta = next((r for r in rows if r.get("event") == "meta"), {})
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


def overflow_cap(events: list[dict]) -> int | None:
    """Steps skipped at scale S say S overflows: the cap is one binade below the smallest such S."""
    scales = [e["loss_scale"] for e in events if e.get("loss_scale")]
    return math.floor(math.log2(min(scales))) - 1 if scales else None


# ---- the advice ------------------------------------------------------------------------------------

def _at_risk(per: dict[str, float], top: int = 3) -> list[list]:
    worst = sorted(((v, k) for k, v in per.items() if v > TAIL), reverse=True)[:top]
    return [[k, v] for v, k in worst]


def advise(meta: dict, samples: list[dict], events: list[dict]) -> dict:
    overall, tensors, ratio = gather(samples)
    if not overall.nonzero:
        raise NoDiagnostics("every recorded gradient is zero or non-finite, nothing to base a scale on; probe with "
                            "precision=fp32 trainer.max_steps=50 diagnostics.every=1")
    fp16 = FORMATS["fp16"]
    plan = scale_plan(overall, fp16, overflow_cap(events))
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
    fp16_plan = {**plan, "S": 2.0 ** plan["s"], "S_lo": _pow2(plan["s_lo"]), "S_hi": _pow2(plan["s_hi"]),
                 "underflow_at_1": underflow(overall, fp16, 0), "largest_abs": overall.max_abs,
                 "dynamic_start_overflows": plan["s_hi"] is not None and DYNAMIC_START > plan["s_hi"],
                 "dynamic_skips_at_start": max(0, DYNAMIC_START - plan["s_hi"]) if plan["s_hi"] is not None else None}
    masters = update_fractions(ratio) if ratio else None
    if masters is None and any("update_underflow" in r for r in samples):
        fp16_only = [r["update_underflow"]["overall"] for r in samples if "update_underflow" in r]
        masters = {"updates": None, "fp16": sum(fp16_only) / len(fp16_only), "bf16": None}
    verdict, overrides = decide(fp16_plan, formats)
    return {"probe": {"fp16_view": meta.get("fp16_view"), "samples": len(samples),
                      "steps": [samples[0]["step"], samples[-1]["step"]], "gradients": overall.nonzero,
                      "zero": overall.zero / max(overall.nonzero + overall.zero, 1), "nonfinite": overall.nonfinite,
                      "overflow_events": len(events)},
            "rule": {"tail": TAIL, "floor_margin_binades": FLOOR_MARGIN, "master_threshold": MASTER_THRESHOLD},
            "fp16": fp16_plan, "master_weights": masters, "formats": formats,
            "verdict": verdict, "recommended_overrides": overrides}


def _pow2(s: int | None) -> float | None:
    return None if s is None else 2.0**s


def scale_value(s: int) -> str:
    """2^s as a config value: an integer from 1 up, else the exact decimal."""
    return str(2**s) if s >= 0 else repr(2.0**s)


def decide(fp16: dict, formats: dict) -> tuple[str, list[str]]:
    """The verdict and the overrides that run it."""
    s = fp16["s"]
    if fp16["workable"] and fp16["s_lo"] <= 0:
        overrides = ["precision=dynamic"]
        if fp16["dynamic_start_overflows"]:
            overrides.append(f"precision.loss_scale.init={scale_value(s)}")
        if s < 0:
            overrides.append(f"precision.loss_scale.min={scale_value(s)}")
        return "fp16 is safe with dynamic loss scaling", overrides
    if fp16["feasible"]:
        tight = "" if fp16["workable"] else " (tight: no margin left at either end)"
        overrides = ["precision=static", f"precision.loss_scale.init={scale_value(s)}"]
        if s < 0:
            overrides.append(f"precision.loss_scale.min={scale_value(s)}")
        return f"fp16 needs a loss scale: static S = 2^{s}{tight}", overrides
    bf16 = formats["bf16"]
    if bf16["underflow"] + bf16["overflow"] <= TAIL:
        return "fp16 cannot hold these gradients with any one loss scale: train in bf16", ["precision=bf16"]
    return "neither fp16 nor bf16 holds these gradients: stay in fp32", ["precision=fp32"]


# ---- output ---------------------------------------------------------------------------------------

def _p2(x: float | None) -> str:
    return "n/a" if x is None else f"2^{round(math.log2(x))}"


def render(advice: dict, command: str | None = None) -> list[str]:
    p, f, m = advice["probe"], advice["fp16"], advice["master_weights"]
    lines = [f"probe: {p['samples']} sampled steps ({p['steps'][0]}..{p['steps'][1]}), {p['gradients']} nonzero "
             f"gradient values, fp16 view {p['fp16_view']}, {p['overflow_events']} skipped steps"]
    if p["fp16_view"] == "actual":
        lines.append("  note: this run computed in fp16, so gradients it flushed to zero are not seen; "
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
    how = "middle of the range" if f["workable"] else "largest S without overflow; the range is empty"
    lines.append(f"  S = {_p2(f['S'])} = {scale_value(f['s'])} ({how}): {f['underflow']:.3%} would underflow, "
                 f"{f['overflow']:.3%} overflow; headroom {f['s_hi'] - f['s'] if f['s_hi'] is not None else 'n/a'} "
                 f"binades above, {f['s'] - f['s_lo'] if f['s_lo'] is not None else 'n/a'} above the floor")
    if f["dynamic_start_overflows"]:
        lines.append(f"  dynamic scaling from 2^{DYNAMIC_START} overflows at first: about {f['dynamic_skips_at_start']} "
                     "skipped steps before it backs off into range")
    else:
        lines.append(f"  dynamic scaling from 2^{DYNAMIC_START} does not overflow at first")
    lines.append("master weights")
    if m is None:
        lines.append("  no update statistics recorded (no applied sampled step)")
    else:
        need16 = "lost in fp16 weights (nomaster): keep FP32 master weights" if m["fp16"] > MASTER_THRESHOLD else "fp16 weights would keep them"
        lines.append(f"  updates below 2^-11 of their weight: {m['fp16']:.2%}: {need16}")
        if m["bf16"] is not None:
            need = ("lost in bf16 weights (bf16_pure, update=nearest): use update=stochastic|kahan or FP32 weights"
                    if m["bf16"] > MASTER_THRESHOLD else "bf16 weights (bf16_pure) would keep them")
            lines.append(f"  updates below 2^-8 of their weight:  {m['bf16']:.2%}: {need}")
    lines.append("formats (lost = underflow + overflow at the format's scale; most at risk: keep in higher precision)")
    for name, r in advice["formats"].items():
        scale = r["scale"] if isinstance(r["scale"], str) else _p2(r["scale"])
        risk = ", ".join(f"{k} {v:.1%}" for k, v in r["at_risk"]) or "-"
        lines.append(f"  {name:<9} scale {scale:<10} underflow {r['underflow']:7.3%}  overflow {r['overflow']:7.3%}  "
                     f"most at risk: {risk}")
    lines.append(f"verdict: {advice['verdict']}")
    lines.append("recommended overrides:")
    lines.extend(advice["recommended_overrides"])
    if command:
        lines.append("run:")
        lines.append(command)
    return lines


def run_command(run_dir: Path, overrides: list[str]) -> str | None:
    """`mptrain` with the run's own overrides (less precision, diagnostics, hydra, resume) plus the advice."""
    path = run_dir / OVERRIDES
    if not path.is_file():
        return None
    own = yaml.safe_load(path.read_text()) or []
    drop = ("precision", "diagnostics", "hydra", "resume")
    keep = [o for o in own if o.lstrip("+~").split("=")[0].split(".")[0] not in drop]
    return " ".join(["mptrain", *keep, *overrides])


FP16_PRESETS = ("dynamic", "static", "master", "noscale", "nomaster")


def run_device(run_dir: Path) -> str | None:
    """The device the probe run trained on (its summary.json), if recorded."""
    try:
        return json.loads((run_dir / SUMMARY).read_text()).get("device")
    except (OSError, ValueError, AttributeError):
        return None


def device_note(overrides: list[str], device: str | None) -> str | None:
    """fp16 advice for a run on a CPU: the numerics hold, but a CPU emulates float16 (several times slower)."""
    fp16 = any(o.startswith("precision=") and o.split("=", 1)[1] in FP16_PRESETS for o in overrides)
    if not fp16 or device is None or not device.startswith("cpu"):
        return None
    return ("fp16 numerics are safe for these gradients, but this run was on a CPU, where float16 is emulated "
            "(4-15x slower than fp32 or bf16): it is not faster here; train in fp16 on a GPU, or use precision=bf16 "
            "(or amp, which picks bf16) on a CPU")


def advise_run(run_dir: Path) -> tuple[dict, list[str]]:
    """Advice for one run directory; writes RUN_DIR/advice.json and returns (advice, printed lines)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NoDiagnostics(f"{run_dir} is not a directory; pass a run directory, e.g. outputs/<date>/<time>-<id>")
    advice = advise(*read_diagnostics(run_dir))
    advice["command"] = run_command(run_dir, advice["recommended_overrides"])
    advice["device"] = run_device(run_dir)
    advice["device_note"] = device_note(advice["recommended_overrides"], advice["device"])
    lines = render(advice, advice["command"])
    if advice["device_note"]:
        lines.append(f"note: {advice['device_note']}")
    write_json_atomic(run_dir / ADVICE, advice)
    return advice, lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mptrain-advise", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help=f"a run directory with {DIAGNOSTICS}")
    args = parser.parse_args(argv)
    try:
        _, lines = advise_run(args.run_dir)
    except MptrainError as e:
        print(f"mptrain-advise: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
