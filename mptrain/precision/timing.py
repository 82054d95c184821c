"""Forward+backward time of one module in one format, measured on the running device (precision=auto's
objective=time): the module's copy converted by the run's own applier, so the time is that of the executor the
run would use (autocast kernels, torchao's Float8Linear, emulation), on an input of the shape the probe saw.

Cost model: per (module, format) one warm-up and `repeats` timed forward+backward runs of that module alone (one
where the warm-up and the first round both put one format at least `APART` times ahead), once, on the probe's
first step; CUDA events on a GPU (one synchronisation per run), perf_counter on a CPU. The formats'
runs are interleaved (a, b, a, b, ...), so a change of load on a shared machine falls on each format alike.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

APART = 1.5  # time_formats stops after one timed round where one format leads the others by this factor twice


def seconds(fn: Callable[[], None], device: torch.device) -> float:
    """The wall time of one run of `fn`."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()  # the one host synchronisation of a timed run
        return start.elapsed_time(end) / 1000
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """The median wall time of `fn` over `repeats` runs after one warm-up run."""
    return interleaved_medians({"fn": fn}, device, repeats)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int,
                        apart: float | None = None) -> dict[str, float]:
    """Each of `fns` warmed once, then run `repeats` rounds of one run each: the median wall time per name.

    `apart`: stop after the first round when, in it and in the warm-up round alike, the same name ran at least
    `apart` times faster than every other: the order is plain and more rounds would not change it (a 512-wide
    GPT's layers, bf16 against fp32 on a CPU: 2x apart, a third of the probe's timing saved); a near tie gets
    all `repeats` rounds."""
    warm = {name: seconds(fn, device) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn, device))
        if r == 0 and apart is not None and len(fns) > 1:
            first = {name: t[0] for name, t in times.items()}
            if _fastest_by(warm, apart) is not None and _fastest_by(warm, apart) == _fastest_by(first, apart):
                break
    return {name: statistics.median(t) for name, t in times.items()}


def _fastest_by(times: dict[str, float], apart: float) -> str | None:
    """The name at least `apart` times faster than every other (None: no such name)."""
    best = min(times, key=times.__getitem__)
    others = [t for name, t in times.items() if name != best]
    return best if all(t >= apart * times[best] for t in others) else None


# what fully_shard attaches to a module: its state, and hooks that gather and reduce-scatter for the real model
FSDP_STATE = ("__composable_api_state_key", "_fsdp", "_is_fsdp")


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` as its plain torch.nn class (a converted module's own forward dropped). An FSDP2
    module's copy has whole parameters (all-gathered: a collective, every rank times the same modules in the same
    order), and neither FSDP's state nor its hooks."""
    from mptrain.precision.convert import torch_base

    base = torch_base(module)
    plain = base.__new__(base)
    plain.__dict__.update({k: v for k, v in module.__dict__.items() if k not in ("fmt", "grad_fmt", "forward")})
    sharded = [p for p in module.parameters() if hasattr(p, "full_tensor")]
    if not sharded:
        return copy.deepcopy(plain)
    for k, v in module.__dict__.items():
        if k.startswith(FSDP_STATE):
            del plain.__dict__[k]
        elif k.endswith(("hooks", "hooks_with_kwargs", "hooks_always_called")):
            plain.__dict__[k] = type(v)()
    # deepcopy takes the memo's objects for these: the whole weights in place of the shards
    memo = {id(p): nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad) for p in sharded}
    return copy.deepcopy(plain, memo)


def forward_backward(wrapper: nn.Module, example: torch.Tensor, autocast) -> Callable[[], None]:
    """One forward and backward of `wrapper` on `example` (a float input of the probe's shape), gradients dropped."""
    x = example.detach().clone().requires_grad_(example.is_floating_point())

    def run() -> None:
        with autocast():
            out = wrapper(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        wrapper.zero_grad(set_to_none=True)
        x.grad = None

    return run
