"""Checkpoints in a run: the checkpointer callback (when to save, best.pt, stop signals), resume (which
checkpoint, checked against the run, loaded exactly) and the checks of a changed config.

The files themselves (contents, atomic finite-only writes, safe reads) are checkpoint_files.py's.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mptrain import __version__
from mptrain.checkpoint.files import (  # noqa: F401  (re-exported: the checkpoint API in one place)
    FORMAT_VERSION,
    STEP_FILE,
    CheckpointError,
    NonFiniteCheckpoint,
    candidates,
    capture_rng,
    check_finite,
    find_resumable,
    finite_state,
    load_file,
    own_rng,
    rank_rngs,
    restore_rng,
    save_atomic,
    sharded_complete,
)
from mptrain.config import check_monitor
from mptrain.errors import MptrainError
from mptrain.parallel.distributed import any_rank
from mptrain.train.loop import Callback

log = logging.getLogger("mptrain")

# config keys that may differ on resume without changing the result of the steps already taken
SAFE_TO_CHANGE = ("trainer.max_steps", "trainer.max_epochs", "trainer.log_every", "trainer.eval_every",
                  "trainer.progress_bar", "trainer.tensorboard", "trainer.device", "trainer.num_workers",
                  "checkpoint.", "resume", "diagnostics.", "trainer.profile.", "trainer.detect_anomaly")
WARN_IF_CHANGED = ("seed", "trainer.seed", "precision.")


# ---- checking a checkpoint against the run -----------------------------------------------------------

def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(saved), _flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check_model_fits(state: dict, model: torch.nn.Module, path: Path) -> None:
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    extra = sorted(state.keys() - own.keys())
    shapes = [f"{k} {list(state[k].shape)} in the checkpoint vs {list(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]  # model order
    if missing or extra or shapes:
        detail = f"{len(shapes)} tensors differ in shape, e.g. " * bool(shapes) + "; ".join(shapes[:3] + [f"missing {', '.join(missing[:3])}"] * bool(missing)
                           + [f"unexpected {', '.join(extra[:3])}"] * bool(extra))
        raise CheckpointError(f"checkpoint {path} was written for another model: {detail}. Resume with the "
                              "checkpoint's model settings, or start a new run directory")


def report_config_changes(saved: dict, current: dict) -> None:
    for key, old, new in config_differences(saved, current):
        if key.startswith(SAFE_TO_CHANGE):
            log.info("resume: %s changed %r -> %r (safe)", key, old, new)
        elif key.startswith(WARN_IF_CHANGED):
            log.warning("resume: %s changed %r -> %r; the resumed run is not the run the checkpoint began", key, old, new)
        else:
            log.warning("resume: %s changed %r -> %r", key, old, new)


# ---- signals -------------------------------------------------------------------------------------

class StopSignals:
    """SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 set a flag; the loop finishes its step, checkpoints and stops.

    A second SIGINT (Ctrl-C twice) stops at once. The previous handlers come back on exit, so
    Hydra multirun jobs in the same process do not inherit them.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # USR2: submitit on SLURM

    def __init__(self) -> None:
        self.received: int | None = None
        self._saved: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        try:
            for s in self.SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals to the host program
            self._saved.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)

    def forward(self) -> None:
        """Pass the signal on to the handler that was there before (e.g. submitit's requeue on SLURM)."""
        previous = self._saved.get(self.received)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.received, None)


class Interrupted(MptrainError):
    """Stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, step: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after saving a checkpoint; "
                         "continue with resume=auto in the same run directory")


# ---- the callback that writes checkpoints ----------------------------------------------------------


DEFAULT_MONITOR = "val/acc"  # checkpoint.monitor's default: classification's metric


def pick_monitor(monitor: str | None, mode: str, reported) -> tuple[str | None, str]:
    """The metric best.pt follows, given the names a task reports. The default (val/acc) falls back to the
    task's val/loss (min) where the task has no accuracy; any other unknown name is refused."""
    if monitor is None or monitor in reported:
        return monitor, mode
    if monitor == DEFAULT_MONITOR and "val/loss" in reported:
        log.info("checkpoint.monitor: this task reports no %s; best.pt follows val/loss (min)", monitor)
        return "val/loss", "min"
    check_monitor(monitor, list(reported))  # raises, naming what the task reports
    return monitor, mode


class Checkpointer(Callback):
    """Saves last.pt (+ step_<N>.pt) every `every_steps` steps, every `every_epochs` epochs, at the end
    of the run and on a stop signal; best.pt whenever the monitored validation metric improves.

    `save_sharded(c, extra, ckpt_dir, keep)` (FSDP): every rank writes its shards; given by the recipe."""

    def __init__(self, cfg: DictConfig, run_dir: Path, config: dict, signals: StopSignals, log_every: int = 1,
                 save_sharded=None, metrics: tuple[str, ...] | None = None):
        """`metrics`: the validation metrics the task declares it reports (None: known at the first validation)."""
        self.cfg, self.config, self.signals, self.log_every = cfg, config, signals, log_every
        self.save_sharded = save_sharded
        self.monitor, self.mode = cfg.monitor, cfg.mode
        self.monitor_checked = metrics is not None
        if metrics is not None:
            self.monitor, self.mode = pick_monitor(self.monitor, self.mode, metrics)
        self.dir = Path(run_dir) / "checkpoints"
        self.saved: list[int] = []  # the steps of the last.pt this attempt wrote, oldest first

    def on_step_end(self, c: Any, state: Any, out: Any = None) -> None:
        cfg = self.cfg
        improved = self._update_best(state)
        stop = self.signals.received is not None
        if c.world_size > 1:
            # every rank must stop after the same step; asking the others is an all-reduce and a host sync,
            # so it happens only every log_every steps (where the loop reads the loss anyway)
            stop = state.step % self.log_every == 0 and any_rank(stop, c.dist, c.device)
        due = cfg.enabled and (
            (cfg.every_steps is not None and state.step % cfg.every_steps == 0)
            or (cfg.every_epochs is not None and state.step_in_epoch == 0 and state.epoch % cfg.every_epochs == 0)
            or state.step == c.total_steps)
        if stop or due or (cfg.enabled and out is not None and out.event is not None):  # a change of course: save
            self.save(c, state)
        if improved and cfg.enabled and cfg.save_best and self.save_sharded is None:
            rngs = rank_rngs(c)  # every rank (the same validation made it improve on every rank)
            if c.is_main:
                save_atomic(self.contents(c, state, rngs=rngs), self.dir / "best.pt")
        if stop:
            raise Interrupted(self.signals.received or signal.SIGTERM, state.step)

    def on_validation_end(self, c: Any, state: Any, metrics: dict) -> None:
        if not self.monitor_checked:  # a task that does not declare its metrics: check the name now
            self.monitor, self.mode = pick_monitor(self.monitor, self.mode, metrics)
            self.monitor_checked = True

    def _update_best(self, state: Any) -> bool:
        monitor, val = self.monitor, state.last_val
        if monitor is None or val.get("step") != state.step or monitor not in val:
            return False
        value, best = val[monitor], state.best_metric
        if not all(math.isfinite(v) for k, v in val.items() if k != "step"):
            return False  # a diverged validation (any metric inf or NaN, e.g. val/loss beside val/acc) is never "best"
        if best is None or (value > best if self.mode == "max" else value < best):
            state.best_metric = value
            return True
        return False

    def contents(self, c: Any, state: Any, weights: bool = True, rngs: list[dict] | None = None) -> dict:
        """Everything a resume needs, as state_dict()s; `weights=False` leaves out model and optimizer
        (FSDP saves those sharded). `rngs`: every rank's generator states (rank_rngs), else this process's."""
        rngs = rngs if rngs is not None else [capture_rng(c.device)]
        out = {
            "format_version": FORMAT_VERSION,
            "mptrain_version": __version__,
            "torch_version": str(torch.__version__),
            "precision": c.precision.state_dict(),
            "scheduler": c.scheduler.state_dict(),
            "train_state": state.state_dict(),
            "rng": rngs[0],
            "config": self.config,
        }
        if len(rngs) > 1:  # each rank restores its own (dropout draws differ by rank)
            out["rng_ranks"] = rngs
        if weights:
            out["model"] = {k: v.detach().clone() for k, v in c.base_model.state_dict().items()}
            out["optimizer"] = c.optimizer.state_dict()
        return out

    def save(self, c: Any, state: Any) -> None:
        rngs = rank_rngs(c)  # a collective: before rank 0 goes on alone
        if self.save_sharded is not None:  # every rank writes its shards
            path = self.save_sharded(c, self.contents(c, state, weights=False, rngs=rngs), self.dir, self.cfg.keep_last)
            log.info("sharded checkpoint saved at step %d: %s", state.step, path)
            return
        if not c.is_main:  # the replicas are identical: rank 0 writes
            return
        step, keep = state.step, self.cfg.keep_last
        save_atomic(self.contents(c, state, rngs=rngs), self.dir / "last.pt", also=self.dir / f"step_{step}.pt" if keep > 0 else None)
        self.saved.append(step)
        for old in [p for p in candidates(self.dir) if STEP_FILE.match(p.name)][keep:]:
            old.unlink(missing_ok=True)
        log.info("checkpoint saved at step %d: %s", step, self.dir / "last.pt")

    def set_aside_unverified(self, verified: int) -> None:
        """The run diverged: the checkpoints this attempt wrote after step `verified` hold weights whose loss
        was never seen finite (the step after one of them gave inf/NaN). Move them to checkpoints/diverged/
        (never deleted) so that resume=auto continues from the newest checkpoint that trained finitely."""
        bad = [s for s in self.saved if s > verified]
        if not bad or self.save_sharded is not None:
            return
        dest = self.dir / "diverged"
        dest.mkdir(exist_ok=True)
        for s in bad:
            if (self.dir / f"step_{s}.pt").is_file():
                os.replace(self.dir / f"step_{s}.pt", dest / f"step_{s}.pt")
        last = self.dir / "last.pt"
        if last.is_file():
            if (dest / f"step_{bad[-1]}.pt").is_file():
                last.unlink()  # a hard link of the step file just moved
            else:
                os.replace(last, dest / f"step_{bad[-1]}.pt")
        found = find_resumable(self.dir)
        log.warning("checkpoints written after step %d (steps %s) hold weights never seen to give a finite loss: moved to %s; "
                    "resume=auto continues from %s", verified, ", ".join(map(str, bad)), dest,
                    f"step {found[1]['train_state']['step']}" if found else "the start (none is left)")


def resolve_resume(resume: str | None, run_dir: Path, sharded: bool = False) -> tuple[Path, dict | None] | None:
    """What to resume from: None (fresh), `auto` (newest readable in this run) or a file path.
    Sharded (FSDP) checkpoints are directories; their weights load once the model is sharded (ckpt None)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if resume is None:
        if candidates(ckpt_dir) or sharded_complete(ckpt_dir):
            raise CheckpointError(f"{run_dir} already holds checkpoints; pass resume=auto to continue that run, "
                                  "or choose a new hydra.run.dir (nothing was overwritten)")
        return None
    if sharded:
        found_dirs = sharded_complete(ckpt_dir) if resume == "auto" else [Path(resume)]
        if not found_dirs:
            log.info("resume=auto: no sharded checkpoint in %s, starting fresh", ckpt_dir)
            return None
        if not (found_dirs[0] / ".metadata").is_file():
            raise CheckpointError(f"{found_dirs[0]} is not a complete sharded checkpoint (no .metadata)")
        return found_dirs[0], None
    if resume == "auto":
        found = find_resumable(ckpt_dir)
        if found is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", ckpt_dir)
        return found
    path = Path(resume)
    return path, load_file(path)


def apply_checkpoint(c: Any, state: Any, ckpt: dict, path: Path, config: dict) -> None:
    """Load every piece of state into the freshly built components and train state, after checking that
    it fits. A sharded checkpoint's weights and optimizer are already loaded (fsdp.load); its `ckpt` has
    neither."""
    report_config_changes(ckpt["config"], config)
    fresh = settings_of(c.optimizer, c.scheduler)  # what this run's config asks for
    if "model" in ckpt:
        check_model_fits(ckpt["model"], c.base_model, path)
        c.base_model.load_state_dict(ckpt["model"])
        c.precision.load_state_dict(ckpt["precision"])
        try:
            c.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: the optimizer state does not fit this optimizer ({e}); "
                                  "resume with the checkpoint's optimizer settings") from None
    else:  # a sharded checkpoint's precision state has no master tensors
        c.precision.load_state_dict({k: v for k, v in ckpt["precision"].items() if k != "master"})
    c.scheduler.load_state_dict(ckpt["scheduler"])
    if any(key.startswith("optimizer.") for key, _, _ in config_differences(ckpt["config"], config)):
        apply_settings(c.optimizer, c.scheduler, fresh)  # e.g. a lower optimizer.lr after a divergence
    state.load_state_dict({**ckpt.get("loop", {}), **ckpt["train_state"]})  # "loop": format of mptrain <= 0.1.0
    restore_rng(own_rng(ckpt, c), c.device)
    log.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)


def _schedulers(scheduler: Any) -> list:
    return list(scheduler.schedulers.values()) if hasattr(scheduler, "schedulers") else [scheduler]


def settings_of(optimizer: Any, scheduler: Any) -> tuple[list[dict], list[float]]:
    """The hyperparameters of every param group (all but the tensors) and the schedules' base lrs."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return groups, [lr for s in _schedulers(scheduler) for lr in s.base_lrs]


def apply_settings(optimizer: Any, scheduler: Any, fresh: tuple[list[dict], list[float]]) -> None:
    """Resuming with changed optimizer.* settings: loading the optimizer's state_dict brought back the
    checkpoint's hyperparameters (lr, momentum, weight decay...); put this run's back. The lr keeps its
    place in the schedule: lr = new base lr x the schedule's factor at this step."""
    groups, base_lrs = fresh
    saved_base = [lr for s in _schedulers(scheduler) for lr in s.base_lrs]
    for group, new, old_base, new_base in zip(optimizer.param_groups, groups, saved_base, base_lrs):
        factor = group["lr"] / old_base if old_base else 1.0
        group.update({k: v for k, v in new.items() if k not in ("lr", "initial_lr")})
        group["initial_lr"], group["lr"] = new_base, new_base * factor
    i = 0
    for s in _schedulers(scheduler):
        n = len(s.base_lrs)
        s.base_lrs = list(base_lrs[i:i + n])
        s._last_lr = [g["lr"] for g in s.optimizer.param_groups]
        i += n
    log.info("resume: the optimizer runs with this run's optimizer.* settings (lr %.3g from here)",
             optimizer.param_groups[0]["lr"])


def config_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
