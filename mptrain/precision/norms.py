"""Normalization layers that compute in float32 inside a low-precision model (master, nomaster, bf16_pure).

With keep_norm_fp32 a LayerNorm keeps float32 parameters while its input is fp16 or bf16. PyTorch's CPU
kernel accepts that mix; its CUDA kernel has raised "expected scalar type Half but found Float"
(pytorch#135969). So the layer's input is upcast to float32 and its output cast back to the input's dtype,
the same on every device: the statistics are float32 (where fp16 loses most) and the model around it stays
in its own dtype. Batch norm is left alone: its CPU and CUDA kernels take a low-precision input with
float32 parameters by design (apex's keep_batchnorm_fp32).
"""

from __future__ import annotations

import re
import types

import torch
from torch import nn

FP32_COMPUTE = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# kept float32 in a low-precision model (apex's keep_batchnorm_fp32): their reductions are where fp16 loses most
TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
# a library's own norm class (Hugging Face's LlamaRMSNorm, T5LayerNorm, Qwen2RMSNorm ...), known by its name
OTHER_NORM = re.compile(r"(RMSNorm|LayerNorm|GroupNorm)(\d+d)?$")


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: PyTorch's, or another library's that names itself one and is a leaf holding only
    per-channel (1-D) parameters. Without the second kind, bf16_pure never trained HF Llama's RMSNorm weights:
    an update below half a bf16 ulp of 1.0 rounds away."""
    if isinstance(module, TORCH_NORMS):
        return True
    params = list(module.parameters(recurse=False))
    return (bool(OTHER_NORM.search(type(module).__name__)) and not any(True for _ in module.children())
            and bool(params) and all(p.dim() == 1 for p in params))


def _fp32_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    low = x.is_floating_point() and x.dtype != torch.float32
    out = type(self).forward(self, x.float() if low else x, *args, **kwargs)
    return out.to(x.dtype) if low else out


def compute_in_fp32(module: nn.Module) -> bool:
    """Make `module` (a float32 norm layer) upcast its input and cast its output back; True if it was one.
    The override is an instance attribute: state_dict keys, deepcopy and torch.compile see the same module."""
    computes = isinstance(module, FP32_COMPUTE) or (is_norm(module) and not isinstance(module, TORCH_NORMS))
    if not computes or "forward" in vars(module):
        return False
    module.forward = types.MethodType(_fp32_forward, module)
    return True
