"""One object per precision family, chosen by the preset (the `precision=` name).

    autocast      fp32 amp dynamic static bf16 noscale fp8   float32 weights, autocast in the compute dtype
                                                             (none for fp32), optional loss scaler; module
                                                             converters for fp8 / emulated / per-layer formats
    fp16_weights  master nomaster                            the model in float16 (norm layers float32), with or
                                                             without fp32 master weights
    pure_bf16     bf16_pure                                  bf16 weights and optimizer state, its update rule

A family knows the preset's plan before any rule (`base`), how to prepare the model, and how to build the
optimizer; the training step and the optimizer builder never test a preset's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mptrain.config import PRESET_FAMILIES
from mptrain.errors import ConfigError
from mptrain.library.optim import build_optimizer, check_bf16_pure, param_groups
from mptrain.precision.bf16_pure import PureBf16Optimizer, build_pure_bf16_optimizer
from mptrain.precision.formats import FP32
from mptrain.precision.formats.registry import AUTOCAST_TYPES, Registry
from mptrain.precision.master import cast_model
from mptrain.precision.norms import is_norm
from mptrain.precision.plan import planned_modules


@dataclass(frozen=True)
class Preset:
    family: str
    # the loss scaling the preset is named for: a different precision.loss_scale.kind contradicts it
    # (None: the preset takes any kind)
    scaling: str | None = None
    master: bool = False  # fp16_weights: an fp32 master copy in the optimizer
    fixed_dtype: str | None = None  # the only compute dtype the preset allows (with "auto")
    dtype_why: str = ""
    fp8: bool = False  # Linear layers in float8 through torchao, chosen by precision.fp8's filter
    measured: bool = False  # the plan comes from measurement during the run (precision=auto, precision/planner.py)


PRESETS = {
    "fp32": Preset(
        "autocast",
        fixed_dtype="float32",
        dtype_why="computes in float32; precision.dtype={dtype} contradicts it (pick precision=amp or "
        "precision=bf16 instead)",
    ),
    "amp": Preset("autocast"),
    "dynamic": Preset("autocast", scaling="dynamic"),
    "static": Preset("autocast", scaling="static"),
    "bf16": Preset("autocast"),
    "noscale": Preset("autocast", scaling="none"),
    "fp8": Preset(
        "autocast",
        fixed_dtype="bfloat16",
        fp8=True,
        dtype_why="runs the layers it does not convert in bfloat16; precision.dtype={dtype} contradicts it "
        "(leave it auto or bfloat16)",
    ),
    "master": Preset("fp16_weights", master=True),
    "nomaster": Preset("fp16_weights"),
    "bf16_pure": Preset(
        "pure_bf16",
        fixed_dtype="bfloat16",
        dtype_why="holds bfloat16 weights; precision.dtype={dtype} contradicts it (use precision=master "
        "or nomaster for float16 weights)",
    ),
    # bf16 autocast where the device has it, else fp32 (engine.resolve_dtype); then a measured plan (planner.py)
    "auto": Preset("autocast", scaling="none", measured=True),
}
# the presets mptrain-estimate compares by default (the fp8 and auto ones need a plan or torchao)
ESTIMATED = ("fp32", "amp", "bf16", "dynamic", "master", "bf16_pure")
assert {k: p.family for k, p in PRESETS.items()} == PRESET_FAMILIES, "config.PRESET_FAMILIES and PRESETS disagree"


class AutocastFamily:
    """fp32 weights; autocast in the compute dtype (not for fp32); converters for per-layer formats."""

    uses_autocast = True
    low_precision_params = False
    takes_layers = True

    def __init__(self, preset: Preset, cfg):
        self.preset, self.cfg = preset, cfg

    def base(self, model: nn.Module, compute_dtype: torch.dtype) -> dict[str, tuple[str, str, str]]:
        name = Registry.for_dtype(compute_dtype).name
        out = {}
        for n, m in planned_modules(model):
            if compute_dtype == torch.float32:
                out[n] = (name, "fp32", "preset")
            elif isinstance(m, AUTOCAST_TYPES):
                out[n] = (name, "autocast", "preset")
            else:
                out[n] = (FP32.name, "fp32", f"autocast does not lower {type(m).__name__} (fp32 parameters)")
        return out

    def prepare(self, model: nn.Module, compute_dtype: torch.dtype, keep_norm_fp32: bool) -> None:
        pass

    def build_optimizer(self, cfg, params, seed: int | None = None) -> torch.optim.Optimizer:
        return build_optimizer(cfg, params)

    def describe(self) -> str:
        return ""

    def check_strategy(self, strategy: str, mode: str) -> None:
        pass


class Fp16WeightsFamily(AutocastFamily):
    """The model holds float16 parameters (norm layers float32); `master`: fp32 copies in the optimizer."""

    uses_autocast = False
    low_precision_params = True
    takes_layers = False

    def base(self, model: nn.Module, compute_dtype: torch.dtype) -> dict[str, tuple[str, str, str]]:
        name = Registry.for_dtype(compute_dtype).name
        keep = self.cfg.keep_norm_fp32
        return {n: (FP32.name, "weights", "norm layer kept fp32 (precision.keep_norm_fp32)")
                if keep and is_norm(m) else (name, "weights", "preset")
                for n, m in planned_modules(model)}

    def prepare(self, model: nn.Module, compute_dtype: torch.dtype, keep_norm_fp32: bool) -> None:
        cast_model(model, compute_dtype, keep_norm_fp32)

    def describe(self) -> str:
        return ", fp32 master weights" if self.preset.master else ""

    def check_strategy(self, strategy: str, mode: str) -> None:
        if strategy == "fsdp":
            raise ConfigError(f"precision={mode} with trainer.strategy=fsdp: FSDP2 already keeps float32 "
                              "shards as master weights; use precision=dynamic (fp16) or bf16 instead")


class PureBf16Family(Fp16WeightsFamily):
    """bf16 weights, gradients and optimizer state; each fp32 update rounded by `precision.update`."""

    def build_optimizer(self, cfg, params, seed: int | None = None) -> torch.optim.Optimizer:
        check_bf16_pure(cfg)  # its own SGD/AdamW, in the same parameter groups as PyTorch's would have
        return build_pure_bf16_optimizer(cfg, param_groups(cfg, list(params)), self.cfg.get("update"), seed,
                                         compile=bool(self.cfg.get("compile_update", False)))

    def describe(self) -> str:
        return f", bf16 optimizer state, update={self.cfg.get('update')}"  # cfg.update is DictConfig.update

    def check_strategy(self, strategy: str, mode: str) -> None:
        pass


FAMILIES = {"autocast": AutocastFamily, "fp16_weights": Fp16WeightsFamily, "pure_bf16": PureBf16Family}


def optimizer_state_kind(mode: str) -> str:
    """What the optimizer of a preset keeps: PyTorch's own state, or pure bf16's (bfloat16 moments and its
    update rule's buffers). A resume maps one preset's state onto another's only within a kind."""
    preset = PRESETS.get(mode)
    return (
        "bfloat16 optimizer state" if preset is not None and preset.family == "pure_bf16" else "PyTorch optimizer state"
    )


def family_for(mode: str, cfg):
    preset = PRESETS[mode]
    return preset, FAMILIES[preset.family](preset, cfg)


def request_update_stats(optimizer) -> bool:
    """bf16_pure's optimizers measure what rounding did on request (a sampled step); others do not."""
    if isinstance(optimizer, PureBf16Optimizer):
        optimizer.request_stats()
        return True
    return False


def update_stats(optimizer) -> dict | None:
    return optimizer.last_stats if isinstance(optimizer, PureBf16Optimizer) else None
