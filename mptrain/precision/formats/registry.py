"""The registry: every format a run can name, built-ins and the user's own, and every rule about them.

    registry = Registry.from_config(cfg.precision)      # built-ins + precision.formats, per run
    fmt = registry.get("nvfp4")                          # a Format (aliases too); ConfigError when unknown
    registry.fits(fmt, module, dim_multiple)             # None, or why the module cannot take it
    registry.kernel(fmt, module)                         # fp32 | autocast | float8 | emulated
    registry.cost(fmt)                                   # bits per value: the order "cheaper" means

Plan, convert, shadow, the planner, the advisor, estimate and report ask the registry; none restates a rule. A
user format is defined in config alone:

    precision.formats.NAME={element: {ebits: E, mbits: M[, bias: B, max: X, overflow: saturate|inf]} | ELEMENT,
                            scaling: none|tensor|row|block, block: N, scale_element: ELEMENT | {...},
                            tensor_scale: true|false, weight_scaling: 1d|2d, wgrad_hadamard: 0|16|...,
                            grad_rounding: nearest|stochastic}
    precision.formats.NAME={_target_: pkg.module.fn, ...}      # fn(**rest) returns a Format (or subclass)

and runs emulated on Linear and Conv2d layers wherever a built-in can be named (docs/formats.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace

import torch
from omegaconf import OmegaConf
from torch import nn

from mptrain.errors import ConfigError
from mptrain.precision.formats.builtin import ALIASES, BF16, BUILTIN, FP8, FP8_RECIPES, FP8_ROW, FP16, FP32
from mptrain.precision.formats.element import ELEMENTS, Element, element
from mptrain.precision.formats.format import SCALINGS, Format

EMULATED_TYPES = (nn.Linear, nn.Conv2d)  # what the emulated converters (precision/convert.py) replace
# autocast runs these in its low-precision dtype; everything else (norms, embeddings, losses) in fp32
AUTOCAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.RNNBase, nn.MultiheadAttention, nn.Bilinear)
RECIPE_KEYS = ("weight_scaling", "wgrad_hadamard", "grad_rounding")  # the training recipe (Format's fields)
SPEC_KEYS = ("element", "scaling", "block", "scale_element", "tensor_scale", *RECIPE_KEYS, "doc")
ELEMENT_KEYS = ("ebits", "mbits", "bias", "max", "overflow")


class Registry(Mapping):
    """name -> Format, in registry order (built-ins first, then the user's), with aliases."""

    def __init__(self, formats: Iterable[Format] = BUILTIN, aliases: Mapping[str, str] | None = None,
                 user: Mapping[str, dict] | None = None):
        self._formats = {f.name: f for f in formats}
        self.aliases = dict(ALIASES if aliases is None else aliases)
        self.user = dict(user or {})  # name -> definition (records, and the resume check)

    # ---- the mapping -------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Format:
        return self._formats[name]

    def __iter__(self):
        return iter(self._formats)

    def __len__(self) -> int:
        return len(self._formats)

    def get(self, name, default=None) -> Format:  # noqa: D401 - a Mapping's get, but unknown names fail loudly
        """The format called `name` (or an alias); a one-line ConfigError when there is none."""
        if isinstance(name, Format):
            return name
        key = self.aliases.get(str(name), str(name))
        if key not in self._formats:
            if default is not None:
                return default
            raise ConfigError(f"unknown number format {name!r}; known: {self.accepted()}")
        return self._formats[key]

    def canonical(self, name: str, key: str) -> str:
        """The canonical name of `name`, or a one-line ConfigError naming the config `key`."""
        try:
            return self.get(name).name
        except ConfigError:
            raise ConfigError(f"{key}: unknown format {name!r}; choose one of {self.accepted()}") from None

    def accepted(self) -> str:
        """Every name `get` takes, for an error message: "fp32, ..., nvfp4 (aliases: float32 = fp32, ...)"."""
        aliases = ", ".join(f"{a} = {f}" for a, f in self.aliases.items())
        return f"{', '.join(self._formats)} (aliases: {aliases})"

    # ---- the rules -----------------------------------------------------------------------------------------------
    @staticmethod
    def is_fp32(fmt: Format) -> bool:
        return fmt == FP32

    def fits(self, fmt: Format | str, module: nn.Module, dim_multiple: int = 16,
             device: torch.device | None = None) -> str | None:
        """Why `module` cannot compute in `fmt` (None: it can). The one rule plans, the planner and the advisor
        use. Native 16-bit formats run through autocast, which lowers only AUTOCAST_TYPES: a rule putting a norm
        or an embedding in bf16 is refused, as its record would otherwise say what does not run. `device`: refuse a
        native format the device lacks (bf16 on a pre-Ampere GPU)."""
        fmt = self.get(fmt)
        if fmt.executor == "native":
            if fmt != FP32 and not isinstance(module, AUTOCAST_TYPES):
                return f"autocast does not lower {type(module).__name__}: it computes in fp32"
            if device is not None and device.type == "cuda" and fmt == BF16 and not torch.cuda.is_bf16_supported():
                return f"{fmt.name} needs an Ampere-or-newer GPU"
            if device is not None and device.type == "cpu" and fmt == FP16 and isinstance(module, nn.RNNBase):
                # oneDNN has no float16 LSTM/GRU kernel; precision=dynamic's whole-run autocast leaves RNNs fp32
                return f"{type(module).__name__} has no float16 kernel on a CPU"
            return None
        if isinstance(module, EMULATED_TYPES) and "weight" not in module._parameters:
            # weight_norm / torch.nn.utils.parametrize compute the weight in the forward: torchao's Float8Linear
            # and the emulated layers need it as a plain parameter
            return f"{type(module).__name__}'s weight is computed (weight_norm or a parametrization), not a parameter"
        if fmt.executor == "torchao":
            if isinstance(module, nn.Linear):
                if module.in_features % dim_multiple or module.out_features % dim_multiple:
                    return (f"in/out features {module.in_features}x{module.out_features} not multiples of "
                            f"{dim_multiple}")
                return None
            if not isinstance(module, nn.Conv2d):
                return f"{fmt.name} covers Linear (torchao) and Conv2d (emulated)"
            return None
        if not isinstance(module, EMULATED_TYPES):
            return f"{fmt.name} emulation covers Linear and Conv2d, not {type(module).__name__}"
        if fmt.three_gemms and not isinstance(module, nn.Linear):
            return f"{fmt.name} is a training recipe: its three GEMMs are emulated for Linear layers only"
        return None

    def kernel(self, fmt: Format | str, module: nn.Module) -> str:
        """How `module` computes in `fmt`: fp32 | autocast (PyTorch's own bf16/fp16) | float8 (torchao's
        Float8Linear) | emulated (precision/convert.py)."""
        fmt = self.get(fmt)
        if self.is_fp32(fmt):
            return "fp32"
        if fmt.executor == "native":
            return "autocast"
        if fmt.executor == "torchao" and isinstance(module, nn.Linear):
            return "float8"
        return "emulated"

    @staticmethod
    def scaling(fmt: Format) -> str:
        """The record's description of how `fmt` scales: none | tensor | row | block-N (scale element[ + fp32])."""
        out = fmt.scaling
        if fmt.scaling == "block":
            extra = " + fp32 tensor" if fmt.tensor_scale else ""
            out = f"block-{fmt.block} ({fmt.scale_element.name}{extra})"
        recipe = [f"weights {fmt.block}x{fmt.block}" if fmt.weight_scaling == "2d" else "",
                  f"wgrad RHT-{fmt.wgrad_hadamard}" if fmt.wgrad_hadamard else "",
                  "stochastic gradients" if fmt.grad_rounding == "stochastic" else ""]
        return out + "".join(f", {r}" for r in recipe if r)

    def cost(self, fmt: Format | str) -> float:
        """Bits per value: what "cheaper" means wherever formats are ranked (ties keep registry order)."""
        return self.get(fmt).bits_per_value

    def cheapest_first(self, names: Iterable[str]) -> list[str]:
        order = {n: i for i, n in enumerate(self._formats)}
        return sorted(dict.fromkeys(names), key=lambda n: (self.cost(n), order.get(n, len(order))))

    @staticmethod
    def execution(fmt: Format, device: torch.device) -> str:
        """How `fmt` executes on `device`: native (a real kernel) | torchao (real fp8 kernels) | emulated."""
        if fmt.executor == "native":
            # float16 on a CPU is computed through float32 conversions: as slow as emulation (docs/benchmarks.md)
            return "emulated" if fmt == FP16 and device.type != "cuda" else "native"
        if fmt.executor == "torchao":
            cuda = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
            return "torchao" if cuda else "emulated"
        return "emulated"

    def default_candidates(self, device: torch.device) -> list[str]:
        """The formats with real kernels on `device`, the default candidates of the shadow and of auto.
        Emulated formats cost several plain steps per sampled step on a CPU (docs/benchmarks.md), so they are
        measured only when listed."""
        if device.type != "cuda":
            return [BF16.name]  # fp16 and fp8 are emulated on CPUs
        out = [BF16.name if torch.cuda.is_bf16_supported() else FP16.name]
        if self.execution(FP8, device) == "torchao":  # Ada / Hopper: fp8 tensor cores
            out += [FP8.name, FP8_ROW.name]
        return out

    @staticmethod
    def for_dtype(dtype: torch.dtype) -> Format:
        """The format of a torch dtype (a compute dtype, or the weights of master / nomaster / bf16_pure)."""
        return {f.torch_dtype: f for f in (FP32, BF16, FP16)}[dtype]

    # ---- building one for a run ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, formats=None, fp8_recipe: str | None = None) -> Registry:
        """The built-ins plus `formats` (precision.formats: {name: spec}); `fp8_recipe` (precision.fp8.recipe)
        makes the name `fp8` stand for that recipe's entry. ConfigError (one line) on a bad definition."""
        entries = list(BUILTIN)
        aliases = dict(ALIASES)
        user: dict[str, dict] = {}
        for name, spec in (formats or {}).items():
            name = str(name)
            if name in {f.name for f in BUILTIN} or name in ALIASES:
                raise ConfigError(f"precision.formats.{name} redefines the built-in format {name}; "
                                  "give your format another name")
            fmt = user_format(name, spec)
            entries.append(fmt)
            user[name] = definition(fmt)
        if fp8_recipe is not None and FP8_RECIPES[fp8_recipe] != FP8:
            aliases[FP8.name] = FP8_RECIPES[fp8_recipe].name
        return cls(entries, aliases, user)

    def check_same(self, saved: Mapping[str, dict]) -> None:
        """A resume: every user format the run defined must be defined the same way now (ConfigError)."""
        for name, before in saved.items():
            now = self.user.get(name)
            if now is None:
                raise ConfigError(f"the run defined the format precision.formats.{name}, which is missing now; "
                                  "give its definition again (its .hydra/config.yaml has it)")
            if now != before:
                raise ConfigError(f"precision.formats.{name} differs from the run's own definition ({before} now "
                                  f"{now}); a resume must keep it: restore it or start a new run")


BUILTINS = Registry()  # the built-ins alone: tools that read a run without a config, tests


def definition(fmt: Format) -> dict:
    """A format as plain data, for records and the resume check (its class too: a subclass quantizes its way)."""
    def elem(e: Element | None):
        return None if e is None else asdict(e)

    return {"class": f"{type(fmt).__module__}.{type(fmt).__qualname__}", "element": elem(fmt.element),
            "scaling": fmt.scaling, "block": fmt.block, "scale_element": elem(fmt.scale_element),
            "tensor_scale": fmt.tensor_scale, "executor": fmt.executor,
            "grad": None if fmt.grad is None else definition(fmt.grad),
            # the recipe only where set: a plain format's definition reads as it did before the recipe fields
            **{k: getattr(fmt, k) for k in RECIPE_KEYS if fmt.three_gemms}}


def _element(name: str, key: str, spec) -> Element:
    if isinstance(spec, str):
        if spec not in ELEMENTS:
            raise ConfigError(f"{key}={spec!r}: unknown element; name one of {', '.join(ELEMENTS)} or give "
                              "{ebits: E, mbits: M}")
        return ELEMENTS[spec]
    if not hasattr(spec, "items"):
        raise ConfigError(f"{key}={spec!r} is invalid: give an element name or {{ebits: E, mbits: M}}")
    unknown = sorted(set(map(str, spec)) - set(ELEMENT_KEYS))
    if unknown or "ebits" not in spec or "mbits" not in spec:
        raise ConfigError(f"{key}: needs ebits and mbits, may have {', '.join(ELEMENT_KEYS[2:])}"
                          + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return element(name, **{str(k): v for k, v in spec.items()})


def _call_target(spec: dict, key: str):
    """`_target_(**rest)`: a user's function or Format subclass, imported by its dotted path."""
    target = str(spec["_target_"])
    module, _, attr = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}._target_={target} cannot be imported ({str(e).splitlines()[0]}); put its module "
                          "on PYTHONPATH") from None
    kwargs = {k: (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
              for k, v in spec.items() if k != "_target_"}
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {target}(...) failed: {e}") from None


def user_format(name: str, spec) -> Format:
    """One precision.formats entry as a Format (ConfigError, one line, naming the key, when it is not one)."""
    key = f"precision.formats.{name}"
    if not hasattr(spec, "items"):
        raise ConfigError(f"{key}={spec!r} is invalid: a mapping {{element: ..., scaling: ...}} or {{_target_: ...}}")
    spec = {str(k): v for k, v in spec.items()}
    if "_target_" in spec:
        fmt = _call_target(spec, key)
        if not isinstance(fmt, Format):
            raise ConfigError(f"{key}: {spec['_target_']} returned {type(fmt).__name__}, not a "
                              "mptrain.precision.formats.Format")
        missing = [m for m, needed in (("quantize_stochastic", fmt.grad_rounding == "stochastic"),
                                       ("quantize_tiles", fmt.weight_scaling == "2d")) if needed
                   and type(fmt).quantize is not Format.quantize and getattr(type(fmt), m) is getattr(Format, m)]
        if missing:
            raise ConfigError(f"{key}: {type(fmt).__name__} overrides quantize but not {' and '.join(missing)}, "
                              "which its recipe fields use; override them too")
        return fmt if fmt.name == name else replace(fmt, name=name)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{key}: unknown key {', '.join(unknown)}; a format takes {', '.join(SPEC_KEYS)}")
    if "element" not in spec:
        raise ConfigError(f"{key}: needs an element, e.g. {{element: {{ebits: 3, mbits: 2}}}} or {{element: e3m2}}")
    scaling = spec.get("scaling", "none")
    if scaling not in SCALINGS:
        raise ConfigError(f"{key}.scaling={scaling!r} is invalid: choose one of {', '.join(SCALINGS)}")
    elem = _element(f"{name}.element", f"{key}.element", spec["element"])
    block, scale = spec.get("block"), spec.get("scale_element")
    if scaling == "block":
        if not isinstance(block, int) or block < 1 or scale is None:
            raise ConfigError(f"{key}: scaling=block needs block (an integer >= 1) and scale_element, "
                              "e.g. {block: 32, scale_element: e8m0}")
        scale = _element(f"{name}.scale", f"{key}.scale_element", scale)
    elif block is not None or scale is not None or spec.get("tensor_scale"):
        raise ConfigError(f"{key}: block, scale_element and tensor_scale go with scaling=block only")
    recipe = {k: spec[k] for k in RECIPE_KEYS if k in spec}
    try:
        return Format(name, elem, scaling, block if scaling == "block" else None, scale,
                      bool(spec.get("tensor_scale", False)), doc=str(spec.get("doc", "config-defined")), **recipe)
    except ValueError as e:  # a recipe field out of range: Format's own check, named by its key
        raise ConfigError(f"{key}: {e}") from None
