"""Structured-config schemas: one dataclass per config group, registered in Hydra's ConfigStore.

Hydra checks types and unknown keys when it composes (a wrong type or key fails with Hydra's own
message). Value ranges are checked by each schema's ``__post_init__``, which runs when
:func:`validate` turns the composed config into objects, before any work is done.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from mptrain.errors import ConfigError

# the precision presets (the `precision=` names) and the family that runs each (mptrain/precision/families.py)
PRESET_FAMILIES = {"fp32": "autocast", "amp": "autocast", "dynamic": "autocast", "static": "autocast",
                   "bf16": "autocast", "noscale": "autocast", "fp8": "autocast", "master": "fp16_weights",
                   "nomaster": "fp16_weights", "bf16_pure": "pure_bf16", "auto": "autocast"}
PRECISION_MODES = tuple(PRESET_FAMILIES)
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")  # torchao's float8 recipes (formats/builtin.py)
# other tools' names for presets (Lightning's `precision=`): `precision=<alias>` composes conf/precision/<alias>.yaml,
# which is the preset plus `alias`; runs are recorded under the preset, the alias beside it (docs/precision.md)
PRECISION_ALIASES = {"16-mixed": "dynamic", "bf16-mixed": "bf16", "bf16-true": "bf16_pure", "32-true": "fp32",
                     "transformer-engine": "fp8"}
BF16_UPDATES = ("nearest", "stochastic", "kahan")  # precision=bf16_pure's rounding of each weight update
COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")
SCALING_KINDS = ("auto", "none", "static", "dynamic")


def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {need}")


@dataclass
class LossScaleConfig:
    """Loss scaler settings, one schema for static and dynamic scaling (defaults = torch.amp.GradScaler)."""

    kind: str = "auto"  # auto: dynamic when the compute dtype is float16, else none
    init: float = 2.0**16  # initial scale S (the static scale for kind=static)
    growth_factor: float = 2.0  # multiply S after growth_interval clean steps in a row
    backoff_factor: float = 0.5  # multiply S on an overflow (once the hysteresis count is spent)
    growth_interval: int = 2000  # clean steps in a row before S grows
    hysteresis: int = 1  # overflows tolerated before backing off (1 = back off at once, GradScaler)
    # false: the hysteresis count is refilled only when S grows (a full growth_interval of clean steps):
    #   Megatron-LM's --hysteresis and DeepSpeed's default (fp16.consecutive_hysteresis: false);
    # true: refilled by every clean step, so only `hysteresis` overflows in a row back off
    #   (DeepSpeed's fp16.consecutive_hysteresis: true)
    consecutive_hysteresis: bool = False
    min: float = 1.0  # S never goes below this
    max: float = math.inf  # S never grows above this
    # a back-off due while S is at `min`: raise (stop the run) | clamp (keep skipping) |
    # bf16 (continue the run in bfloat16 autocast, without loss scaling)
    on_min: str = "raise"

    def __post_init__(self) -> None:
        p = "precision.loss_scale"
        _check(self.kind in SCALING_KINDS, f"{p}.kind", self.kind, f"choose one of {', '.join(SCALING_KINDS)}")
        _check(self.init > 0, f"{p}.init", self.init, "must be > 0")
        _check(self.growth_factor >= 1, f"{p}.growth_factor", self.growth_factor, "must be >= 1")
        _check(0 < self.backoff_factor < 1, f"{p}.backoff_factor", self.backoff_factor, "must be in (0, 1)")
        _check(self.growth_interval >= 1, f"{p}.growth_interval", self.growth_interval, "must be >= 1")
        _check(self.hysteresis >= 1, f"{p}.hysteresis", self.hysteresis, "must be >= 1")
        _check(0 < self.min <= self.max, f"{p}.min", self.min, "need 0 < min <= max")
        _check(self.min <= self.init <= self.max, f"{p}.init", self.init, "must lie in [min, max]")
        _check(math.isfinite(self.init), f"{p}.init", self.init, "must be finite (inf skips every step)")
        _check(self.on_min in ("raise", "clamp", "bf16"), f"{p}.on_min", self.on_min, "choose raise, clamp or bf16")


@dataclass
class Fp8Config:
    """precision=fp8 (torchao float8 training): which Linear layers compute in float8 and how they scale.
    The filter follows torchtitan's converter; see docs/precision.md."""

    # tensorwise (one dynamic scale per tensor, e5m2 grads) | rowwise (per row, e4m3) | rowwise_with_gw_hp (rowwise,
    # the weight-gradient GEMM in bf16): the registry's fp8, fp8_row and fp8_row_hp entries
    recipe: str = "tensorwise"
    emulate: bool | None = None  # null: real fp8 kernels on CUDA capability >= 8.9, emulated elsewhere
    skip_first: bool = True  # keep the first Linear (in module order) in bf16
    skip_last: bool = True  # keep the last Linear (usually the output head) in bf16
    dim_multiple: int = 16  # convert only layers whose in and out features are multiples of this (fp8 GEMMs need 16)
    include: list[str] = field(default_factory=list)  # fnmatch patterns: only these layers may convert (empty: all)
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns: these layers never convert
    # FSDP2: all-gather the Float8Linear weights in fp8, not in their param dtype (torchao's
    # enable_fsdp_float8_all_gather; tensorwise recipe, real fp8 kernels, trainer.strategy=fsdp): half the bytes of bf16
    fsdp_all_gather: bool = False

    def __post_init__(self) -> None:
        p = "precision.fp8"
        _check(self.recipe in FP8_RECIPES, f"{p}.recipe", self.recipe, f"choose {', '.join(FP8_RECIPES)}")
        _check(self.dim_multiple >= 1, f"{p}.dim_multiple", self.dim_multiple, "must be >= 1")


@dataclass
class AutoConfig:
    """precision=auto: probe in bf16 (fp32 without it) with shadow measurement, then give each layer the cheapest
    format whose measured error stays within `tolerance`; re-measure and demote (docs/precision.md)."""

    probe_steps: int = 5  # ordinary training steps measured on every step before the plan is built
    tolerance: float = 0.1  # largest relative error of a layer's output and of its output gradient (advisor's)
    formats: list[str] | None = None  # candidates; null: those with a real kernel on the device (CPU: bf16)
    # re-measure every N steps after the plan (0: never); each re-check costs a few steps of shadow measurement, so
    # every 200 keeps them near 1-2% of a run (every 50 cost ~5% of the default CNN's 1000 steps: docs/benchmarks.md)
    recheck_every: int = 200
    # a demoted layer moves back one format after this many consecutive re-checks within tolerance in it (0: never)
    promote_after: int = 3
    # what "cheapest" means: time (each layer's forward+backward timed on the device in each format, on the first
    # probe step: the fastest that holds wins) | bits (the fewest bits per value that hold: format studies)
    objective: str = "time"
    timing_repeats: int = 3  # time: timed forward+backward runs per layer and format (the median; one warm-up)
    # time on a named GPU instead of this device (h100, b200, ...: precision/roofline.py, modeled, not timed): what
    # that GPU would choose; emulated formats may then be chosen, and run emulated here (a study)
    target: str | None = None
    # a memory budget in GB (null: none): the fastest plan whose predicted memory (weights, grads, optimizer state,
    # activations) fits; layers move to smaller formats that hold, most bytes saved per second lost first
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        p = "precision.auto"
        _check(self.objective in ("time", "bits"), f"{p}.objective", self.objective, "choose time or bits")
        _check(self.timing_repeats >= 1, f"{p}.timing_repeats", self.timing_repeats, "must be >= 1")
        _check(self.probe_steps >= 1, f"{p}.probe_steps", self.probe_steps, "must be >= 1")
        _check(self.tolerance > 0, f"{p}.tolerance", self.tolerance, "must be > 0")
        _check(self.recheck_every >= 0, f"{p}.recheck_every", self.recheck_every, "must be >= 0 (0: never)")
        _check(self.target is None or self.objective == "time", f"{p}.target", self.target,
               "models time: leave precision.auto.objective=time (the default) or drop the target")
        _check(self.promote_after >= 0, f"{p}.promote_after", self.promote_after, "must be >= 0 (0: never)")
        _check(self.memory_gb is None or self.memory_gb > 0, f"{p}.memory_gb", self.memory_gb,
               "must be > 0 (null: no budget)")
        _check(self.memory_gb is None or self.objective == "time", f"{p}.memory_gb", self.memory_gb,
               "trades time for memory: leave precision.auto.objective=time (the default) or drop the budget")


SCHEDULE_EXAMPLE = "e.g. 'precision.schedule=[{at: 0.8, preset: bf16}]'"


def check_schedule(schedule: Any) -> None:
    """precision.schedule's shape: a list of {at, preset and/or layers}; `at` a step (int >= 1) or a fraction of
    the run (a float in (0, 1))."""
    key = "precision.schedule"
    _check(schedule is None or isinstance(schedule, list), key, schedule, f"must be a list, {SCHEDULE_EXAMPLE}")
    for i, entry in enumerate(schedule or []):
        where = f"{key}[{i}]"
        _check(isinstance(entry, dict) and "at" in entry and set(entry) <= {"at", "preset", "layers"}
               and ("preset" in entry or "layers" in entry), where, entry,
               f"must be {{at: STEP | FRACTION, preset: NAME}} and/or layers: {{glob: format}}, {SCHEDULE_EXAMPLE}")
        at = entry["at"]
        _check(
            not isinstance(at, bool) and ((isinstance(at, int) and at >= 1) or (isinstance(at, float) and 0 < at < 1)),
            f"{where}.at",
            at,
            "must be a step (an integer >= 1) or a fraction of the run (a float in (0, 1))",
        )
        preset = entry.get("preset")
        _check(preset is None or PRECISION_ALIASES.get(preset, preset) in PRECISION_MODES, f"{where}.preset", preset,
               f"choose one of {', '.join(PRECISION_MODES)}")
        _check(entry.get("layers") is None or isinstance(entry["layers"], dict), f"{where}.layers", entry.get("layers"),
               "must be a mapping {module glob: format}")


CONFIG_NAME = "config"  # conf/config.yaml, the primary config


def config_dir() -> str:
    """conf/ inside the installed package (wheel), else the repository's top-level conf/ (source tree)."""
    here = Path(__file__).resolve().parent  # the mptrain package
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"mptrain's conf/ was not found next to {here}; reinstall mptrain")


@dataclass
class PrecisionConfig:
    """How the model computes and how its gradients are protected. See docs/precision.md."""

    mode: str = MISSING  # one of PRECISION_MODES
    dtype: str = "auto"  # compute dtype; auto = float16 on CUDA, bfloat16 where float16 is emulated (CPU)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    # master/nomaster: keep normalization layers in float32 (apex O2's keep_batchnorm_fp32)
    keep_norm_fp32: bool = True
    # forbid reduced-precision reductions inside fp16/bf16 matmuls (the paper's FP32 accumulation)
    fp32_accumulation: bool = True
    # bf16_pure: how an fp32 update is written into a bf16 weight: nearest | stochastic | kahan
    # (other modes keep fp32 or fp32-master weights, where the rule means nothing: only nearest is accepted)
    update: str = "nearest"
    # bf16_pure: update each bf16 tensor with one torch.compile'd function (needs a C++ compiler on CPU)
    compile_update: bool = False
    auto: AutoConfig = field(default_factory=AutoConfig)  # precision=auto
    fp8: Fp8Config = field(default_factory=Fp8Config)  # precision=fp8, and layers planned fp8 in any preset
    # the user's own number formats, usable wherever a built-in is named (docs/formats.md):
    # precision.formats.NAME={element: {ebits: 3, mbits: 2}, scaling: block, block: 32, scale_element: e8m0}
    # or {_target_: my_pkg.my_format}; empty by default
    formats: dict[str, Any] = field(default_factory=dict)
    # per-layer formats over the preset: {module glob (or @first / @last): format}; the last match wins
    # (docs/precision.md "Per-layer plans"), e.g. {"*": nvfp4, "@first": bf16, "@last": bf16}; typed Any (null)
    # so that a command-line mapping replaces it (a typed dict refuses new keys under Hydra's struct mode)
    layers: Any = None
    alias: str | None = None  # the familiar name the preset was chosen by (precision=16-mixed), PRECISION_ALIASES
    # switches in the running process (docs/precision.md "Schedules"): a list of {at: STEP | FRACTION of the run,
    # preset: NAME} and/or {at: ..., layers: {glob: format}}; each equals a stop at that step and a resume into
    # it; typed Any (null) for the same reason as `layers`
    schedule: Any = None

    def __post_init__(self) -> None:
        _check(self.mode in PRECISION_MODES, "precision.mode", self.mode, f"choose one of {', '.join(PRECISION_MODES)}")
        _check(self.alias is None or PRECISION_ALIASES.get(self.alias) == self.mode, "precision.alias", self.alias,
               f"names precision={PRECISION_ALIASES.get(self.alias)}, not precision.mode={self.mode}; choose a preset "
               "by one name (precision=<preset or alias>) and leave precision.mode and precision.alias unset")
        _check(
            self.dtype in COMPUTE_DTYPES, "precision.dtype", self.dtype, f"choose one of {', '.join(COMPUTE_DTYPES)}"
        )
        _check(self.update in BF16_UPDATES, "precision.update", self.update, f"choose one of {', '.join(BF16_UPDATES)}")
        _check(self.layers is None or isinstance(self.layers, dict), "precision.layers", self.layers,
               "must be a mapping {module glob: format}, e.g. 'precision.layers={head: bf16}'")
        check_schedule(self.schedule)
        rounds = PRESET_FAMILIES[self.mode] == "pure_bf16"  # the one family that rounds updates to bf16
        _check(self.update == "nearest" or rounds, "precision.update", self.update,
               f"applies only to precision=bf16_pure (precision={self.mode} does not round updates to bf16)")
        _check(not self.compile_update or rounds, "precision.compile_update", self.compile_update,
               f"applies only to precision=bf16_pure (precision={self.mode} uses PyTorch's optimizers)")


# the low-bit three: torchao.optim; torch: the class optimizer._target_ names
OPTIMIZERS = ("sgd", "adamw", "adamw8bit", "adamw4bit", "adamwfp8", "torch")


@dataclass
class OptimizerConfig:
    """The optimizer (mptrain.library.optim, docs/optimizers.md)."""

    name: str = "sgd"  # sgd | adamw | adamw8bit | adamw4bit | adamwfp8 | torch (the class _target_ names)
    # name=torch: any optimizer class (torch.optim.RAdam, my_pkg.Lion), built with (param groups, lr,
    # weight_decay, the momentum/nesterov/betas/eps given (not null) and **kwargs)
    _target_: str | None = None
    kwargs: Any = None  # a dict of further arguments (_target_'s, or the built-in's, e.g. {amsgrad: true})
    # weight decay on every tensor (true) or only on tensors of >= 2 dims, none on biases and norm weights
    # (false; nanoGPT, timm); null: false for AdamW-type optimizers, true for the others
    decay_all: bool | None = None
    lr: float = 0.1
    weight_decay: float = 0.0
    # null (optimizer=torch's own setting): not given, the class's own default
    momentum: float | None = 0.9  # sgd only
    nesterov: bool | None = False  # sgd only
    betas: list[float] | None = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    eps: float | None = 1e-8  # adamw only
    # "auto": foreach on CPU, fused where PyTorch has a fused kernel for the device (CUDA)
    implementation: str = "auto"

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, "optimizer.name", self.name, f"choose one of {', '.join(OPTIMIZERS)} (or set "
               "optimizer._target_ to any optimizer class)")
        _check(self.lr > 0, "optimizer.lr", self.lr, "must be > 0")
        by_class = self.name == "torch"
        _check(not by_class or self._target_ is not None, "optimizer._target_", None,
               "optimizer=torch builds the class it names; give one, e.g. optimizer._target_=torch.optim.RAdam")
        _check(by_class or self._target_ is None, "optimizer._target_", self._target_,
               f"a class goes with optimizer=torch, not optimizer={self.name} (optimizer=torch optimizer._target_=...)")
        _check(math.isfinite(self.lr), "optimizer.lr", self.lr, "must be finite")
        _check(math.isfinite(self.weight_decay), "optimizer.weight_decay", self.weight_decay, "must be finite")
        _check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")
        for key in ("momentum", "nesterov", "betas", "eps"):
            _check(by_class or getattr(self, key) is not None, f"optimizer.{key}", None,
                   "null (the class's own default) is for optimizer=torch; give a value")
        if self.eps is not None:
            _check(math.isfinite(self.eps) and self.eps > 0, "optimizer.eps", self.eps, "must be finite and > 0")
        if self.momentum is not None:
            _check(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "must be in [0, 1)")
        _check(not (self.nesterov and self.momentum == 0), "optimizer.nesterov", self.nesterov, "needs momentum > 0")
        if self.betas is not None:
            _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optimizer.betas", self.betas,
                   "two values in [0, 1)")
        _check(self.implementation in ("auto", "foreach", "fused", "loop"), "optimizer.implementation",
               self.implementation, "choose auto, foreach, fused or loop")


@dataclass
class SchedulerConfig:
    name: str = "none"  # none | cosine | step (ignored when _target_ is set)
    # any torch.optim.lr_scheduler class (e.g. torch.optim.lr_scheduler.OneCycleLR), after the warm-up
    _target_: str | None = None
    kwargs: Any = None  # its arguments, e.g. {T_max: 1000} (the optimizer is given by mptrain)
    warmup_steps: int = 0  # linear warm-up from warmup_start_factor * lr (cosine and step)
    warmup_start_factor: float = 0.1
    min_lr_ratio: float = 0.0  # cosine: final lr as a fraction of the peak lr
    step_size: int = 1000  # step: multiply lr by gamma every step_size applied steps
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _check(self.name in ("none", "cosine", "step"), "scheduler.name", self.name, "choose none, cosine or step")
        _check(self.warmup_steps >= 0, "scheduler.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(
            0 < self.warmup_start_factor <= 1,
            "scheduler.warmup_start_factor",
            self.warmup_start_factor,
            "must be in (0, 1]",
        )
        _check(0 <= self.min_lr_ratio <= 1, "scheduler.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.step_size >= 1, "scheduler.step_size", self.step_size, "must be >= 1")
        _check(0 < self.gamma <= 1, "scheduler.gamma", self.gamma, "must be in (0, 1]")


@dataclass
class ProfileConfig:
    """debug=profile: torch.profiler over a few steps after warm-up (mptrain/train/callbacks/profiler.py)."""

    enabled: bool = False
    wait: int = 1  # steps not traced first (first-call overheads: allocator, cuDNN autotuning)
    warmup: int = 1  # steps traced and discarded (the profiler's own start-up)
    active: int = 3  # steps recorded into <run dir>/profile/ and the top-ops table
    record_shapes: bool = True
    profile_memory: bool = False
    with_stack: bool = False
    row_limit: int = 15  # rows of the top-ops table written to the log
    sort_by: str = "auto"  # a key_averages column; auto: self device time on CUDA, self CPU time otherwise

    def __post_init__(self) -> None:
        p = "trainer.profile"
        _check(self.wait >= 0, f"{p}.wait", self.wait, "must be >= 0")
        _check(self.warmup >= 0, f"{p}.warmup", self.warmup, "must be >= 0")
        _check(self.active >= 1, f"{p}.active", self.active, "must be >= 1")
        _check(self.row_limit >= 1, f"{p}.row_limit", self.row_limit, "must be >= 1")


@dataclass
class EarlyStoppingConfig:
    """trainer.early_stopping: stop when the monitored validation metric has not improved by more than
    min_delta for `patience` validations in a row; the reason goes into summary.json."""

    enabled: bool = False
    monitor: str | None = None  # null: checkpoint.monitor (val/acc, or val/loss where a task has no accuracy)
    mode: str | None = None  # min | max; null: checkpoint.mode (with the monitor it follows)
    patience: int = 3  # validations without improvement before stopping
    min_delta: float = 0.0  # an improvement must exceed this

    def __post_init__(self) -> None:
        p = "trainer.early_stopping"
        _check(self.mode in (None, "min", "max"), f"{p}.mode", self.mode, "choose min or max")
        _check(self.patience >= 1, f"{p}.patience", self.patience, "must be >= 1")
        _check(self.min_delta >= 0, f"{p}.min_delta", self.min_delta, "must be >= 0")


EMA_DECAY = 0.999  # trainer.ema.decay's default


@dataclass
class EmaConfig:
    """trainer.ema: an fp32 exponential moving average of the weights, validated as val_ema/..."""

    enabled: bool = False
    decay: float = EMA_DECAY  # ema <- decay * ema + (1 - decay) * w after every applied step

    def __post_init__(self) -> None:
        _check(0 < self.decay < 1, "trainer.ema.decay", self.decay, "must be in (0, 1)")
        # a decay of its own without the switch would average nothing, silently
        _check(self.enabled or self.decay == EMA_DECAY, "trainer.ema.decay", self.decay,
               "no average is kept while trainer.ema.enabled=false; add trainer.ema.enabled=true (or drop the decay)")


DEFAULT_BATCH_SIZE = 64  # the global batch when neither trainer.batch_size nor per_device_batch_size is set


def global_batch(t, world_size: int) -> int:
    """The global batch of trainer config `t` for `world_size` processes."""
    if t.batch_size is not None:
        return t.batch_size
    if t.per_device_batch_size is not None:
        return t.per_device_batch_size * world_size
    return DEFAULT_BATCH_SIZE


@dataclass
class TrainerConfig:
    max_steps: int | None = None  # optimizer steps (skipped ones count); null = run max_epochs
    max_epochs: int = 10
    # the global batch, over all processes (torchrun); null: DEFAULT_BATCH_SIZE, or per_device_batch_size x processes
    batch_size: int | None = None
    # the batch of each process, as Lightning and Accelerate count it; an alternative to batch_size (not both)
    per_device_batch_size: int | None = None
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float | None = None  # clip the unscaled gradients to this total norm
    # multiply the training loss by this (a small-weighted loss term has small gradients: the case
    # loss scaling exists for); logged losses stay unweighted
    loss_weight: float = 1.0
    log_every: int = 10  # steps between metrics rows (the loss is read from the device only then)
    eval_every: int | None = None  # steps between validations; null = at the end of every epoch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # data-loading processes: auto = none for in-memory datasets, else min(8, CPUs per process - 1)
    num_workers: Any = "auto"
    seed: int = "${seed}"  # type: ignore[assignment]  # follows the top-level seed unless set
    deterministic: bool = False  # torch.use_deterministic_algorithms for the run (docs/reproduction.md)
    deterministic_warn_only: bool = False  # with deterministic: warn, not raise, at ops with no deterministic kernel
    channels_last: bool = False  # NHWC activations: faster convolutions on tensor cores
    compile: bool = False  # torch.compile the model (checkpoints still hold the plain model)
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest convolution algorithms (fixed shapes)
    allow_tf32: bool = False  # TF32 for fp32 matmuls/convolutions on Ampere+ (explicit: off keeps fp32 exact)
    # CPU only: weight gradients of small-map convolutions as a forward convolution, where oneDNN's own
    # kernel is slow (mptrain/conv_wgrad.py): auto (where measured faster) | forward (always) | native (never)
    conv_wgrad: str = "auto"
    tensorboard: bool = True
    progress_bar: bool = True
    # data parallel under torchrun (docs/distributed.md)
    strategy: str = "ddp"  # ddp (replicated) | fsdp (FSDP2: sharded params, grads, optimizer state)
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    grad_compression: str = "none"  # none | fp16 | bf16: compress DDP's gradient all-reduce
    # debugging (conf/debug/): train and validate on the first N training batches only (0: off)
    overfit_batches: int = 0
    detect_anomaly: bool = False  # autograd anomaly detection: name the op whose backward made a NaN
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    # keep fewer activations, recompute them in backward: none | blocks (each repeated block) | all (one
    # recomputation of the whole forward); mptrain/library/models/checkpointing.py
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        _check(
            self.max_steps is None or self.max_steps >= 1, "trainer.max_steps", self.max_steps, "must be >= 1 or null"
        )
        _check(self.max_epochs >= 1, "trainer.max_epochs", self.max_epochs, "must be >= 1")
        _check(self.batch_size is None or self.batch_size >= 1, "trainer.batch_size", self.batch_size, "must be >= 1")
        _check(self.per_device_batch_size is None or self.per_device_batch_size >= 1, "trainer.per_device_batch_size",
               self.per_device_batch_size, "must be >= 1")
        _check(self.batch_size is None or self.per_device_batch_size is None, "trainer.batch_size", self.batch_size,
               f"so is trainer.per_device_batch_size={self.per_device_batch_size}: give one of them (batch_size: the "
               "global batch over all processes; per_device_batch_size: each process's)")
        _check(
            self.accumulate_grad_batches >= 1,
            "trainer.accumulate_grad_batches",
            self.accumulate_grad_batches,
            "must be >= 1",
        )
        _check(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            "trainer.clip_grad_norm",
            self.clip_grad_norm,
            "must be > 0 or null",
        )
        _check(self.loss_weight > 0 and math.isfinite(self.loss_weight), "trainer.loss_weight", self.loss_weight,
               "must be finite and > 0")
        _check(self.log_every >= 1, "trainer.log_every", self.log_every, "must be >= 1")
        _check(
            self.eval_every is None or self.eval_every >= 1,
            "trainer.eval_every",
            self.eval_every,
            "must be >= 1 or null",
        )
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
               "trainer.device", self.device, "choose auto, cpu, cuda or cuda:N")
        _check(self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0),
               "trainer.num_workers", self.num_workers, "must be auto or an integer >= 0")
        _check(self.overfit_batches >= 0, "trainer.overfit_batches", self.overfit_batches, "must be >= 0")
        _check(self.conv_wgrad in ("auto", "native", "forward"), "trainer.conv_wgrad", self.conv_wgrad,
               "choose auto, native or forward")
        _check(self.activation_checkpointing in ("none", "blocks", "all"), "trainer.activation_checkpointing",
               self.activation_checkpointing, "choose none, blocks or all")
        _check(self.strategy in ("ddp", "fsdp"), "trainer.strategy", self.strategy, "choose ddp or fsdp")
        _check(
            self.dist_backend in ("auto", "gloo", "nccl"),
            "trainer.dist_backend",
            self.dist_backend,
            "choose auto, gloo or nccl",
        )
        _check(self.grad_compression in ("none", "fp16", "bf16"), "trainer.grad_compression", self.grad_compression,
               "choose none, fp16 or bf16")
        # numpy takes seeds below 2**32, and the epoch sampler derives int64 seeds from this one
        _check(0 <= self.seed < 2**32, "seed", self.seed, "must be an integer in [0, 2**32)")


@dataclass
class CheckpointConfig:
    """When checkpoints are written (see docs/checkpoints.md). The end of the run and a stop signal write last.pt;
    with enabled=false only a stop signal does (last.pt alone: no step_<N>.pt, no best.pt)."""

    enabled: bool = True  # false: no checkpoint but last.pt on a stop signal (SIGTERM, SIGINT, SIGUSR1)
    every_steps: int | None = None  # also write every N optimizer steps
    every_epochs: int | None = 1  # write at the end of every N-th epoch
    keep_last: int = 2  # step_<N>.pt files kept beside last.pt (0: none)
    monitor: str | None = "val/acc"  # best.pt tracks this validation metric (null: no best.pt)
    mode: str = "max"  # max | min
    save_best: bool = True

    def __post_init__(self) -> None:
        _check(
            self.every_steps is None or self.every_steps >= 1,
            "checkpoint.every_steps",
            self.every_steps,
            "must be >= 1 or null",
        )
        _check(
            self.every_epochs is None or self.every_epochs >= 1,
            "checkpoint.every_epochs",
            self.every_epochs,
            "must be >= 1 or null",
        )
        _check(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "must be >= 0")
        _check(self.mode in ("max", "min"), "checkpoint.mode", self.mode, "choose max or min")


@dataclass
class DiagnosticsConfig:
    """Precision diagnostics (docs/diagnostics.md). Off: no hooks, no extra work at all."""

    enabled: bool = True
    every: int = 100  # sample every N-th optimizer step ...
    first_steps: int = 3  # ... and the first few
    activation_layers: list[str] | None = (
        None  # modules whose output gradients are histogrammed; null: top-level children
    )
    trace_after: int | None = 20  # consecutive skipped steps before the overflowing batch is traced (null: never)
    # candidate formats measured by shadow execution on every module with parameters (docs/diagnostics.md
    # "Shadow measurement"): the format registry's names (built-ins, fp8 / fp8_row / fp8_row_hp, precision.formats);
    # null = the formats with real kernels on the device (CPU: bf16; CUDA: bf16 or fp16, plus fp8 from sm_89).
    # Off by default ([]): a sampled step with it costs several plain steps (docs/benchmarks.md), opt in to measure
    shadow: list[str] | None = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.every >= 1, "diagnostics.every", self.every, "must be >= 1")
        _check(self.first_steps >= 0, "diagnostics.first_steps", self.first_steps, "must be >= 0")
        _check(
            self.trace_after is None or self.trace_after >= 1,
            "diagnostics.trace_after",
            self.trace_after,
            "must be >= 1 or null",
        )


@dataclass
class CNNModelConfig:
    """The small default CNN (mptrain.library.models.vision.SmallCNN)."""

    _target_: str = "mptrain.library.models.vision.SmallCNN"
    num_classes: int | None = "${dataset.num_classes}"  # type: ignore[assignment]  # null: from the data
    in_channels: int = "${dataset.channels}"  # type: ignore[assignment]
    width: int = 32
    dropout: float = 0.1
    image_size: int | None = "${oc.select:dataset.image_size,null}"  # type: ignore[assignment]  # for the size check

    def __post_init__(self) -> None:
        _check(self.width >= 1, "model.width", self.width, "must be >= 1")
        _check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class MLPModelConfig:
    """A tanh MLP on flattened images (mptrain.library.models.vision.MLP)."""

    _target_: str = "mptrain.library.models.vision.MLP"
    num_classes: int | None = "${dataset.num_classes}"  # type: ignore[assignment]  # null: from the data
    in_channels: int = "${dataset.channels}"  # type: ignore[assignment]
    image_size: int = "${dataset.image_size}"  # type: ignore[assignment]
    width: int = 64
    depth: int = 4
    init_gain: float = 1.0

    def __post_init__(self) -> None:
        _check(self.width >= 1, "model.width", self.width, "must be >= 1")
        _check(self.depth >= 1, "model.depth", self.depth, "must be >= 1")
        _check(self.init_gain > 0, "model.init_gain", self.init_gain, "must be > 0")


@dataclass
class TorchvisionModelConfig:
    """Any torchvision classification model by name, randomly initialised (weights: null)."""

    _target_: str = "mptrain.library.models.vision.torchvision_model"
    name: str = MISSING
    num_classes: int | None = "${dataset.num_classes}"  # type: ignore[assignment]  # null: from the data
    in_channels: int = "${dataset.channels}"  # type: ignore[assignment]
    weights: str | None = None
    small_input: bool = False  # 3x3 stem without max-pool, for images of 32x32 or less
    image_size: int | None = "${oc.select:dataset.image_size,null}"  # type: ignore[assignment]  # for the stem check


@dataclass
class RecurrentLMConfig:
    """LSTM or GRU language model (mptrain.library.models.language.RecurrentLM)."""

    _target_: str = "mptrain.library.models.language.RecurrentLM"
    vocab_size: int | None = "${oc.select:dataset.vocab_size,null}"  # type: ignore[assignment]  # null: from the data
    cell: str = "lstm"  # lstm | gru
    embed_dim: int = 128
    hidden_dim: int = 256
    num_layers: int = 2
    dropout: float = 0.1
    tie_weights: bool = False  # share the embedding and output matrices (needs embed_dim == hidden_dim)

    def __post_init__(self) -> None:
        _check(self.cell in ("lstm", "gru"), "model.cell", self.cell, "choose lstm or gru")
        for key in ("embed_dim", "hidden_dim", "num_layers"):
            _check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "must be >= 1")
        _check(
            self.vocab_size is None or self.vocab_size >= 1, "model.vocab_size", self.vocab_size, "must be >= 1 or null"
        )
        _check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class GPTConfig:
    """A GPT-style decoder (mptrain.library.models.language.GPT)."""

    _target_: str = "mptrain.library.models.language.GPT"
    vocab_size: int | None = "${oc.select:dataset.vocab_size,null}"  # type: ignore[assignment]
    seq_len: int = "${oc.select:dataset.seq_len,64}"  # type: ignore[assignment]
    dim: int = 128
    layers: int = 4
    heads: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for key in ("dim", "layers", "heads", "seq_len"):
            _check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "must be >= 1")
        _check(
            self.vocab_size is None or self.vocab_size >= 1, "model.vocab_size", self.vocab_size, "must be >= 1 or null"
        )
        _check(self.dim % self.heads == 0, "model.dim", self.dim, f"must be divisible by model.heads={self.heads}")


@dataclass
class DCGANConfig:
    """DCGAN generator + discriminator (mptrain.library.models.gan.DCGAN), trained by the gan task."""

    _target_: str = "mptrain.library.models.gan.DCGAN"
    channels: int = "${dataset.channels}"  # type: ignore[assignment]
    image_size: int = "${dataset.image_size}"  # type: ignore[assignment]
    latent_dim: int = 64
    width: int = 32

    def __post_init__(self) -> None:
        for key in ("latent_dim", "width"):
            _check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "must be >= 1")


@dataclass
class TimmModelConfig:
    """Any timm architecture by name, built with pretrained=False (mptrain.library.models.timm_models)."""

    _target_: str = "mptrain.library.models.timm_models.timm_model"
    _convert_: str = "all"  # kwargs reach timm as plain dicts and lists
    name: str = MISSING  # e.g. convnext_atto, resnet18, vit_tiny_patch16_224 (timm.list_models())
    num_classes: int | None = "${dataset.num_classes}"  # type: ignore[assignment]  # null: from the data
    in_channels: int = "${dataset.channels}"  # type: ignore[assignment]
    checkpoint_path: str | None = None  # a local .pth/.safetensors state dict (never the hub)
    drop_path_rate: float = 0.0  # stochastic depth, where the architecture has it
    kwargs: Any = None  # a dict to the architecture's constructor (depths, dims, ...)

    def __post_init__(self) -> None:
        _check(0 <= self.drop_path_rate < 1, "model.drop_path_rate", self.drop_path_rate, "must be in [0, 1)")


@dataclass
class HFCausalLMConfig:
    """A Hugging Face AutoModelForCausalLM from model.config (random weights) or a local model.path."""

    _target_: str = "mptrain.library.models.hf.hf_causal_lm"
    _convert_: str = "all"
    config: Any = None  # {model_type: llama, hidden_size: ..., ...} (transformers' names)
    path: str | None = None  # a local directory with config.json and weights
    vocab_size: int | None = "${oc.select:dataset.vocab_size,null}"  # type: ignore[assignment]  # null: from the data
    attn_implementation: str = "sdpa"  # sdpa | eager (| flash_attention_2 where installed)

    def __post_init__(self) -> None:
        _check((self.config is None) != (self.path is None), "model.config", self.config,
               "give exactly one of model.config={model_type: ...} or model.path=<local directory>")


@dataclass
class HFImageClassificationConfig:
    """A Hugging Face AutoModelForImageClassification from model.config or a local model.path."""

    _target_: str = "mptrain.library.models.hf.hf_image_classification"
    _convert_: str = "all"
    config: Any = None  # {model_type: vit, image_size: ..., ...}
    path: str | None = None
    num_classes: int | None = "${dataset.num_classes}"  # type: ignore[assignment]  # num_labels
    in_channels: int = "${dataset.channels}"  # type: ignore[assignment]  # num_channels

    def __post_init__(self) -> None:
        _check((self.config is None) != (self.path is None), "model.config", self.config,
               "give exactly one of model.config={model_type: ...} or model.path=<local directory>")


@dataclass
class TorchvisionDatasetConfig:
    """MNIST, Fashion-MNIST, CIFAR-10/100 from dataset.root (downloaded only with download=true)."""

    _target_: str = "mptrain.library.data.vision.torchvision_dataset"
    name: str = MISSING
    root: str = "data"
    download: bool = False
    augment: bool = True  # CIFAR: random crop and flip
    num_classes: int = 10
    channels: int = 1
    image_size: int = 28


@dataclass
class ImageFolderConfig:
    """ImageNet layout: root/train/<class>/*.jpg, root/val/<class>/*.jpg."""

    _target_: str = "mptrain.library.data.vision.imagefolder"
    name: str = "imagefolder"
    root: str = "data/imagenet"
    image_size: int = 224
    num_classes: int | None = None  # null: one class per folder of train/
    channels: int = 3


@dataclass
class TextDatasetConfig:
    """A local UTF-8 text file as byte, char or word tokens."""

    _target_: str = "mptrain.library.data.text.text"
    name: str = "text"
    path: str | None = None
    level: str = "char"  # byte | char | word
    # null: dataset.level; or bpe:<vocab size> (byte-level BPE trained on the file, needs mptrain[hf]) | the path
    # of a tokenizers .json file | byte | char | word. Saved in the run directory.
    tokenizer: str | None = None
    seq_len: int = 64
    val_fraction: float = 0.1
    max_vocab: int = 10000  # word level: the most frequent words, the rest <unk>
    vocab_size: int | None = None  # null: as many as the file has (byte: 256)

    def __post_init__(self) -> None:
        _check(self.path is not None, "dataset.path", self.path, "dataset=text needs dataset.path=<a UTF-8 text file>")
        _check(self.level in ("byte", "char", "word"), "dataset.level", self.level, "choose byte, char or word")
        _check(self.seq_len >= 1, "dataset.seq_len", self.seq_len, "must be >= 1")
        _check(0 < self.val_fraction < 1, "dataset.val_fraction", self.val_fraction, "must be in (0, 1)")
        # word level: <unk> plus at least one word, else every token is <unk> and the loss is trivially 0
        _check(self.max_vocab >= 2, "dataset.max_vocab", self.max_vocab, "must be >= 2 (<unk> and at least one word)")
        _check(
            self.vocab_size is None or self.vocab_size >= 1,
            "dataset.vocab_size",
            self.vocab_size,
            "must be >= 1 or null",
        )


@dataclass
class TokensDatasetConfig:
    """nanoGPT-style token files: dataset.path=DIR with train.bin (and val.bin), memory-mapped."""

    _target_: str = "mptrain.library.data.tokens.tokens"
    name: str = "tokens"
    path: str | None = None  # the directory (mptrain-prepare-text FILE --out DIR writes one)
    seq_len: int = 256
    dtype: str | None = None  # uint16 | uint32; null: from DIR/meta.json, else uint16
    windows: str = "random"  # random (uniform offsets, fixed by the seed) | contiguous (non-overlapping)
    samples: int | None = None  # random windows per epoch; null: tokens // seq_len
    val_windows: int | None = None  # validate on this many windows spread over val.bin; null: all of them
    vocab_size: int | None = None  # null: from DIR/meta.json
    train_file: str = "train.bin"
    val_file: str = "val.bin"
    seed: int = "${trainer.seed}"  # type: ignore[assignment]  # the random windows' seed

    def __post_init__(self) -> None:
        _check(
            self.path is not None, "dataset.path", self.path, "dataset=tokens needs dataset.path=<dir with train.bin>"
        )
        _check(self.seq_len >= 1, "dataset.seq_len", self.seq_len, "must be >= 1")
        _check(self.windows in ("random", "contiguous"), "dataset.windows", self.windows, "choose random or contiguous")
        _check(self.dtype in (None, "uint16", "uint32"), "dataset.dtype", self.dtype, "choose uint16 or uint32")
        _check(self.samples is None or self.samples >= 1, "dataset.samples", self.samples, "must be >= 1 or null")
        _check(self.val_windows is None or self.val_windows >= 1, "dataset.val_windows", self.val_windows,
               "must be >= 1 or null")


@dataclass
class HFDatasetConfig:
    """A local Hugging Face datasets directory (save_to_disk) or data files: a text or an image column."""

    _target_: str = "mptrain.library.data.hf.hf"
    name: str = "hf"
    path: str | None = None  # a save_to_disk directory, a .parquet/.arrow/.jsonl/.json/.csv file, or a folder of them
    column: str = "text"  # text (language modelling) or image (classification)
    label_column: str = "label"  # image datasets
    split: str = "train"  # of a DatasetDict
    val_split: str | None = None  # null: validation, valid, val or test if present; a single Dataset: val_fraction
    val_fraction: float = 0.1
    tokenizer: str = "byte"  # text: byte | char | word | bpe:<vocab size> | <tokenizers .json>
    seq_len: int = 64
    max_vocab: int = 10000
    vocab_size: int | None = None  # null: the tokenizer's
    image_size: int = 32
    channels: int = 3
    num_classes: int | None = None  # null: the label feature's, else max label + 1

    def __post_init__(self) -> None:
        _check(
            self.path is not None,
            "dataset.path",
            self.path,
            "dataset=hf needs dataset.path=<local dataset dir or file>",
        )
        _check(0 < self.val_fraction < 1, "dataset.val_fraction", self.val_fraction, "must be in (0, 1)")
        for key in ("seq_len", "image_size", "channels"):
            _check(getattr(self, key) >= 1, f"dataset.{key}", getattr(self, key), "must be >= 1")


@dataclass
class SyntheticTokensConfig:
    """A learnable synthetic token stream."""

    _target_: str = "mptrain.library.data.text.synthetic_tokens"
    name: str = "synthetic_tokens"
    vocab_size: int = 64
    seq_len: int = 64
    train_tokens: int = 200_000
    val_tokens: int = 20_000

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 2, "dataset.vocab_size", self.vocab_size, "must be >= 2")
        _check(self.seq_len >= 1, "dataset.seq_len", self.seq_len, "must be >= 1")
        for key in ("train_tokens", "val_tokens"):  # one window is seq_len inputs plus the next token
            _check(getattr(self, key) > self.seq_len, f"dataset.{key}", getattr(self, key),
                   f"must exceed dataset.seq_len={self.seq_len} (one window of inputs and next tokens)")


@dataclass
class DigitsDatasetConfig:
    """scikit-learn's bundled 8x8 handwritten digits: 1797 real images, offline."""

    _target_: str = "mptrain.library.data.loading.digits"
    name: str = "digits"
    num_classes: int = 10
    channels: int = 1
    image_size: int = 8  # upsampled (bilinear) when larger than 8, e.g. 32 for torchvision models
    val_fraction: float = 0.2  # fixed split, the same for every run

    def __post_init__(self) -> None:
        _check(self.image_size >= 8, "dataset.image_size", self.image_size, "must be >= 8")
        _check(0 < self.val_fraction < 1, "dataset.val_fraction", self.val_fraction, "must be in (0, 1)")


@dataclass
class SyntheticDatasetConfig:
    """Random images with a weak class signal, generated on the fly: for speed work."""

    _target_: str = "mptrain.library.data.loading.synthetic"
    name: str = "synthetic"
    num_classes: int = 10
    channels: int = 3
    image_size: int = 32
    train_size: int = 2048
    val_size: int = 512
    pool_size: int = 256  # distinct images held in memory; samples cycle through them

    def __post_init__(self) -> None:
        for key in ("num_classes", "channels", "image_size", "train_size", "val_size", "pool_size"):
            _check(getattr(self, key) >= 1, f"dataset.{key}", getattr(self, key), "must be >= 1")


WANDB_MODES = ("online", "offline", "disabled")  # logger=wandb's logger.mode (and $WANDB_MODE)


@dataclass
class LoggerConfig:
    """An experiment tracker beside the run directory (`logger=mlflow|wandb`). TensorBoard is separate
    (`trainer.tensorboard`); both can run together. Only rank 0 logs."""

    name: str = "none"  # none | mlflow | wandb
    # null: $MLFLOW_TRACKING_URI if set, else SQLite in ./mlruns/mlflow.db (MLflow 3 refuses a plain file store)
    tracking_uri: str | None = None
    # where a new experiment keeps its artifacts; null: ./mlruns/artifacts beside the local store
    artifact_location: str | None = None
    experiment: str = "mptrain"  # MLflow experiment / W&B project name (created when missing)
    run_name: str | None = None  # null: the run directory's name
    entity: str | None = None  # W&B team or user; null: W&B's default for the login
    # W&B: online | offline | disabled; null: $WANDB_MODE, else online when logged in (wandb login), else offline
    mode: str | None = None

    def __post_init__(self) -> None:
        _check(self.name in ("none", "mlflow", "wandb"), "logger.name", self.name, "choose none, mlflow or wandb")
        _check(self.mode is None or self.mode in WANDB_MODES, "logger.mode", self.mode,
               f"choose {', '.join(WANDB_MODES)} (or null)")


@dataclass
class Config:
    model: Any = MISSING
    dataset: Any = MISSING
    precision: PrecisionConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    trainer: TrainerConfig = MISSING
    checkpoint: CheckpointConfig = MISSING
    diagnostics: DiagnosticsConfig = MISSING
    experiment: Any = None
    task: Any = None  # null: the model's own task (classification unless the model declares another)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # the user's training callbacks, each {_target_: ..., its keys}: a mptrain.Callback (docs/python.md)
    callbacks: list[Any] = field(default_factory=list)
    # the summary key a sweep optimizes (hparams_search=optuna): the value the `mptrain` task returns
    optimized_metric: str | None = None
    seed: int = 0
    resume: str | None = None  # null: fresh run | auto: newest checkpoint in this run dir | a checkpoint path


def validate(cfg: DictConfig) -> None:
    """Run every schema's range checks. Raises ConfigError naming the key and the fix."""
    for key in (
        "precision",
        "optimizer",
        "scheduler",
        "trainer",
        "checkpoint",
        "diagnostics",
        "dataset",
        "model",
        "logger",
    ):  # data first: a model key often interpolates it
        node = cfg.get(key)
        if isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None):
            OmegaConf.to_object(node)  # instantiates the dataclass, so __post_init__ runs


def check_warmup(sched_cfg: DictConfig, total_steps: int) -> bool:
    """A warm-up that covers more than half of the run leaves little of it at the peak learning rate: say so,
    once per run (a warning, not a refusal: short smoke runs keep the default schedule). Returns False then."""
    warmup = sched_cfg.get("warmup_steps") or 0
    active = sched_cfg.get("name", "none") != "none" or sched_cfg.get("_target_")
    if active and 2 * warmup > total_steps:
        reach = ("the learning rate never reaches optimizer.lr" if warmup >= total_steps
                 else f"optimizer.lr is reached only after step {warmup}")
        logging.getLogger("mptrain").warning(
            "scheduler.warmup_steps=%d covers more than half of the run (%d steps): %s; lower the warm-up "
            "(scheduler.warmup_steps=0) or train longer", warmup, total_steps, reach)
        return False
    return True


def check_monitor(monitor: str | None, metric_names: list[str] | tuple[str, ...]) -> None:
    """checkpoint.monitor must name a metric the task reports (else best.pt is never written)."""
    if monitor is not None and monitor not in metric_names:
        raise ConfigError(f"checkpoint.monitor={monitor!r} is not a metric this task reports "
                          f"({', '.join(metric_names) or 'none'}); choose one of them or null")
