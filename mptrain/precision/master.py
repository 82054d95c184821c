"""Low-precision models and FP32 master weights (the paper's explicit scheme, apex O2 style)."""

from __future__ import annotations

import torch
from torch import nn

# Normalization layers keep float32 parameters and statistics (apex's keep_batchnorm_fp32):
# their reductions are where float16 loses most. PyTorch accepts a float16 input with float32
# norm parameters and returns float16, so no casts are needed around them.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def cast_model(model: nn.Module, dtype: torch.dtype, keep_norm_fp32: bool = True) -> nn.Module:
    """Cast the model's floating parameters and buffers to `dtype`, norm layers excepted."""
    model.to(dtype)
    if keep_norm_fp32:
        for module in model.modules():
            if isinstance(module, NORM_LAYERS):
                module.float()
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

    def grads_to_master(self) -> list[torch.Tensor]:
        """Give each master the float32 copy of its model gradient; return all gradients to unscale."""
        for p, m in zip(self.model_params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None  # the float16 gradient is no longer needed: free it now
        return [q.grad for q in self.params if q.grad is not None]

    @torch.no_grad()
    def master_to_model(self) -> None:
        if self.masters:
            torch._foreach_copy_(self.model_params, self.masters)

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
