"""Resume: which checkpoint, checked against the run, loaded exactly; and what a changed config means."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mptrain.checkpoint.contents import PARTS, own_rng, restore_rng, stateful, written_by
from mptrain.checkpoint.files import (
    CheckpointError,
    candidates,
    find_resumable,
    load_file,
    sharded_complete,
)
from mptrain.library.imports import MOVED_MODULES
from mptrain.library.optim import MultiScheduler
from mptrain.precision.families import optimizer_state_kind
from mptrain.run.layout import CHECKPOINTS

log = logging.getLogger("mptrain")

# config keys that may differ on resume without changing the run's course (its weights, step by step); anything
# else, the run's length included (a cosine schedule is recomputed over it), is a change recorded in summary.json
# (early stopping replays the run's validations under the new rule, so the resumed run is the one that rule gives
# from the start; the EMA is a side average: the weights' steps never read it)
SAFE_TO_CHANGE = ("trainer.log_every", "trainer.eval_every",
                  "trainer.progress_bar", "trainer.tensorboard", "trainer.device", "trainer.num_workers",
                  "checkpoint.", "resume", "diagnostics.", "trainer.profile.", "trainer.detect_anomaly",
                  "trainer.ema.", "trainer.early_stopping.")
# ... of which the summary still records these, as `ema_change` events: the average (val_ema/...) is not the one
# a run started with the new setting would hold
AVERAGE = "trainer.ema."
WARN_IF_CHANGED = ("seed", "trainer.seed", "precision.")


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _current_name(value: Any) -> Any:
    if isinstance(value, str):
        for old, new in MOVED_MODULES.items():
            if value.startswith(old):
                return new + value[len(old):]
    return value


def saved_optimizer(saved: dict) -> dict:
    """A checkpoint's optimizer config in today's terms: a class by _target_ saved before optimizer=torch had its
    own name recorded name: sgd, and ran with the class's own momentum/nesterov/betas/eps (they were dropped)."""
    opt = dict(saved.get("optimizer") or {})
    if opt.get("_target_") and opt.get("name") != "torch":
        opt.update(name="torch", momentum=None, nesterov=None, betas=None, eps=None)
    return opt


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    if saved.get("optimizer"):
        saved = {**saved, "optimizer": saved_optimizer(saved)}
    a, b = {k: _current_name(v) for k, v in _flatten(saved).items()}, _flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


RESUME_FIX = "Resume with the checkpoint's model settings, or start a new run directory"


def check_model_fits(state: dict, model: torch.nn.Module, path: Path, fix: str = RESUME_FIX) -> None:
    """A CheckpointError naming what differs when the checkpoint's weights do not fit `model`; `fix` says what
    to do (a resume's by default; the offline tools give their own)."""
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    extra = sorted(state.keys() - own.keys())
    shapes = [f"{k} {list(state[k].shape)} in the checkpoint vs {list(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]  # model order
    if missing or extra or shapes:
        detail = f"{len(shapes)} tensors differ in shape, e.g. " * bool(shapes) + "; ".join(
            shapes[:3]
            + [f"missing {', '.join(missing[:3])}"] * bool(missing)
            + [f"unexpected {', '.join(extra[:3])}"] * bool(extra)
        )
        raise CheckpointError(f"checkpoint {path} was written for another model: {detail}. {fix}")


def full_precision_weights(ckpt: dict, model: torch.nn.Module, path: Path) -> dict:
    """The checkpoint's weights at their best precision: a master-weights run's model holds float16 copies,
    so its float32 masters take their place (matched in parameter order, the order MasterWeights keeps). A run
    in any precision then starts from the weights that were trained, not from their float16 rounding."""
    weights = dict(ckpt["model"])
    masters = ((ckpt.get("precision") or {}).get("master") or {}).get("masters")
    if not masters:
        return weights
    low = [(n, p) for n, p in model.named_parameters()
           if p.requires_grad and n in weights and weights[n].dtype != torch.float32]
    if len(low) != len(masters):
        raise CheckpointError(f"checkpoint {path} holds {len(masters)} master tensors for {len(low)} float16 "
                              "parameters; it was edited or written for another model")
    by_param = {id(p): m for (_, p), m in zip(low, masters)}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: every name of the tensor
        if id(p) in by_param:
            weights[name] = by_param[id(p)]
    return weights


# (saved mode, this mode) pairs a resume refuses: what their optimizers keep does not map onto each other
def check_precision_change(saved_mode: str | None, mode: str, path: Path) -> None:
    """bf16_pure's optimizer keeps its own bfloat16 state (and update rule); PyTorch's optimizers keep theirs.
    Neither maps onto the other, so such a resume would fail at its first step, or silently start the
    optimizer afresh: refused here, before the run directory changes."""
    if saved_mode is None or saved_mode == mode:
        return
    saved_kind, kind = optimizer_state_kind(saved_mode), optimizer_state_kind(mode)
    if saved_kind == kind:
        return
    raise CheckpointError(f"checkpoint {path} was written with precision={saved_mode}, this run asks for "
                          f"precision={mode}: the checkpoint's optimizer state ({saved_kind}) does not map onto "
                          f"this run's ({kind}); resume with precision={saved_mode}, or start a new run directory")


def load_masters(master: Any, model: torch.nn.Module, weights: dict) -> None:
    """Rebuild the fp32 master copies from the checkpoint's full-precision weights (never from the freshly
    initialised model, and whatever master layout the checkpoint had: precision.keep_norm_fp32 may differ)."""
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for p, m in zip(master.model_params, master.masters):
            m.copy_(weights[names[id(p)]].float())


def report_config_changes(saved: dict, current: dict) -> list[dict]:
    """Log every difference from the checkpoint's config: a resume takes the run's own overrides as its base
    (cli/main.py), so each one was given now, deliberately. Returns those that change the trajectory (all but
    SAFE_TO_CHANGE), which the run records as events in summary.json."""
    changes = []
    for key, old, new in config_differences(saved, current):
        if key.startswith(SAFE_TO_CHANGE):
            log.info("resume: %s changed %r -> %r (given now; the steps already taken are unaffected)", key, old, new)
            continue
        changes.append({"key": key, "from": old, "to": new})
        if key.startswith(WARN_IF_CHANGED):
            log.warning("resume: %s changed %r -> %r (given now); the resumed run is not the run the checkpoint "
                        "began", key, old, new)
        else:
            log.warning("resume: %s changed %r -> %r (given now): the run continues on another course", key, old, new)
    return changes


def average_changes(saved: dict, current: dict) -> list[dict]:
    """trainer.ema.* changes: safe for the weights, but the average follows the new setting from this step on."""
    return [{"key": key, "from": old, "to": new} for key, old, new in config_differences(saved, current)
            if key.startswith(AVERAGE)]


def resolve_resume(resume: str | None, run_dir: Path, sharded: bool = False) -> tuple[Path, dict | None] | None:
    """What to resume from: None (fresh), `auto` (newest readable in this run) or a file path.
    Sharded (FSDP) checkpoints are directories; their weights load once the model is sharded (ckpt None)."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
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
    """Load every piece of state (contents.py's lists) into the freshly built components and train state,
    after checking that it fits. A sharded checkpoint's weights and optimizer are already loaded
    (checkpoint/sharded.py); its `ckpt` has neither."""
    changes = report_config_changes(ckpt["config"], config)
    saved_mode, mode = ckpt["precision"].get("mode"), c.precision.mode
    check_precision_change(saved_mode, mode, path)
    saved_opt, opt = saved_optimizer(ckpt["config"]).get("name"), (config.get("optimizer") or {}).get("name")
    if saved_opt is not None and opt is not None and saved_opt != opt:  # SGD's momentum is no Adam moment
        raise CheckpointError(f"checkpoint {path} was written with optimizer={saved_opt}: the optimizer state does not "
                              f"fit this optimizer ({opt}); resume with optimizer={saved_opt}, or start a new run "
                              "directory")
    fresh = settings_of(c.optimizer, c.scheduler)  # what this run's config asks for
    parts = stateful(c, state)
    weights = None
    for key in PARTS:
        if key not in ckpt:  # sharded: model and optimizer were loaded through DCP
            continue
        saved = ckpt[key]
        if key == "model":
            check_model_fits(saved, c.base_model, path)
            saved = weights = full_precision_weights(ckpt, c.base_model, path)
        if key == "precision":
            # masters are rebuilt below from the weights; on_min=bf16's switch belongs to the checkpoint's
            # precision and is continued only in that precision (an explicit other precision is what it says)
            saved = {k: v for k, v in saved.items()
                     if k != "master" and not (k == "bf16_switch" and saved_mode != mode)}
            if saved_mode != mode and ckpt[key].get("bf16_switch") is not None:
                log.warning("resume: the checkpoint's run had switched to bf16 (on_min=bf16); this run computes in "
                            "precision=%s as given", mode)
        try:
            parts[key].load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError) as e:
            if key != "optimizer":
                raise
            raise CheckpointError(f"checkpoint {path}: the optimizer state does not fit this optimizer ({e}); "
                                  "resume with the checkpoint's optimizer settings") from None
    if c.precision.master is not None and weights is not None:
        load_masters(c.precision.master, c.base_model, weights)
    if getattr(c, "ema", None) is not None:
        if "ema" in ckpt:
            c.ema.load_state_dict(ckpt["ema"])
        else:  # trainer.ema turned on at this resume: the average starts from the checkpoint's weights
            c.ema.restart()  # after the masters: under master weights it starts from them
            log.warning("resume: %s holds no EMA; trainer.ema starts from its weights", path)
    elif ckpt.get("ema"):
        log.warning("resume: trainer.ema is off: the average %s holds is not kept (later checkpoints hold none)", path)
    if any(key.startswith("optimizer.") for key, _, _ in config_differences(ckpt["config"], config)):
        apply_settings(c.optimizer, c.scheduler, fresh)  # e.g. a lower optimizer.lr after a divergence
    if any(key.startswith(RESCHEDULE) for key, _, _ in config_differences(ckpt["config"], config)):
        reschedule(c.scheduler)  # e.g. a longer run: its cosine now ends later
    warn_other_order(c, state, ckpt, path)
    restore_rng(own_rng(ckpt, c), c.device)
    before, now = written_by(ckpt), c.dist.world_size
    if before != now:  # the global batch, the data order and the precision plan carry over; the ranks' RNG cannot
        log.warning("resume: the checkpoint was written by %d processes and this run has %d: every rank continues "
                    "from rank 0's random state; the global batch, the data order and the precision plan are the "
                    "run's", before, now)
        state.events.append({"event": "world_size_change", "step": state.step, "old": before, "new": now})
    timing = ckpt.get("timing")
    state.load_timing(timing if isinstance(timing, dict) else {})
    # a change of course is part of the run's record (summary.json's events, kept by later checkpoints)
    state.events.extend({"event": "resume_change", "step": state.step, **change} for change in changes)
    state.events.extend({"event": "ema_change", "step": state.step, **change}
                        for change in average_changes(ckpt["config"], config))
    log.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)


def warn_other_order(c: Any, state: Any, ckpt: dict, path: Path) -> None:
    """A token-file run checkpointed mid-epoch before issue 37 (no `data_order`: its order was torch.randperm's)
    continues under the streamed order: skipping the positions already trained on then skips other windows."""
    order = getattr(getattr(getattr(c, "train_loader", None), "sampler", None), "order", None)
    saved = ckpt.get("data_order", "randperm")
    if order is None or saved == order or not state.step_in_epoch:
        return
    log.warning("resume: %s was written under the %s data order, this mptrain orders this dataset by %s: the rest of "
                "epoch %d sees other windows than the run would have (some twice, some not); resume from a "
                "checkpoint at an epoch's end to continue exactly", path, saved, order, state.epoch)


def _schedulers(scheduler: Any) -> list:
    return list(scheduler.schedulers.values()) if isinstance(scheduler, MultiScheduler) else [scheduler]


# the keys that change where the built-in schedule is at this step
RESCHEDULE = ("trainer.max_steps", "trainer.max_epochs", "scheduler.")


def reschedule(scheduler: Any) -> None:
    """Resuming with another run length or schedule: the optimizer state brought back the checkpoint's lr,
    which the old schedule set; put the rebuilt schedule's lr at this step in its place. The built-in schedules
    are LambdaLR, whose lr is closed-form (base lr x factor(step)); other classes keep their saved state."""
    changed = False
    for s in _schedulers(scheduler):
        if type(s) is not torch.optim.lr_scheduler.LambdaLR:
            continue
        for group, base, factor in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
            group["lr"] = base * factor(s.last_epoch)
        s._last_lr = [g["lr"] for g in s.optimizer.param_groups]
        changed = True
    if changed:
        log.info("resume: the learning rate follows this run's schedule (lr %.3g from here)",
                 float(_schedulers(scheduler)[0].optimizer.param_groups[0]["lr"]))  # float: see apply_settings


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
    # float(): torchao's lr is a tensor the scheduler later updates in place; a record that kept it (a handler that
    # formats late, pytest's caplog) printed the run's last lr (0 at a cosine's end), not this one
    log.info("resume: the optimizer runs with this run's optimizer.* settings (lr %.3g from here)",
             float(optimizer.param_groups[0]["lr"]))


def config_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
