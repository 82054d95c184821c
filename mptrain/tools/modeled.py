"""mptrain-estimate --target NAME: a preset's step time and memory modeled for a named GPU, from the model alone.

The network is built on the meta device (no weights allocated, no data computed on: an 8B-parameter model
estimates on a laptop) and traced once with a meta batch of the run's shape (trainer.batch_size samples of the
dataset's own shape), which gives every Linear its M (batch x sequence) and every Conv2d its implicit GEMM. The
preset's plan (precision.layers applied) gives each layer's format (precision=auto: the planner's own choice
on the target's modeled times, `auto_plan`); precision/roofline.py gives its forward+backward time on the target.
The step: every micro-batch's modeled layers, plus the optimizer as one
memory-bound pass over weights, gradients, optimizer state and masters. Not modeled (and listed): every other
module (norms, embeddings, activations), and attention's own matmuls (F.scaled_dot_product_attention is no
module).

Memory, without an allocator: weights, gradients, optimizer state and masters as the preset holds them (its bytes
per parameter, times the meta model's parameters), and activations as the tensors autograd keeps in one
micro-batch's forward, each counted once, weights excluded, floating ones at the preset's compute dtype
(autocast's fp32 norms and losses are undercounted by that). On the meta device attention takes PyTorch's math
path, which keeps the B x heads x T^2 attention matrices that a GPU's flash attention does not keep: there the
activations are an upper bound.
"""

from __future__ import annotations

import logging

import torch
from hydra.utils import instantiate
from torch import nn

from mptrain.config import global_batch
from mptrain.errors import ConfigError
from mptrain.library.data.loading import as_datasets
from mptrain.precision import roofline
from mptrain.precision.bf16_pure import memory_per_param
from mptrain.precision.engine import DTYPES, Precision, resolve_device
from mptrain.precision.families import PRESETS
from mptrain.precision.formats import BF16, FP8

MB = 2**20  # what every memory figure of mptrain-estimate is in
META = torch.device("meta")


def example_batch(cfg) -> tuple[torch.Tensor, dict]:
    """A meta batch of the run's micro-batch size in the dataset's sample shape, and the data's facts."""
    data = as_datasets(instantiate(cfg.dataset))
    sample = data.train[0]
    x = sample[0] if isinstance(sample, (tuple, list)) else sample
    x = torch.as_tensor(x)
    return torch.empty((global_batch(cfg.trainer, 1), *x.shape), dtype=x.dtype, device=META), data.facts


def trace(model: nn.Module, x: torch.Tensor, compute_bytes: int) -> tuple[dict[str, tuple[int, ...]], int]:
    """(module -> its input's shape, activation bytes) of one forward and backward of `model` on the meta `x`."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name):
        def pre(module, args):
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)
        return pre

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()]
    params = {id(p) for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}  # the tensors themselves stay referenced: their ids cannot be reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(base) not in params:
            kept.setdefault(id(base), base)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        raise ConfigError(f"{type(model).__name__} cannot be traced on the meta device ({str(e).splitlines()[0]}); "
                          "estimate it on a device instead (mptrain-estimate without --target)") from None
    finally:
        for h in hooks:
            h.remove()
    size = lambda t: t.numel() * (compute_bytes if t.is_floating_point() else t.element_size())  # noqa: E731
    return shapes, sum(size(t) for t in kept.values())


def bytes_per_param(cfg) -> dict[str, float]:
    """Bytes per parameter of weights, grads, optimizer state, masters and compensation as the preset holds
    them: its optimizer built and stepped once on a small stand-in Linear on the CPU (the optimizers' lazy
    state, fused kernels and random streams do not run on meta tensors). Norm layers kept in fp32 by
    bf16_pure / master are counted in the preset's dtype."""
    precision = Precision(cfg.precision, torch.device("cpu"))
    stand_in = nn.Sequential(*(nn.Linear(32, 32) for _ in range(3)))  # fp8 keeps the first and last bf16
    log = logging.getLogger("mptrain")
    level, _ = log.level, log.setLevel(logging.ERROR)  # the stand-in's plan and emulation lines are not the run's
    try:
        precision.prepare_model(stand_in)
    finally:
        log.setLevel(level)
    params = precision.optimizer_params()
    optimizer = precision.build_optimizer(cfg.optimizer, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return memory_per_param(list(stand_in.parameters()), optimizer, precision)


def auto_plan(precision: Precision, model: nn.Module, plan, shapes: dict, t) -> dict:
    """precision=auto's plan on target `t`: each module auto plans gets the planner's choice (planner.fastest) among
    the candidates it fits, timed by the roofline on its traced input. Errors are not measured here: every
    candidate is taken to hold (a run may still keep a layer in a wider format for its error)."""
    planner = precision.planner
    formats, why = {}, {}
    for name in planner.planned_modules(plan):
        fits = [f for f in planner.ladder if planner.fits(model, name, f, precision.dim_multiple)]
        times = planner.target_times(model.get_submodule(name), shapes[name], fits, t) if name in shapes else {}
        formats[name] = planner.fastest(fits, times)
        why[name] = f"auto: fastest on {t.name}, modeled (errors not measured)"
    return precision.plan_for(model, formats, why)


def model_preset(cfg, where: str) -> dict:
    """The row of the run `cfg` (its preset chosen), modeled for target `where`: memory (MB), step_time_s, and per
    planned Linear / Conv2d its format, time_s, shape (Linear: M, K, N) and whether this machine would emulate it."""
    t = roofline.target(where)
    preset = PRESETS[cfg.precision.mode]
    if preset.fixed_dtype is None and not preset.measured and cfg.precision.dtype not in DTYPES:  # dtype auto
        cfg.precision.dtype = "float16"  # amp's auto dtype on a GPU, as engine.resolve_dtype picks it on CUDA
    if preset.measured and cfg.precision.auto.formats is None:  # a GPU's default candidates, as on CUDA
        cfg.precision.auto.formats = [f.name for f in (BF16, FP8) if roofline.why_not(f, t) is None]
    here = resolve_device(cfg.trainer.device)  # the plan's `emulated`: how this machine would run it
    precision = Precision(cfg.precision, here)
    x, facts = example_batch(cfg)
    facts = {k: v for k, v in facts.items() if k in cfg.model and cfg.model.get(k) is None}
    with META:
        model = instantiate(cfg.model, **facts)
    plan = precision.resolve_plan(model)
    shapes, activations = trace(model, x, torch.empty((), dtype=precision.compute_dtype).element_size())
    if precision.planner is not None:
        plan = auto_plan(precision, model, plan, shapes, t)
    tf32 = bool(cfg.trainer.allow_tf32)
    micro = cfg.trainer.accumulate_grad_batches
    layers, not_modeled = {}, {}
    for name, entry in plan.items():
        module = model.get_submodule(name)
        shape = roofline.shape_of(module, shapes[name]) if name in shapes else None
        if shape is None:
            not_modeled[name] = entry.type
            continue
        fmt = precision.registry.get(entry.format)
        layer = {"format": entry.format, "time_s": roofline.seconds(shape, fmt, t, tf32) * micro,
                 "emulated_here": entry.emulated}
        if isinstance(module, nn.Linear):
            layer["shape"] = {"M": shape.M, "K": shape.K, "N": shape.N}
        layers[name] = layer
    lacking = {roofline.why_not(precision.registry.get(v["format"]), t, tf32) for v in layers.values()} - {None}
    if lacking:
        raise ConfigError(f"precision={cfg.precision.mode} on {t.name}: {'; '.join(sorted(lacking))}")
    n = sum(p.numel() for p in model.parameters())
    per = bytes_per_param(cfg)
    row = {k: per[k] * n / MB for k in ("weights", "grads", "optimizer_state", "master", "compensation")}
    if cfg.trainer.ema.enabled:  # an fp32 copy of every parameter
        row["ema"] = 4 * n / MB
    optimizer_bytes = 2 * (row["weights"] + row["optimizer_state"] + row["master"] + row["compensation"]) + row["grads"]
    row["activations"] = activations / MB
    row["total"] = sum(row.values())
    row["params"] = n
    row["device"] = f"{t.name} ({t.part})"
    optimizer_s = optimizer_bytes * MB / (t.bandwidth * roofline.MEMORY_EFFICIENCY)
    row["step_time_s"] = sum(v["time_s"] for v in layers.values()) + optimizer_s
    row["optimizer_s"] = optimizer_s
    row["layers"], row["not_modeled"] = layers, not_modeled
    return row
