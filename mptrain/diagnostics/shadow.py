"""Shadow measurement: what each candidate format would do to each layer, on the same inputs, against fp32.

On a sampled step, for every module that holds parameters and every candidate format, the module's forward is
run again (no autograd, autocast off) twice: in float32 on its inputs as they came, and with its floating inputs
and its weights quantized to the format (the bias too where the format is unscaled, as autocast casts it); a
module that calls others (a ConvNeXt block around its convolutions) runs with theirs the same way;
for unscaled formats the output is stored in the format as well (fp16's 65504 bounds outputs too). In the
backward the output gradient is quantized the same way. Per (module, format), the largest over the step's calls:

    err    ||y_q - y|| / ||y||   relative error of the output ("inf": non-finite; null: not measured)
    flush  fraction of the nonzero inputs that the format stores as 0
    sat    fraction of the inputs clamped or overflowed: beyond the max of an unscaled format; for scaled
           formats, elements in the top binade of their scale group (tensor, row, block) that lost more than
           a rounding error (MX block scales put the block's largest value past the element's max)
    gerr, gflush, gsat   the same three for the output gradient (at the run's loss scale)
    wgerr  a training-recipe format (nvfp4_recipe) on a Linear: ||dW_q - dW|| / ||dW|| of the weight gradient
           computed as the recipe computes it (precision/gemms.py: its Hadamard transform, blocks along the
           tokens, stochastic rounding), against dy^T x in float32. Plain formats quantize one output gradient
           for both backward GEMMs, which gerr measures; they leave wgerr null (not measured)

A recipe format's forward reads the weight as the recipe does (2D tiles), and its output gradient is rounded
as the recipe rounds it (stochastically: from the shadow's own generator, never the run's streams).

Scaling follows the format: fp8 is torchao's recipe (dynamic e4m3 per tensor forward and e5m2 per tensor
gradients; `fp8_row`: e4m3 per row throughout), MX and NV formats their blocks; rows and blocks run along the
last dimension (channels for Conv2d). The ops are the training step's own forward, so dropout masks are drawn
from the saved RNG state and restored; buffers (batch-norm statistics) are swapped for copies.

Cost model: only on sampled steps; per module and format one extra forward of that module, one quantize of
its inputs, weights and output gradient; every figure stays on the device until one copy at the end.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import astuple, dataclass

import torch
from torch import nn

from mptrain.errors import ConfigError
from mptrain.precision import gemms
from mptrain.precision.formats import BUILTINS, Format, Registry
from mptrain.precision.master import inputs_as_given

FIELDS = ("err", "flush", "sat", "gerr", "gflush", "gsat", "wgerr")  # the order of a row in diagnostics.jsonl


def _worse(a, b):
    """The larger of two figures ("inf" beats any number; None is not measured)."""
    if a is None:
        return b
    if b is None:
        return a
    if "inf" in (a, b):
        return "inf"
    return max(a, b)


@dataclass(frozen=True)
class Figures:
    """One format's shadow figures on one module (a number, "inf" for non-finite, None when not measured)."""

    err: float | str | None = None
    flush: float | str | None = None
    sat: float | str | None = None
    gerr: float | str | None = None
    gflush: float | str | None = None
    gsat: float | str | None = None
    wgerr: float | str | None = None  # the weight gradient's (training-recipe formats only)

    @classmethod
    def from_row(cls, row) -> Figures:
        """From diagnostics.jsonl's positional row (FIELDS order)."""
        return cls(*row) if row is not None else cls()

    def as_row(self) -> list:
        return list(astuple(self))

    def worst(self, other: Figures) -> Figures:
        return Figures(*(_worse(a, b) for a, b in zip(astuple(self), astuple(other))))

    @property
    def error(self) -> float | None:
        """The worst of the forward, output-gradient and weight-gradient relative errors (None: none measured)."""
        errs = [f for f in (self.err, self.gerr, self.wgerr) if f is not None]
        if not errs:
            return None
        return math.inf if "inf" in errs else max(errs)


def check_formats(names: list[str], registry: Registry = BUILTINS) -> None:
    """A one-line ConfigError for an unknown candidate (checked before the run directory changes)."""
    for name in names:
        try:
            registry.get(name)
        except ConfigError:
            raise ConfigError(f"diagnostics.shadow: unknown format {name!r}; choose from "
                              f"{registry.accepted()}") from None


# the modules a plan swaps in (emulated layers, torchao's Float8Linear): measured through their torch.nn base
CONVERTERS = ("mptrain.precision", "torchao")


def _torch_base(module: nn.Module) -> type:
    return next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn."))


def channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


def quantize(x: torch.Tensor, fmt: Format, dim: int = -1) -> torch.Tensor:
    """fmt.quantize with rows and blocks along `dim`."""
    if fmt.scaling in ("none", "tensor") or dim in (-1, x.dim() - 1) or x.dim() < 2:
        return fmt.quantize(x)
    return fmt.quantize(x.movedim(dim, -1)).movedim(-1, dim)


def _weight(w: torch.Tensor, fmt: Format, owner: nn.Module, key: str) -> torch.Tensor:
    """A parameter as the format's forward reads it: a recipe's Linear weight in 2D tiles, else `quantize`."""
    if key == "weight" and fmt.weight_scaling == "2d" and isinstance(owner, nn.Linear):
        return fmt.quantize_tiles(w)
    return quantize(w, fmt, channel_dim(owner))


def lost(x: torch.Tensor, q: torch.Tensor, fmt: Format, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(flushed, saturated) fractions of x stored as q (device scalars)."""
    x, q = x.detach().float(), q.float()
    n = max(x.numel(), 1)
    nonzero = x != 0
    flush = (nonzero & (q == 0)).sum() / nonzero.sum().clamp(min=1)
    a = x.abs()
    if fmt.scaling == "none":
        # beyond max, or rounded to inf from a finite value: the same set, since a finite |x| <= max never rounds
        # past max (max is on the grid); one comparison instead of five passes (the shadow's largest cost)
        sat = a > fmt.max
    else:
        b = q.abs()
        # top binade of each scale group (the whole tensor, a row, a block), and more than a rounding error lost
        if fmt.scaling == "tensor" or x.dim() == 0:
            top = a.amax()
        else:
            moved = a.movedim(dim, -1) if dim not in (-1, x.dim() - 1) else a
            if fmt.scaling == "row":
                top = moved.amax(dim=-1, keepdim=True)
            else:
                last = moved.shape[-1]
                pad = (-last) % fmt.block
                blocks = torch.nn.functional.pad(moved, (0, pad)).unflatten(-1, (-1, fmt.block))
                top = blocks.amax(dim=-1, keepdim=True).expand(blocks.shape).flatten(-2)[..., :last]
            if dim not in (-1, x.dim() - 1):
                top = top.movedim(-1, dim)
        rounding = 2.0 ** -(fmt.element.mbits + 1)
        sat = (a >= top / 2) & (b < a * (1 - rounding) - 1e-30) | (torch.isinf(b) & torch.isfinite(a))
    return flush, sat.sum() / n


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    ref, got = ref.detach().float(), got.detach().float()
    den = torch.linalg.vector_norm(ref)
    num = torch.linalg.vector_norm(got - ref)
    err = num / den.clamp(min=1e-30)
    return torch.where(torch.isfinite(num), torch.where(den > 0, err, (num > 0).float() * math.inf), math.inf)


def _floats(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_floats(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _floats(v, fn) for k, v in obj.items()}
    return obj


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _own_tensors(module: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(owner, key, parameter) for every parameter of the module and of the modules inside it: a module that
    holds parameters and calls others (timm's ConvNeXt block, a ViT's root) is measured with all of them."""
    return [(m, k, p) for m in module.modules() for k, p in m._parameters.items() if p is not None]


def whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter whole: FSDP2's shard (a DTensor, once the module's forward has resharded it) all-gathered for
    the measurement only (a collective: every rank's hooks meet the modules in the same order)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


@contextlib.contextmanager
def _swapped(module: nn.Module, params: list[torch.Tensor]):
    """The module and the modules inside it compute with `params` (in `_own_tensors` order), fresh copies of
    their buffers (a batch-norm update lands in the copies), the torch.nn forward of a converted module
    (emulated, float8: the reference is float32, not the format it computes in now), and inputs as given
    (a low-precision model's input casts would make the float32 reference fp16). Everything is put back."""
    owners = list(module.modules())
    saved = [(m, dict(m._parameters), dict(m._buffers), vars(m).get("forward")) for m in owners]
    try:
        for (m, k, _), v in zip(_own_tensors(module), params):
            m._parameters[k] = v
        for m in owners:
            for k, b in m._buffers.items():
                if b is not None:
                    m._buffers[k] = b.clone()
            if type(m).__module__.startswith(CONVERTERS):  # not a user's or timm's own subclass
                m.forward = _torch_base(m).forward.__get__(m)
        with inputs_as_given():
            yield
    finally:
        for m, p, b, forward in saved:
            m._parameters.update(p)
            m._buffers.update(b)
            if forward is None:
                vars(m).pop("forward", None)
            else:
                m.forward = forward


class Shadow:
    """The shadow figures of one sampled step: `forward(module, name, args, kwargs)` from a forward hook,
    `grad(name, module, g)` from the output's gradient hook, `end()` -> {module: {format: [six figures]}}
    (rows in FIELDS order, as diagnostics.jsonl holds them; `Figures.from_row` reads one)."""

    def __init__(self, formats: list[str] | tuple[str, ...], registry: Registry = BUILTINS,
                 only: dict[str, list[str]] | None = None, gather: bool = False):
        self.names = list(formats)
        # FSDP2: all-gather a sharded module's weights for the measurement; only where every rank measures (the
        # planner), since a gather on one rank alone (diagnostics run on rank 0) would wait forever
        self.gather = gather
        # (forward, gradient) formats; an unknown name fails here, at start
        self.formats = {n: (registry.get(n), registry.get(n).grad_format) for n in self.names}
        self.only = only  # module -> the formats measured on it (precision=auto: those that could pay); None: all
        self._rows: dict[str, dict[str, list]] = {}
        # training recipes: the shadow's own random streams, and each Linear's inputs until its backward
        self._random: gemms.RecipeRandom | None = None
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._recipes = any(f.three_gemms for f, _ in self.formats.values())

    def measures(self, module: str) -> bool:
        return self.only is None or bool(self.only.get(module))

    def _formats(self, module: str) -> list[tuple[str, tuple]]:
        return [(n, f) for n, f in self.formats.items() if self.only is None or n in self.only.get(module, ())]

    def __bool__(self) -> bool:
        return bool(self.names)

    def _keep(self, module: str, fmt: str, i: int, values: list[torch.Tensor]) -> None:
        row = self._rows.setdefault(module, {}).setdefault(fmt, [None] * len(FIELDS))
        for k, v in enumerate(values):
            v = v.reshape(()).float()
            row[i + k] = v if row[i + k] is None else torch.maximum(row[i + k], v)

    @torch.no_grad()
    def forward(self, module: nn.Module, name: str, args: tuple, kwargs: dict, output) -> None:
        y = _first_tensor(output)
        x = _first_tensor(args)
        if y is None or x is None or not y.is_floating_point():
            return
        dim = channel_dim(module)
        own = _own_tensors(module)
        if any(hasattr(v, "full_tensor") for _, _, v in own):
            if not self.gather:
                return  # a sharded module measured on one rank only: its weights cannot be gathered here
            own = [(m, k, whole(v)) for m, k, v in own]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if y.is_cuda else None

        def run(p: list, a: tuple, kw: dict) -> torch.Tensor | None:
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng)
            with torch.autocast(y.device.type, enabled=False), _swapped(module, p):
                # forward, not __call__: the module's own hooks (a preset's input casts) are the run's, not ours
                return _first_tensor(module.forward(*a, **kw))

        f32 = lambda t: t.detach().float()  # noqa: E731
        ref = run([f32(v) for _, _, v in own], _floats(args, f32), _floats(kwargs, f32))
        for fname, (fwd, _) in self._formats(name):
            q = lambda t, fwd=fwd: quantize(t.detach().float(), fwd, dim)  # noqa: E731
            qp = [_weight(f32(v), fwd, m, k) if v.dim() >= 2 or not fwd.scaled else f32(v) for m, k, v in own]
            got = run(qp, _floats(args, q), _floats(kwargs, q))
            if not fwd.scaled:
                got = fwd.quantize(got)  # the output is held in the format too
            flush, sat = lost(x, quantize(x.detach().float(), fwd, dim), fwd, dim)
            if not fwd.scaled:
                sat = torch.maximum(sat, (ref.abs() > fwd.max).float().mean())
            self._keep(name, fname, 0, [rel_err(ref, got), flush, sat])
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)
        if self._recipes and isinstance(module, nn.Linear):
            self._inputs.setdefault(name, []).append(x.detach().float().reshape(-1, x.shape[-1]))

    def _generator(self, device: torch.device) -> gemms.RecipeRandom:
        if self._random is None or self._random.device != device:
            self._random = gemms.RecipeRandom(device)  # seed 0: a measurement, not the run's rounding
        return self._random

    @torch.no_grad()
    def grad(self, name: str, module: nn.Module, g: torch.Tensor) -> None:
        dim = channel_dim(module)
        g = g.detach().float()
        inputs = self._inputs.get(name)
        x = inputs.pop() if inputs else None  # the backward meets a module's calls in reverse order
        for fname, (fwd, gfmt) in self._formats(name):
            random = self._generator(g.device) if fwd.three_gemms else None
            if random is not None and fwd.grad_rounding == "stochastic" and dim == -1:
                q = gemms.round_grad(gfmt, g, random.generator)  # a recipe's Linear: blocks along out_features
            else:
                q = quantize(g, gfmt, dim)
            flush, sat = lost(g, q, gfmt, dim)
            self._keep(name, fname, 3, [rel_err(g, q), flush, sat])
            if random is not None and x is not None:
                dy = g.reshape(-1, g.shape[-1])
                signs = random.signs(fwd.wgrad_hadamard, g.device) if fwd.wgrad_hadamard else None
                generator = random.generator if fwd.grad_rounding == "stochastic" else None
                dw = gemms.weight_gradient(fwd, dy, x, signs, generator)
                self._keep(name, fname, 6, [rel_err(dy.t() @ x, dw)])

    def end(self) -> dict[str, dict[str, list[float | None]]]:
        """Every figure with one copy to the host; a figure not measured (no backward) is None."""
        keys = [(m, f, i) for m, row in self._rows.items() for f, vals in row.items()
                for i, v in enumerate(vals) if v is not None]
        out = {m: {f: [None] * len(FIELDS) for f in row} for m, row in self._rows.items()}
        if keys:
            values = torch.stack([self._rows[m][f][i] for m, f, i in keys]).cpu().tolist()
            for (m, f, i), v in zip(keys, values):
                out[m][f][i] = v if math.isfinite(v) else "inf"  # JSON has no inf; null = not measured
        self._rows = {}
        self._inputs = {}
        return out
