"""Optimizer and learning-rate scheduler builders (`optimizer=` and `scheduler=` groups).

Optimizers: the built-in SGD and AdamW, torchao's low-bit AdamW (adamw8bit | adamw4bit | adamwfp8: the two
moments stored in 8 or 4 bits, or fp8, blockwise scaled), or any class by `optimizer=torch optimizer._target_`
(taking lr, weight_decay, the momentum/nesterov/betas/eps given and `optimizer.kwargs`). Parameter groups: weight
decay only on tensors of two or more dimensions (matrices, convolution kernels, embeddings), none on biases and
norm weights, as nanoGPT and timm do; the default for AdamW-type optimizers (`optimizer.decay_all=null`).

Schedulers: the built-in warm-up + cosine/step, or any torch.optim.lr_scheduler class by `scheduler._target_`
after the same linear warm-up. Either one is stepped once per *applied* optimizer step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf

from mptrain.errors import ConfigError, MptrainError
from mptrain.library.extras import TORCHAO, require
from mptrain.library.imports import locate

LOW_BIT = {"adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit", "adamwfp8": "AdamWFp8"}  # torchao.optim classes
# the tensor subclasses their states are saved as: torch.load(weights_only=True) reads them once torchao.optim
# is imported (it registers them as safe), which a fresh process resuming a run has not done yet
LOW_BIT_STATES = ("torchao.optim.subclass_8bit.OptimState8bit", "torchao.optim.subclass_4bit.OptimState4bit",
                  "torchao.optim.subclass_fp8.OptimStateFp8")


def allow_low_bit_states() -> None:
    """Let torch.load(weights_only=True) read torchao's low-bit optimizer states."""
    require("torchao.optim", TORCHAO, "a checkpoint holding torchao's low-bit optimizer state")


def _target_class(target: str, key: str):
    like = {"optimizer": "torch.optim.RAdam", "scheduler": "torch.optim.lr_scheduler.StepLR"}[key]
    cls = locate(key, target, f"give a class such as {like}, or put its module on PYTHONPATH")
    if not isinstance(cls, type):
        raise ConfigError(
            f"{key}._target_={target} is a {type(cls).__name__}, not a class; give a class such as {like}"
        )
    return cls


def optimizer_name(cfg: DictConfig) -> str:
    """adamw | sgd | adamw8bit | ... or the class name of optimizer._target_."""
    target = cfg.get("_target_")
    return target.rsplit(".", 1)[-1] if target else cfg.name


def decoupled(cfg: DictConfig) -> bool:
    """AdamW-type (decoupled weight decay): its decay belongs on matrices only by default."""
    return optimizer_name(cfg).lower().startswith("adamw")


def param_groups(cfg: DictConfig, params: list[torch.Tensor]) -> list[dict] | list[torch.Tensor]:
    """One group with weight decay (tensors of >= 2 dims) and one without (biases, norm weights), unless
    optimizer.decay_all (default: true for SGD and other non-AdamW optimizers, false for AdamW-type)."""
    decay_all = cfg.get("decay_all")
    if decay_all is None:
        decay_all = not decoupled(cfg)
    if decay_all or cfg.weight_decay == 0:
        return params
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def check_bf16_pure(cfg: DictConfig) -> None:
    """precision=bf16_pure rounds into bf16 with its own SGD/AdamW: another optimizer cannot."""
    if cfg.get("_target_") or cfg.name in LOW_BIT:
        raise ConfigError(
            f"precision=bf16_pure updates bf16 weights with its own SGD/AdamW; optimizer="
            f"{optimizer_name(cfg)} cannot round into bf16: use optimizer=adamw|sgd, or another precision"
        )


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def build_optimizer(cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The `optimizer=` group's optimizer over `params` (the FP32 master copies in `master` mode), in
    param_groups. precision=bf16_pure builds its own (Precision.build_optimizer). An argument the class refuses
    (TypeError, ValueError) is a ConfigError naming optimizer.kwargs."""
    target = cfg.get("_target_")
    what = f"optimizer._target_={target}" if target else f"optimizer={cfg.name}"
    try:
        optimizer = _construct_optimizer(cfg, list(params))
    except MptrainError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: {_first_line(e)}; set only arguments it takes, with values it accepts, "
                          "in optimizer.kwargs") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"{what} built a {type(optimizer).__name__}, not a torch.optim.Optimizer; give an "
                          "optimizer class such as torch.optim.RAdam")
    return optimizer


SETTINGS = ("momentum", "nesterov", "betas", "eps")  # the built-ins' own keys, which a class by _target_ may take


def given_settings(cfg: DictConfig, cls: type, kwargs: dict) -> dict:
    """optimizer.momentum / nesterov / betas / eps that were given (not null) for a class by _target_: each
    one the class takes, as its argument; one it does not take (or also in optimizer.kwargs) is a ConfigError,
    never dropped."""
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {k: cfg[k] for k in SETTINGS if cfg.get(k) is not None}
    for key, value in given.items():
        if key in kwargs:
            raise ConfigError(f"optimizer.{key} is given twice, as optimizer.{key}={value} and in optimizer.kwargs; "
                              "give it once")
        if not (takes_any or key in params):
            takes = ", ".join(k for k in params if k not in ("self", "params"))
            raise ConfigError(f"optimizer.{key}={value}: {cfg._target_} takes no {key} (it takes {takes}); remove "
                              f"optimizer.{key}, or choose an optimizer class that takes it")
    return {k: tuple(v) if k == "betas" else v for k, v in given.items()}


def _construct_optimizer(cfg: DictConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    target = cfg.get("_target_")
    groups = param_groups(cfg, params)
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") is not None else {}
    if target:
        cls = _target_class(target, "optimizer")
        if not issubclass(cls, torch.optim.Optimizer):
            raise ConfigError(f"optimizer._target_={target} is not a torch.optim.Optimizer; give an optimizer "
                              "class such as torch.optim.RAdam")
        return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **given_settings(cfg, cls, kwargs), **kwargs)
    if cfg.name in LOW_BIT:
        torchao_optim = require("torchao.optim", TORCHAO, f"optimizer={cfg.name}")
        cls = getattr(torchao_optim, LOW_BIT[cfg.name])
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **kwargs)

    def make(**impl) -> torch.optim.Optimizer:
        if cfg.name == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                   weight_decay=cfg.weight_decay, **impl, **kwargs)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, **impl, **kwargs)

    if cfg.implementation == "auto" and any(hasattr(p, "device_mesh") for p in params):
        # FSDP2's DTensor parameters: PyTorch shards the fused Adam/AdamW kernel (one launch per step) but has no
        # sharding rule for fused SGD (NotImplementedError at the first step), which takes the foreach kernels
        return make(fused=True) if cfg.name == "adamw" else make(foreach=True)
    if cfg.implementation == "auto":
        # fused kernels (one per step, CPU and CUDA) are ~3x faster than the per-tensor loop on a CPU;
        # fall back to PyTorch's own choice where a device or dtype has none (a bad kwarg fails again there)
        try:
            return make(fused=True)
        except (RuntimeError, ValueError):
            return make()
    return make(
        **{"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[cfg.implementation]
    )


def lr_factor(cfg: DictConfig, step: int, total_steps: int) -> float:
    """The multiplier of the peak lr after `step` applied optimizer steps."""
    if cfg.name == "none":
        return 1.0
    if step < cfg.warmup_steps:
        start = cfg.warmup_start_factor
        return start + (1.0 - start) * step / cfg.warmup_steps
    if cfg.name == "step":
        return cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
    # cosine from the end of warm-up to total_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# a scheduler by _target_ is stepped this many times at set-up on a stand-in optimizer, so that one failing
# within the run (OneCycleLR past its total_steps, StepLR with step_size=0) is refused before the run starts;
# a longer run is checked over its first PROBE_STEPS steps (and OneCycleLR's total_steps over all of them)
PROBE_STEPS = 5000


def _own(value):
    """A copy of a tensor hyper-parameter: torchao's optimizers keep lr as a tensor, which a scheduler updates in
    place (fill_), so a shared one let the probe's thousands of steps set the real run's lr (1e-3 -> 1e-9)."""
    return value.clone() if isinstance(value, torch.Tensor) else value


class _StandIn(torch.optim.Optimizer):
    """An optimizer with another's param_groups hyper-parameters and no work: a scheduler's test bench."""

    def __init__(self, like: torch.optim.Optimizer):
        groups = [{k: _own(v) for k, v in g.items() if k != "params"} | {"params": [torch.zeros(1)]}
                  for g in like.param_groups]
        super().__init__(groups, {k: _own(v) for k, v in like.defaults.items()})

    def step(self, closure=None) -> None:
        return None


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A LambdaLR stepped once per *applied* optimizer step (skipped steps do not advance it); with
    scheduler._target_, that class (its arguments from scheduler.kwargs) after scheduler.warmup_steps of
    linear warm-up from warmup_start_factor (SequentialLR: the class counts its steps from the warm-up's end).
    A class that refuses its arguments, or fails within the run's first PROBE_STEPS steps, is a ConfigError."""
    if cfg.get("_target_"):
        probe = _StandIn(optimizer)  # before the real one is built: that one writes initial_lr into the groups
        scheduler = _target_scheduler(cfg, optimizer, total_steps)
        _step_through(cfg, _target_scheduler(cfg, probe, total_steps), probe, total_steps)
        return scheduler
    cfg = SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True))  # plain copy: fast, frozen
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total_steps))


def _target_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    lrs = torch.optim.lr_scheduler
    target = cfg._target_
    cls = _target_class(target, "scheduler")
    if not issubclass(cls, lrs.LRScheduler) or issubclass(cls, lrs.ReduceLROnPlateau):
        raise ConfigError(f"scheduler._target_={target} is not a step-driven LR scheduler (ReduceLROnPlateau needs a "
                          "metric); choose a torch.optim.lr_scheduler class stepped per optimizer step")
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") is not None else {}
    try:
        main = cls(optimizer, **kwargs)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(
            f"scheduler._target_={target}: {_first_line(e)}; give its arguments in scheduler.kwargs"
        ) from None
    after_warmup = total_steps - cfg.warmup_steps
    if isinstance(getattr(main, "total_steps", None), int) and main.total_steps < after_warmup:  # OneCycleLR
        raise ConfigError(f"scheduler._target_={target} lasts total_steps={main.total_steps}, fewer than the run's "
                          f"{after_warmup} steps after {cfg.warmup_steps} of warm-up; set scheduler.kwargs.total_steps "
                          f"to {after_warmup} (or shorten trainer.max_steps / max_epochs)")
    if not cfg.warmup_steps:
        return main
    warmup = lrs.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0,
                          total_iters=cfg.warmup_steps)
    return lrs.SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_steps])


def _step_through(cfg: DictConfig, scheduler, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
    """Step `scheduler` as the loop will, over the run's first PROBE_STEPS steps; a failure is the scheduler's
    settings, said at set-up."""
    steps = min(total_steps, PROBE_STEPS)
    of = f"the run's {steps}" if steps == total_steps else f"the first {steps} checked of the run's {total_steps}"
    for step in range(1, steps + 1):
        optimizer.step()
        try:
            scheduler.step()
        except Exception as e:  # noqa: BLE001 - any failure of the user's class at step k is theirs to fix
            raise ConfigError(f"scheduler._target_={cfg._target_} fails at step {step} of {of}: "
                              f"{type(e).__name__}: {_first_line(e)}; fix scheduler.kwargs") from None
        bad = [g["lr"] for g in optimizer.param_groups if not (math.isfinite(g["lr"]) and g["lr"] >= 0)]
        if bad:
            raise ConfigError(
                f"scheduler._target_={cfg._target_} sets lr={bad[0]} at step {step}; fix scheduler.kwargs"
            )


class MultiOptimizer:
    """Several named optimizers behind one object for the loop and checkpoints (a GAN's two)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"checkpoint has optimizers {sorted(state)}, this run has {sorted(self.optimizers)}")
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])


class MultiScheduler:
    def __init__(self, schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]):
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers.values():
            s.step()

    def state_dict(self) -> dict:
        return {k: s.state_dict() for k, s in self.schedulers.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, s in self.schedulers.items():
            s.load_state_dict(state[k])
