"""precision=auto: a per-layer plan from measurement, applied in the running process.

    probe     steps 1..probe_steps train in the safe preset (bf16 autocast; fp32 without bf16), with shadow
              measurement (diagnostics/shadow.py) of every candidate format on every step
    plan      each module the safe preset computes in bf16 gets the cheapest candidate whose worst relative error,
              of its output and of its output gradient, stayed within `tolerance`; the model is converted in place
              (convert.replan: the same parameter objects, so the optimizer state carries on)
    recheck   every `recheck_every` steps the formats in use are measured again; a layer over tolerance moves one
              format up its ladder (e.g. fp8_e4m3 -> bf16 -> fp32) and the change is an event row

The planner's state (phase, the probe's worst figures so far, the plan, its history) is part of the precision
checkpoint, so a resume rebuilds the same plan.
"""

from __future__ import annotations

import logging

from torch import nn

from mptrain.diagnostics.ranges import ModuleRanges
from mptrain.diagnostics.shadow import Shadow, check_formats, native_formats
from mptrain.errors import ConfigError
from mptrain.precision.formats import get_format
from mptrain.precision.plan import RECIPE, Rule, check_format, constraint

log = logging.getLogger(__name__)


def cost(fmt: str) -> float:
    """Bits per value: what the cheapest format means (fp8's recipe stores 8)."""
    return 8.0 if fmt == RECIPE else get_format(fmt).bits_per_value


def worst(a, b):
    """The larger of two shadow figures ("inf" beats any number, None is not measured)."""
    if a is None:
        return b
    if b is None:
        return a
    if "inf" in (a, b):
        return "inf"
    return max(a, b)


def error_of(figures: list | None) -> float | None:
    """The worst of a format's forward and gradient relative errors (None: not measured)."""
    if figures is None:
        return None
    errs = [f for f in (figures[0], figures[3]) if f is not None]
    if not errs:
        return None
    return float("inf") if "inf" in errs else max(errs)


def _json(v: float | None):
    return "inf" if v == float("inf") else v  # JSON has no inf (the shadow rows' convention)


class AutoPlanner:
    def __init__(self, cfg, device, base: str):
        names = list(cfg.formats) if cfg.formats is not None else [f for f in native_formats(device) if f != "fp8_row"]
        formats = [check_format(str(f), "precision.auto.formats") for f in names]
        check_formats(formats)
        if not formats:
            raise ConfigError("precision.auto.formats=[] leaves nothing to choose; list formats, e.g. [fp8_e4m3,bf16]")
        self.base = base  # the safe preset's format (bf16, or fp32 without it)
        # the ladder, cheapest first: the candidates no dearer than the base, the base, then fp32
        cheap = sorted({f for f in formats if f not in ("fp32", base) and cost(f) <= cost(base)}, key=cost)
        self.ladder = [*cheap, base] + (["fp32"] if base != "fp32" else [])
        self.probe_steps, self.tolerance, self.recheck_every = cfg.probe_steps, cfg.tolerance, cfg.recheck_every
        self.planned = False
        self.figures: dict[str, dict[str, list]] = {}  # the probe's worst figures so far
        self.formats: dict[str, str] = {}  # the plan: module -> format (the modules auto plans)
        self.history: list[dict] = []
        self._ranges: ModuleRanges | None = None
        self._shadow: Shadow | None = None

    def planned_modules(self, plan) -> list[str]:
        """The modules the safe preset computes in its own format: those auto may move."""
        return [n for n, e in plan.items() if e.format == self.base]

    def measured(self, step: int) -> bool:
        if not self.planned:
            return step <= self.probe_steps
        return self.recheck_every > 0 and step % self.recheck_every == 0

    # ---- the step ------------------------------------------------------------------------------
    def begin_step(self, step: int, model: nn.Module) -> None:
        if not self.measured(step):
            return
        if self.planned:  # a recheck: the formats in use (fp32 has nothing to lose)
            names = sorted({f for f in self.formats.values() if f != "fp32"}, key=cost)
        else:
            names = [f for f in self.ladder if f != "fp32"]
        if not names:
            return
        self._shadow = Shadow(names)
        self._ranges = ModuleRanges(model, self._shadow)
        self._ranges.begin()

    def end_step(self, step: int, precision) -> dict | None:
        """After the optimizer step: read the figures; at the probe's end build and apply the plan, on a recheck
        demote the layers over tolerance. Returns the event row (or None)."""
        if self._ranges is None:
            return None
        self._ranges.remove()
        figures = self._shadow.end()
        self._ranges = self._shadow = None
        if not self.planned:
            for module, per in figures.items():
                for fmt, vals in per.items():
                    row = self.figures.setdefault(module, {}).setdefault(fmt, [None] * len(vals))
                    self.figures[module][fmt] = [worst(a, b) for a, b in zip(row, vals)]
            if step < self.probe_steps:
                return None
            return self._plan(step, precision)
        return self._recheck(step, precision, figures)

    def _fits(self, figures: dict, module: str, fmt: str) -> bool:
        if fmt == "fp32":
            return True
        err = error_of(figures.get(module, {}).get(fmt))
        return err is not None and err <= self.tolerance

    def _plan(self, step: int, precision) -> dict:
        model = precision._model
        chosen, errors = {}, {}
        for name in self.planned_modules(precision.plan):
            module = model.get_submodule(name)
            for fmt in self.ladder:
                if fmt == "fp32" or (constraint(fmt, module, precision.dim_multiple) is None
                                     and self._fits(self.figures, name, fmt)):
                    chosen[name] = fmt
                    errors[name] = {f: _json(error_of(v)) for f, v in self.figures.get(name, {}).items()}
                    break
        self.planned = True
        self.figures = {}
        self.formats = chosen
        self.history.append({"step": step, "event": "plan", "formats": dict(chosen), "errors": errors})
        precision.apply_auto(self.formats, f"auto (step {step})")
        measured = "; ".join(f"{n} " + ", ".join(f"{f} {e:.3g}" if isinstance(e, float) else f"{f} {e}"
                                                   for f, e in errs.items()) for n, errs in errors.items())
        log.info("precision=auto: plan after %d probe steps (tolerance %g; worst error per format: %s):\n%s", step,
                 self.tolerance, measured, precision.plan.table())
        return {"event": "precision_plan", "formats": dict(chosen), "errors": errors}

    def _recheck(self, step: int, precision, figures: dict) -> dict | None:
        changes = []
        for name, fmt in self.formats.items():
            if fmt == "fp32" or self._fits(figures, name, fmt):
                continue
            new = self.ladder[self.ladder.index(fmt) + 1]
            vals = figures.get(name, {}).get(fmt)
            changes.append({"layer": name, "old": fmt, "new": new, "err": vals[0] if vals else None,
                            "gerr": vals[3] if vals else None, "flush": vals[1] if vals else None,
                            "sat": vals[2] if vals else None})
        if not changes:
            return None
        for c in changes:
            self.formats[c["layer"]] = c["new"]
            log.warning("precision=auto: step %d: %s demoted %s -> %s (error %s over tolerance %g)", step,
                        c["layer"], c["old"], c["new"], c["err"], self.tolerance)
        self.history.append({"step": step, "event": "demote", "changes": changes})
        precision.apply_auto(self.formats, f"auto (demoted at step {step})")
        return {"event": "precision_demote", "changes": changes}

    # ---- records -------------------------------------------------------------------------------
    def rules(self, why: str) -> list[Rule]:
        return [Rule(name, fmt, why) for name, fmt in self.formats.items()]

    def summary(self) -> dict:
        demotions = sum(len(h["changes"]) for h in self.history if h["event"] == "demote")
        return {"auto_planned": self.planned, "auto_plan": dict(self.formats), "auto_demotions": demotions,
                "auto_tolerance": self.tolerance}

    def state_dict(self) -> dict:
        return {"planned": self.planned, "figures": self.figures, "formats": dict(self.formats),
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.planned, self.figures = state["planned"], state["figures"]
        self.formats, self.history = dict(state["formats"]), list(state["history"])
