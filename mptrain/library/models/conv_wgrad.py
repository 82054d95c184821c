"""Weight gradients of small-map convolutions on CPU, computed as a forward convolution.

oneDNN's backward-weights kernels on CPU are slow when the feature map is tiny: on the AVX512/AMX
Xeon this project is developed on (oneDNN 3.12), the bf16 weight gradient of a 512->512 3x3 convolution
on a 2x2 map takes ~17 ms while the forward convolution takes ~5 ms, and in fp32 ~23 ms; ResNets on
small images spend most of their backward pass there (docs/benchmarks.md has the profile).

The same numbers come out of a *forward* convolution, which oneDNN does fast. For dilation 1 and one
group, with stride s,

    dW[o, i, a, b] = sum_{n, h, w} dY[n, o, h, w] * Xpad[n, i, s*h + a, s*w + b]

which is conv2d(X with batch and channels swapped, kernel = dY with batch and channels swapped, same
padding, dilation s): a "batch" of C_in images with N channels, filtered by C_out kernels of the output
map's size. Its output is at least kh x kw (exactly, for stride 1); the first kh x kw are dW. Accumulation
happens inside oneDNN in fp32 either way; results agree with the native kernel to rounding.

`trainer.conv_wgrad`: `native` leaves every convolution alone; `forward` uses the forward form for every
eligible convolution (dilation 1, groups 1, zero padding given as numbers, CPU, training);
`auto` (the default) uses it only where it measured faster here: output maps of at most
AUTO_MAX_PIXELS pixels for the compute dtype. `python scripts/conv_wgrad.py` re-measures the crossover
on another machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("auto", "native", "forward")

# Largest output map (pixels) at which `auto` takes the forward form, per compute dtype; measured with
# scripts/conv_wgrad.py on the development machine (oneDNN 3.12, AVX512 + AMX). fp16 on CPU is emulated
# and was not measured: it stays native.
AUTO_MAX_PIXELS = {torch.bfloat16: 16, torch.float32: 4}


class _ConvWgradByForward(torch.autograd.Function):
    """conv2d (dilation 1, one group) whose weight gradient is a forward convolution."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            # (C_in, N, H, W) filtered by (C_out, N, Ho, Wo) dilated by the stride -> (C_in, C_out, >=kh, >=kw)
            kh, kw = weight.shape[-2:]
            grad_w = F.conv2d(x.transpose(0, 1), grad_out.transpose(0, 1), None, 1, ctx.padding, ctx.stride)
            grad_w = grad_w[:, :, :kh, :kw].transpose(0, 1)
            # in the weight's own layout, while still 16-bit: otherwise the cast back to fp32 keeps the
            # transposed strides and the parameter's gradient is re-laid out at full size
            grad_w = torch.empty_like(weight).copy_(grad_w)  # empty_like keeps the weight's strides
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state_dict) whose weight gradient may take the forward form."""

    conv_wgrad: str = "auto"

    def _forward_form_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype to run the forward form in, or None where the plain convolution runs."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad and x.device.type == "cpu" and x.dim() == 4):
            return None
        if self.dilation != (1, 1) or self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else self.weight.dtype
        if not autocast and x.dtype != dtype:
            return None  # let the native path raise its dtype-mismatch error
        if self.conv_wgrad == "forward":
            return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else None
        limit = AUTO_MAX_PIXELS.get(dtype)
        if limit is None:
            return None
        out_h = (x.shape[-2] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        out_w = (x.shape[-1] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        return dtype if out_h * out_w <= limit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._forward_form_dtype(x)
        if dtype is None:
            return super().forward(x)
        # what autocast would do for conv2d, done here because the Function runs with autocast off
        weight, bias = self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _ConvWgradByForward.apply(x.to(dtype), weight, bias, self.stride, self.padding)


def apply(model: nn.Module, mode: str) -> int:
    """Switch the model's plain nn.Conv2d modules to Conv2d (in place); return how many were switched.

    Only exact nn.Conv2d instances: a subclass has its own forward that must not be replaced."""
    if mode not in MODES:
        raise ValueError(f"conv_wgrad={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "native":
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = Conv2d
            module.conv_wgrad = mode
            count += 1
    return count
