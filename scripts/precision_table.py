"""Train the same job in every precision mode and print a markdown table (used in docs/precision.md).

    python scripts/precision_table.py                        # small CNN on digits, 2 epochs (44 steps)
    python scripts/precision_table.py model=mlp trainer.max_steps=220
Extra arguments are Hydra overrides applied to every mode.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from mptrain.cli.register import register
from mptrain.config import validate
from mptrain.train.recipe import run

MODES = ["fp32", "amp", "bf16", "dynamic", "static", "master", "noscale", "nomaster"]
BASE = ["trainer.max_steps=44", "scheduler.warmup_steps=5", "trainer.progress_bar=false", "trainer.tensorboard=false",
        "diagnostics.every=11", "checkpoint.enabled=false"]


def main(extra: list[str]) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=register(), version_base="1.3"):
        for mode in MODES:
            cfg = compose("config", overrides=[*BASE, f"precision={mode}", *extra])
            validate(cfg)
            s = run(cfg, Path(tmp) / mode)
            rows.append(s)
            print(f"{mode}: val/acc {s['val/acc']:.4f}", file=sys.stderr)
    ref = rows[0]["val/acc"]
    print(
        "| mode | compute | val/acc % | Δ vs fp32 (points) | val/loss | skipped | final scale | zero grads % | "
        "update underflow % | samples/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, s in zip(MODES, rows):
        print(
            f"| `{mode}` | {s['compute_dtype']} | {100 * s['val/acc']:.2f} | {100 * (s['val/acc'] - ref):+.2f} | "
            f"{s['val/loss']:.4f} | {s['skipped_steps']} | {s['final_loss_scale']:g} | "
            f"{100 * s.get('diag/grad_zero', 0):.2f} | {100 * s.get('diag/update_underflow', 0):.1f} | "
            f"{s['samples_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
