"""mptrain's per-layer judgement in your own loop: measure what each format does to each layer on a few of your
batches, choose a plan, convert the model in place (issue 40; docs/python.md).

    report = mptrain.precision.measure(model, batches, loss_fn, formats=["fp8", "bf16"])
    plan = report.plan(tolerance=0.1, objective="time")      # {module: format}
    done = mptrain.precision.apply(model, plan, autocast="bf16")
    # the same Parameter objects: an optimizer built before keeps working

`measure` runs `loss_fn(model, batch)` (forward included) and its backward on each batch with the shadow
measurement hooked in (diagnostics/shadow.py, the measurement precision=auto's probe makes), and keeps one input
of each layer for timing; it applies no update and leaves every `.grad` None. The rules are the registry's:
which module can take which format, what "cheaper" means. Nothing here knows a training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from mptrain.diagnostics.ranges import ModuleRanges
from mptrain.diagnostics.shadow import Figures, Shadow, check_formats
from mptrain.errors import ConfigError
from mptrain.precision import timing
from mptrain.precision.convert import Applier
from mptrain.precision.formats import FP32, Registry
from mptrain.precision.plan import Rule, planned_modules, resolve


def _registry(formats: Mapping | None) -> Registry:
    return Registry.from_config(formats or {})


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@dataclass
class Report:
    """What `measure` saw: per module and format the worst shadow figures over the batches (Figures), and one
    input per module (for timing)."""

    model: nn.Module
    registry: Registry
    formats: list[str]
    figures: dict[str, dict[str, Figures]]
    inputs: dict[str, torch.Tensor] = field(repr=False)
    dim_multiple: int = 16

    def errors(self) -> dict[str, dict[str, float | None]]:
        """module -> format -> the worse of its output and output-gradient relative errors."""
        return {m: {f: v.error for f, v in per.items()} for m, per in self.figures.items()}

    def plan(self, tolerance: float = 0.1, objective: str = "time", target: str | None = None,
             repeats: int = 3) -> dict[str, str]:
        """module -> format: among the measured formats whose error stays within `tolerance` and that the module
        can take (fp32 always can), the fastest on this device (objective="time"; formats emulated here are left
        out) or the fewest bits per value (objective="bits")."""
        if objective not in ("time", "bits"):
            raise ConfigError(f"objective={objective!r}: choose time or bits")
        if target is not None:
            raise ConfigError(f"target={target!r}: a named target's time model is not built yet; leave target=None to "
                              "time on this device")
        device = _device(self.model)
        out = {}
        for name, module in planned_modules(self.model):
            if name not in self.figures:
                continue  # never called on the batches
            ok = [f for f in self.registry.cheapest_first(self.formats)
                  if self.registry.fits(f, module, self.dim_multiple, device) is None
                  and (self.figures[name].get(f) or Figures()).error is not None
                  and self.figures[name][f].error <= tolerance] + [FP32.name]
            ok = list(dict.fromkeys(ok))
            if objective == "bits" or name not in self.inputs:
                out[name] = ok[0]
                continue
            real = [
                f for f in ok if self.registry.execution(self.registry.get(f), device) != "emulated" or f == FP32.name
            ]
            times = time_formats(module, real, self.inputs[name], self.registry, self.dim_multiple, repeats)
            out[name] = min(real, key=lambda f: (times.get(f, math.inf), real.index(f)))
        return out


def measure(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], torch.Tensor],
            formats: list[str] | None = None, *, user_formats: Mapping | None = None, dim_multiple: int = 16,
            max_batches: int | None = None) -> Report:
    """The shadow measurement of `formats` (default: those with real kernels on the model's device) on every
    module with parameters, over `batches` (at most `max_batches`). `user_formats`: your own, as
    precision.formats takes them ({name: {element: ..., ...}} or {name: {_target_: ...}})."""
    registry = _registry(user_formats)
    device = _device(model)
    names = [registry.canonical(str(f), "formats") for f in (formats or registry.default_candidates(device))]
    check_formats(names, registry)
    names = [n for n in names if n != FP32.name]  # fp32 is the reference: nothing to measure
    figures: dict[str, dict[str, Figures]] = {}
    inputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def pre_hook(module, args):
            x = args[0] if args else None
            if name not in inputs and isinstance(x, torch.Tensor) and x.is_floating_point():
                inputs[name] = x.detach().float().clone()
        return pre_hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in planned_modules(model)]
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            shadow = Shadow(names, registry)
            ranges = ModuleRanges(model, shadow)
            ranges.begin()
            try:
                loss = loss_fn(model, batch)
                loss.float().backward()
            finally:
                ranges.remove()
            for module, per in shadow.end().items():
                row = figures.setdefault(module, {})
                for fmt, values in per.items():
                    row[fmt] = row.get(fmt, Figures()).worst(Figures.from_row(values))
            model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    if not figures:
        raise ConfigError("measure: no batch reached the model (batches was empty, or loss_fn never called it)")
    return Report(model, registry, names, figures, inputs, dim_multiple)


def time_formats(module: nn.Module, formats: list[str], example: torch.Tensor, registry: Registry,
                 dim_multiple: int = 16, repeats: int = 3) -> dict[str, float]:
    """Forward+backward seconds of a copy of `module` in each format, converted as `apply` converts it."""
    device = example.device
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for fmt in formats:
            wrapper = nn.Sequential(timing.plain_copy(module))
            plan = _resolve(wrapper, {"0": fmt}, registry, dim_multiple, device, None)
            if plan["0"].format != fmt:
                continue
            Applier(registry, device, None, _fp8_emulated(device)).apply(wrapper, plan)
            run = timing.forward_backward(wrapper, example, lambda: torch.autocast(device.type, enabled=False))
            out[fmt] = timing.median_seconds(run, device, repeats)
    return out


def _fp8_emulated(device: torch.device) -> bool:
    return not (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


def _resolve(model: nn.Module, plan: Mapping[str, str], registry: Registry, dim_multiple: int,
             device: torch.device, autocast: str | None):
    """The plan as entries: every module fp32 (or the loop's autocast format) unless `plan` names it."""
    base = {n: (autocast or FP32.name, "autocast" if autocast else FP32.name, "your loop")
            for n, _ in planned_modules(model)}
    rules = [Rule(n, registry.canonical(str(f), f"plan[{n!r}]"), "measured") for n, f in plan.items()]
    return resolve(model, base, rules, autocast=autocast, registry=registry, dim_multiple=dim_multiple,
                   fp8_emulated=_fp8_emulated(device), device=device)


def apply(model: nn.Module, plan: Mapping[str, str], *, autocast: str | None = None,
          user_formats: Mapping | None = None, dim_multiple: int = 16) -> dict:
    """Convert `model`'s modules in place as `plan` (module -> format) says; the Parameter objects stay, so an
    optimizer built before keeps working. `autocast`: the format your loop's torch.autocast computes in ("bf16",
    "fp16"; None without autocast), so that a module planned fp32 runs with autocast off. Returns
    {"converted": {module: format}, "refused": {module: why}, "emulated": {module: format}}."""
    registry = _registry(user_formats)
    device = _device(model)
    entries = _resolve(model, plan, registry, dim_multiple, device, autocast)
    Applier(registry, device, autocast, _fp8_emulated(device)).apply(model, entries)
    converted = {n: e.format for n, e in entries.items() if e.by_rule}
    refused = {n: entries[n].why for n in plan if n in entries and not entries[n].by_rule}
    return {"converted": converted, "refused": refused,
            "emulated": {n: e.format for n, e in entries.items() if e.emulated and e.by_rule}}
