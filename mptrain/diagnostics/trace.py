"""Overflow provenance: re-run one batch with hooks and name the first module that overflowed."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mptrain.diagnostics.stats import FP16_MAX


def is_bad(t: object) -> bool:
    """Non-finite, or beyond what FP16 can hold."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return False
    t = t.detach()
    return bool((~torch.isfinite(t)).any() or t.abs().max() > FP16_MAX)


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


@contextlib.contextmanager
def _no_inplace(model: nn.Module) -> Iterator[None]:
    """Full backward hooks cannot see through in-place activations: switch them off for the trace."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """The trace must not change the run: keep buffers (BN statistics) and the RNG as they were."""
    buffers = {k: v.detach().clone() for k, v in model.state_dict().items() if not isinstance(v, nn.Parameter)}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        model.load_state_dict(buffers, strict=False)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def trace_overflow(
    model: nn.Module, run_batch: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None]
) -> dict:
    """Forward and backward one batch with hooks on every leaf module.

    `run_batch()` returns the loss (it does the forward under the run's autocast); `backward(loss)`
    does the run's scaled backward. Returns {"forward": {...} | None, "backward": {...} | None,
    "nonfinite_params": [...]}, each naming the first module, in execution order, whose output
    (forward) or gradient w.r.t. its input (backward) was non-finite or above 65504.
    """
    found: dict = {"forward": None, "backward": None}
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def on_forward(module: nn.Module, args: object, output: object) -> None:
        if found["forward"] is None and any(is_bad(t) for t in _tensors(output)):
            found["forward"] = {"module": names[module], "type": type(module).__name__, "where": "output"}

    def on_backward(module: nn.Module, grad_input: object, grad_output: object) -> None:
        if found["backward"] is not None:
            return
        if any(is_bad(t) for t in _tensors(grad_output)):
            found["backward"] = {"module": names[module], "type": type(module).__name__, "where": "gradient of output"}
        elif any(is_bad(t) for t in _tensors(grad_input)):
            found["backward"] = {"module": names[module], "type": type(module).__name__, "where": "gradient of input"}

    leaves = [m for m in model.modules() if not list(m.children())]
    with _preserved(model), _no_inplace(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            for m in leaves:
                handles.append(m.register_forward_hook(on_forward))
                handles.append(m.register_full_backward_hook(on_backward))
            loss = run_batch()
            if not torch.isfinite(loss.detach()).all() and found["forward"] is None:
                found["forward"] = {"module": "loss", "type": "loss", "where": "output"}
            backward(loss)
        finally:
            for h in handles:
                h.remove()
    bad_params = [n for n, p in model.named_parameters()
                  if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    if found["backward"] is None and bad_params:
        # no module's input gradient overflowed: the first parameter gradient in backward order did
        owner = bad_params[-1].rpartition(".")[0]
        found["backward"] = {"module": owner, "type": type(model.get_submodule(owner)).__name__ if owner else "",
                             "where": "gradient of parameter"}
    model.zero_grad(set_to_none=True)
    found["nonfinite_params"] = bad_params
    return found
