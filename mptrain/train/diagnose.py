"""Why a run's gradients were zero at every step: its loss, or float16's range.

Under float16 without enough loss scaling the backward pass flushes every gradient below 2^-24 to zero (the
paper's loss-scaling ablation, precision=noscale), and the run's own diagnostics then see only zeros. The same
batch recomputed in float32 tells that apart from a loss that does not depend on the parameters.
"""

from __future__ import annotations

import copy

import torch

from mptrain.diagnostics.stats import range_stats
from mptrain.library.tasks import checked_loss
from mptrain.train.components import Components


def _first_tensor(output):
    if isinstance(output, dict):  # a Hugging Face ModelOutput: its first tensor
        output = next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def below_subnormal(tensors: list[torch.Tensor], scale: float) -> float | None:
    """The share of the nonzero values whose |x| * scale is below float16's smallest subnormal (2^-24),
    which float16 flushes to zero; None when every value is zero."""
    overall = range_stats(tensors, [str(i) for i in range(len(tensors))], scale=scale).overall
    nonzero = 1.0 - overall["zero"]
    return overall["underflow"] / nonzero if nonzero > 0 else None


def fp32_gradients(c: Components, batch, scale: float) -> dict[str, float | None]:
    """One micro-batch's loss (weighted as the step weights it) backpropagated in float32, no autocast: the
    share of its nonzero gradients below 2^-24 at loss scale `scale`, at the model's output (where the
    backward pass starts) and over the parameters. The run's weights and gradients are left as they were."""
    model = c.base_model
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()  # float16 weights (master, nomaster): a float32 copy
    saved = [p.grad for p in model.parameters()]
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        out = _first_tensor(output)
        if out is not None and out.requires_grad:
            out.register_hook(outputs.append)

    handle = model.register_forward_hook(hook)
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast(c.device.type, enabled=False):
            part = () if len(c.parts) == 1 else (c.parts[0].name,)
            loss = checked_loss(c.task.loss(model, batch, *part), c.task)
            (loss.float() * (c.loss_weight / c.accumulate)).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return {"output": below_subnormal(outputs, scale) if outputs else None,
                "params": below_subnormal(grads, scale) if grads else None}
    finally:
        handle.remove()
        for p, g in zip(model.parameters(), saved):
            p.grad = g


def zero_gradient_error(c: Components, steps: int) -> str:
    """The error of a run whose gradient was zero at every logged step: under float16, with the share of the
    float32 gradients that float16 flushes, and a loss-scaling preset to use."""
    head = f"the run did not train: the loss's gradient was zero at every logged step of {steps}"
    p = c.precision
    fp16 = p.compute_dtype == torch.float16 or any(t.dtype == torch.float16 for t in c.base_model.parameters())
    if fp16 and c.strategy != "fsdp":  # an FSDP forward needs every rank: no one-rank recomputation there
        shares = fp32_gradients(c, c.to_device(next(iter(c.train_loader))), p.loss_scale)
        if shares["output"] is not None or shares["params"] is not None:
            scaling = "no loss scaling" if not p.scaler.enabled else f"loss scale {p.loss_scale:g}"
            where = [f"{s:.1%} of the {what}" for what, s in (("model output's", shares["output"]),
                                                               ("parameters'", shares["params"])) if s is not None]
            fix = ("use a loss-scaling preset: precision=dynamic (or precision=static with precision.loss_scale.init)"
                   if not p.scaler.enabled else
                   f"raise precision.loss_scale.init (now {p.loss_scale:g}), or use precision=dynamic")
            return (f"{head} under float16 with {scaling}, but in float32 (one batch recomputed) it is not: "
                    f"{' and '.join(where)} nonzero gradients lie below float16's smallest subnormal (2^-24), "
                    f"which float16 flushes to zero; {fix}")
    return f"{head}, so the loss does not depend on the parameters' values; check the task's loss"
