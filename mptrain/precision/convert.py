"""Module converters: make each module compute as its plan entry says.

- `emulated`: nn.Linear / nn.Conv2d become EmulatedLinear / EmulatedConv2d (the same parameter objects, no
  buffers, so state_dicts stay the plain model's). Their forward quantizes the input and the weight to the
  format (blocks along the reduction dimension: a Linear's in_features, a Conv2d's input channels) and the
  backward quantizes the output gradient, straight-through; the matmul runs in float32 with autocast off, as an
  accumulator in hardware would. A training-recipe format (weight_scaling, wgrad_hadamard, grad_rounding set)
  runs a Linear's three GEMMs each with its own operands' quantization instead (precision/gemms.py).
- `float8`: torchao's Float8Linear (precision/fp8.py), for the Linear layers planned `fp8`.
- a native format other than the run's: the module's forward runs under its own autocast (or with autocast off
  on float32 inputs for `fp32`), its floating outputs returned in float32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.precision.formats import FP32, Format, Registry
from mptrain.precision.gemms import RecipeLinear, RecipeRandom
from mptrain.precision.plan import Plan


class _QuantizeGrad(torch.autograd.Function):
    """Identity forward; the gradient flowing back is quantized to `fmt` (the output-gradient cast)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: Format, channel_dim: int) -> torch.Tensor:
        ctx.fmt, ctx.channel_dim = fmt, channel_dim
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return fake_quantize(grad, ctx.fmt, ctx.channel_dim), None, None


def fake_quantize(x: torch.Tensor, fmt: Format, channel_dim: int = -1) -> torch.Tensor:
    """`fmt.quantize` with the blocks (rows) along `channel_dim`; float32 out."""
    if channel_dim in (-1, x.dim() - 1):
        return fmt.quantize(x)
    return fmt.quantize(x.movedim(channel_dim, -1)).movedim(-1, channel_dim)


class _Quantize(torch.autograd.Function):
    """x quantized in the forward, its gradient passed straight through (exactly the quantized values: the
    usual x + (q - x).detach() rounds twice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: Format, channel_dim: int) -> torch.Tensor:
        ctx.dtype = x.dtype
        return fake_quantize(x, fmt, channel_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None, None


def _ste(x: torch.Tensor, fmt: Format, channel_dim: int = -1) -> torch.Tensor:
    return _Quantize.apply(x, fmt, channel_dim)


class EmulatedLinear(nn.Linear):
    """nn.Linear computing in an emulated format (see the module docstring)."""

    fmt: Format
    grad_fmt: Format
    random: RecipeRandom  # the recipe formats' own random streams (the Applier's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt.three_gemms:
            with torch.autocast(x.device.type, enabled=False):
                return RecipeLinear.apply(x, self.weight, self.bias, self.fmt, self.random)
        with torch.autocast(x.device.type, enabled=False):
            w = _ste(self.weight, self.fmt)
            b = self.bias.float() if self.bias is not None else None
            y = F.linear(_ste(x, self.fmt), w, b)
        return _QuantizeGrad.apply(y, self.grad_fmt, -1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.fmt.name} (emulated)"


class EmulatedConv2d(nn.Conv2d):
    """nn.Conv2d computing in an emulated format: blocks along the input channels of the activation and of
    each filter (the reduction dimension), and along the output channels of the gradient."""

    fmt: Format
    grad_fmt: Format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            w = _ste(self.weight, self.fmt, 1)
            b = self.bias.float() if self.bias is not None else None
            y = self._conv_forward(_ste(x, self.fmt, 1), w, b)
        return _QuantizeGrad.apply(y, self.grad_fmt, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.fmt.name} (emulated)"


def _emulated(module: nn.Module, fwd: Format, grad: Format, random: RecipeRandom) -> nn.Module:
    cls = EmulatedLinear if isinstance(module, nn.Linear) else EmulatedConv2d
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)  # the same parameters, hooks and settings: nothing is copied
    new.fmt, new.grad_fmt, new.random = fwd, grad, random
    return new


def _floats_to_fp32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_floats_to_fp32(o) for o in out)
    return out


def _own_autocast(forward, device_type: str, dtype: torch.dtype | None, *args, **kwargs):
    """The module's forward under its own autocast dtype, or (dtype None) with autocast off on float32 inputs."""
    if dtype is None:
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        with torch.autocast(device_type, enabled=False):
            return _floats_to_fp32(forward(*args, **kwargs))
    with torch.autocast(device_type, dtype=dtype):
        return _floats_to_fp32(forward(*args, **kwargs))


class Applier:
    """Converts modules in place as plan entries say: the same parameter objects (so the optimizer state carries
    on), no buffers added. `fp8_emulate`: torchao's Float8Linear emulates its fp8 GEMMs (no fp8 kernels here).
    `random`: the recipe formats' random streams (stochastic rounding, Hadamard signs), shared by the modules."""

    def __init__(self, registry: Registry, device: torch.device, autocast: str | None, fp8_emulate: bool = True,
                 fp8_all_gather: bool = False):
        self.registry, self.device, self.autocast, self.fp8_emulate = registry, device, autocast, fp8_emulate
        self.fp8_all_gather = fp8_all_gather  # FSDP2 all-gathers the Float8Linear weights in fp8 (torchao)
        self.random = RecipeRandom(device)
        self.recipes = False  # some module runs a training recipe (its random streams go into the checkpoint)

    def apply(self, model: nn.Module, plan: Plan) -> list[str]:
        """Convert `model` as `plan` says; returns the names converted to Float8Linear. Call once, before the
        optimizer is built."""
        if getattr(model, "_mptrain_planned", False):
            return []  # converted before: FSDP prepares the sharded model again
        float8 = [name for name, e in plan.items() if self._apply_entry(model, name, e)]
        self._float8(model, float8, plan)
        model._mptrain_planned = True
        return float8

    def replan(self, model: nn.Module, old: Plan, new: Plan) -> list[str]:
        """Move the modules whose entry differs between `old` and `new` to their new entry, in the same process:
        each goes back to its plain torch.nn class (the same parameter objects), then converts as `new` says.
        Returns the names changed."""
        key = lambda e: None if e is None else (e.format, e.grad_format, e.kernel, e.by_rule)  # noqa: E731
        changed = [n for n, e in new.items() if key(old.get(n)) != key(e)]
        float8 = []
        for name in changed:
            _plain(model, name)
            if self._apply_entry(model, name, new[name]):
                float8.append(name)
        self._float8(model, float8, new)
        return changed

    @staticmethod
    def revert(model: nn.Module, plan: Plan) -> None:
        """Every module of `plan` back to its plain torch.nn class, as a freshly built model holds it (the same
        parameter objects): what a switch of preset starts from, so that it converts as a resume would."""
        for name in plan:
            _plain(model, name)
        model.__dict__.pop("_mptrain_planned", None)

    def _apply_entry(self, model: nn.Module, name: str, e) -> bool:
        """Convert one module as its entry says; True where it is to become a Float8Linear (done in one pass)."""
        module = model.get_submodule(name)
        if e.kernel == "float8":
            return True
        fmt = self.registry.get(e.format)
        if e.kernel == "emulated":
            _replace(model, name, _emulated(module, fmt, fmt.grad_format, self.random))
            self.recipes = self.recipes or fmt.three_gemms
        elif e.by_rule and e.kernel in ("autocast", FP32.name) and e.format != (self.autocast or FP32.name):
            # a rule moved it off the run's autocast dtype (the preset's own entries run as autocast decides)
            dtype = None if e.kernel == FP32.name else fmt.torch_dtype
            module.forward = functools.partial(_own_autocast, module.forward, self.device.type, dtype)
        return False

    def _float8(self, model: nn.Module, names: list[str], plan: Plan) -> None:
        """torchao's Float8Linear for `names`, one conversion per recipe."""
        if not names:
            return
        from mptrain.precision import fp8

        by_recipe: dict[str, set[str]] = {}
        for n in names:
            by_recipe.setdefault(self.registry.get(plan[n].format).recipe, set()).add(n)
        before = {n: model.get_submodule(n) for n in names}
        for recipe, chosen in by_recipe.items():
            fp8.require_torchao().convert_to_float8_training(
                model, config=fp8.float8_config(recipe, self.fp8_emulate, self.fp8_all_gather),
                module_filter_fn=lambda m, fqn, chosen=chosen: fqn in chosen)
        for name, old in before.items():
            _keep_hooks(old, model.get_submodule(name))


def _keep_hooks(old: nn.Module, new: nn.Module) -> None:
    """torchao's swap builds a new module: give it the old one's hooks and parameter table, as `_emulated` does,
    so what was attached to the module (FSDP2's gathers, when a plan changes on a sharded model) carries on."""
    if new is old:
        return
    for key, value in vars(old).items():
        if key == "_parameters" or key.endswith(("hooks", "hooks_with_kwargs", "hooks_always_called")):
            new.__dict__[key] = value


def _plain(model: nn.Module, name: str) -> None:
    """Module `name` back to its plain torch.nn class, the same parameter objects, no own-autocast wrapper."""
    module = model.get_submodule(name)
    module.__dict__.pop("forward", None)  # an own-autocast wrapper
    base = torch_base(module)
    if type(module) is not base:
        plain = base.__new__(base)
        plain.__dict__.update({k: v for k, v in module.__dict__.items() if k not in ("fmt", "grad_fmt", "random")})
        _replace(model, name, plain)


def torch_base(module: nn.Module) -> type:
    """The torch.nn class a converted module derives from (EmulatedLinear, Float8Linear -> nn.Linear)."""
    return next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn."))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
