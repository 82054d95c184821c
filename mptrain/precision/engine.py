"""The precision object: everything precision-specific, behind one small interface for the loop.

    precision.prepare_model(model)              # cast to fp16 for master/nomaster
    opt = build_optimizer(cfg, precision.optimizer_params(model))
    with precision.autocast():  loss = ...     # forward in the compute dtype
    precision.backward(loss / k)                # scaled backward, once per micro-batch
    applied = precision.step(opt, clip)         # unscale once, overflow check, clip, step|skip,
                                                # scale update, copy masters back
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError, HardwareError
from .master import MasterWeights, cast_model
from .scaler import LossScaler

FP16_MAX = 65504.0  # the largest finite float16

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# mode -> (uses autocast, parameters held in the compute dtype, FP32 master copy)
MODES = {
    "fp32": (False, False, False),
    "amp": (True, False, False),
    "dynamic": (True, False, False),
    "static": (True, False, False),
    "bf16": (True, False, False),
    "noscale": (True, False, False),
    "master": (False, True, True),
    "nomaster": (False, True, False),
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HardwareError(f"trainer.device={name} but no CUDA GPU is visible here; use trainer.device=cpu or auto")
    return device


def resolve_dtype(mode: str, dtype: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype and the reason it was chosen."""
    if mode == "fp32":
        if dtype not in ("auto", "float32"):
            raise ConfigError(f"precision=fp32 computes in float32; precision.dtype={dtype} contradicts it "
                             "(pick precision=amp or precision=bf16 instead)")
        return torch.float32, "fp32 mode"
    if dtype != "auto":
        chosen, why = DTYPES[dtype], f"precision.dtype={dtype}"
    elif device.type == "cuda":
        chosen, why = torch.float16, "auto on CUDA: float16 runs on tensor cores"
    else:
        chosen, why = torch.bfloat16, f"auto on {device.type}: float16 is emulated there, bfloat16 is native"
    if chosen == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise HardwareError(f"bfloat16 needs an Ampere-or-newer GPU; {torch.cuda.get_device_name(device)} lacks it: "
                            "use precision=dynamic (float16) instead")
    return chosen, why


@dataclass
class StepResult:
    applied: bool  # False when the step was skipped for non-finite gradients
    grad_norm: torch.Tensor | None  # total norm of the unscaled gradients, when clipping


class Precision:
    """Owns the autocast context, the loss scaler and (master/nomaster) the parameter dtypes."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.mode = cfg.mode
        self.device = device
        self.use_autocast, self.low_precision_params, self.use_master = MODES[self.mode]
        self.compute_dtype, self.dtype_reason = resolve_dtype(cfg.mode, cfg.dtype, device)
        self.keep_norm_fp32 = cfg.keep_norm_fp32
        self.fp32_accumulation = cfg.fp32_accumulation
        ls = cfg.loss_scale
        kind = ls.kind
        if kind == "auto":
            kind = "dynamic" if self.compute_dtype == torch.float16 else "none"
        if kind == "static" and self.compute_dtype == torch.float16 and ls.init > FP16_MAX:
            raise ConfigError(f"precision.loss_scale.init={ls.init:g} is above float16's largest value (65504): a "
                              "static scale that large overflows a float16 gradient of magnitude >= 1 on every step "
                              "and skips them all; use 32768 or less, or precision.loss_scale.kind=dynamic")
        self.scaler: LossScaler | None = None
        if kind != "none":
            self.scaler = LossScaler(kind, ls.init, ls.growth_factor, ls.backoff_factor, ls.growth_interval,
                                     ls.hysteresis, ls.min, ls.max, ls.on_min)
        self.master: MasterWeights | None = None
        self._params: list[torch.Tensor] = []

    # ---- set-up -------------------------------------------------------------------------------
    def describe(self) -> str:
        scaling = "no loss scaling" if self.scaler is None else f"{self.scaler.kind} loss scaling from {self.scaler.scale:g}"
        params = SHORT_DTYPE[self.compute_dtype] if self.low_precision_params else "fp32"
        master = ", fp32 master weights" if self.use_master else ""
        return f"precision={self.mode}: compute {SHORT_DTYPE[self.compute_dtype]} ({self.dtype_reason}), params {params}{master}, {scaling}"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Cast the model for master/nomaster (call before building the optimizer)."""
        if self.low_precision_params:
            cast_model(model, self.compute_dtype, self.keep_norm_fp32)
        if self.use_master:
            self.master = MasterWeights(model)
            self._params = self.master.params
        else:
            self._params = [p for p in model.parameters() if p.requires_grad]
        self._model = model
        return model

    def optimizer_params(self, module: nn.Module | None = None) -> list[torch.Tensor]:
        """The tensors an optimizer updates (of `module`, default the whole model): FP32 masters in
        `master` mode, else the model's own parameters."""
        if module is None:
            return self._params
        if self.master is not None:
            return self.master.params_for(module)
        return [p for p in module.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def backend_flags(self) -> Iterator[None]:
        """FP32 accumulation inside fp16/bf16 matmuls for the run; restored afterwards (multirun)."""
        m = torch.backends.cuda.matmul
        saved = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
        if self.fp32_accumulation:
            m.allow_fp16_reduced_precision_reduction = False
            m.allow_bf16_reduced_precision_reduction = False
        try:
            yield
        finally:
            m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved

    # ---- the step -----------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_autocast or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """master/nomaster models take inputs in their own dtype."""
        if self.low_precision_params and x.is_floating_point():
            return x.to(self.compute_dtype)
        return x

    def backward(self, loss: torch.Tensor) -> None:
        """Scaled backward. `loss` is float32 (compute losses on float32 logits)."""
        (self.scaler.scale_loss(loss) if self.scaler is not None else loss).backward()

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def step(self, optimizer: torch.optim.Optimizer, clip_grad_norm: float | None = None,
             inspect: Callable[[list[torch.Tensor], bool, float], None] | None = None,
             params: list[torch.Tensor] | None = None, update: bool = True) -> StepResult:
        """Unscale once, check overflow, clip, step or skip, update the scale, copy masters back.

        `inspect(params, overflow, scale)` (diagnostics) sees the unscaled gradients before clipping.
        Several optimizers (a GAN): pass each one's `params` and `update=False`, then call
        `update_scale` once for the iteration (PyTorch's recipe: one scaler, a step per optimizer).
        """
        params = self._params if params is None else params
        grads = self.master.grads_to_master(params) if self.master is not None else [p.grad for p in params if p.grad is not None]
        overflow = False
        if self.scaler is not None:
            # FSDP2: gradients are DTensors; unscale each rank's local shard in place
            sharded = any(hasattr(g, "to_local") for g in grads)
            found_inf = self.scaler.unscale_([g.to_local() if hasattr(g, "to_local") else g for g in grads])
            if found_inf is None:
                found_inf = torch.zeros((), device=self.device)
            if sharded:
                # every rank must take the same skip decision, and each sees only its shard's gradients
                # (DDP needs no such all-reduce: its gradients, infs included, are already all-reduced)
                flag = found_inf.reshape(1).float()
                flag = flag.cpu() if torch.distributed.get_backend() == "gloo" else flag
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                found_inf = flag
            # The one host synchronisation of the step: the skip decision needs the flag.
            overflow = bool(found_inf.item())
        if inspect is not None:
            inspect(params, overflow, self.loss_scale)
        grad_norm = None
        if not overflow:
            if clip_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip_grad_norm)
            optimizer.step()
            if self.master is not None:
                self.master.master_to_model(params)
        optimizer.zero_grad(set_to_none=True)
        self._model.zero_grad(set_to_none=True)  # also gradients other optimizers' losses left (GAN)
        if update:
            self.update_scale(overflow)
        return StepResult(applied=not overflow, grad_norm=grad_norm)

    def update_scale(self, overflow: bool) -> None:
        if self.scaler is not None:
            self.scaler.update(overflow)  # may raise LossScalingError (on_min=raise)

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state: dict = {"mode": self.mode}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.master is not None:
            state["master"] = self.master.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.master is not None and "master" in state:
            self.master.load_state_dict(state["master"])
