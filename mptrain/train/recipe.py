"""The training recipe: set up from the config, train, write the summary, clean up."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mptrain import __version__
from mptrain.checkpoint import sharded
from mptrain.checkpoint.callback import Checkpointer
from mptrain.checkpoint.files import NonFiniteCheckpoint
from mptrain.checkpoint.resume import apply_checkpoint, config_container, resolve_resume
from mptrain.checkpoint.signals import Interrupted, StopSignals
from mptrain.config import check_warmup, global_batch
from mptrain.diagnostics import Diagnostics
from mptrain.errors import ConfigError, Diverged, MptrainError, TrainingFailed
from mptrain.library.data.loading import as_datasets, make_loader, overfit
from mptrain.library.imports import import_failure, locate
from mptrain.library.models import checkpointing, conv_wgrad
from mptrain.library.optim import MultiOptimizer, MultiScheduler, build_scheduler
from mptrain.library.tasks import BUILTIN, Task, check_task
from mptrain.parallel import distributed, fsdp
from mptrain.precision import LossScalingError, Precision, resolve_device
from mptrain.precision.bf16_pure import memory_per_param
from mptrain.precision.schedule import resolve as resolve_schedule
from mptrain.run.directory import RunDir
from mptrain.run.layout import (
    PRECISION_PLAN,
    SUMMARY,
    TOKENIZER,
    VOCAB,
    OutputError,
    write_atomic,
    write_json_atomic,
)
from mptrain.run.summary import Progress, Summary
from mptrain.run.tracking import check_trackers, trackers
from mptrain.run.writer import RunWriter
from mptrain.train.callbacks.console import Console
from mptrain.train.callbacks.early_stopping import EarlyStopping, stopped_early
from mptrain.train.callbacks.metrics import CompileNotice, MetricsLogger
from mptrain.train.callbacks.profiler import ProfileSteps, anomaly_detection
from mptrain.train.components import Components, Part
from mptrain.train.diagnose import zero_gradient_error
from mptrain.train.ema import EMA, EmaCallback
from mptrain.train.given import Given, as_callback, check_passed
from mptrain.train.loop import fit, probe_task
from mptrain.train.state import TrainState

log = logging.getLogger("mptrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def backend_settings(t: DictConfig) -> Iterator[None]:
    """Determinism, cuDNN autotuning and TF32 for this run only (Hydra multirun shares the process)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.benchmark = t.cudnn_benchmark and not t.deterministic
    cudnn.allow_tf32 = matmul.allow_tf32 = t.allow_tf32
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=t.deterministic_warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[2:]


# cuBLAS is deterministic only with a fixed workspace (PyTorch raises at the first GEMM without it); it reads
# the variable when CUDA creates its handles, so it is set before anything touches the device
CUBLAS_WORKSPACE = ":4096:8"


def deterministic_cublas(t: DictConfig) -> None:
    if not t.deterministic or "CUBLAS_WORKSPACE_CONFIG" in os.environ:  # the user's own setting stands
        return
    if torch.cuda.is_initialized():  # a multirun's earlier job already made the handles
        log.warning("trainer.deterministic=true: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG could be set; "
                    "export CUBLAS_WORKSPACE_CONFIG=%s before starting mptrain", CUBLAS_WORKSPACE)
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE


def fp8_eager_warning(uses_fp8: bool, device: torch.device, compiled: bool) -> str | None:
    """fp8 on a GPU without torch.compile: torchao's casts and scales run as separate eager kernels, each a
    pass over the activations, which costs more than the fp8 GEMMs save (slower than bf16). `uses_fp8`: some
    layers may compute in torchao's float8 (the preset, a precision.layers rule, or an auto candidate)."""
    if uses_fp8 and device.type == "cuda" and not compiled:
        return ("precision=fp8 without trainer.compile=true runs torchao's float8 casts eagerly: slower than bf16 "
                "on a GPU; add trainer.compile=true (the casts fuse into the GEMMs' neighbours)")
    return None


def _instantiate(node: DictConfig, group: str, **kwargs):
    """hydra.utils.instantiate, with our own errors surfacing as themselves."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, MptrainError):
            raise cause from None
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if isinstance(cause, ImportError) and str(cause).startswith("Error loading"):
            failed = import_failure(group, target, cause)
            if failed is not None:  # the module is there, an import inside it failed: that error, as itself
                raise failed from None
            # Hydra could not import the target: its reasons follow the first line
            reason = " ".join(" ".join(str(cause).splitlines()[1:]).split()) or str(cause)
            raise ConfigError(f"{group}._target_={target} cannot be imported ({reason}); check the name and put "
                              "its module on PYTHONPATH") from None
        why = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
        raise ConfigError(" ".join(f"{group}._target_={target} failed: {why}".split())) from e


def build_task(cfg: DictConfig, model_target: object, dataset_task: str | None) -> Task:
    """`task=` when given, else the task the model declares (`task = "gan"` on its class; default
    classification); checked against what the dataset serves before any model is built (None: no data,
    e.g. sampling from a trained model)."""
    node = cfg.get("task")
    if node is None:
        name = getattr(model_target, "task", "classification")
        if name not in BUILTIN:
            raise ConfigError(f"the model declares task {name!r}, which mptrain does not ship; add task=<yours> "
                              f"(built in: {', '.join(BUILTIN)}; docs/tasks.md)")
        node = OmegaConf.create({"_target_": BUILTIN[name]})
    task = _instantiate(node, "task")
    return check_task(task, dataset_task) if dataset_task is not None else task


def emulated_fp16(precision: Precision, device: torch.device) -> str | None:
    """The warning for float16 compute on a CPU, which emulates it (several times slower than fp32 or bf16)."""
    if precision.compute_dtype != torch.float16 or device.type != "cpu":
        return None
    return (f"precision={precision.mode} computes in float16, which a CPU emulates (4-15x slower than fp32 here): "
            "for speed on a CPU use precision=bf16 (or amp, which picks bf16 on a CPU); fp16 here is for its numerics")


def model_target(cfg: DictConfig, given: nn.Module | None = None) -> object:
    """The class (or function) model._target_ names, imported; the class of a `given` model (mptrain.train)."""
    if given is not None:
        return type(given)
    return locate("model", cfg.model._target_, "put its module on PYTHONPATH")


# model keys that must be at least the data's value: token ids index the embedding, windows the positions
AT_LEAST_THE_DATA = {"vocab_size": "token ids", "seq_len": "tokens per sample", "num_classes": "classes"}


def check_model_fits(model_cfg: DictConfig, facts: dict) -> None:
    """A model smaller than its data (vocabulary, window, classes) fails mid-run with an IndexError or a
    shape error: refuse it here, before the run directory changes."""
    for key, what in AT_LEAST_THE_DATA.items():
        mine, data = model_cfg.get(key), facts.get(key)
        if isinstance(mine, int) and isinstance(data, int) and mine < data:
            raise ConfigError(f"model.{key}={mine} is smaller than the data's {data} {what}; set model.{key}={data} "
                              f"or leave it null (taken from the data)")


def build_model(cfg: DictConfig, task: Task, device: torch.device, precision: Precision, facts: dict,
                model: nn.Module | None = None) -> nn.Module:
    """The model as the run trains it: instantiated (data `facts` such as vocab_size fill model keys left
    null), or the `model` passed from Python (converted in place), on the device, in its memory format,
    prepared by the precision. Also what mptrain-eval, -sample and -export rebuild a trained run's model with."""
    t = cfg.trainer
    if model is None:
        facts = {k: v for k, v in facts.items() if k in cfg.model and cfg.model.get(k) is None}
        model = _instantiate(cfg.model, "model", **facts)
    elif not isinstance(model, nn.Module):
        raise ConfigError(f"model= passed a {type(model).__name__}, not a torch.nn.Module")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={cfg.model._target_} returned a {type(model).__name__}, not a "
                          "torch.nn.Module; point it at a module class or a function returning one")
    # ("model",) is the whole model; any other name, even a single one, must be a submodule
    named = tuple(task.parts) != ("model",)
    missing = [n for n in task.parts if named and not isinstance(getattr(model, n, None), nn.Module)]
    if missing:
        raise ConfigError(f"task {task.name} trains the submodules {', '.join(task.parts)} but the model has no "
                          f"{', '.join(missing)}")
    model = model.to(device)
    if device.type == "cpu":
        switched = conv_wgrad.apply(model, t.conv_wgrad)
        if switched:
            log.debug("trainer.conv_wgrad=%s: %d convolutions may take the forward-form weight gradient",
                      t.conv_wgrad, switched)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision.prepare_model(model)
    wrapped = checkpointing.apply(model, t.activation_checkpointing)
    if wrapped:
        log.info("trainer.activation_checkpointing=%s: %d modules recompute their forward in backward",
                 t.activation_checkpointing, wrapped)
    return model


def build(cfg: DictConfig, given: Given | None = None, training: bool = True) -> Components:
    """Every component of the run, each builder taking only its own sub-config; `given`: ready objects passed
    from Python (mptrain.train) in place of the model, datasets or task the config would build. `training=False`
    (eval, export): the same components, without the lines about the run's length and schedule, which are
    training's."""
    given = given or Given()
    check_passed(cfg, given)
    t = cfg.trainer
    deterministic_cublas(t)  # before CUDA initialises
    info = distributed.env_info()
    device = resolve_device(distributed.device_for(t.device, info))
    info = distributed.setup(t, device)
    seed_everything(t.seed)
    precision = Precision(cfg.precision, device)
    precision.seed(t.seed, info.rank)  # the training recipes' own random streams (per rank)
    if info.enabled:  # precision=auto: each rank measures its shard; one plan from all ranks' figures
        precision.agree_across_ranks(functools.partial(distributed.all_gather_objects, info=info))
    if precision.applier.fp8_all_gather and t.strategy != "fsdp":
        raise ConfigError("precision.fp8.fsdp_all_gather=true all-gathers FSDP2's weights in fp8: it needs "
                          "trainer.strategy=fsdp; drop it, or shard the model")
    log.info(precision.describe())
    for slow in (emulated_fp16(precision, device), fp8_eager_warning(precision.fp8_cfg is not None, device, t.compile)):
        if slow:
            log.warning("%s", slow)

    datasets = as_datasets(given.datasets if given.datasets is not None else _instantiate(cfg.dataset, "dataset"))
    global_size = global_batch(t, info.world_size)
    if t.overfit_batches:  # debug=overfit: the same few samples every epoch, and for validation
        datasets = overfit(datasets, t.overfit_batches * global_size)
    pin = device.type == "cuda"
    batch = global_size // info.world_size  # trainer.batch_size is the global batch
    shard = {"rank": info.rank, "world_size": info.world_size, "num_workers": t.num_workers, "pin_memory": pin}
    train_loader = make_loader(datasets.train, batch, train=True, seed=t.seed, **shard)
    val_loader = None
    if datasets.val is not None:
        val_loader = make_loader(datasets.val, batch, train=False, seed=t.seed, pad=t.strategy == "fsdp", **shard)
    steps_per_epoch = len(train_loader) // t.accumulate_grad_batches
    if steps_per_epoch == 0:
        raise ConfigError(
            f"trainer.batch_size={global_size} x trainer.accumulate_grad_batches={t.accumulate_grad_batches} "
            f"exceeds the {len(datasets.train)} training samples; lower the batch size"
        )

    target = model_target(cfg, given.model)
    if given.task is not None:
        task = check_task(given.task, datasets.task)
    else:
        task = build_task(cfg, target, datasets.task)  # before building a model that cannot fit the data
    several = len(task.parts) > 1
    if several and info.enabled:
        raise ConfigError(f"task {task.name} steps {len(task.parts)} networks separately, which would bypass DDP's "
                          "gradient all-reduce; train it in one process (no torchrun)")
    check_model_fits(cfg.model, datasets.facts)  # before a model that cannot fit the data is built
    facts = {k: v for k, v in datasets.facts.items() if k in cfg.model and cfg.model.get(k) is None}
    model = build_model(cfg, task, device, precision, facts, given.model)
    if t.strategy == "fsdp" and info.enabled:
        model = fsdp.shard(model, precision)
        precision.prepare_model(model)  # the optimizer must see the sharded parameters
    elif t.strategy == "fsdp":
        raise ConfigError("trainer.strategy=fsdp shards the model across processes: launch with torchrun "
                          "--nproc_per_node=N (N > 1)")
    if several:  # one optimizer per network, one loss scaler for all; the precision family builds each
        parts = [Part(n, precision.build_optimizer(cfg.optimizer, precision.optimizer_params(getattr(model, n))),
                      precision.optimizer_params(getattr(model, n))) for n in task.parts]
        optimizer = MultiOptimizer({part.name: part.optimizer for part in parts})
    else:
        optimizer = precision.build_optimizer(cfg.optimizer, precision.optimizer_params())
        parts = [Part("model", optimizer, precision.optimizer_params())]
    base_model = model
    if t.strategy == "ddp":
        model = distributed.wrap(model, t, info, device)  # DDP under torchrun
    if t.compile:
        model = torch.compile(model)  # shares the parameters; checkpoints unwrap it (_orig_mod)
    if info.enabled:
        # the weights were drawn alike on every rank (FSDP2 shards what each rank built; DDP broadcasts rank 0's);
        # from here on each rank draws its own dropout masks and noise
        seed_everything(t.seed + info.rank)
    total_steps = t.max_steps if t.max_steps is not None else t.max_epochs * steps_per_epoch
    if isinstance(optimizer, MultiOptimizer):
        scheduler = MultiScheduler(
            {k: build_scheduler(cfg.scheduler, o, total_steps) for k, o in optimizer.optimizers.items()}
        )
    else:
        scheduler = build_scheduler(cfg.scheduler, optimizer, total_steps)
    if cfg.precision.get("schedule"):  # checked here, before the run directory changes
        precision.set_schedule(resolve_schedule(cfg.precision, total_steps), t.strategy, len(task.parts),
                               base_model)
    n_params = sum(p.numel() for p in model.parameters())
    if training:
        check_warmup(cfg.scheduler, total_steps)
        log.info("model %s, task %s: %.2fM parameters; %d steps (%d per epoch) on %s", type(base_model).__name__,
                 task.name, n_params / 1e6, total_steps, steps_per_epoch, device)
    else:
        log.info("model %s, task %s: %.2fM parameters on %s", type(base_model).__name__, task.name, n_params / 1e6,
                 device)
    if t.ema.enabled and t.strategy == "fsdp" and info.enabled:
        raise ConfigError("trainer.ema keeps a whole fp32 copy of the weights on every rank, which FSDP's sharding "
                          "exists to avoid; use trainer.strategy=ddp or trainer.ema.enabled=false")
    ema = EMA(base_model, t.ema.decay, precision.master) if t.ema.enabled else None
    params = list(base_model.parameters())  # precision.auto.memory_gb's state: as summary.json's memory_per_param
    precision.count_state_with(lambda: memory_per_param(params, optimizer, precision)["total"] * n_params)
    # the user's callbacks: from config (callbacks=[{_target_: ...}]), then the objects passed from Python
    callbacks = [as_callback(_instantiate(node, "callbacks"), f"callbacks[{i}]")
                 for i, node in enumerate(cfg.get("callbacks") or [])]
    callbacks += [as_callback(obj, f"callbacks= object {i}") for i, obj in enumerate(given.callbacks)]
    return Components(
        model=model, task=task, precision=precision, optimizer=optimizer, scheduler=scheduler, parts=parts, ema=ema,
        train_loader=train_loader, val_loader=val_loader, device=device, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, accumulate=t.accumulate_grad_batches, clip_grad_norm=t.clip_grad_norm,
        loss_weight=t.loss_weight, channels_last=t.channels_last, dist=info,
        strategy=t.strategy if info.enabled else "single", model_facts=facts,
        vocab=datasets.vocab, tokenizer=datasets.facts.get("tokenizer"), callbacks=callbacks,
        rebuild_optimizer=lambda c: rebuild_optimizer(c, cfg.optimizer, cfg.scheduler, total_steps),
    )


def rebuild_optimizer(c: Components, opt_cfg: DictConfig, sched_cfg: DictConfig, total_steps: int) -> None:
    """After a precision.schedule switch into master weights the optimizer updates the fp32 masters: a new one
    over them, built and loaded in a resume's order (optimizer, schedule, then their states: building the schedule
    sets the lr), so the switch equals a resume into that precision. One network (checked at set-up)."""
    params = c.precision.optimizer_params()
    optimizer = c.precision.build_optimizer(opt_cfg, params)
    scheduler = build_scheduler(sched_cfg, optimizer, total_steps)
    optimizer.load_state_dict(c.optimizer.state_dict())
    scheduler.load_state_dict(c.scheduler.state_dict())
    c.optimizer, c.scheduler, c.parts = optimizer, scheduler, [Part(c.parts[0].name, optimizer, params)]
    if c.ema is not None:  # a parameter is averaged from its master from now on
        c.ema.masters = c.precision.master
    c.precision.params_changed = False


def early_stopping(cfg: DictConfig, checkpointer: Checkpointer) -> EarlyStopping:
    """trainer.early_stopping, monitoring checkpoint.monitor (as resolved for the task) unless it names its own."""
    monitor, mode = cfg.monitor or checkpointer.monitor, cfg.mode or checkpointer.mode
    if monitor is None:
        raise ConfigError("trainer.early_stopping needs a metric: set trainer.early_stopping.monitor (e.g. val/loss) "
                          "or checkpoint.monitor")
    if cfg.monitor is not None and cfg.mode is None:
        mode = "max" if monitor.endswith(("acc", "accuracy")) else "min"
    return EarlyStopping(cfg, monitor, mode)


def read_summary(run_dir: Path) -> dict | None:
    """The run directory's summary.json, or None when it is missing or unreadable."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def check_trained(c: Components, state: TrainState) -> None:
    """A run that applied no update did not train: it is not `completed` (issue 25, case 6)."""
    if state.step == 0:
        return
    if c.precision.skipped_steps >= state.step:
        raise TrainingFailed(f"no update was applied: all {state.step} steps were skipped (their gradients were inf "
                             f"or NaN under precision={c.precision.mode}), so the weights are those the run started "
                             "from; check the loss for inf/NaN, or use precision=dynamic or fp32")
    if state.gradient_read and not state.gradient_seen:
        raise TrainingFailed(zero_gradient_error(c, state.step))  # the loss, or float16 flushing the gradients


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def summarize(cfg: DictConfig, c: Components | None, state: TrainState | None, status: str, wall_s: float,
              diagnostics: Diagnostics | None = None, error: str | None = None) -> dict:
    """summary.json's content (run/summary.py): the one place it is assembled."""
    progress = None
    if c is not None and state is not None:
        p = c.precision
        mem, mem_kind = peak_memory_mb(c.device)
        progress = Progress(
            compute_dtype=p.compute_name, device=str(c.device), steps=state.step,
            epochs=round(state.epoch + state.step_in_epoch / c.steps_per_epoch, 4), skipped_steps=p.skipped_steps,
            final_loss_scale=p.loss_scale, train_loss=state.train_loss,
            samples=state.samples * c.world_size,  # every rank trains on as many samples
            # over the whole run: its samples over its training time, across attempts
            samples_per_s=(round((state.samples - state.all_untimed_samples()) * c.world_size / state.train_s(), 2)
                           if state.train_s() > 0 else None),
            world_size=c.world_size, peak_memory_mb=round(mem, 1), peak_memory_kind=mem_kind,
            # optimizer state exists once a step has run
            memory_per_param=(memory_per_param(list(c.base_model.parameters()), c.optimizer, p,
                                               c.ema.shadow if c.ema is not None else None)
                              if state.step > 0 else None),
            events=list(state.events) or None, stop_reason=state.stop_reason,
            scaler=p.scaler_stats(), validation={k: v for k, v in state.last_val.items() if k != "step"},
            memory=state.memory.summary(),  # CUDA: the training peak without the diagnostics' buffers, and theirs
            precision=p.summary(), diagnostics=diagnostics.summary() if diagnostics is not None else {})
    return Summary(
        status=status, precision=cfg.precision.mode, precision_alias=cfg.precision.get("alias"),
        task=c.task.name if c is not None else None,
        model=cfg.model.get("name") or cfg.model.get("_target_"),
        dataset=cfg.dataset.get("name") or cfg.dataset.get("_target_"), seed=cfg.trainer.seed,
        wall_s=round(state.wall_s() if state is not None else wall_s, 3),
        mptrain_version=__version__, torch_version=str(torch.__version__), progress=progress, error=error,
    ).as_dict()


def run(cfg: DictConfig, run_dir: RunDir | Path, given: Given | None = None) -> dict:
    """Train as the config says, recording everything in the run directory. Returns the summary.

    `run_dir`: the CLI's RunDir (locked, with the Hydra records to write), or a plain path (tests, scripts).
    `given`: ready objects passed from Python (mptrain.train), recorded in `cfg` by given.record.
    Nothing in it is touched until the config, the checkpoint to resume from and the model have all been
    checked; then `RunDir.commit` is called, here and only here. From then on summary.json is written whatever
    happens: completed, interrupted (a stop signal, after a checkpoint) or failed.
    """
    job = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run_dir = job.path
    start = time.perf_counter()
    check_trackers(cfg.get("logger"))  # a tracker that cannot run is refused before anything else
    config = config_container(cfg)
    # a signal during set-up stops at once (nothing to save); once the directory is committed, after a step
    with StopSignals() as signals:
        resume = resolve_resume(cfg.resume, run_dir, sharded=cfg.trainer.strategy == "fsdp")
        c = build(cfg, given)
        try:
            return _run(cfg, job, config, resume, c, start, signals)
        finally:
            distributed.teardown(c.dist)
            if cfg.trainer.compile:
                torch._dynamo.reset()  # no compiled graphs leak into the next multirun job


def _run(cfg: DictConfig, job: RunDir, config: dict, resume, c: Components, start: float,
         signals: StopSignals) -> dict:
    t, run_dir = cfg.trainer, job.path
    distributed.check_same_config({k: v for k, v in config.items() if k != "resume"}, c.dist)
    state = TrainState(attempt_start=start).to(c.device)
    if resume is not None:
        path, ckpt = resume
        if ckpt is None:  # sharded: the weights and optimizer load into the sharded model first
            ckpt = sharded.load(c, path)
        # the switches so far (precision.schedule's; on_min=bf16's the checkpoint records)
        c.precision.catch_up(ckpt["train_state"]["step"], c.base_model, ckpt.get("precision"))
        if c.precision.params_changed:
            c.rebuild_optimizer(c)
        apply_checkpoint(c, state, ckpt, path, config)
    if cfg.diagnostics.enabled:
        Diagnostics.check_layers(cfg.diagnostics, c.base_model, c.precision.registry)
    # the task's contract on one batch (its metric names, when it does not declare them)
    probed = probe_task(c) if not t.compile else None
    if t.early_stopping.enabled and c.val_loader is None:  # no validation: the rule could never fire
        raise ConfigError(
            f"trainer.early_stopping watches validation metrics, but dataset "
            f"{cfg.dataset.get('name') or cfg.dataset.get('_target_')} has no validation data; give it "
            "validation data (e.g. a val.bin beside train.bin) or set trainer.early_stopping.enabled=false"
        )
    checkpointer = Checkpointer(cfg.checkpoint, run_dir, config, signals, t.log_every,
                                metrics=c.task.metrics if c.task.metrics is not None else probed,
                                save_sharded=sharded.save if c.strategy == "fsdp" else None,
                                validated=c.val_loader is not None)  # checks checkpoint.monitor
    stopper = early_stopping(t.early_stopping, checkpointer) if t.early_stopping.enabled else None
    reported = c.task.metrics if c.task.metrics is not None else probed
    if stopper is not None and reported is not None:  # a metric the task never reports would never stop the run
        names = [*reported, *([m.replace("val/", "val_ema/", 1) for m in reported] if c.ema is not None else [])]
        if stopper.monitor not in names:
            raise ConfigError(f"trainer.early_stopping.monitor={stopper.monitor!r} is not a metric this run reports "
                              f"({', '.join(names) or 'none'}); choose one of them")
    # connects to the tracker: one that cannot be used is refused here
    sinks = trackers(cfg.get("logger"), run_dir, config, resume=resume is not None, enabled=c.is_main)
    if resume is not None:  # the stop under this config's rule, replayed on the run's validations so far
        if stopper is not None:
            stopper.reconsider(state)
        elif stopped_early(state):
            state.stop_reason = None
            log.info("trainer.early_stopping is off: the run continues from step %d", state.step)
    if resume is not None and (state.step >= c.total_steps or state.stop_reason is not None):
        done = read_summary(run_dir)
        if done is not None and done.get("status") == "completed" and done.get("steps") == state.step:
            # resume=auto on a finished run: nothing to train, so nothing is rewritten (no attempt_<k>, no summary)
            why = "complete" if state.stop_reason is None else f"finished, stopped early ({state.stop_reason})"
            log.info("the run in %s is %s (step %d of %d): nothing to do, its records are unchanged",
                     run_dir, why, state.step, c.total_steps)
            return done
    # every check has passed: only now does the run directory change (rank 0 writes it)
    resume_step = state.step if resume is not None else None
    signals.defer()  # from here a stop signal gets a checkpoint and a summary
    if c.is_main:
        job.commit(resume_step)
        if c.vocab is not None:  # what decodes the model's tokens (mptrain-sample), among the run's files
            write_json_atomic(run_dir / VOCAB, c.vocab)
    writer = RunWriter(run_dir, tensorboard=t.tensorboard, resume_step=resume_step, enabled=c.is_main)
    if c.is_main and hasattr(c.tokenizer, "to_str"):  # a trained or given tokenizers file (tokenizer.json)
        text = c.tokenizer.to_str().encode()
        write_atomic(run_dir / TOKENIZER, lambda f: f.write(text))
    for sink in sinks:
        sink.start()
    writer.sinks += sinks  # before the plan: a tracker may keep it (W&B's config)
    if c.precision.plan is not None:
        writer.write_json(PRECISION_PLAN, c.precision.plan_record())
        c.precision.on_plan_change(lambda: writer.write_json(PRECISION_PLAN, c.precision.plan_record()))
    diagnostics = None
    sharded_model = c.strategy == "fsdp"  # every rank reads its shards: every rank runs the diagnostics
    if cfg.diagnostics.enabled and (c.is_main or sharded_model):
        diagnostics = Diagnostics(cfg.diagnostics, c.base_model, c.precision, run_dir, tb=writer.tb,
                                  ranks=distributed.Ranks(c.dist) if sharded_model else None)
        diagnostics.totals = (
            state.diag_totals
        )  # one dict: checkpoints carry the sums, so the summary covers every attempt
    if c.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(c.device)
    console = Console(enabled=t.progress_bar and c.is_main, total=c.total_steps, initial=state.step)
    status, error = "failed", None
    # (the signal handlers were installed in run(): a stop is deferred to the end of a step since commit)
    callbacks = [console, MetricsLogger(writer, t.log_every, console), checkpointer]
    if stopper is not None:  # before the metrics row and the checkpoint of the step it stops at
        callbacks.insert(1, stopper)
    if c.ema is not None:  # first: its val_ema/... join the validation's row and the stopping rule's view
        callbacks.insert(0, EmaCallback(c.ema))
    if t.compile:
        callbacks.insert(0, CompileNotice())
    profiler = ProfileSteps(t.profile, run_dir, c.device) if t.profile.enabled and c.is_main else None
    if profiler is not None:  # debug=profile
        callbacks.append(profiler)
    callbacks += c.callbacks  # the user's: after the metrics row and the checkpoint of the step
    try:
        with (c.precision.backend_flags(), backend_settings(t), console.logging_above(),
              anomaly_detection(t.detect_anomaly)):
            fit(c, state, callbacks, diagnostics, log_every=t.log_every, eval_every=t.eval_every)
        check_trained(c, state)
        status = "completed"
    except Interrupted as e:
        status, error = "interrupted", str(e)
        raise
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt (no checkpoint: interrupted twice)"
        raise
    except MptrainError as e:
        error = str(e)
        if isinstance(e, (Diverged, NonFiniteCheckpoint)) and c.is_main:
            checkpointer.set_aside_unverified(state.verified_step)
        if isinstance(e, LossScalingError) and cfg.checkpoint.enabled:
            # the scale cannot back off further (on_min=raise): the overflowing step was skipped, so the weights
            # are those of the last applied step; save them to continue with other settings (resume=auto)
            with contextlib.suppress(MptrainError):
                checkpointer.save(c, state)
        raise
    except BaseException as e:
        error = repr(e)
        raise
    finally:
        for callback in callbacks:
            callback.close()
        summary = summarize(cfg, c, state, status, time.perf_counter() - start, diagnostics, error)
        try:
            writer.write_summary(summary)
        except OutputError as e:  # a full disk: say so, without hiding the error that ended the run
            log.error("%s", e)
            if status == "completed":
                raise
        writer.close()
        if diagnostics is not None:
            diagnostics.close()
        if status == "interrupted":
            signals.forward()
    return summary
