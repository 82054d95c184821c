"""The training recipe: set up from the config, train, write the summary, clean up."""

from __future__ import annotations

import contextlib
import logging
import random
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig

from . import __version__, conv_wgrad, distributed, fsdp
from .checkpoint import (
    Checkpointer,
    Interrupted,
    StopSignals,
    apply_checkpoint,
    config_container,
    resolve_resume,
)
from .data import as_datasets, make_loader
from .diagnostics import Diagnostics
from .errors import ConfigError, MptrainError
from .loop import Loop, fit
from .optim import MultiOptimizer, MultiScheduler, build_optimizer, build_scheduler
from .outputs import RunWriter
from .precision import SHORT_DTYPE, Precision, resolve_device
from .state import TrainState
from .tasks import task_for

log = logging.getLogger("mptrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def backend_settings(t: DictConfig) -> Iterator[None]:
    """Determinism, cuDNN autotuning and TF32 for this run only (Hydra multirun shares the process)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.benchmark = t.cudnn_benchmark and not t.deterministic
    cudnn.allow_tf32 = matmul.allow_tf32 = t.allow_tf32
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[1:]


def _instantiate(node: DictConfig, group: str, **kwargs):
    """hydra.utils.instantiate, with our own errors surfacing as themselves."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, MptrainError):
            raise cause from None
        raise ConfigError(f"{group}: {e}".splitlines()[0]) from e


def build(cfg: DictConfig) -> Loop:
    """Every object the loop needs, each builder taking only its own sub-config."""
    t = cfg.trainer
    info = distributed.env_info()
    device = resolve_device(distributed.device_for(t.device, info))
    info = distributed.setup(t, device)
    seed_everything(t.seed)
    precision = Precision(cfg.precision, device)
    log.info(precision.describe())

    datasets = as_datasets(_instantiate(cfg.dataset, "dataset"))
    pin = device.type == "cuda"
    batch = t.batch_size // info.world_size  # trainer.batch_size is the global batch
    shard = {"rank": info.rank, "world_size": info.world_size, "num_workers": t.num_workers, "pin_memory": pin}
    train_loader = make_loader(datasets.train, batch, train=True, seed=t.seed, **shard)
    val_loader = None
    if datasets.val is not None:
        val_loader = make_loader(datasets.val, batch, train=False, seed=t.seed, pad=t.strategy == "fsdp", **shard)
    steps_per_epoch = len(train_loader) // t.accumulate_grad_batches
    if steps_per_epoch == 0:
        raise ConfigError(f"trainer.batch_size={t.batch_size} x trainer.accumulate_grad_batches={t.accumulate_grad_batches} "
                          f"exceeds the {len(datasets.train)} training samples; lower the batch size")

    # facts only the data know (a text file's vocabulary) fill model keys left null
    facts = {k: v for k, v in datasets.facts.items() if k in cfg.model and cfg.model.get(k) is None}
    try:
        target = get_object(cfg.model._target_)
    except Exception as e:
        raise ConfigError(f"model._target_={cfg.model._target_} cannot be imported ({e}); "
                          "put its module on PYTHONPATH") from None
    task = task_for(target, datasets.task)  # before building a model that cannot fit the data
    model = _instantiate(cfg.model, "model", **facts).to(device)
    if device.type == "cpu":
        switched = conv_wgrad.apply(model, t.conv_wgrad)
        if switched:
            log.debug("trainer.conv_wgrad=%s: %d convolutions may take the forward-form weight gradient",
                      t.conv_wgrad, switched)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision.prepare_model(model)
    if t.strategy == "fsdp":
        if not info.enabled:
            raise ConfigError("trainer.strategy=fsdp shards the model across processes: launch with torchrun "
                              "--nproc_per_node=N (N > 1)")
        if task.name == "gan":
            raise ConfigError("model=dcgan with trainer.strategy=fsdp is not supported; train it in one process")
        model = fsdp.shard(model, precision)
        precision.prepare_model(model)  # the optimizer must see the sharded parameters
    if task.name == "gan":  # one optimizer per network, one loss scaler for both
        parts = ("discriminator", "generator")
        optimizer = MultiOptimizer({k: build_optimizer(cfg.optimizer, precision.optimizer_params(getattr(model, k)),
                                                          **precision.optimizer_options())
                                    for k in parts})
    else:
        optimizer = build_optimizer(cfg.optimizer, precision.optimizer_params(), **precision.optimizer_options())
    base_model = model
    if t.strategy == "ddp":
        model = distributed.wrap(model, t, info, device)  # DDP under torchrun
    if t.compile:
        model = torch.compile(model)  # shares the parameters; checkpoints unwrap it (_orig_mod)
    total_steps = t.max_steps if t.max_steps is not None else t.max_epochs * steps_per_epoch
    if isinstance(optimizer, MultiOptimizer):
        scheduler = MultiScheduler({k: build_scheduler(cfg.scheduler, o, total_steps) for k, o in optimizer.optimizers.items()})
    else:
        scheduler = build_scheduler(cfg.scheduler, optimizer, total_steps)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters; %d steps (%d per epoch) on %s", type(base_model).__name__, n_params / 1e6,
             total_steps, steps_per_epoch, device)
    return Loop(
        model=model, precision=precision, optimizer=optimizer, scheduler=scheduler,
        train_loader=train_loader, val_loader=val_loader, device=device, writer=None, state=TrainState(),
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, accumulate=t.accumulate_grad_batches,
        clip_grad_norm=t.clip_grad_norm, loss_weight=t.loss_weight, log_every=t.log_every, eval_every=t.eval_every,
        channels_last=t.channels_last, progress_bar=t.progress_bar and info.is_main, task=task,
        dist=info, strategy=t.strategy if info.enabled else "single",
    )


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def summarize(cfg: DictConfig, loop: Loop | None, status: str, wall_s: float, error: str | None = None) -> dict:
    summary: dict = {
        "status": status,
        "precision": cfg.precision.mode,
        "task": loop.task.name if loop is not None else None,
        "model": cfg.model.get("name") or cfg.model.get("_target_"),
        "dataset": cfg.dataset.get("name") or cfg.dataset.get("_target_"),
        "seed": cfg.trainer.seed,
        "wall_s": round(wall_s, 3),
        "mptrain_version": __version__,
        "torch_version": str(torch.__version__),
    }
    if loop is not None:
        s, p = loop.state, loop.precision
        mem, mem_kind = peak_memory_mb(loop.device)
        summary.update({
            "compute_dtype": SHORT_DTYPE[p.compute_dtype],
            "device": str(loop.device),
            "steps": s.step,
            "epochs": round(s.epoch + s.step_in_epoch / loop.steps_per_epoch, 4),
            "skipped_steps": p.scaler.skipped if p.scaler is not None else 0,
            "final_loss_scale": p.loss_scale,
            "train_loss": loop.train_loss,
            **{k: v for k, v in loop.last_val.items() if k != "step"},
            "samples": s.samples * loop.world_size,  # every rank trains on as many samples
            "samples_per_s": round(s.samples * loop.world_size / loop.train_time, 2) if loop.train_time > 0 else None,
            "world_size": loop.world_size,
            "peak_memory_mb": round(mem, 1),
            "peak_memory_kind": mem_kind,
        })
        if loop.diagnostics is not None:
            summary.update(loop.diagnostics.summary())
    if error is not None:
        summary["error"] = error
    return summary


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train as the config says, recording everything in run_dir. Returns the summary.

    Nothing in run_dir is touched until the config, the checkpoint to resume from and the model have
    all been checked. From then on summary.json is written whatever happens: completed, interrupted
    (a stop signal, after a checkpoint) or failed.
    """
    start = time.perf_counter()
    config = config_container(cfg)
    resume = resolve_resume(cfg.resume, run_dir, sharded=cfg.trainer.strategy == "fsdp")
    loop = build(cfg)
    try:
        return _run(cfg, run_dir, config, resume, loop, start)
    finally:
        distributed.teardown(loop.dist)
        if cfg.trainer.compile:
            torch._dynamo.reset()  # no compiled graphs leak into the next multirun job


def _run(cfg: DictConfig, run_dir: Path, config: dict, resume, loop: Loop, start: float) -> dict:
    info = loop.dist
    distributed.check_same_config({k: v for k, v in config.items() if k != "resume"}, info)
    if resume is not None:
        apply_checkpoint(loop, resume[1], resume[0], config)
    # only rank 0 writes the run directory
    loop.writer = RunWriter(run_dir, tensorboard=cfg.trainer.tensorboard,
                            resume_step=loop.state.step if resume is not None else None, enabled=info.is_main)
    if cfg.diagnostics.enabled and info.is_main:
        loop.diagnostics = Diagnostics(cfg.diagnostics, loop.model, loop.precision, run_dir, tb=loop.writer.tb)
    if loop.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loop.device)
    status, error = "failed", None
    with StopSignals() as signals:
        loop.after_step.append(Checkpointer(cfg.checkpoint, run_dir, config, signals))
        try:
            with loop.precision.backend_flags(), backend_settings(cfg.trainer):
                fit(loop)
            status = "completed"
        except Interrupted as e:
            status, error = "interrupted", str(e)
            raise
        except KeyboardInterrupt:
            status, error = "interrupted", "KeyboardInterrupt (no checkpoint: interrupted twice)"
            raise
        except MptrainError as e:
            error = str(e)
            raise
        except BaseException as e:
            error = repr(e)
            raise
        finally:
            summary = summarize(cfg, loop, status, time.perf_counter() - start, error)
            loop.writer.write_summary(summary)
            loop.writer.close()
            if loop.diagnostics is not None:
                loop.diagnostics.close()
            if status == "interrupted":
                signals.forward()
    return summary
