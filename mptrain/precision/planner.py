"""precision=auto: a per-layer plan from measurement, applied in the running process.

    probe     steps 1..probe_steps train in the safe preset (bf16 autocast; fp32 without bf16) and measure:
              objective=time: step 1 times each planned module's forward+backward in each candidate it fits, on
              its own input, on this device (emulated formats are not real speed here: never timed or chosen for
              it); the later steps measure the error (diagnostics/shadow.py) only of the formats clearly faster
              than fp32 on a module, so where fp32 is fastest everywhere (a CPU without bf16 units) the plan is
              made on step 1 with no error measurement at all;
              objective=bits: every step measures the error of every candidate on every module
    plan      each module the safe preset computes in its own format gets, among the candidates that it fits (the
              registry's rule) and whose worst relative error, of its output and of its output gradient, stayed
              within `tolerance` (fp32 always does), the fastest as timed (objective=time), or the fewest bits
              per value (objective=bits, the registry's cost); the model is converted in place (the applier: the
              same parameter objects, so the optimizer state carries on)
    recheck   every `recheck_every` steps the formats in use are measured again; a layer over tolerance moves up
              its ladder to the next format it fits (e.g. fp8_e4m3 -> bf16 -> fp32) and the change is an event row
    promote   a demoted layer is also measured, at each re-check, in the rungs between its planned format and its
              current one; after `promote_after` consecutive re-checks within tolerance in the next cheaper rung
              it fits, it moves back down one rung (never below the plan's choice), an event row too. The count
              restarts on any miss and on every move: the hysteresis that keeps a layer from flapping

Across ranks (DDP, FSDP2) every rank measures its own shard of the batch; before a decision (what to measure
after timing, the plan, a recheck) the figures are reduced over the ranks — the worst error, the slowest rank's
time — through the gather the run injects (`agree_across_ranks`; the planner itself knows no process group), so
every rank applies one plan. The plan's history says how many ranks measured each decision.

The planner's state (phase, the probe's worst figures so far, the plan, its history) is part of the precision
checkpoint, so a resume rebuilds the same plan. It never reads the precision's insides: the model and the
policy (`plan`, `apply_formats`, `dim_multiple`) are passed to each call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from mptrain.diagnostics.ranges import ModuleRanges
from mptrain.diagnostics.shadow import Figures, Shadow, check_formats
from mptrain.errors import ConfigError
from mptrain.precision import budget, roofline
from mptrain.precision.formats import FP8_ROW, FP32, Registry
from mptrain.precision.plan import planned_modules

log = logging.getLogger(__name__)
# objective=time: a format must time under this share of the layer's default (the safe preset's format, or fp32) to
# replace it: repeated timings on a shared machine differ by a few percent, and a format no faster only adds error
# and casts between layers
CLEARLY_FASTER = 0.95


def _json(v: float | None):
    return "inf" if v == float("inf") else v  # JSON has no inf (the shadow rows' convention)


class Planner:
    def __init__(self, cfg, device, base: str, registry: Registry):
        self.registry = registry
        if cfg.formats is not None:
            names = list(cfg.formats)
        else:  # the device's real kernels, torchao's rowwise recipe aside (tensorwise is its faster twin)
            names = [f for f in registry.default_candidates(device) if f != FP8_ROW.name]
        formats = [registry.canonical(str(f), "precision.auto.formats") for f in names]
        check_formats(formats, registry)
        if not formats:
            raise ConfigError("precision.auto.formats=[] leaves nothing to choose; list formats, e.g. [fp8_e4m3,bf16]")
        self.base = base  # the safe preset's format (bf16, or fp32 without it): the probe computes in it
        self.fp32 = FP32.name
        # the ladder, cheapest first: the candidates no dearer than the base, the base where it is a candidate,
        # then fp32 (always safe); a format not listed is never chosen (formats=[fp32]: every layer fp32)
        cheap = registry.cheapest_first(f for f in formats if f not in (self.fp32, base)
                                        and registry.cost(f) <= registry.cost(base))
        self.ladder = [*cheap, *([base] if base in formats and base != self.fp32 else []), self.fp32]
        self.probe_steps, self.tolerance, self.recheck_every = cfg.probe_steps, cfg.tolerance, cfg.recheck_every
        self.promote_after = cfg.promote_after
        self.objective, self.repeats = cfg.get("objective", "time"), cfg.get("timing_repeats", 3)
        self.target = cfg.get("target")
        if self.target is not None:
            roofline.target(self.target)  # an unknown name stops here, at start
        self.device = device
        # precision.auto.memory_gb (bytes; None: no budget): the plan's predicted memory must fit (budget.py)
        self.budget = cfg.memory_gb * budget.GB if cfg.get("memory_gb") is not None else None
        self._state_bytes: Callable[[], float] = lambda: 0.0  # weights, grads, optimizer state: the run's count
        self._saved: budget.SavedBytes | None = None
        self.activations = 0  # bytes kept for backward in the probe's first step (memory_gb)
        self.sizes: dict[str, tuple[int, int]] = {}  # module -> (input, weight) elements (memory_gb)
        self.memory = None  # the plan's predicted bytes (memory_gb)
        self._examples: dict = {}  # module -> an input of the first probe step (objective=time times on its shape)
        self.probe_times: dict[str, dict[str, float]] = {}  # module -> format -> seconds, until the plan
        self.timed = False  # objective=time: the probe's first step has timed the formats (errors come next)
        self._input_hooks: list = []
        self.planned = False
        self.figures: dict[str, dict[str, Figures]] = {}  # the probe's worst figures so far
        self.formats: dict[str, str] = {}  # the plan: module -> format (the modules auto plans)
        self.why: dict[str, str] = {}  # module -> why it has its format (the step that chose it)
        self.chosen: dict[str, str] = {}  # module -> the plan's format: the floor a promotion returns to
        self.streak: dict[str, int] = {}  # demoted module -> consecutive re-checks within tolerance one rung down
        self.times: dict[str, float] = {}  # module -> its measured forward+backward seconds in its format
        self.history: list[dict] = []
        self._ranges: ModuleRanges | None = None
        self._shadow: Shadow | None = None
        # every rank's copy of a picklable object, in rank order (a collective); one process: [obj]
        self._gather: Callable[[object], list] = lambda obj: [obj]

    def count_state_with(self, fn: Callable[[], float]) -> None:
        """memory_gb: `fn()` gives the bytes of the run's weights, gradients, optimizer state and masters (called at
        the plan, after the optimizer state exists)."""
        self._state_bytes = fn

    def agree_across_ranks(self, gather: Callable[[object], list]) -> None:
        """Data parallel: `gather(obj)` returns every rank's `obj`; decisions then rest on all ranks' figures."""
        self._gather = gather

    def _worst_over_ranks(self, figures: dict[str, dict[str, Figures]]) -> tuple[dict, int]:
        """The worst of every rank's figures per module and format (one gather), and how many ranks measured."""
        rows = {m: {f: v.as_row() for f, v in per.items()} for m, per in figures.items()}
        out: dict[str, dict[str, Figures]] = {}
        gathered = self._gather(rows)
        for rank_rows in gathered:
            for m, per in rank_rows.items():
                for f, row in per.items():
                    out.setdefault(m, {})[f] = out.get(m, {}).get(f, Figures()).worst(Figures.from_row(row))
        return out, len(gathered)

    def _slowest_over_ranks(self, times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Each module's and format's time on the slowest rank (the step waits for it)."""
        out: dict[str, dict[str, float]] = {}
        for rank_times in self._gather(times):
            for m, per in rank_times.items():
                for f, t in per.items():
                    out.setdefault(m, {})[f] = max(t, out.get(m, {}).get(f, t))
        return out

    @property
    def uses_torchao(self) -> bool:
        """Some candidate runs through torchao's float8 (the run must enable it at set-up)."""
        return any(self.registry.get(f).executor == "torchao" for f in self.ladder)

    def planned_modules(self, plan) -> list[str]:
        """The modules the safe preset computes in its own format: those auto may move."""
        return [n for n, e in plan.items() if e.format == self.base]

    def measured(self, step: int) -> bool:
        if not self.planned:  # objective=time: the probe goes on past its steps until an error was measured
            return step <= self.probe_steps or self.objective == "time"
        return self.recheck_every > 0 and step % self.recheck_every == 0

    # ---- the step ------------------------------------------------------------------------------
    def begin_step(self, step: int, model: nn.Module) -> None:
        if not self.measured(step):
            return
        only = None
        if self.planned:  # a recheck: each module in its own format (fp32 has nothing to lose) and, demoted, in
            # the rungs of its way back (promotion)
            only = {n: [x for x in [f, *self._way_back(n, f)] if x != self.fp32] for n, f in self.formats.items()}
            only = {n: fs for n, fs in only.items() if fs}
            names = self.registry.cheapest_first({f for fs in only.values() for f in fs})
        elif self.objective == "time" and not self.timed:
            # time first: this step's inputs time every format on each module; errors are measured next, and
            # only of the formats faster than fp32 there (the others can never be chosen)
            self._keep_inputs(model)
            if self.budget is not None:
                self._saved = budget.SavedBytes(model)
                self._saved.begin()
            return
        elif self.objective == "time":  # an error step: the formats that could pay, on the modules where they could
            only = self._worth()
            names = [f for f in self.ladder if any(f in fs for fs in only.values())]
        else:
            names = [f for f in self.ladder if f != self.fp32]
        if not names:
            return
        # every rank measures: FSDP2 may gather a sharded module's weights (the same modules on every rank)
        self._shadow = Shadow(names, self.registry, only, gather=True)
        self._ranges = ModuleRanges(model, self._shadow, set(only) if only is not None else None)
        self._ranges.begin()

    def _worth(self) -> dict[str, list[str]]:
        """objective=time: module -> the formats worth an error measurement on it: those timed clearly faster than
        fp32, and the safe preset's own format unless it is clearly slower than fp32 (it is the default a layer
        keeps, so that a plan equal to the preset runs as the preset does: a mix of formats adds casts between
        layers that no single layer's timing shows). fp32 itself always holds; a module timed in one format only
        has none."""
        out = {}
        for name, times in self.probe_times.items():
            fp32 = times.get(self.fp32, 0)
            out[name] = [f for f, t in times.items() if f != self.fp32 and (
                t < CLEARLY_FASTER * fp32 or (f == self.base and CLEARLY_FASTER * t <= fp32)
                or self.budget is not None)]  # a memory budget may need a slower, smaller format
        return out

    def _keep_inputs(self, model: nn.Module) -> None:
        """One floating input per planned module, from the step's own forward (the shadow's re-runs call forward
        directly and are not seen), in the dtype the module received: a module inside a bf16 chain is timed
        without an input cast in bf16 and with one in fp32, as it runs in a plan that keeps its neighbours."""
        def keep(name):
            def pre_hook(module, args):
                x = args[0] if args else None
                if name not in self._examples and isinstance(x, torch.Tensor) and x.is_floating_point():
                    self._examples[name] = x.detach().clone()
            return pre_hook

        self._input_hooks = [m.register_forward_pre_hook(keep(n)) for n, m in planned_modules(model)]

    def _time(self, model: nn.Module, policy) -> None:
        """objective=time: each planned module's forward+backward in each candidate it fits, on this device."""
        for h in self._input_hooks:
            h.remove()
        self._input_hooks = []
        for name in self.planned_modules(policy.plan):
            fits = [f for f in self.ladder if self.fits(model, name, f, policy.dim_multiple)]
            x = self._examples.get(name)
            if x is not None:
                weight = getattr(model.get_submodule(name), "weight", None)
                self.sizes[name] = (x.numel(), weight.numel() if isinstance(weight, torch.Tensor) else 0)
            if self.target is not None:  # modeled on the target: every format it has a rate for, emulated here or not
                self.probe_times[name] = (self.target_times(model.get_submodule(name), tuple(x.shape), fits)
                                          if x is not None else {})
                continue
            # emulated formats are not real speed here: never chosen for it; a module without an input seen, or
            # with one candidate, is timed in fp32 alone (nothing to compare)
            real = [f for f in fits
                    if f == self.fp32 or self.registry.execution(self.registry.get(f), self.device) != "emulated"]
            self.probe_times[name] = (policy.time_formats(model.get_submodule(name), real, x, self.repeats)
                                      if x is not None and len(real) > 1 else {})
        # the slowest rank's times: what is measured next, and the plan, are then the same on every rank
        self.probe_times = self._slowest_over_ranks(self.probe_times)
        self._examples = {}
        self.timed = True

    def end_step(self, step: int, model: nn.Module, policy) -> dict | None:
        """After the optimizer step: read the figures; at the probe's end build and apply the plan, on a recheck
        demote the layers over tolerance. Returns the event row (or None)."""
        if not self.planned and self.objective == "time" and not self.timed:
            if self._saved is not None:  # before the timing runs, which would count too
                self.activations, self._saved = self._saved.end(), None
            self._time(model, policy)
            if any(self._worth().values()):
                return None  # errors next, of the formats that could pay
            return self._plan(step, model, policy)  # fp32 is fastest everywhere: nothing to measure
        if self._ranges is None:  # nothing measured: not a probe step, or nothing to measure (a ladder of fp32)
            if self.planned or not self.measured(step):
                return None
            figures = {}
        else:
            self._ranges.remove()
            figures = {m: {f: Figures.from_row(v) for f, v in per.items()} for m, per in self._shadow.end().items()}
            self._ranges = self._shadow = None
        if not self.planned:
            for module, per in figures.items():
                for fmt, f in per.items():
                    row = self.figures.setdefault(module, {})
                    row[fmt] = row.get(fmt, Figures()).worst(f)
            if step < self.probe_steps:
                return None
            return self._plan(step, model, policy)
        return self._recheck(step, model, policy, figures)

    def _holds(self, figures: dict[str, dict[str, Figures]], module: str, fmt: str) -> bool:
        if fmt == self.fp32:
            return True
        err = figures.get(module, {}).get(fmt, Figures()).error
        return err is not None and err <= self.tolerance

    def _way_back(self, name: str, fmt: str) -> list[str]:
        """The rungs between a demoted layer's planned format and its current one `fmt` (the candidates to promote
        it to); none for a layer at its plan."""
        floor = self.chosen.get(name, fmt)
        if not self.promote_after or fmt == floor:
            return []
        return self.ladder[self.ladder.index(floor):self.ladder.index(fmt)]

    def _below(self, model: nn.Module, name: str, fmt: str, dim_multiple: int) -> str | None:
        """The next cheaper rung `name` fits, no cheaper than its planned format (None: it is at its plan)."""
        floor = self.chosen.get(name, fmt)
        lower = self.ladder[self.ladder.index(floor):self.ladder.index(fmt)]
        return next((f for f in reversed(lower) if self.fits(model, name, f, dim_multiple)), None)

    def fits(self, model: nn.Module, name: str, fmt: str, dim_multiple: int) -> bool:
        return fmt == self.fp32 or self.registry.fits(fmt, model.get_submodule(name), dim_multiple) is None

    def target_times(self, module: nn.Module, input_shape, formats: list[str], where=None) -> dict[str, float]:
        """The roofline's forward+backward seconds of `module` (input of `input_shape`) in each of `formats` on the
        target (`where`, else precision.auto.target), emulated here or not; a format the target lacks the rate of
        is left out (why: `lacking`)."""
        times = roofline.layer_times(module, input_shape, formats, where or self.target, self.registry)
        return {f: t for f, t in times.items() if math.isfinite(t)}

    def lacking(self, where=None) -> dict[str, str]:
        """format -> why the target cannot run it, for the candidates it lacks the rate of (they are never chosen)."""
        why = {f: roofline.why_not(self.registry.get(f), where or self.target) for f in self.ladder if f != self.fp32}
        return {f: w for f, w in why.items() if w is not None}

    def fastest(self, ok: list[str], times: dict[str, float]) -> str:
        """objective=time: the layer's default, the safe preset's format where it holds (else fp32), unless a
        format that holds was timed clearly faster than it (then the fastest such, ties: the cheaper). fp32 where
        the module was not timed (no evidence either way). `ok`: the formats that fit and hold, ladder order."""
        timed = [f for f in ok if f in times]
        if not timed:
            return self.fp32
        default = self.base if self.base in timed else self.fp32
        fastest = min(timed, key=lambda f: (times[f], ok.index(f)))
        return fastest if times[fastest] < CLEARLY_FASTER * times[default] else default

    def _plan(self, step: int, model: nn.Module, policy) -> dict:
        self.figures, ranks = self._worst_over_ranks(self.figures)
        chosen, errors, times, why = {}, {}, {}, {}
        for name in self.planned_modules(policy.plan):
            ok = [f for f in self.ladder
                  if self.fits(model, name, f, policy.dim_multiple) and self._holds(self.figures, name, f)]
            errors[name] = {f: _json(v.error) for f, v in self.figures.get(name, {}).items()}
            why[name] = f"auto (step {step})"
            if self.objective == "time":
                measured = self.probe_times.get(name, {})
                chosen[name] = self.fastest(ok, measured)
                if measured:
                    times[name] = measured
                    fast = measured.get(chosen[name], math.inf)
                    on = f" on {self.target}, modeled" if self.target is not None else ""
                    why[name] += f": fastest that holds{on} (" + ", ".join(
                        f"{f} {t * 1e3:.3g} ms" + (" over tolerance" if f not in ok and t < fast else "")
                        for f, t in sorted(measured.items(), key=lambda kv: kv[1])) + ")"
            else:
                chosen[name] = ok[0]
        if self.budget is not None:
            self._fit(chosen, why, model, policy)
        not_chosen = self._not_chosen(chosen) if self.target is not None else {}
        for name in chosen:  # a candidate the target cannot run has no time in the layer's reason: say why
            why[name] += "".join(f"; {f}: {w}" for f, w in not_chosen.items() if f not in times.get(name, {}))
        self.planned = True
        self.figures = {}
        self.probe_times, self.timed = {}, False
        self.formats = chosen
        self.chosen, self.streak = dict(chosen), {}
        self.why = why
        self.times = {n: t[chosen[n]] for n, t in times.items() if chosen[n] in t}
        self.history.append({"step": step, "event": "plan", "probe": self.base, "formats": dict(chosen),
                             "errors": errors, **({"times": times} if times else {}), "ranks": ranks,
                             **({"not_chosen": not_chosen} if not_chosen else {})})
        policy.apply_formats(model, self.formats, self.why)
        measured = "; ".join(f"{n} " + ", ".join(f"{f} {e:.3g}" if isinstance(e, float) else f"{f} {e}"
                                                   for f, e in errs.items()) for n, errs in errors.items())
        log.info("precision=auto: plan after %d probe steps on %d rank(s) (tolerance %g; worst error per format: "
                 "%s):\n%s", step, ranks, self.tolerance, measured, policy.plan.table())
        for f, w in not_chosen.items():
            log.warning("precision=auto: %s is chosen for no layer on %s: %s", f, self.target, w)
        if times:
            totals = self.totals(times)
            log.info("precision=auto: the planned layers' forward+backward %s: %.3g ms in the plan; %s",
                     f"on {self.target}, modeled" if self.target else "as timed here", sum(self.times.values()) * 1e3,
                     ", ".join(f"{t * 1e3:.3g} ms all {f}" for f, t in totals.items()))
        return {"event": "precision_plan", "formats": dict(chosen), "errors": errors,
                **({"times": times} if times else {}), "ranks": ranks}

    def _fit(self, chosen: dict[str, str], why: dict[str, str], model: nn.Module, policy) -> None:
        """memory_gb: move layers of the fastest plan `chosen` (in place) to smaller formats that hold until its
        predicted memory fits the budget (budget.fit), each move in its layer's reason and the log."""
        sized = {n: f for n, f in chosen.items() if n in self.sizes}
        formats = [*self.ladder, *([] if self.base in self.ladder else [self.base])]  # the probe's, listed or not
        sizes = {n: {f: budget.layer_bytes(self.registry, f, *self.sizes[n]) for f in formats} for n in sized}
        options = {}
        for n in sized:  # the formats that fit, hold and were timed, with their times
            times = self.probe_times.get(n, {})
            options[n] = {f: times[f] for f in self.ladder if f in times
                          and self.fits(model, n, f, policy.dim_multiple) and self._holds(self.figures, n, f)}
        # the probe computed the planned layers in the safe preset's format: their share is counted per format
        fixed = self._state_bytes() + self.activations - sum(sizes[n][self.base] for n in sized)
        fitted, self.memory = budget.fit(sized, options, sizes, fixed, self.budget)
        for n, f in fitted.items():
            if f != chosen[n]:
                why[n] += f"; {f}, not {chosen[n]}, for precision.auto.memory_gb={self.budget / budget.GB:g}"
                chosen[n] = f
        log.info("precision=auto: the plan's predicted memory %.3g GB, within precision.auto.memory_gb=%g",
                 self.memory / budget.GB, self.budget / budget.GB)

    def _not_chosen(self, chosen: dict[str, str]) -> dict[str, str]:
        """precision.auto.target: format -> why, for each candidate the plan gives to no layer (fp32 aside): the
        target lacks its rate, or it was modeled no faster than the layer's choice (or faster, over tolerance)."""
        lacking, used = self.lacking(), set(chosen.values())
        slower = (f"modeled no faster on {self.target} than the format chosen, or over tolerance, on every layer it "
                  "fits (each layer's reason has its times)")
        return {f: lacking.get(f, slower)
                for f in self.ladder if f not in used and f != self.fp32}

    def _recheck(self, step: int, model: nn.Module, policy, figures: dict) -> dict | None:
        """Demote each layer over tolerance one rung up; promote each demoted layer whose next cheaper rung held
        for `promote_after` re-checks in a row. Returns the event row (a demotion, with a promotion at the same
        step under "also")."""
        figures, ranks = self._worst_over_ranks(figures)  # every rank demotes and promotes alike
        demoted, promoted = [], []
        for name, fmt in self.formats.items():
            if not self._holds(figures, name, fmt):
                # one format up the ladder: the next one the module can compute in (a constraint skips a rung)
                higher = self.ladder[self.ladder.index(fmt) + 1:]
                new = next(f for f in higher if self.fits(model, name, f, policy.dim_multiple))
                demoted.append(self._change(figures, name, fmt, new, fmt))
                continue
            below = self._below(model, name, fmt, policy.dim_multiple) if self.promote_after else None
            if below is None:
                continue
            streak = self.streak.get(name, 0) + 1 if self._holds(figures, name, below) else 0
            self.streak[name] = streak
            if streak >= self.promote_after:
                promoted.append(self._change(figures, name, fmt, below, below))
        if not demoted and not promoted:
            return None
        rows = []
        for kind, changes in (("demote", demoted), ("promote", promoted)):
            if not changes:
                continue
            for c in changes:
                self.formats[c["layer"]] = c["new"]
                self.streak.pop(c["layer"], None)  # every move restarts the count
                self.why[c["layer"]] = f"auto ({kind}d at step {step})"
                log.warning("precision=auto: step %d: %s %sd %s -> %s (error %s in %s, tolerance %g)", step,
                            c["layer"], kind, c["old"], c["new"], c["err"], c["measured"], self.tolerance)
            self.history.append({"step": step, "event": kind, "changes": changes, "ranks": ranks})
            rows.append({"event": f"precision_{kind}", "changes": changes, "ranks": ranks})
        policy.apply_formats(model, self.formats, self.why)
        return {**rows[0], "also": rows[1]} if len(rows) == 2 else rows[0]

    @staticmethod
    def _change(figures: dict, name: str, old: str, new: str, measured: str) -> dict:
        """One move's record: the layer, its formats, and the figures of the format that decided it."""
        f = figures.get(name, {}).get(measured, Figures())
        return {"layer": name, "old": old, "new": new, "measured": measured, "err": f.err, "gerr": f.gerr,
                "flush": f.flush, "sat": f.sat}

    # ---- records -------------------------------------------------------------------------------
    def summary(self) -> dict:
        demotions = sum(len(h["changes"]) for h in self.history if h["event"] == "demote")
        promotions = sum(len(h["changes"]) for h in self.history if h["event"] == "promote")
        tolerance = self.tolerance if math.isfinite(self.tolerance) else "inf"  # JSON has no inf (it read null)
        out = {"auto_planned": self.planned, "auto_plan": dict(self.formats), "auto_demotions": demotions,
               "auto_promotions": promotions,
               "auto_tolerance": tolerance, "auto_objective": self.objective}
        if self.target is not None:  # the times were modeled for this GPU, not measured here
            out["auto_target"] = self.target
        if self.memory is not None:  # memory_gb: the plan's predicted bytes (weights, grads, optimizer, activations)
            out["auto_memory_gb"] = self.memory / budget.GB
        plans = [h for h in self.history if h["event"] == "plan"]
        if plans:  # how many ranks measured the plan (older checkpoints did not say: one)
            out["auto_ranks"] = plans[-1].get("ranks", 1)
        if self.times:  # objective=time: the planned layers' forward+backward, as measured at the plan
            out["auto_planned_layers_s"] = sum(self.times.values())
            plan = next((h for h in reversed(self.history) if h["event"] == "plan"), {})
            # the same layers all in one format, where every one was timed in it: the plan's predicted gain
            out["auto_planned_layers_s_if_all"] = self.totals(plan.get("times") or {})
        return out

    @staticmethod
    def totals(times: dict[str, dict[str, float]]) -> dict[str, float]:
        """format -> the planned layers' summed time all in it, for the formats every timed layer was timed in."""
        common = set.intersection(*(set(t) for t in times.values())) if times else set()
        return {f: sum(t[f] for t in times.values()) for f in sorted(common)}

    def state_dict(self) -> dict:
        figures = {m: {f: v.as_row() for f, v in per.items()} for m, per in self.figures.items()}
        return {"planned": self.planned, "figures": figures, "formats": dict(self.formats),
                "history": list(self.history), "why": dict(self.why), "ladder": list(self.ladder),
                "times": dict(self.times), "probe_times": dict(self.probe_times), "timed": self.timed,
                "chosen": dict(self.chosen), "streak": dict(self.streak), "memory": self.memory,
                "activations": self.activations, "sizes": {n: list(v) for n, v in self.sizes.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("ladder")
        if saved is not None and saved != self.ladder:
            raise ConfigError(
                f"precision.auto.formats changed on resume: the run chose among {saved[:-1] or saved} and is asked "
                f"to choose among {self.ladder[:-1] or self.ladder} now; its plan was measured among its own: resume "
                "with the run's precision.auto.formats, or start a new run directory with the new list")
        self.planned = state["planned"]
        self.figures = {m: {f: Figures.from_row(v) for f, v in per.items()} for m, per in state["figures"].items()}
        self.formats, self.history = dict(state["formats"]), list(state["history"])
        # checkpoints from before per-layer reasons: the last event's step for every layer
        last = self.history[-1]["step"] if self.history else 0
        self.why = dict(state.get("why") or dict.fromkeys(self.formats, f"auto (step {last})"))
        self.times = dict(state.get("times") or {})
        self.probe_times, self.timed = dict(state.get("probe_times") or {}), bool(state.get("timed"))
        # checkpoints from before promotion: the plan's own record holds the formats it chose
        plans = [h["formats"] for h in self.history if h["event"] == "plan"]
        self.chosen = dict(state.get("chosen") or (plans[-1] if plans else self.formats))
        self.streak = dict(state.get("streak") or {})
        # memory_gb: the probe's figures and the plan's predicted bytes (older checkpoints: none)
        self.memory, self.activations = state.get("memory"), state.get("activations", 0)
        self.sizes = {n: tuple(v) for n, v in (state.get("sizes") or {}).items()}
