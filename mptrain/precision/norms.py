"""Normalization layers that compute in float32 inside a low-precision model (master, nomaster, bf16_pure).

With keep_norm_fp32 a LayerNorm keeps float32 parameters while its input is fp16 or bf16. PyTorch's CPU
kernel accepts that mix; its CUDA kernel has raised "expected scalar type Half but found Float"
(pytorch#135969). So the layer's input is upcast to float32 and its output cast back to the input's dtype,
the same on every device: the statistics are float32 (where fp16 loses most) and the model around it stays
in its own dtype. Batch norm is left alone: its CPU and CUDA kernels take a low-precision input with
float32 parameters by design (apex's keep_batchnorm_fp32).
"""

from __future__ import annotations

import types

import torch
from torch import nn

FP32_COMPUTE = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _fp32_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    low = x.is_floating_point() and x.dtype != torch.float32
    out = type(self).forward(self, x.float() if low else x, *args, **kwargs)
    return out.to(x.dtype) if low else out


def compute_in_fp32(module: nn.Module) -> bool:
    """Make `module` (a float32 norm layer) upcast its input and cast its output back; True if it was one.
    The override is an instance attribute: state_dict keys, deepcopy and torch.compile see the same module."""
    if not isinstance(module, FP32_COMPUTE) or "forward" in vars(module):
        return False
    module.forward = types.MethodType(_fp32_forward, module)
    return True
