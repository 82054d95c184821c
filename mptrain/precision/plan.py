"""The precision plan: an ordered list of rules (module-name glob -> format), resolved against the model into
one entry per module that holds parameters.

    rules = preset_rules(preset, ...) + user_rules(cfg.layers)     # the preset first, then precision.layers
    plan = resolve(model, rules, ...)                             # the last matching rule wins
    plan["body.3"].format, .grad_format, .scaling, .kernel, .emulated, .why

A rule's pattern is an fnmatch glob over module names (`blocks.3.*`, `head`, `*`), or `@first` / `@last`: the
first and last Linear or Conv layer in module order (Megatron's --first-last-layers-bf16). A rule the module
cannot take is not applied and the entry says why (a constraint: "in/out features not multiples of 16",
"emulation covers Linear and Conv2d").

Kernels: `autocast` (PyTorch's bf16/fp16 kernels), `fp32` (float32; inside an autocast run with autocast off),
`float8` (torchao's Float8Linear), `weights` (the module's parameters are held in the format: master, nomaster,
bf16_pure), `emulated` (every other format: input and weight quantized in the forward, the output gradient in
the backward, straight-through; formats/'s quantize).
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from torch import nn
from torch.nn.utils import parametrize

from mptrain.errors import ConfigError
from mptrain.precision.formats import BUILTINS, Registry

COMPUTE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what @first / @last count
ALIASES = ("@first", "@last")


@dataclass(frozen=True)
class Rule:
    pattern: str
    format: str
    why: str  # "preset fp8", "precision.layers", ...


@dataclass
class Entry:
    """What one module computes in."""

    module: str
    type: str
    params: int
    format: str  # of its compute: inputs and weights
    grad_format: str  # of its output gradients
    scaling: str  # none | tensor | row | block-N (+ the block scale's format)
    kernel: str  # autocast | fp32 | float8 | weights | emulated
    emulated: bool
    why: str
    by_rule: bool = False  # set by a precision.layers rule (else the preset's own choice)
    shared: int = 0  # of `params`, those an earlier module holds too (a tied embedding and head): counted once

    def record(self) -> dict:
        out = asdict(self)
        del out["module"]
        if not self.shared:
            del out["shared"]
        return out


class Plan(dict):
    """module name -> Entry, in module order."""

    def records(self) -> dict[str, dict]:
        """precision_plan.json: {module: {format, grad_format, scaling, kernel, emulated, why, ...}}."""
        return {name: e.record() for name, e in self.items()}

    def formats(self) -> dict[str, str]:
        return {name: e.format for name, e in self.items()}

    def summary(self) -> dict:
        """For summary.json: how many modules (and parameters) each format got, and whether any is emulated."""
        counts: dict[str, int] = {}
        params: dict[str, int] = {}
        for e in self.values():
            counts[e.format] = counts.get(e.format, 0) + 1
            params[e.format] = params.get(e.format, 0) + e.params - e.shared
        return {"plan_modules": counts, "plan_params": params,
                "plan_emulated": sorted(n for n, e in self.items() if e.emulated)}

    def table(self) -> str:
        """The compact log table: module, parameters, format (compute/gradients), kernel, why."""
        rows = [("module", "params", "format", "kernel", "why")]
        for name, e in self.items():
            fmt = e.format if e.grad_format == e.format else f"{e.format}/{e.grad_format}"
            kernel = f"{e.kernel} (emulated)" if e.emulated and e.kernel != "emulated" else e.kernel
            rows.append((name, f"{e.params:,}", fmt, kernel, e.why))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def user_rules(layers, registry: Registry = BUILTINS) -> list[Rule]:
    """precision.layers ({glob: format}, in the order written) as rules; formats checked here."""
    if layers is not None and not hasattr(layers, "items"):
        raise ConfigError(f"precision.layers={layers!r} is invalid: must be a mapping {{module glob: format}}, "
                          "e.g. 'precision.layers={head: bf16}'")
    for p in (layers or {}):
        if str(p).startswith("@") and str(p) not in ALIASES:
            raise ConfigError(f"precision.layers.{p}: unknown alias {p}; the aliases are {', '.join(ALIASES)} "
                              "(the first and the last Linear/Conv layer), other keys are module-name globs")
    return [Rule(str(p), registry.canonical(str(f), f"precision.layers.{p}"), "precision.layers")
            for p, f in (layers or {}).items()]


def own_parameters(module: nn.Module) -> list:
    """The parameters a module computes with itself: its own, and those a parametrization
    (torch.nn.utils.parametrize, weight_norm) keeps for it under `module.parametrizations`."""
    params = list(module.parameters(recurse=False))
    if parametrize.is_parametrized(module):
        params += list(module.parametrizations.parameters())
    return params


def planned_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules a plan covers: those holding parameters of their own, in module order (a parametrization's
    container is not a module of the plan: its parameters count for the module it parametrizes)."""
    inside = {id(m) for _, p in model.named_modules() if parametrize.is_parametrized(p)
              for m in p.parametrizations.modules()}
    return [(n, m) for n, m in model.named_modules() if n and id(m) not in inside and own_parameters(m)]


def matches(rule: Rule, name: str, firsts: tuple[str | None, str | None]) -> bool:
    if rule.pattern == "@first":
        return name == firsts[0]
    if rule.pattern == "@last":
        return name == firsts[1]
    return fnmatch.fnmatchcase(name, rule.pattern)


def resolve(model: nn.Module, base: dict[str, tuple[str, str, str]], rules: list[Rule], *, autocast: str | None,
            registry: Registry = BUILTINS, dim_multiple: int = 16, fp8_emulated: bool = True,
            device=None) -> Plan:
    """One Entry per planned module.

    `base[name] = (format, kernel, why)`: what the preset gives each module before any rule (the family knows:
    autocast's dtype for the layers autocast lowers, fp32 elsewhere; the weights' dtype under master ...).
    `rules` apply in order, the last match winning, each only where the registry says the module fits.
    `autocast`: the run's autocast format (None: no autocast), so that a module planned in it runs there."""
    modules = planned_modules(model)
    lazy = [n for n, m in modules if any(isinstance(p, nn.parameter.UninitializedParameter) for p in own_parameters(m))]
    if lazy:
        raise ConfigError(f"the model has lazy modules ({', '.join(lazy[:3])}{', ...' if len(lazy) > 3 else ''}) whose "
                          "parameters are not made yet: a precision plan needs their shapes; give them their sizes "
                          "(nn.Linear instead of nn.LazyLinear), or run one batch through the model in its __init__")
    compute = [n for n, m in modules if isinstance(m, COMPUTE_TYPES)]
    firsts = (compute[0], compute[-1]) if compute else (None, None)
    plan = Plan()
    used: set[Rule] = set()
    seen: set[int] = set()  # parameters counted at an earlier module (tied weights)
    for name, module in modules:
        fmt, kernel, why = base[name]
        by_rule = False
        for rule in rules:
            if not matches(rule, name, firsts):
                continue
            used.add(rule)
            blocked = registry.fits(rule.format, module, dim_multiple, device)
            if blocked is not None:
                why = f"{why}; {rule.why} {rule.pattern}: {rule.format} refused ({blocked})"
                continue
            fmt, why, by_rule = rule.format, f"{rule.why} {rule.pattern}", True
            kernel = registry.kernel(fmt, module)
        emulated = kernel == "emulated" or (kernel == "float8" and fp8_emulated)
        f = registry.get(fmt)
        own = own_parameters(module)
        shared = sum(p.numel() for p in own if id(p) in seen)
        seen.update(id(p) for p in own)
        plan[name] = Entry(name, type(module).__name__, sum(p.numel() for p in own), fmt, f.grad_format.name,
                           registry.scaling(f), kernel, emulated, why, by_rule, shared)
    unused = [r.pattern for r in rules if r.why == "precision.layers" and r not in used]
    if unused:
        names = ", ".join(n for n, _ in modules[:8]) + (", ..." if len(modules) > 8 else "")
        raise ConfigError(f"precision.layers: {', '.join(unused)} matches no module with parameters "
                          f"(they are: {names}); fix the pattern")
    return plan
