"""precision=fp8: Linear layers trained in float8 through torchao (`pip install mptrain[fp8]`).

torchao's Float8Linear casts the input and weight to e4m3 and the output gradient to e5m2 (tensorwise
recipe; the rowwise recipe uses e4m3 with one scale per row) with dynamic scales, scale = fp8 max / amax:
the direct descendant of loss scaling, recomputed for every tensor on every step. Real fp8 GEMMs need a
CUDA GPU of compute capability 8.9+ (H100/H200, L40S, RTX 4090); elsewhere torchao emulates them (same
casts, fp32 matmul), which trains with the same numerics and no speed-up.

Which layers convert follows torchtitan's converter: nn.Linear whose in and out features are multiples
of 16 (an fp8 GEMM requirement), not the first or last Linear (input and output layers are the most
sensitive), plus explicit include/exclude patterns. Float8Linear keeps the parameters of the nn.Linear it
replaces and adds no buffers, so state_dicts stay the plain model's.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math

import torch
from torch import nn

from mptrain.errors import ConfigError, HardwareError

log = logging.getLogger("mptrain")

INSTALL_HINT = "precision=fp8 needs torchao: pip install mptrain[fp8]"


class Fp8MissingError(ConfigError):
    """precision=fp8 without torchao installed."""


def require_torchao():
    """torchao.float8, or Fp8MissingError with the one-line fix."""
    # importing torchao logs a torch.compile deprecation warning about one of its enums: not the user's concern
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
    except ImportError:
        raise Fp8MissingError(INSTALL_HINT) from None
    finally:
        pytree_log.setLevel(level)
    return float8


def has_fp8_kernels(device: torch.device) -> bool:
    """Real fp8 GEMMs (torch._scaled_mm): CUDA compute capability 8.9 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_emulate(emulate: bool | None, device: torch.device) -> tuple[bool, str]:
    """(emulated, why) for precision.fp8.emulate (null = decide from the device)."""
    native = has_fp8_kernels(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if emulate is None:
        if native:
            return False, f"fp8 kernels on {where}"
        return True, f"emulated: {where} has no fp8 kernels (CUDA capability 8.9+ needed)"
    if not emulate and not native:
        raise HardwareError(
            f"precision.fp8.emulate=false needs fp8 kernels (a CUDA GPU of capability 8.9+, e.g. H100); "
            f"{where} lacks them: use precision.fp8.emulate=null"
        )
    return emulate, "emulated (precision.fp8.emulate=true)" if emulate else f"fp8 kernels on {where}"


def plan(model: nn.Module, cfg) -> dict[str, str | None]:
    """Every nn.Linear of `model` (module order) -> None if it converts, else why it stays bf16."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out: dict[str, str | None] = {}
    for i, (name, mod) in enumerate(linears):
        if type(mod).__name__ == "Float8Linear":
            reason = "already float8"
        elif any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            reason = "excluded by precision.fp8.exclude"
        elif cfg.include and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            reason = "not in precision.fp8.include"
        elif cfg.skip_first and i == 0:
            reason = "first Linear (precision.fp8.skip_first)"
        elif cfg.skip_last and i == len(linears) - 1:
            reason = "last Linear (precision.fp8.skip_last)"
        elif "weight" not in mod._parameters:
            reason = "weight computed by weight_norm or a parametrization (Float8Linear needs a plain weight)"
        elif mod.in_features % cfg.dim_multiple or mod.out_features % cfg.dim_multiple:
            reason = f"{mod.in_features}x{mod.out_features} not multiples of {cfg.dim_multiple}"
        else:
            reason = None
        out[name] = reason
    return out


def float8_config(recipe: str, emulate: bool, fsdp_all_gather: bool = False):
    """torchao's Float8LinearConfig for a recipe name, with emulation on or off, and FSDP2's fp8 all-gather."""
    float8 = require_torchao()
    return dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate,
                               enable_fsdp_float8_all_gather=fsdp_all_gather)


def check_all_gather(cfg, emulated: bool, reason: str, tensorwise: str) -> None:
    """precision.fp8.fsdp_all_gather=true where torchao cannot do it: one line, before any work."""
    if not cfg.get("fsdp_all_gather"):
        return
    if emulated:
        raise ConfigError(f"precision.fp8.fsdp_all_gather=true needs real fp8 kernels ({reason}); drop it here "
                          "(the weights are all-gathered in their param dtype)")
    if cfg.recipe != tensorwise:
        raise ConfigError(f"precision.fp8.fsdp_all_gather=true works with precision.fp8.recipe={tensorwise} only "
                          f"(torchao), not {cfg.recipe}; use that recipe or drop the flag")


def converted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The Float8Linear layers of a model (under torch.compile or DDP too)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"}


# ---- diagnostics ----------------------------------------------------------------------------------
# Per converted layer and role (input, weight, grad = the output gradient), what the fp8 cast does:
# amax, the scale (min and max over rows for rowwise), and the fractions of values that underflow
# (non-zero, cast to 0), are subnormal or overflow (round beyond the fp8 max: saturated) at that scale, and
# the same without scaling: what a plain cast would lose, the case the scale exists for.
ROLES = ("input", "weight", "grad")
_FIELDS = ("amax", "scale_min", "scale_max", "count", "underflow", "subnormal", "overflow",
           "underflow_unscaled", "overflow_unscaled")


def _cast_spec(module: nn.Module, role: str) -> tuple[torch.dtype, bool, bool]:
    """(fp8 dtype, rowwise, scales rounded to a power of 2) for one operand of a Float8Linear."""
    c = module.config
    cast = {"input": c.cast_config_input, "weight": c.cast_config_weight, "grad": c.cast_config_grad_output}[role]
    return cast.target_dtype, cast.scaling_granularity.name == "AXISWISE", c.round_scales_to_power_of_2


@torch.no_grad()
def cast_stats(x: torch.Tensor, dtype: torch.dtype, rowwise: bool = False, pow2: bool = False) -> torch.Tensor:
    """The _FIELDS of casting `x` to `dtype` with a dynamic scale (per row along the last dim if
    `rowwise`), as one float64 tensor on x's device (counts, not fractions, so calls can be summed)."""
    x = x.detach().float()
    info = torch.finfo(dtype)
    fmax, tiny = info.max, info.smallest_normal
    # overflow: beyond what rounds to the max (max + half its ulp), not a last-bit excess of x * scale
    limit = fmax + 2.0 ** math.floor(math.log2(fmax)) * info.eps / 2
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    # torchao: scale = fp8 max / amax in float64, amax clamped at 1e-12
    scale = (fmax / amax.double().clamp(min=1e-12)).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    nonzero = x != 0

    def lost(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = v.clamp(-fmax, fmax).to(dtype).float()
        return ((q == 0) & nonzero).sum(), ((q.abs() < tiny) & (q != 0)).sum(), (v.abs() >= limit).sum()

    under, sub, over = lost(x * scale)
    under_u, _, over_u = lost(x)
    n = torch.tensor(float(x.numel()), device=x.device)
    return torch.stack([amax.max(), scale.min(), scale.max(), n, under, sub, over, under_u, over_u]).double()


def _combine(parts: list[torch.Tensor]) -> dict:
    """Calls of one layer and role on one step (micro-batches, shared layers) -> one record of fractions."""
    t = torch.stack(parts).cpu()
    amax, smin, smax = t[:, 0].max().item(), t[:, 1].min().item(), t[:, 2].max().item()
    counts = t[:, 3:].sum(0).tolist()
    n = max(counts[0], 1.0)
    out = {"amax": amax, "scale": smin}
    if smax != smin:
        out["scale_max"] = smax
    out.update({k: c / n for k, c in zip(_FIELDS[4:], counts[1:])})
    return out


class Fp8Stats:
    """amax, scales and e4m3/e5m2 under/overflow of every converted layer, on sampled steps only.

        stats = Fp8Stats(model)      # once; finds the Float8Linear layers (empty for other modes)
        stats.begin()                # before the forward of a sampled step: installs forward hooks
        ... forward, backward (any number of micro-batches) ...
        layers = stats.end()         # after backward: removes the hooks, one host copy per layer
        # {"blocks.0.mlp.0": {"input": {...}, "weight": {...}, "grad": {...}}, ...}
    """

    def __init__(self, model: nn.Module):
        self.modules = converted_modules(model)
        self._handles: list = []
        self._parts: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.totals: dict[str, float] = {}
        self.samples = 0

    def __bool__(self) -> bool:
        return bool(self.modules)

    def begin(self) -> None:
        self._parts = {}
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _add(self, name: str, role: str, module: nn.Module, x: torch.Tensor) -> None:
        self._parts.setdefault((name, role), []).append(cast_stats(x, *_cast_spec(module, role)))

    def _make_hook(self, name: str):
        def forward_hook(module, args, output):
            x = args[0]
            if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
                x = x.to(torch.get_autocast_dtype("cuda"))  # Float8Linear casts its input so under CUDA autocast
            self._add(name, "input", module, x)
            self._add(name, "weight", module, module.weight)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: self._add(name, "grad", module, g))
        return forward_hook

    def end(self) -> dict[str, dict[str, dict]]:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        layers: dict[str, dict[str, dict]] = {}
        for (name, role), parts in self._parts.items():
            layers.setdefault(name, {})[role] = _combine(parts)
        self._parts = {}
        if layers:
            self.samples += 1
            for role, values in overall(layers).items():
                for key, v in values.items():
                    k = f"{role}_{key}"
                    self.totals[k] = max(self.totals.get(k, 0.0), v) if key == "amax" else self.totals.get(k, 0.0) + v
        return layers

    def summary(self) -> dict:
        """For summary.json: mean over sampled steps of the per-step means over layers (amax: the max)."""
        if not self.samples:
            return {}
        return {f"diag/fp8_{k}": v if k.endswith("amax") else v / self.samples for k, v in sorted(self.totals.items())}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def overall(layers: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per role: the mean over layers of the under/overflow fractions, and the largest amax."""
    out: dict[str, dict] = {}
    for role in ROLES:
        recs = [rec[role] for rec in layers.values() if role in rec]
        if recs:
            out[role] = {
                "amax": max(r["amax"] for r in recs),
                **{k: sum(r[k] for r in recs) / len(recs) for k in ("underflow", "overflow", "underflow_unscaled")},
            }
    return out


def scalars(layers: dict[str, dict[str, dict]]) -> dict[str, float]:
    """TensorBoard scalars for one sampled step (tag -> value)."""
    return {f"diag/fp8_{role}_{k}": v for role, rec in overall(layers).items() for k, v in rec.items()}
