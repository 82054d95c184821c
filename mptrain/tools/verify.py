"""`mptrain-advise --verify RUN_DIR`: advice proved by a short trial before it is recommended.

From the probe's last checkpoint, two arms train the same K steps (same weights, optimizer state, data order
and RNG: a resume): the probe's own precision (its continuation) and the advised overrides. The advice is
verified when the advised arm
- skips no more steps than the advice predicts (0, or dynamic scaling's back-off from its initial scale),
- reaches a mean training loss over the K steps within LOSS_TOLERANCE of the continuation's (finite), and
- keeps every layer within the advisor's thresholds in the format it computed in (shadow figures of its
  sampled steps: advise.fits).
A failed verification moves the overrides to `rejected_overrides`: they are never recommended silently.
"""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mptrain.errors import MptrainError
from mptrain.precision.formats import BF16, FP16
from mptrain.run.layout import CHECKPOINTS, DIAGNOSTICS, LAST, METRICS, VERIFY, read_jsonl

DEFAULT_STEPS = 50
LOSS_TOLERANCE = 0.05  # relative, plus LOSS_SLACK absolute: the advised arm's mean loss may exceed the probe's by this
LOSS_SLACK = 0.01
FORMAT_OF = {
    "float16": FP16.name,
    "bfloat16": BF16.name,
}  # the compute dtype a run reports -> the format its layers ran in


class VerifyError(MptrainError):
    """The probe cannot be continued (no checkpoint)."""


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from mptrain.cli.keys import check_override_keys
    from mptrain.cli.register import register

    check_override_keys(list(overrides))  # a mistyped key: "did you mean ...?", as mptrain says it
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=register(), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except HydraException as e:  # a bad value or group choice: Hydra's own first line, not its traceback
        raise VerifyError(f"--overrides {' '.join(overrides)}: {str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()


def representative_lr(run_dir: Path) -> float | None:
    """The median of the learning rates the run logged: the trial trains at it, held constant, so that it is
    evidence for the run's body, not for its schedule's tail (a finished cosine ends near zero). None when the run
    logged none."""
    lrs = [r["lr"] for r in read_jsonl(Path(run_dir) / METRICS) if isinstance(r.get("lr"), (int, float))]
    return statistics.median(lrs) if lrs else None


def trial_config(saved: dict, overrides: list[str], checkpoint: Path, steps: int, lr: float | None = None):
    """The probe's own config, the top-level groups the overrides touch replaced by theirs, resumed from
    `checkpoint` for `steps` more steps, sampling diagnostics (fp16/bf16 shadow figures) five times; at the
    constant learning rate `lr` when given (no schedule: both arms alike)."""
    cfg = OmegaConf.create(saved)
    if overrides:
        new = _compose(overrides)
        for key in {o.lstrip("+~").split("=")[0].split(".")[0] for o in overrides}:
            cfg[key] = new[key]
    if lr is not None and "lr" in cfg.get("optimizer", {}):
        cfg.optimizer.lr = lr
        cfg.scheduler = OmegaConf.merge(cfg.scheduler, {"name": "none", "_target_": None, "warmup_steps": 0})
    start = torch.load(checkpoint, map_location="cpu", weights_only=True)["train_state"]["step"]
    cfg.resume = str(checkpoint)
    cfg.trainer.max_steps = start + steps
    cfg.trainer.progress_bar = False
    cfg.trainer.log_every = 1
    cfg.checkpoint.enabled = False
    cfg.diagnostics.enabled = True
    cfg.diagnostics.every = max(1, steps // 5)
    cfg.diagnostics.first_steps = 0
    cfg.diagnostics.shadow = [FP16.name, BF16.name]
    return cfg, start


def run_arm(saved: dict, overrides: list[str], checkpoint: Path, steps: int, out: Path, layers_over,
            lr: float | None = None) -> dict:
    """One arm of the trial. `layers_over(run_dir, format)`: the layers whose measured error in `format` exceeds
    the advisor's thresholds (advise.layers_over: the same reading and the same thresholds as the advice)."""
    from mptrain.config import validate
    from mptrain.train.recipe import run

    cfg, start = trial_config(saved, overrides, checkpoint, steps, lr)
    if out.exists():
        shutil.rmtree(out)  # a trial of its own, never mixed with an earlier one
    validate(cfg)
    summary = run(cfg, out)
    losses = [r["loss"] for r in read_jsonl(out / METRICS) if r.get("step", 0) > start and "loss" in r]
    fmt = FORMAT_OF.get(summary.get("compute_dtype"))
    over = layers_over(out, fmt) if fmt is not None and (out / DIAGNOSTICS).is_file() else []
    finite = losses and all(x is not None and math.isfinite(x) for x in losses)  # null: a non-finite loss
    mean = sum(losses) / len(losses) if finite else math.inf
    return {"dir": str(out), "precision": summary.get("precision"), "compute_dtype": summary.get("compute_dtype"),
            "from_step": start, "steps": summary.get("steps", 0) - start, "skipped": summary.get("skipped_steps", 0),
            "status": summary.get("status"), "mean_loss": mean, "layers_over": over}


def allowed_skips(advice: dict, overrides: list[str]) -> int:
    """Dynamic scaling from its initial scale backs off once per skipped step until it fits: the advice says how
    many. A static scale, or a dynamic one started where the advice put it, skips none."""
    dynamic = "precision=dynamic" in overrides and not any(
        o.startswith("precision.loss_scale.init=") for o in overrides
    )
    return int(advice.get(FP16.name, {}).get("dynamic_skips_at_start") or 0) if dynamic else 0


def verify(run_dir: Path, advice: dict, overrides: list[str], layers_over, steps: int = DEFAULT_STEPS) -> dict:
    checkpoint = Path(run_dir) / CHECKPOINTS / LAST
    if not checkpoint.is_file():
        raise VerifyError(f"{run_dir} has no {CHECKPOINTS}/{LAST} to continue from; probe with checkpoint.enabled=true")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]
    if (saved.get("precision") or {}).get("schedule"):
        # both arms would resume through the run's own switches and train the same precision: no comparison
        raise VerifyError(f"{run_dir} ran with precision.schedule, which both trial arms would follow from its "
                          "checkpoint; verify a probe run without a schedule")
    base = Path(run_dir) / VERIFY
    lr = representative_lr(run_dir) if "lr" in (saved.get("optimizer") or {}) else None
    probe = run_arm(saved, [], checkpoint, steps, base / "probe", layers_over, lr)
    trial = run_arm(saved, overrides, checkpoint, steps, base / "advised", layers_over, lr)
    reasons = []
    allowed = allowed_skips(advice, overrides)
    if trial["skipped"] > allowed:
        reasons.append(f"{trial['skipped']} of {trial['steps']} steps skipped (allowed {allowed})")
    if trial["status"] != "completed":
        reasons.append(f"the trial ended {trial['status']}")
    limit = probe["mean_loss"] * (1 + LOSS_TOLERANCE) + LOSS_SLACK
    if not trial["mean_loss"] <= limit:
        reasons.append(f"mean loss {trial['mean_loss']:.4g} above the continuation's {probe['mean_loss']:.4g} "
                       f"(limit {limit:.4g})")
    for layer in trial["layers_over"]:
        reasons.append(f"{layer['module']} in {layer['format']} past its thresholds")
    return {"verified": not reasons, "steps": steps, "overrides": overrides, "reasons": reasons,
            "probe": probe, "advised": trial, "loss_tolerance": LOSS_TOLERANCE, "allowed_skips": allowed, "lr": lr}


def render(v: dict) -> list[str]:
    p, a = v["probe"], v["advised"]
    at = (f" at lr {v['lr']:.3g} held constant (the run's median logged lr)" if v.get("lr") is not None
          else " on the run's own schedule")
    lines = [f"verify: {v['steps']} steps from step {p['from_step']}{at}, the probe's continuation "
             f"({p['precision']}) against {' '.join(v['overrides'])}",
             f"  continuation: mean loss {p['mean_loss']:.4g}, {p['skipped']} skipped",
             f"  advised:      mean loss {a['mean_loss']:.4g}, {a['skipped']} skipped (allowed {v['allowed_skips']}), "
             f"{len(a['layers_over'])} layers past their thresholds"]
    if v["verified"]:
        lines.append("  VERIFIED")
    else:
        lines.append("  FAILED: " + "; ".join(v["reasons"]))
    return lines
