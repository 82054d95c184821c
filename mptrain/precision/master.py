"""Low-precision models and FP32 master weights (the paper's explicit scheme, apex O2 style)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from mptrain.precision.norms import compute_in_fp32, is_norm

# Normalization layers keep float32 parameters and statistics (norms.is_norm; apex's keep_batchnorm_fp32):
# their reductions are where float16 loses most. Layer, group and RMS norms also compute in float32
# (norms.py: the input is upcast, the output cast back; CUDA's LayerNorm refuses the mix).


# off inside `inputs_as_given`: a low-precision model's input casts (Precision's forward pre-hooks) do nothing
CASTING = contextvars.ContextVar("mptrain_input_casts", default=True)


@contextlib.contextmanager
def inputs_as_given() -> Iterator[None]:
    """A low-precision model's input casts do nothing inside: a float32 re-run of its parts (the diagnostics'
    shadow reference) stays float32."""
    token = CASTING.set(False)
    try:
        yield
    finally:
        CASTING.reset(token)


def cast_model(model: nn.Module, dtype: torch.dtype, keep_norm_fp32: bool = True) -> nn.Module:
    """Cast the model's floating parameters and buffers to `dtype`, norm layers excepted."""
    model.to(dtype)
    if keep_norm_fp32:
        for module in model.modules():
            if is_norm(module):
                module.float()
                compute_in_fp32(module)
    return model


class MasterWeights:
    """FP32 master copies of a low-precision model's parameters; the optimizer updates these.

    Parameters that are already float32 (norm layers) serve as their own master. Each step:
    copy the model's gradients to the masters in float32 (where they are unscaled, so small values
    survive), let the optimizer update the masters, then copy the masters back into the model.
    """

    def __init__(self, model: nn.Module):
        self.model_params: list[nn.Parameter] = []  # low-precision params that have a separate master
        self.masters: list[torch.Tensor] = []
        self.params: list[torch.Tensor] = []  # what the optimizer sees, in model order
        self._master_of: dict[int, torch.Tensor] = {}
        self._model_of: dict[int, nn.Parameter] = {}
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if p.dtype == torch.float32:
                self.params.append(p)
                continue
            master = p.detach().clone().float().requires_grad_(True)
            self.model_params.append(p)
            self.masters.append(master)
            self.params.append(master)
            self._master_of[id(p)], self._model_of[id(master)] = master, p

    def master_of(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master of model parameter `p` (`p` itself where it has none)."""
        return self._master_of.get(id(p), p)

    def params_for(self, module: nn.Module) -> list[torch.Tensor]:
        """The optimizer-side tensors of `module`'s parameters (masters where they exist)."""
        return [self.master_of(p) for p in module.parameters() if p.requires_grad]

    def grads_to_master(self, params: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Give each master (of `params`, default all) the float32 copy of its model gradient;
        return the gradients to unscale."""
        params = self.params if params is None else params
        for m in params:
            p = self._model_of.get(id(m))
            if p is not None:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None  # the float16 gradient is no longer needed: free it now
        return [q.grad for q in params if q.grad is not None]

    @torch.no_grad()
    def master_to_model(self, params: list[torch.Tensor] | None = None) -> None:
        pairs = [
            (self._model_of[id(m)], m) for m in (self.masters if params is None else params) if id(m) in self._model_of
        ]
        if pairs:
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])

    def state_dict(self) -> dict:
        return {"masters": [m.detach().clone() for m in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state["masters"]
        if len(saved) != len(self.masters):
            raise ValueError(f"checkpoint holds {len(saved)} master tensors, the model needs {len(self.masters)}")
        for m, s in zip(self.masters, saved):
            m.copy_(s)
        self.master_to_model()
