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
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mptrain.config import Fp8Config
from mptrain.errors import ConfigError, HardwareError
from mptrain.library.optim import build_optimizer
from mptrain.precision import fp8
from mptrain.precision.bf16_pure import build_pure_bf16_optimizer
from mptrain.precision.master import MasterWeights, cast_model
from mptrain.precision.scaler import LossScaler, SwitchToBF16

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
    "bf16_pure": (False, True, False),  # bf16 weights, grads and optimizer state (precision/bf16_pure.py)
    "fp8": (True, False, False),  # float8 Linear layers (torchao), bf16 autocast around them
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
    if mode == "bf16_pure" and dtype not in ("auto", "bfloat16"):
        raise ConfigError(f"precision=bf16_pure holds bfloat16 weights; precision.dtype={dtype} contradicts it "
                          "(use precision=master or nomaster for float16 weights)")
    if mode == "fp8" and dtype not in ("auto", "bfloat16"):
        raise ConfigError(f"precision=fp8 runs the layers it does not convert in bfloat16; precision.dtype={dtype} "
                          "contradicts it (leave it auto or bfloat16)")
    if mode in ("bf16_pure", "fp8"):
        dtype = "bfloat16"
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


def check_bf16_fallback(mode: str, kind: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Refuse `precision.loss_scale.on_min=bf16` at start where the switch could not apply.

    `kind` is the resolved scaler kind (static | dynamic; with none there is nothing to switch)."""
    key = "precision.loss_scale.on_min=bf16"
    if compute_dtype == torch.float32:
        raise ConfigError(f"{key} switches float16 compute to bfloat16, but precision={mode} computes in float32: "
                          "a switch would lower its precision (use on_min=raise or on_min=clamp)")
    if MODES[mode][1]:
        raise ConfigError(f"{key} needs float32 parameters, but precision={mode} holds them in float16: "
                          "use precision=dynamic (or amp) to keep the bf16 fallback, or on_min=raise|clamp")
    if kind == "static":
        raise ConfigError(f"{key} cannot apply with precision.loss_scale.kind=static: a static scale never backs "
                          "off, so it never reaches min and the switch would never happen (use kind=dynamic)")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key} needs bfloat16, which {torch.cuda.get_device_name(device)} lacks (pre-Ampere): "
                          "use on_min=raise or on_min=clamp")


@dataclass
class StepResult:
    applied: bool  # False when the step was skipped for non-finite gradients
    grad_norm: torch.Tensor | None  # total norm of the unscaled gradients, when clipping
    switched_to_bf16: bool = False  # on_min=bf16: this step's overflow at min scale switched the run to bf16


class Precision:
    """Owns the autocast context, the loss scaler and (master/nomaster) the parameter dtypes."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.mode = cfg.mode
        self.device = device
        self.use_autocast, self.low_precision_params, self.use_master = MODES[self.mode]
        self.compute_dtype, self.dtype_reason = resolve_dtype(cfg.mode, cfg.dtype, device)
        self.keep_norm_fp32 = cfg.keep_norm_fp32
        self.fp32_accumulation = cfg.fp32_accumulation
        self.update = cfg.get("update", "nearest")  # bf16_pure's rounding rule (cfg.update is DictConfig.update)
        self.compile_update = bool(cfg.get("compile_update", False))  # bf16_pure: compiled per-tensor update
        ls = cfg.loss_scale
        kind = ls.kind
        if kind == "auto":
            kind = "dynamic" if self.compute_dtype == torch.float16 else "none"
        if ls.on_min == "bf16" and kind != "none":
            check_bf16_fallback(self.mode, kind, self.compute_dtype, device)
        if kind == "static" and self.compute_dtype == torch.float16 and ls.init > FP16_MAX:
            log.warning("precision.loss_scale.init=%g is above float16's largest value (65504): unless the gradients "
                        "are far below 1 (e.g. a small trainer.loss_weight), every step overflows and is skipped; "
                        "32768 or less, or precision.loss_scale.kind=dynamic, is the usual choice", ls.init)
        self.scaler: LossScaler | None = None
        if kind != "none":
            self.scaler = LossScaler(kind, ls.init, ls.growth_factor, ls.backoff_factor, ls.growth_interval,
                                     ls.hysteresis, ls.min, ls.max, ls.on_min,
                                     consecutive_hysteresis=ls.get("consecutive_hysteresis", False))
        # on_min=bf16: the facts of the switch once it happened (None before), kept in state_dict()
        self.bf16_switch: dict | None = None
        self.master: MasterWeights | None = None
        self._params: list[torch.Tensor] = []
        self._input_hooks: list = []
        # FSDP: each rank sees only its gradient shard, so every rank must agree on a skip; the distributed
        # code sets this to an all-reduce (max) of the overflow flag (DDP's gradients are already all-reduced)
        self.agree_on_overflow: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.fp8_cfg = (cfg.get("fp8") or OmegaConf.structured(Fp8Config)) if self.mode == "fp8" else None
        self.fp8_layers: list[str] = []
        if self.fp8_cfg is not None:  # fail before the run directory is touched
            fp8.require_torchao()
            self.fp8_emulated, self.fp8_reason = fp8.resolve_emulate(self.fp8_cfg.emulate, device)

    # ---- set-up -------------------------------------------------------------------------------
    def describe(self) -> str:
        scaling = "no loss scaling" if self.scaler is None else f"{self.scaler.kind} loss scaling from {self.scaler.scale:g}"
        params = SHORT_DTYPE[self.compute_dtype] if self.low_precision_params else "fp32"
        master = ", fp32 master weights" if self.use_master else ""
        if self.mode == "bf16_pure":
            master = f", bf16 optimizer state, update={self.update}"
        if self.fp8_cfg is not None:
            master += (f", Linear layers in float8 (e4m3 forward, {'e4m3' if self.fp8_cfg.recipe == 'rowwise' else 'e5m2'} "
                       f"gradients, {self.fp8_cfg.recipe} dynamic scales; {self.fp8_reason})")
        return f"precision={self.mode}: compute {SHORT_DTYPE[self.compute_dtype]} ({self.dtype_reason}), params {params}{master}, {scaling}"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Cast the model for master/nomaster, convert Linear layers for fp8 (call before building the optimizer)."""
        if self.fp8_cfg is not None:
            _, names, _ = fp8.convert(model, self.fp8_cfg, self.device)
            self.fp8_layers += names  # FSDP calls this again on the sharded model: nothing new converts then
        if self.low_precision_params:
            cast_model(model, self.compute_dtype, self.keep_norm_fp32)
            if not self._input_hooks:  # once: FSDP calls prepare_model again on the sharded model
                # float32 inputs reach the low-precision model (and its top-level parts, which a task may call
                # directly, e.g. a GAN's generator) in its own dtype
                for module in (model, *model.children()):
                    self._input_hooks.append(module.register_forward_pre_hook(self._cast_args))
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

    def build_optimizer(self, cfg: DictConfig, params: list) -> torch.optim.Optimizer:
        """The `optimizer=` group's optimizer over `params` (optimizer_params()): PyTorch's, or under bf16_pure
        the same rule computed in fp32 from bf16 state, rounded by precision.update."""
        if self.mode != "bf16_pure":
            return build_optimizer(cfg, params)
        return build_pure_bf16_optimizer(cfg, list(params), self.update, compile=self.compile_update)

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
        if self.low_precision_params and x.is_floating_point() and x.dtype == torch.float32:
            return x.to(self.compute_dtype)
        return x

    def _cast_args(self, module: nn.Module, args: tuple) -> tuple:
        return tuple(self.cast_inputs(a) if isinstance(a, torch.Tensor) else a for a in args)

    def backward(self, loss: torch.Tensor) -> None:
        """Scaled backward. `loss` is float32 (compute losses on float32 logits)."""
        (self.scaler.scale_loss(loss) if self.scaler is not None else loss).backward()

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def step(self, optimizer: torch.optim.Optimizer, clip_grad_norm: float | None = None,
             inspect: Callable[[list[torch.Tensor], bool, float], None] | None = None,
             params: list[torch.Tensor] | None = None, update: bool = True, measure_norm: bool = False) -> StepResult:
        """Unscale once, check overflow, clip, step or skip, update the scale, copy masters back.

        `inspect(params, overflow, scale)` (diagnostics) sees the unscaled gradients before clipping.
        Several optimizers (a GAN): pass each one's `params` and `update=False`, then call
        `update_scale` once for the iteration (PyTorch's recipe: one scaler, a step per optimizer).
        `measure_norm`: return the total norm of the unscaled gradients even without clipping (a device
        tensor, not read here); clipping always returns it.
        """
        params = self._params if params is None else params
        grads = self.master.grads_to_master(params) if self.master is not None else [p.grad for p in params if p.grad is not None]
        overflow = False
        if self.scaler is not None:
            # FSDP2: gradients are DTensors; unscale each rank's local shard in place
            found_inf = self.scaler.unscale_([g.to_local() if hasattr(g, "to_local") else g for g in grads])
            if found_inf is None:
                found_inf = torch.zeros((), device=self.device)
            if self.agree_on_overflow is not None:
                found_inf = self.agree_on_overflow(found_inf)
            # The one host synchronisation of the step: the skip decision needs the flag.
            overflow = bool(found_inf.item())
        if inspect is not None:
            inspect(params, overflow, self.loss_scale)
        grad_norm = None
        if not overflow:
            if clip_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip_grad_norm)
            elif measure_norm:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            optimizer.step()
            if self.master is not None:
                self.master.master_to_model(params)
        optimizer.zero_grad(set_to_none=True)
        self._model.zero_grad(set_to_none=True)  # also gradients other optimizers' losses left (GAN)
        switched = self.update_scale(overflow) if update else False
        return StepResult(applied=not overflow, grad_norm=grad_norm, switched_to_bf16=switched)

    def update_scale(self, overflow: bool) -> bool:
        """Advance the loss scale; True when it switched the run to bfloat16 (on_min=bf16)."""
        if self.scaler is None:
            return False
        try:
            self.scaler.update(overflow)  # may raise LossScalingError (on_min=raise)
        except SwitchToBF16 as switch:
            log.warning("%s: switching to bfloat16 autocast, without loss scaling, for the rest of the run "
                        "(precision.loss_scale.on_min=bf16)", switch)
            self.switch_to_bf16(switch.facts)
            return True
        return False

    def switch_to_bf16(self, facts: dict | None = None) -> None:
        """Compute in bfloat16 autocast from now on, without loss scaling; all else stays.

        `facts` (plain numbers) describe why; they are kept in `bf16_switch` and the state_dict."""
        if self.low_precision_params:
            raise ConfigError(f"precision={self.mode} holds float16 parameters: it cannot switch to bfloat16")
        record = {"from_dtype": SHORT_DTYPE[self.compute_dtype], **(facts or {})}
        if self.scaler is not None:
            record.update(self.scaler.stats(), skipped=self.scaler.skipped)
        self.bf16_switch = record
        self.compute_dtype, self.dtype_reason = torch.bfloat16, "switched from float16 by loss_scale.on_min=bf16"
        self.use_autocast = True
        self.scaler = None

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for overflow over the run (also those before a switch to bf16)."""
        if self.scaler is not None:
            return self.scaler.skipped
        return int(self.bf16_switch["skipped"]) if self.bf16_switch is not None else 0

    def scaler_stats(self) -> dict:
        """The loss scaler's statistics for summary.json ({} without a scaler); after a switch to bf16,
        their values at the switch."""
        if self.scaler is not None:
            return self.scaler.stats()
        if self.bf16_switch is not None:
            return {k: self.bf16_switch[k] for k in ("loss_scale_min", "loss_scale_max", "loss_scale_backoffs")
                    if k in self.bf16_switch}
        return {}

    def summary(self) -> dict:
        """Mode-specific figures for summary.json."""
        if self.fp8_cfg is None:
            return {}
        return {"fp8_layers": len(self.fp8_layers), "fp8_recipe": self.fp8_cfg.recipe, "fp8_emulated": self.fp8_emulated}

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state: dict = {"mode": self.mode}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.bf16_switch is not None:
            state["bf16_switch"] = dict(self.bf16_switch)
        if self.master is not None:
            state["master"] = self.master.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("bf16_switch") is not None:  # the run had switched to bf16: continue in bf16
            self.switch_to_bf16()
            self.bf16_switch = dict(state["bf16_switch"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.master is not None and "master" in state:
            self.master.load_state_dict(state["master"])
