"""`mptrain-eval RUN_DIR [--checkpoint NAME] [overrides]`: a trained run's checkpoint on a validation set.

Rebuilds the run (its .hydra/config.yaml, plus the overrides given) with the recipe's own builders, loads
checkpoints/best.pt (else last.pt, or `--checkpoint NAME`), and runs the task's validation as training does:
in the run's precision, or another preset (`precision=bf16`: the fp32-trained model evaluated in bf16), on
the run's validation set or another dataset (`dataset.root=...`). Prints the metrics and writes
RUN_DIR/eval_<name>.json (name: the checkpoint, plus the overrides; `--name` sets it).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from mptrain.errors import ConfigError
from mptrain.parallel import distributed
from mptrain.precision import SHORT_DTYPE
from mptrain.run.layout import eval_file
from mptrain.run.writer import write_json_atomic
from mptrain.tools.trained import checkpoint_path, load_checkpoint, load_weights, run_config, tool_main
from mptrain.train.loop import validate
from mptrain.train.recipe import backend_settings, build


def default_name(checkpoint: Path, overrides: list[str]) -> str:
    """best, or best-precision_bf16 when evaluated with overrides (one file per setting, none overwritten)."""
    parts = [checkpoint.stem] + [re.sub(r"[^A-Za-z0-9.+-]+", "_", o) for o in overrides]
    return "-".join(parts)


def evaluate(run_dir: Path, checkpoint: str | None = None, overrides: list[str] | None = None,
             name: str | None = None) -> tuple[dict, Path]:
    """The checkpoint's validation metrics; returns (the record written, its path)."""
    run_dir, overrides = Path(run_dir), list(overrides or [])
    cfg = run_config(run_dir, overrides)
    path = checkpoint_path(run_dir, checkpoint)
    ckpt = load_checkpoint(path)  # before any building: a bad file fails at once
    start = time.perf_counter()
    c = build(cfg)
    try:
        if c.val_loader is None:
            raise ConfigError(f"dataset {cfg.dataset.get('name') or cfg.dataset.get('_target_')} has no validation set "
                              "to evaluate on; give a dataset with one as overrides (dataset=...)")
        load_weights(c.base_model, ckpt, path)
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
        "trained_precision": ckpt["config"].get("precision", {}).get("mode"),
        "dataset": cfg.dataset.get("name") or cfg.dataset.get("_target_"),
        "samples": len(c.val_loader.dataset),
        "device": str(c.device),
        **metrics,
        "wall_s": round(time.perf_counter() - start, 3),
    }
    out = run_dir / eval_file(name or default_name(path, overrides))
    write_json_atomic(out, record)
    return record, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mptrain-eval", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (outputs/<date>/<time>-<id>)")
    parser.add_argument("overrides", nargs="*", help="config changes, e.g. precision=bf16 dataset.root=/data")
    parser.add_argument("--checkpoint", help="checkpoints/<NAME> to evaluate (default best.pt, else last.pt)")
    parser.add_argument("--name", help="the result file is eval_<NAME>.json (default: the checkpoint and overrides)")
    args = parser.parse_args(argv)

    def body() -> None:
        record, out = evaluate(args.run_dir, args.checkpoint, args.overrides, args.name)
        print(f"{record['checkpoint']} (step {record['step']}) in precision={record['precision']} "
              f"({record['compute_dtype']}) on {record['dataset']}, {record['samples']} samples:")
        for key, value in record.items():
            if key.startswith("val/"):
                print(f"  {key} {value:.6g}")
        print(f"written: {out}")

    tool_main("mptrain-eval", body)


if __name__ == "__main__":
    main()
