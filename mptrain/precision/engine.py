"""The precision object: everything precision-specific, behind one small interface for the loop.

    precision.prepare_model(model)              # resolve the plan; convert the model to it
    opt = precision.build_optimizer(cfg, precision.optimizer_params())
    with precision.autocast():  loss = ...     # forward in the compute dtype
    precision.backward(loss / k)                # scaled backward, once per micro-batch
    applied = precision.step(opt, clip)         # unscale once, overflow check, clip, step|skip,
                                                # scale update, copy masters back
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mptrain.config import Fp8Config
from mptrain.errors import ConfigError, HardwareError
from mptrain.precision import fp8, timing
from mptrain.precision.convert import Applier
from mptrain.precision.families import (
    PRESETS,
    family_for,
    optimizer_state_kind,
    request_update_stats,
    update_stats,
)
from mptrain.precision.formats import BF16, FP8, FP8_RECIPES, FP32, Registry
from mptrain.precision.master import CASTING, MasterWeights
from mptrain.precision.plan import Plan, Rule, resolve, user_rules
from mptrain.precision.planner import Planner
from mptrain.precision.scaler import LossScaler, NoScaler, SwitchToBF16
from mptrain.precision.schedule import ON_MIN, Switch, on_min_switch, rechain, retime

FP16_MAX = 65504.0  # the largest finite float16

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def short(dtype: torch.dtype) -> str:
    """A torch dtype's format name (float32 -> fp32, ...)."""
    return Registry.for_dtype(dtype).name


SHORT_DTYPE = {d: short(d) for d in DTYPES.values()}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HardwareError(f"trainer.device={name} but no CUDA GPU is visible here; use trainer.device=cpu or auto")
    return device


def resolve_dtype(mode: str, dtype: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype and the reason it was chosen."""
    preset = PRESETS[mode]
    if preset.fixed_dtype is not None:
        if dtype not in ("auto", preset.fixed_dtype):
            raise ConfigError(f"precision={mode} " + preset.dtype_why.format(dtype=dtype))
        if preset.fixed_dtype == "float32":
            return torch.float32, f"{mode} mode"
        dtype = preset.fixed_dtype
    if preset.measured and dtype == "auto":  # precision=auto's probe: the safe preset: bf16 where it runs, else fp32
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float32, "precision=auto on a GPU without bfloat16"
        return torch.bfloat16, "precision=auto probes in bfloat16"
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
    if PRESETS[mode].family != "autocast":
        raise ConfigError(f"{key} needs float32 parameters, but precision={mode} holds them in float16: "
                          "use precision=dynamic (or amp) to keep the bf16 fallback, or on_min=raise|clamp")
    if kind == "static":
        raise ConfigError(f"{key} cannot apply with precision.loss_scale.kind=static: a static scale never backs "
                          "off, so it never reaches min and the switch would never happen (use kind=dynamic)")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key} needs bfloat16, which {torch.cuda.get_device_name(device)} lacks (pre-Ampere): "
                          "use on_min=raise or on_min=clamp")


def _refused(old: Precision, new: Precision, strategy: str, parts: int) -> str | None:
    """Why a switch from the precision `old` to `new` cannot be made in the running process (None: it can)."""
    mode = old.mode
    if optimizer_state_kind(mode) != optimizer_state_kind(new.mode):  # the resume's rule (check_precision_change)
        return (f"the optimizer state of precision={mode} ({optimizer_state_kind(mode)}) does not map onto "
                f"precision={new.mode}'s ({optimizer_state_kind(new.mode)}), as a resume into it would refuse")
    if new.measured_plan:
        return "precision=auto probes from the run's first step; start the run in auto and switch out of it"
    if PRESETS[mode].family != "autocast" or not (new.preset.family == "autocast" or new.preset.master):
        return (f"an in-process switch goes from an autocast preset (fp32, amp, bf16, dynamic, static, noscale, fp8, "
                f"auto) to another or to master; precision={mode} -> {new.mode} needs a stop and a resume "
                f"(resume=auto precision={new.mode})")
    if strategy == "fsdp" and new.preset.master:
        return "trainer.strategy=fsdp keeps float32 shards itself and takes no master weights"
    if strategy == "fsdp" and new.gather_dtype != old.gather_dtype:
        gathered, wanted = (str(p.gather_dtype).removeprefix("torch.") for p in (old, new))
        return (f"trainer.strategy=fsdp gathers the weights in {gathered} (FSDP2's param_dtype, fixed when the model "
                f"was sharded) and precision={new.mode} needs them in {wanted}; stop and resume into it "
                f"(resume=auto precision={new.mode})")
    if new.preset.master and parts > 1:
        return "master weights for a task with several optimizers (a GAN): stop and resume into precision=master"
    return None


def _join(event: dict | None, other: dict | None) -> dict | None:
    """One event row for a step: `event`, with `other` (made at the same step) under "also"."""
    if event is None or other is None:
        return event or other
    return {**event, "also": other}


def _on_min_of(state: dict | None) -> tuple[int, dict] | None:
    """The scaler's switch (on_min=bf16) a checkpoint's precision `state` records: (the step after which it was
    made, its facts; the history's record gives the step where the facts, from an older checkpoint, lack it)."""
    record = (state or {}).get("bf16_switch")
    if record is None:
        return None
    steps = [h["step"] for h in state.get("history") or [] if h.get("what") == ON_MIN]
    return int(record.get("step", steps[0] if steps else 0)), {"from_mode": state.get("mode"), **record}


def _after_switch(record: dict) -> NoScaler:
    """No scaling from an on_min=bf16 switch on, keeping the skipped steps and scale statistics it recorded."""
    return NoScaler(int(record.get("skipped", 0)), {k: record[k] for k in (
        "loss_scale_min", "loss_scale_max", "loss_scale_backoffs") if k in record})


@dataclass
class StepResult:
    applied: bool  # False when the step was skipped for non-finite gradients
    grad_norm: torch.Tensor | None  # total norm of the unscaled gradients, when clipping
    switched_to_bf16: bool = False  # on_min=bf16: this step's overflow at min scale switched the run to bf16


class Precision:
    """The run's precision, the policy the step talks to: the preset's family (autocast + loss scaler; fp16 weights
    + fp32 masters; pure bf16), the format registry, the per-module plan and its applier, the loss scaler (a
    NoScaler where there is no scaling), the master weights, and the planner of precision=auto."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.mode = cfg.mode
        self.cfg = cfg  # what a switch of the scaler's (on_min=bf16) starts from
        self.device = device
        self._step = 0  # the step running (begin_step): the scaler's switch is made after it
        self.preset, self.family = family_for(self.mode, cfg)
        self.use_autocast = self.family.uses_autocast
        self.low_precision_params = self.family.low_precision_params
        self.compute_dtype, self.dtype_reason = resolve_dtype(cfg.mode, cfg.dtype, device)
        self.keep_norm_fp32 = cfg.keep_norm_fp32
        self.fp32_accumulation = cfg.fp32_accumulation
        fp8_cfg = cfg.get(FP8.name) or OmegaConf.structured(Fp8Config)
        # every format the run can name: the built-ins and precision.formats (checked here, before any work)
        self.registry = Registry.from_config(cfg.get("formats"), fp8_cfg.recipe)
        self.rules = user_rules(cfg.get("layers"), self.registry)
        if self.rules and not self.family.takes_layers:
            raise ConfigError(f"precision.layers with precision={self.mode}: its parameters are held in "
                              f"{short(self.compute_dtype)}, so per-layer formats need an autocast preset "
                              "(fp32, amp, bf16, dynamic, static, noscale or fp8)")
        self.scaler = self._build_scaler(cfg.loss_scale)
        # on_min=bf16: the facts of the switch once it happened (None before), kept in state_dict()
        self.bf16_switch: dict | None = None
        self.master: MasterWeights | None = None
        self._params: list[torch.Tensor] = []
        self._input_hooks: list = []
        # FSDP: each rank sees only its gradient shard, so every rank must agree on a skip (agree_on_overflow)
        self._agree: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._on_plan: Callable[[], None] | None = None  # the run writes precision_plan.json again on a change
        self.measured_plan = self.preset.measured
        if self.measured_plan and self.rules:
            raise ConfigError("precision.layers with precision=auto: auto chooses every layer's format itself; "
                              "drop precision.layers, or use another preset (e.g. precision=bf16) with it")
        # precision=auto: the planner (precision/planner.py), fed by the step through begin_step / end_step
        # precision=auto planned every module fp32: the run then computes exactly as precision=fp32 does (autocast
        # off, no per-module wrappers), not as bf16 autocast with each module wrapped back to fp32 (set by the plan)
        self.plain_fp32 = False
        self.planner = (Planner(cfg.auto, device, self.autocast_format or short(torch.float32), self.registry)
                        if self.measured_plan else None)
        uses_fp8 = (self.preset.fp8 or any(self.registry.get(r.format).executor == "torchao" for r in self.rules)
                    or (self.planner is not None and self.planner.uses_torchao))
        self.fp8_cfg = fp8_cfg if uses_fp8 else None
        self.fp8_layers: list[str] = []
        self.fp8_emulated, self.fp8_reason = True, ""
        if self.fp8_cfg is not None:  # fail before the run directory is touched
            try:
                fp8.require_torchao()
            except fp8.Fp8MissingError:
                if self.preset.fp8:
                    raise
                where = "precision.auto.formats" if self.planner is not None else "precision.layers"
                raise fp8.Fp8MissingError(f"{where} names torchao's float8 training (fp8, fp8_row, fp8_row_hp), "
                                          "which needs torchao: pip install mptrain[fp8]") from None
            self.fp8_emulated, self.fp8_reason = fp8.resolve_emulate(self.fp8_cfg.emulate, device)
            fp8.check_all_gather(self.fp8_cfg, self.fp8_emulated, self.fp8_reason, FP8.recipe)
        self.applier = Applier(self.registry, device, self.autocast_format, self.fp8_emulated,
                               bool(self.fp8_cfg is not None and self.fp8_cfg.get("fsdp_all_gather")))
        self.plan: Plan | None = None
        self.plan_changed: dict[str, str] = {}  # module -> "old -> new" when resumed from another plan
        # precision.schedule: the switches still to come (set_schedule), the one made at this step's start (its
        # event row), and the record of those made (precision_plan.json's history, the checkpoint)
        self.switches: list[Switch] = []
        self._switched: dict | None = None
        self.history: list[dict] = []
        self._seeded: tuple[int, int] | None = None
        self.params_changed = False  # the last switch gave the optimizer other tensors (master weights): rebuild it
        self.slowdown: dict[str, float] = {}  # emulated format -> measured time over fp32's (emulated_slowdown)

    def _build_scaler(self, ls) -> LossScaler | NoScaler:
        kind = ls.kind
        if self.preset.scaling is not None and kind not in ("auto", self.preset.scaling):
            raise ConfigError(
                f"precision={self.mode} means {self.preset.scaling} loss scaling; "
                f"precision.loss_scale.kind={kind} contradicts it (use precision=amp "
                f"precision.loss_scale.kind={kind}, or precision={kind if kind != 'none' else 'noscale'})"
            )
        if kind == "auto":
            kind = "dynamic" if self.compute_dtype == torch.float16 else "none"
        if ls.on_min == BF16.name and kind != "none":
            check_bf16_fallback(self.mode, kind, self.compute_dtype, self.device)
        if kind == "static" and self.compute_dtype == torch.float16 and ls.init > FP16_MAX:
            log.warning("precision.loss_scale.init=%g is above float16's largest value (65504): unless the gradients "
                        "are far below 1 (e.g. a small trainer.loss_weight), every step overflows and is skipped; "
                        "32768 or less, or precision.loss_scale.kind=dynamic, is the usual choice", ls.init)
        if kind == "none":
            return NoScaler()
        return LossScaler(kind, ls.init, ls.growth_factor, ls.backoff_factor, ls.growth_interval, ls.hysteresis,
                          ls.min, ls.max, ls.on_min, consecutive_hysteresis=ls.get("consecutive_hysteresis", False))

    def seed(self, seed: int, rank: int) -> None:
        """The training recipes' random streams (stochastic rounding, Hadamard signs): the run's seed and this
        process's rank; they never draw from the global generators (dropout, data order)."""
        self._seeded = (seed, rank)
        self.applier.random.configure(seed, rank)

    def agree_on_overflow(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """FSDP: `fn` reduces the overflow flag across ranks (each rank unscales only its gradient shard)."""
        self._agree = fn

    def count_state_with(self, fn: Callable[[], float]) -> None:
        """precision.auto.memory_gb: `fn()` gives the bytes of the run's weights, grads, optimizer state, masters."""
        if self.planner is not None:
            self.planner.count_state_with(fn)

    def agree_across_ranks(self, gather: Callable[[object], list]) -> None:
        """Data parallel: precision=auto decides on every rank's figures (`gather(obj)`: every rank's `obj`, in
        rank order), so all ranks apply one plan."""
        if self.planner is not None:
            self.planner.agree_across_ranks(gather)

    def on_plan_change(self, fn: Callable[[], None]) -> None:
        """`fn` runs whenever the plan changes in the running process (the run rewrites precision_plan.json)."""
        self._on_plan = fn

    # ---- set-up -------------------------------------------------------------------------------
    def describe(self) -> str:
        scaling = ("no loss scaling" if not self.scaler.enabled
                   else f"{self.scaler.kind} loss scaling from {self.scaler.scale:g}")
        params = short(self.compute_dtype) if self.low_precision_params else short(torch.float32)
        extra = self.family.describe()
        if self.planner is not None:
            extra += (f", per-layer formats measured among {', '.join(self.planner.ladder)} "
                      f"(objective {self.planner.objective})")
        elif self.fp8_cfg is not None:
            fmt = FP8_RECIPES[self.fp8_cfg.recipe]
            which = ("Linear layers" if self.preset.fp8  # else precision.layers named fp8 for some modules
                     else "the modules precision.layers puts in fp8 (a Linear through torchao, a Conv2d emulated)")
            extra += (f", {which} in float8 ({fmt.element.name} forward, {fmt.grad_format.element.name} "
                      f"gradients, {self.fp8_cfg.recipe} dynamic scales; {self.fp8_reason})")
        if self.rules:
            extra += f", per-layer rules {', '.join(f'{r.pattern}: {r.format}' for r in self.rules)}"
        return (f"precision={self.mode}: compute {short(self.compute_dtype)} ({self.dtype_reason}), params {params}"
                f"{extra}, {scaling}")

    @property
    def autocast_format(self) -> str | None:
        """The run's autocast format (None: no autocast, the model computes in its parameters' dtype)."""
        if not self.use_autocast or self.compute_dtype == torch.float32 or self.plain_fp32:
            return None
        return short(self.compute_dtype)

    @property
    def compute_name(self) -> str:
        """The format the model computes in, for records: the compute dtype's, or fp32 where the plan puts every
        module in fp32 (precision=auto may)."""
        if self.plan and all(e.format == short(torch.float32) for e in self.plan.values()):
            return short(torch.float32)
        return short(self.compute_dtype)

    @property
    def per_layer(self) -> bool:
        """The plan may put modules in formats other than the run's autocast dtype (precision=auto or
        precision.layers): FSDP2 then gathers float32 weights, and each module casts them as its format says."""
        return self.planner is not None or bool(self.rules)

    @property
    def gather_dtype(self) -> torch.dtype:
        """The dtype FSDP2 gathers the weights in (MixedPrecisionPolicy.param_dtype, fixed when the model is
        sharded): the compute dtype under one autocast for the whole model; float32 for a per-layer plan (each
        module casts as its format says; a bf16 gather would feed bf16 weights to an fp32 or fp8 layer) and
        without autocast."""
        return self.compute_dtype if self.use_autocast and not self.per_layer else torch.float32

    @property
    def dim_multiple(self) -> int:
        return (self.fp8_cfg or OmegaConf.structured(Fp8Config)).dim_multiple

    def _resolve(self, model: nn.Module, rules: list[Rule]) -> Plan:
        base = self.family.base(model, self.compute_dtype)
        if self.preset.fp8:
            entry = FP8_RECIPES[self.fp8_cfg.recipe].name
            for name, why in fp8.plan(model, self.fp8_cfg).items():
                if name in base:
                    base[name] = (entry, "float8", "preset") if why is None else (base[name][0], base[name][1], why)
        return resolve(model, base, rules, autocast=self.autocast_format, registry=self.registry,
                       dim_multiple=self.dim_multiple, fp8_emulated=self.fp8_emulated, device=self.device)

    def resolve_plan(self, model: nn.Module) -> Plan:
        """The preset's plan for `model` with precision.layers applied (the model is not changed)."""
        return self._resolve(model, self.rules)

    def plan_for(self, model: nn.Module, formats: dict[str, str], why: dict[str, str]) -> Plan:
        """The plan of `model` with each module of `formats` (module -> format; `why`: module -> reason) in that
        format (the model is not changed)."""
        return self._resolve(model, [Rule(n, f, why[n]) for n, f in formats.items()])

    def apply_formats(self, model: nn.Module, formats: dict[str, str], why: dict[str, str]) -> list[str]:
        """Move `model` to the plan `formats` (module -> format; `why`: module -> reason) in place, the parameters
        (and so the optimizer state) kept; precision_plan.json is written again. Returns the modules changed."""
        old = self.plan
        fp32 = bool(formats) and self.planner is not None and all(f == short(torch.float32) for f in formats.values())
        if fp32 != self.plain_fp32:  # into or out of the fp32 preset's own path: every module converts again
            self.plain_fp32, old = fp32, Plan()
            self.applier.autocast = self.autocast_format
        new = self.plan_for(model, formats, why)
        changed = self.applier.replan(model, old, new)
        emulated_before = {n for n, e in self.plan.items() if e.emulated}
        self.plan = new
        self.fp8_layers = [n for n, e in new.items() if e.kernel == "float8"]
        if {n for n, e in new.items() if e.emulated} - emulated_before:
            self.warn_emulated()
        if self._on_plan is not None:
            self._on_plan()
        return changed

    def time_formats(self, module: nn.Module, formats: list[str], example: torch.Tensor, repeats: int) -> dict:
        """Forward+backward seconds of `module` in each of `formats` on this device (precision=auto's objective=time),
        each on a copy converted as this run converts a module (its plan rule, its applier), on `example` (an input
        of the probe's shape), the formats' runs interleaved, stopped early where the order is plain (timing.APART).
        A format the copy refuses is not timed."""
        return self._time(module, formats, example, repeats, timing.APART)

    def _time(self, module: nn.Module, formats: list[str], example: torch.Tensor, repeats: int,
              apart: float | None) -> dict:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # a module's dropout in the timed runs leaves the run's RNG be
            runs = {fmt: run for fmt in formats if (run := self._timed_run(module, fmt, example)) is not None}
            return timing.interleaved_medians(runs, self.device, repeats, apart=apart)

    def _timed_run(self, module: nn.Module, fmt: str, example: torch.Tensor):
        wrapper = nn.Sequential(timing.plain_copy(module))
        plan = self._resolve(wrapper, [Rule("0", fmt, "timing")])
        if plan["0"].format != fmt:
            return None
        Applier(self.registry, self.device, self.autocast_format, self.fp8_emulated).apply(wrapper, plan)
        return timing.forward_backward(wrapper, example, self.autocast)

    def restore_formats(self, formats: dict[str, str], why: str) -> list[str]:
        """The prepared model moved to `formats` (module -> format), every entry giving `why` (a checkpoint's own
        plan restored for evaluation)."""
        return self.apply_formats(self._model, formats, dict.fromkeys(formats, why))

    def emulated_slowdown(self, formats: list[str]) -> dict[str, float]:
        """format -> its forward+backward time over fp32's on this device, measured on a 256 x 256 Linear (256
        rows in) converted as this run converts a module: the figure a run, auto's plan and the advisor give for
        an emulated format. Measured once per format, every one of 5 rounds (no early stop: the figure itself is
        the point, not an order), a few ms each; the run's random streams are left be."""
        todo = [f for f in dict.fromkeys(formats) if f not in self.slowdown and f != FP32.name]
        if todo:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(0)
                layer = nn.Linear(256, 256).to(self.device)
                x = torch.randn(256, 256, device=self.device)
                times = self._time(layer, [*todo, FP32.name], x, 5, apart=None)
            self.slowdown.update({f: times[f] / times[FP32.name] for f in todo if f in times})
        return {f: self.slowdown[f] for f in formats if f in self.slowdown}

    def warn_emulated(self) -> None:
        """Say it when some planned module computes emulated on this device: the format's numerics, not its speed,
        with each format's slowdown measured here."""
        emulated = {n: e.format for n, e in self.plan.items() if e.emulated}
        if emulated:
            counts = {f: list(emulated.values()).count(f) for f in dict.fromkeys(emulated.values())}
            slow = self.emulated_slowdown(list(counts))
            measured = ("; measured here, a 256-wide Linear's forward+backward takes "
                        + ", ".join(f"{x:.1f}x fp32's time in {f}" for f, x in slow.items())) if slow else (
                "; no slowdown measured (no 256-wide Linear takes the format)")
            log.warning("%d of %d planned modules compute emulated on %s (%s): the formats' numerics without their "
                        "kernels%s", len(emulated), len(self.plan), self.device.type,
                        ", ".join(f"{f} x{k}" for f, k in counts.items()), measured)

    def plan_record(self) -> dict:
        """precision_plan.json: module -> entry, and "history": precision=auto's plan, demotions and promotions, and
        the switches (precision.schedule, on_min=bf16), in step order."""
        out: dict = self.plan.records()
        history = [*self.history, *(self.planner.history if self.planner is not None else [])]
        if history or self.planner is not None:
            out["history"] = sorted(history, key=lambda h: h["step"])
        return out

    # ---- precision.schedule -------------------------------------------------------------------
    def set_schedule(self, switches: list[Switch], strategy: str, parts: int, model: nn.Module | None = None) -> None:
        """Check every switch as a resume into its precision would be checked, before the run directory changes
        (each target is built, and its plan resolved on `model`: a format or a dependency it lacks, a layers glob
        that matches no module, fails here), and keep them."""
        old = self
        for sw in switches:
            where = f"precision.schedule[{sw.index}]" if sw.index is not None else "precision.schedule"
            try:
                new = Precision(sw.cfg, self.device)  # its own checks (torchao for fp8, bf16 on this GPU, ...)
                if model is not None:
                    new.resolve_plan(model)
            except ConfigError as e:  # the check names the key as a run's own precision.layers would
                raise ConfigError(f"{where} (after step {sw.step}, {sw.what}): "
                                  f"{str(e).replace('precision.layers', 'its layers')}") from None
            why = _refused(old, new, strategy, parts)
            if why is not None:
                raise ConfigError(f"{where}: the switch after step {sw.step} ({sw.what}) is refused: {why}")
            old = new
        self.switches = list(switches)

    def catch_up(self, step: int, model: nn.Module | None = None, state: dict | None = None) -> None:
        """A resume from step `step` (or a tool reading its checkpoint): make the switches the run made before it
        (each after a step < `step`) on the prepared `model`, so that the checkpoint's precision state loads into
        the precision it was saved from: the schedule's, and the scaler's (on_min=bf16) that checkpoint `state`
        records, in the order they were made. The scaler's is made only where this run is in the precision it
        was made from (an explicit other precision at resume is what it says)."""
        model = model if model is not None else getattr(self, "_model", None)
        on_min = _on_min_of(state)
        if state is not None and self.switches:
            switches, late = retime(self.switches, state.get("history") or [], step)
            for sw in late:
                log.warning("precision.schedule: the switch %s falls after step %d now (trainer.max_steps changed at "
                            "resume), before this resume from step %d: it is made now, after step %d", sw.what,
                            sw.step, step, step)
            self.switches = rechain(self.cfg, switches)
        while True:
            due = self.switches[0] if self.switches and self.switches[0].step < step else None
            if on_min is not None and on_min[0] < step and (due is None or on_min[0] <= due.step):
                if self.mode == on_min[1].get("from_mode", state.get("mode")) and self.bf16_switch is None:
                    self._switch_on_min(on_min[1], on_min[0])
                on_min = None
            elif due is not None:
                self.switch(due, model)
            else:
                break
        self._switched = None

    def switch(self, sw: Switch, model: nn.Module) -> dict:
        """Switch to `sw`'s precision between two steps, in place, exactly as a stop after step `sw.step` and a
        resume into it: the model goes back to its plain modules and converts as the new plan says (the same
        parameter objects, so an optimizer over them carries on); into master weights, the model is cast to fp16
        and the masters are the fp32 weights of now (the resume's full-precision weights), and `params_changed`
        tells the run to rebuild its optimizer over them; the precision state loads by the resume's rules
        (checkpoint/resume.py: no masters, on_min=bf16's switch only within its own preset). This object becomes
        the new precision: the step, the diagnostics and the callbacks hold it. Returns the event row."""
        old = copy.copy(self)  # the precision until now: its attribute values
        self.__init__(sw.cfg, old.device)
        self.applier.random = old.applier.random  # the recipes' streams: one per (seed, rank, step), carried
        self._seeded, self._agree, self._on_plan, self._step = old._seeded, old._agree, old._on_plan, old._step
        if model is None:  # no model prepared yet (a precision state read alone): the precision alone switches
            self.load_state_dict({k: v for k, v in old.state_dict().items() if k not in ("master", "plan", "scaler")})
            self.history = [*old.history, {"step": sw.step, "event": "switch", "from": old.mode, "to": self.mode,
                                           "what": sw.what, **({"index": sw.index} if sw.index is not None else {})}]
            self.switches = [s for s in old.switches if s.step > sw.step]
            return {}
        Applier.revert(model, old.plan)
        fp32 = {id(p): p.detach().clone() for p in model.parameters()} if self.preset.master else {}
        self.prepare_model(model)
        if self.master is not None:
            with torch.no_grad():
                for p, m in zip(self.master.model_params, self.master.masters):
                    m.copy_(fp32[id(p)])
        self.params_changed = [id(p) for p in self._params] != [id(p) for p in old._params]
        state = old.state_dict()
        self.load_state_dict({k: v for k, v in state.items()  # the old plan is this switch's record, not a change
                              if k not in ("master", "plan") and not (k == "bf16_switch" and old.mode != self.mode)})
        if old.scaler.enabled and not self.scaler.enabled:  # the skips so far stay counted (as on_min=bf16)
            self.scaler = _after_switch({**old.scaler.stats(), "skipped": old.scaler.skipped})
        self.plan_changed = dict(old.plan_changed)
        # what the precision switched out of did, which the summary's own keys (this precision's) no longer say
        ran = {k: v for k, v in old.summary().items() if k.startswith(("auto_", "fp8_"))}
        record = {"step": sw.step, "event": "switch", "from": old.mode, "to": self.mode, "what": sw.what,
                  "before": old.plan.formats(), "formats": self.plan.formats(),
                  **({"index": sw.index} if sw.index is not None else {}), **({"ran": ran} if ran else {})}
        self.history = [*old.history, *(old.planner.history if old.planner is not None else []), record]
        self.switches = [s for s in old.switches if s.step > sw.step]
        log.warning("%s: after step %d, %s -> %s (%s):\n%s", "precision.schedule" if sw.entry else "precision",
                    sw.step, old.mode, self.mode, sw.what, self.plan.table())
        if self._on_plan is not None:
            self._on_plan()
        # the row is logged at the first step in the new precision (its "step"); the switch came after `after_step`
        self._switched = {"event": "precision_switch", "after_step": sw.step,
                          **{k: v for k, v in record.items() if k not in ("event", "step", "before")}}
        return self._switched

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Resolve the plan and convert the model to it: float8 / emulated / per-layer autocast modules, fp16 or bf16
        weights for those families (call before building the optimizer)."""
        if self.plan is None:
            self.plan = self.resolve_plan(model)
            log.info("precision plan (%s):\n%s", self.mode, self.plan.table())
            self.warn_emulated()
        if self.family.uses_autocast:
            names = self.applier.apply(model, self.plan)
            self.fp8_layers += names  # FSDP calls this again on the sharded model: nothing new converts then
            if self.preset.fp8 and names:
                log.info("fp8: %d Linear layers in float8 (%s)", len(names), self.fp8_cfg.recipe)
            elif self.preset.fp8 and not self.fp8_layers:
                log.warning("precision=fp8 converted no Linear layer: the run computes in bf16 (see precision.fp8.*)")
        if self.low_precision_params:
            self.family.prepare(model, self.compute_dtype, self.keep_norm_fp32)
            if not self._input_hooks:  # once: FSDP calls prepare_model again on the sharded model
                # float32 inputs reach the low-precision model (and its top-level parts, which a task may call
                # directly, e.g. a GAN's generator) in its own dtype
                for module in (model, *model.children()):
                    self._input_hooks.append(module.register_forward_pre_hook(self._cast_args))
        if self.preset.master:
            self.master = MasterWeights(model)
            self._params = self.master.params
        else:
            self._params = [p for p in model.parameters() if p.requires_grad]
        self._model = model
        return model

    def check_strategy(self, strategy: str) -> None:
        """Refuse a parallel strategy the family cannot run under (master weights under FSDP), or the scaler's
        switch cannot (FSDP2 casts the shards to the param_dtype chosen at set-up: fp16 would stay)."""
        self.family.check_strategy(strategy, self.mode)
        if strategy == "fsdp" and getattr(self.scaler, "on_min", None) == BF16.name:
            raise ConfigError("precision.loss_scale.on_min=bf16 with trainer.strategy=fsdp: FSDP2 casts the "
                              "sharded weights to float16 as set up, so a switch to bf16 cannot apply; use "
                              "on_min=raise or on_min=clamp, or precision=bf16 from the start")

    def optimizer_params(self, module: nn.Module | None = None) -> list[torch.Tensor]:
        """The tensors an optimizer updates (of `module`, default the whole model): FP32 masters in
        `master` mode, else the model's own parameters."""
        if module is None:
            return self._params
        if self.master is not None:
            return self.master.params_for(module)
        return [p for p in module.parameters() if p.requires_grad]

    def build_optimizer(self, cfg: DictConfig, params, seed: int | None = None) -> torch.optim.Optimizer:
        """The `optimizer=` group's optimizer as this family needs it (bf16_pure: rounded bf16 updates)."""
        return self.family.build_optimizer(cfg, params, seed)

    def request_update_stats(self, optimizer) -> bool:
        """Ask the optimizer to measure what rounding its update does on the next step (bf16_pure); False
        where it has nothing to measure."""
        return request_update_stats(optimizer)

    def update_stats(self, optimizer) -> dict | None:
        return update_stats(optimizer)

    @property
    def at_min_scale(self) -> bool:
        """The loss scale has reached its minimum (an overflow now stops or switches the run)."""
        return self.scaler.at_min

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
    def begin_step(self, step: int, model: nn.Module) -> None:
        """Before the step's first forward: precision=auto's shadow measurement on its probe and re-check steps."""
        if self.switches and self.switches[0].step == step - 1:  # precision.schedule: between the two steps
            self.switch(self.switches[0], model)
        self._step = step
        self.applier.random.begin_step(step)  # stochastic rounding: a stream of its own per (seed, rank, step)
        if self.planner is not None:
            self.planner.begin_step(step, model)

    def end_step(self, step: int, model: nn.Module, overflow: bool) -> dict | None:
        """After the step's optimizer updates: advance the loss scale once for the iteration (may raise
        LossScalingError, or switch to bf16), then let precision=auto plan or re-check (a new plan takes effect
        from the next step). Returns the event row of what changed the run's course, or None."""
        event, self._switched = self._switched, None
        if self.update_scale(overflow):  # the step's overflow at the minimum scale was skipped, bf16 from the next
            event = _join({"event": "switch_to_bf16", **{k: v for k, v in self.bf16_switch.items()
                                                         if k not in ("step", "from_mode")}}, event)
        if self.planner is not None:
            planned = self.planner.end_step(step, model, self)
            if planned is not None:
                if event is not None:
                    planned["also"] = event
                event = planned
        return event

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_autocast or self.compute_dtype == torch.float32 or self.plain_fp32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """master/nomaster models take inputs in their own dtype."""
        if self.low_precision_params and x.is_floating_point() and x.dtype == torch.float32:
            return x.to(self.compute_dtype)
        return x

    def _cast_args(self, module: nn.Module, args: tuple) -> tuple:
        if not CASTING.get():
            return args
        return tuple(self.cast_inputs(a) if isinstance(a, torch.Tensor) else a for a in args)

    def backward(self, loss: torch.Tensor) -> None:
        """Scaled backward. `loss` is float32 (compute losses on float32 logits)."""
        self.scaler.scale_loss(loss).backward()

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    def step(self, optimizer: torch.optim.Optimizer, clip_grad_norm: float | None = None,
             inspect: Callable[[list[torch.Tensor], bool, float], None] | None = None,
             params: list[torch.Tensor] | None = None, update: bool = True, measure_norm: bool = False) -> StepResult:
        """Unscale once, check overflow, clip, step or skip, update the scale, copy masters back.

        `inspect(params, overflow, scale)` (diagnostics) sees the unscaled gradients before clipping.
        Several optimizers (a GAN): pass each one's `params` and `update=False`, then advance the scale once for
        the iteration (`end_step`, or `update_scale`): PyTorch's recipe, one scaler, a step per optimizer.
        `measure_norm`: return the total norm of the unscaled gradients even without clipping (a device
        tensor, not read here); clipping always returns it.
        """
        params = self._params if params is None else params
        grads = (
            self.master.grads_to_master(params)
            if self.master is not None
            else [p.grad for p in params if p.grad is not None]
        )
        overflow = False
        if self.scaler.enabled:
            # FSDP2: gradients are DTensors; unscale each rank's local shard in place
            found_inf = self.scaler.unscale_([g.to_local() if hasattr(g, "to_local") else g for g in grads])
            if found_inf is None:
                found_inf = torch.zeros((), device=self.device)
            if self._agree is not None:
                found_inf = self._agree(found_inf)
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
        try:
            self.scaler.update(overflow)  # may raise LossScalingError (on_min=raise)
        except SwitchToBF16 as switch:
            log.warning("%s: switching to bfloat16 autocast, without loss scaling, for the rest of the run "
                        "(precision.loss_scale.on_min=bf16)", switch)
            record = {"from_dtype": short(self.compute_dtype), **switch.facts, **self.scaler.stats(),
                      "skipped": self.scaler.skipped, "scaling": self.scaler.kind}
            self._switch_on_min(record, self._step)
            return True
        return False

    def _switch_on_min(self, record: dict, step: int) -> None:
        """The scaler's switch (on_min=bf16) after `step`: a switch into precision=bf16 (Precision.switch, as a
        schedule's: equal to a stop and a resume into it), the skips so far kept; `record` (plain numbers: why)
        is kept in `bf16_switch` and the state_dict. The schedule's later switches apply over bf16 from now on."""
        record = {**record, "step": step, "from_mode": record.get("from_mode", self.mode)}
        later = self.switches
        self.switch(on_min_switch(self.cfg, step), getattr(self, "_model", None))
        self._switched = None  # its row is the step's own switch_to_bf16 event (end_step)
        self.bf16_switch = record
        self.dtype_reason = f"switched from {record['from_dtype']} by {ON_MIN}"
        self.scaler = _after_switch(record)
        self.switches = rechain(self.cfg, later)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for overflow over the run (also those before a switch to bf16)."""
        return self.scaler.skipped

    def scaler_stats(self) -> dict:
        """The loss scaler's statistics for summary.json ({} without a scaler); after a switch to bf16,
        their values at the switch."""
        return self.scaler.stats()

    def summary(self) -> dict:
        """What ran, for summary.json: the loss scaling, the plan's formats, fp8's figures."""
        out: dict = {"loss_scaling": self.scaler.kind}
        if self.bf16_switch is not None:
            out["loss_scaling"] = f"{self.bf16_switch.get('scaling', 'dynamic')} until the switch to bf16"
        if self.plan is not None:
            out.update(self.plan.summary())
        if self.planner is not None:
            out.update(self.planner.summary())
        if self.plan_changed:
            out["plan_changed_on_resume"] = dict(self.plan_changed)
        switches = [h for h in self.history if h["event"] == "switch"]
        if switches:
            out["precision_switches"] = [{k: h[k] for k in ("step", "from", "to", "what", "ran") if k in h}
                                         for h in switches]
        if self.fp8_cfg is not None:
            out.update({"fp8_layers": len(self.fp8_layers), "fp8_recipe": self.fp8_cfg.recipe,
                        "fp8_emulated": self.fp8_emulated})
        if self.slowdown:  # every emulated format the run computed in, at any point of it
            out["emulated_slowdown_vs_fp32"] = {f: round(x, 1) for f, x in self.slowdown.items()}
        return out

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state: dict = {"mode": self.mode}
        if self.scaler.enabled:
            state["scaler"] = self.scaler.state_dict()
        if self.bf16_switch is not None:
            state["bf16_switch"] = dict(self.bf16_switch)
        if self.master is not None:
            state["master"] = self.master.state_dict()
        if self.plan is not None:
            state["plan"] = self.plan.formats()  # a resume into another plan is then said, not hidden
        if self.planner is not None:
            state["auto"] = self.planner.state_dict()
        if self.registry.user:
            state["formats"] = dict(self.registry.user)  # a resume checks they are defined the same way
        if self.applier.recipes:
            state["recipe_random"] = self.applier.random.state_dict()
        if self.history:
            state["history"] = [dict(h) for h in self.history]
        return state

    def load_state_dict(self, state: dict) -> None:
        on_min = _on_min_of(state)
        if on_min is not None and self.bf16_switch is None and state.get("mode") != self.mode \
                and on_min[1]["from_mode"] == self.mode:  # the run had switched to bf16 (on_min): so does this
            self._switch_on_min(on_min[1], on_min[0])
        self.registry.check_same(state.get("formats") or {})
        self.history = [dict(h) for h in state.get("history") or []]
        if "recipe_random" in state:
            self.applier.random.load_state_dict(state["recipe_random"])
        auto = state.get("auto")
        if auto is not None and self.measured_plan:  # precision=auto: rebuild the run's plan as it stood
            if self.planner is not None:
                self.planner.load_state_dict(auto)
            if auto["planned"]:
                self.apply_formats(self._model, auto["formats"], self.planner.why if self.planner is not None
                                   else dict.fromkeys(auto["formats"], "auto (resumed)"))
                log.info("precision=auto: the checkpoint's measured plan, restored (it replaces the probe's plan "
                         "logged above):\n%s", self.plan.table())
        before = state.get("plan")
        if before is not None and self.plan is not None and before != self.plan.formats():
            changed = {n: f"{before.get(n, '-')} -> {f}" for n, f in self.plan.formats().items() if before.get(n) != f}
            self.plan_changed = changed
            log.warning("resuming into another precision plan: %s (summary.json's plan_changed_on_resume)",
                        ", ".join(f"{n}: {c}" for n, c in changed.items()))
        switched = state.get("bf16_switch")
        if switched is not None:
            self.bf16_switch = dict(switched)
            self.scaler = _after_switch(self.bf16_switch)
        if self.scaler.enabled and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.master is not None and "master" in state:
            self.master.load_state_dict(state["master"])
