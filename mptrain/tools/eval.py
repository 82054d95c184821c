"""`mptrain-eval RUN_DIR [--checkpoint NAME] [--ema] [overrides]`: a trained run's checkpoint on a validation set.

Rebuilds the run (its .hydra/config.yaml, plus the overrides given) with the recipe's own builders, loads
checkpoints/best.pt (else last.pt, or `--checkpoint NAME`), and runs the task's validation as training does:
in the run's precision, or another preset (`precision=bf16`: the fp32-trained model evaluated in bf16), on
the run's validation set or another dataset (`dataset.root=...`). `--ema`: the checkpoint's averaged weights
(trainer.ema), which reproduces the run's own val_ema/... figures. Prints the metrics and writes
RUN_DIR/eval_<name>.json (name: the checkpoint, `ema`, plus the overrides; `--name` sets it), which names what
was evaluated: the precision and its per-module plan, and whether the weights were the average.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import time
from pathlib import Path

from mptrain.errors import ConfigError
from mptrain.parallel import distributed
from mptrain.precision import SHORT_DTYPE
from mptrain.run.layout import eval_file
from mptrain.run.writer import write_json_atomic
from mptrain.tools.trained import (
    checkpoint_path,
    load_checkpoint,
    load_weights,
    require_ema,
    restore_plan,
    run_config,
    sets_precision,
    tool_main,
)
from mptrain.train.given import Given
from mptrain.train.loop import validate
from mptrain.train.recipe import backend_settings, build


def default_name(checkpoint: Path, overrides: list[str], ema: bool = False) -> str:
    """best, best-ema, or best-precision_bf16 when evaluated with overrides (one file per setting, none
    overwritten)."""
    parts = [checkpoint.stem] + ["ema"] * ema + [re.sub(r"[^A-Za-z0-9.+-]+", "_", o) for o in overrides]
    name = "-".join(parts)
    if len(name) > 200:  # a file name has at most 255 bytes: the overrides' start, and a digest of them all
        name = f"{name[:180]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def check_name(name: str) -> None:
    """--name makes eval_<name>.json, a file of the run directory itself: a name that is a path (`../../summary`
    would replace summary.json, `x/../../metrics` would make a directory) is refused before anything is read."""
    if not name or any(c in name for c in "/\\\0") or len(eval_file(name).encode()) > 255:
        raise ConfigError(f"--name {name!r} is not a plain file name: give one without '/' of at most 240 "
                          "characters (the result is eval_<name>.json in the run directory), e.g. --name bf16")


def evaluate(run_dir: Path, checkpoint: str | None = None, overrides: list[str] | None = None,
             name: str | None = None, ema: bool = False, given: Given | None = None) -> tuple[dict, Path]:
    """The checkpoint's validation metrics (of its EMA average with `ema`); returns (the record written, its path).
    `given`: the objects a run trained from Python was passed (mptrain.evaluate(run_dir, model=...))."""
    run_dir, overrides = Path(run_dir), list(overrides or [])
    if name is not None:
        check_name(name)
    cfg = run_config(run_dir, overrides)
    path = checkpoint_path(run_dir, checkpoint)
    ckpt = load_checkpoint(path)  # before any building: a bad file fails at once
    if ema:
        require_ema(ckpt, path)
    start = time.perf_counter()
    c = build(cfg, given, training=False)
    try:
        if c.val_loader is None:
            raise ConfigError(f"dataset {cfg.dataset.get('name') or cfg.dataset.get('_target_')} has no validation set "
                              "to evaluate on; give a dataset with one as overrides (dataset=...)")
        restore_plan(c.precision, ckpt, own=not sets_precision(overrides))
        load_weights(c.base_model, ckpt, path, ema=ema)
        with c.precision.backend_flags(), backend_settings(cfg.trainer):
            metrics = validate(c)
    finally:
        distributed.teardown(c.dist)
    record = {
        "checkpoint": str(path.relative_to(run_dir)),
        "step": ckpt["train_state"]["step"],
        "overrides": overrides,
        "precision": cfg.precision.mode,
        "compute_dtype": SHORT_DTYPE[c.precision.compute_dtype],
        # the per-module plan it ran under (module -> format; precision=auto: the one the checkpoint had measured)
        "plan": c.precision.plan.formats() if c.precision.plan is not None else None,
        **(c.precision.plan.summary() if c.precision.plan is not None else {}),  # plan_modules, plan_emulated
        "ema": ema,
        "trained_precision": ckpt["config"].get("precision", {}).get("mode"),
        "dataset": cfg.dataset.get("name") or cfg.dataset.get("_target_"),
        "samples": len(c.val_loader.dataset),
        "device": str(c.device),
        **metrics,
        "wall_s": round(time.perf_counter() - start, 3),
    }
    out = run_dir / eval_file(name or default_name(path, overrides, ema))
    write_json_atomic(out, record)
    return record, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mptrain-eval", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (outputs/<date>/<time>-<id>)")
    parser.add_argument("overrides", nargs="*", help="config changes, e.g. precision=bf16 dataset.root=/data")
    parser.add_argument("--checkpoint", help="checkpoints/<NAME> to evaluate (default best.pt, else last.pt)")
    parser.add_argument("--ema", action="store_true",
                        help="evaluate the checkpoint's EMA weights (trainer.ema) instead of the live ones")
    parser.add_argument("--name", help="the result file is eval_<NAME>.json (default: the checkpoint and overrides)")
    args = parser.parse_intermixed_args(argv)  # options anywhere among the overrides

    def body() -> None:
        record, out = evaluate(args.run_dir, args.checkpoint, args.overrides, args.name, args.ema)
        print(
            f"{record['checkpoint']} (step {record['step']}{', EMA weights' * record['ema']}) in "
            f"precision={record['precision']} "
            f"({record['compute_dtype']}) on {record['dataset']}, {record['samples']} samples:"
        )
        for key, value in record.items():
            if key.startswith("val/"):
                print(f"  {key} {value:.6g}")
        print(f"written: {out}")

    tool_main("mptrain-eval", body)


if __name__ == "__main__":
    main()
