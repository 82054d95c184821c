"""4-bit training on the small GPT: bf16, plain nvfp4, NVIDIA's nvfp4_recipe, the recipe with the first and last
Linear in bf16, and that recipe with each element removed in turn. Prints the markdown table of docs/precision.md
("4-bit training"). Every row is the same job (same seed, data and model); only the precision changes.

    python scripts/recipe_ablation.py --steps 200 --seeds 0,1,2 model.dim=64 model.layers=2 trainer.batch_size=16
    python scripts/recipe_ablation.py --steps 100 --seeds 0,1 trainer.device=cuda
Extra arguments are Hydra overrides applied to every row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from mptrain.cli.register import register
from mptrain.config import validate
from mptrain.train.recipe import run

# the docs' GPT recipe (docs/models.md): a character model of Python's LICENSE text
TEXT = str(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")
BASE = ["model=gpt", "dataset=text", f"dataset.path={TEXT}", "optimizer=adamw", "optimizer.lr=3e-3",
        "trainer.batch_size=32", "trainer.progress_bar=false", "trainer.tensorboard=false", "diagnostics=off",
        "checkpoint.enabled=false", "precision=bf16"]
# the recipe with one element switched off, each a config-defined format (docs/formats.md)
NVFP4 = "element: e2m1, scaling: block, block: 16, scale_element: e4m3, tensor_scale: true"
ELEMENTS = {"2d": "weight_scaling: 2d", "rht": "wgrad_hadamard: 16", "sr": "grad_rounding: stochastic"}


def without(element: str) -> str:
    """precision.formats.no_X: nvfp4_recipe less one element."""
    rest = ", ".join(v for k, v in ELEMENTS.items() if k != element)
    return f"precision.formats.no_{element}={{{NVFP4}, {rest}}}"


EDGES = "@first: bf16, @last: bf16"  # the high-precision layers: the first and the last Linear
ROWS = {
    "bf16": [],
    "nvfp4 (plain)": ["precision.layers={*: nvfp4}"],
    "nvfp4_recipe": ["precision.layers={*: nvfp4_recipe}"],
    "nvfp4_recipe + first/last bf16": [f"precision.layers={{*: nvfp4_recipe, {EDGES}}}"],
    "  without 2D weight scaling": [without("2d"), f"precision.layers={{*: no_2d, {EDGES}}}"],
    "  without the Hadamard transform": [without("rht"), f"precision.layers={{*: no_rht, {EDGES}}}"],
    "  without stochastic rounding": [without("sr"), f"precision.layers={{*: no_sr, {EDGES}}}"],
}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[0], help="e.g. 0,1")
    parser.add_argument("--only", type=lambda v: v.split(","), default=None,
                        help="comma-separated row names to run (default: all)")
    args, extra = parser.parse_known_args(argv)
    losses: dict[str, list[float]] = {}
    walls: dict[str, float] = {}
    rows = {k: v for k, v in ROWS.items() if args.only is None or k.strip() in args.only}
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=register(), version_base="1.3"):
        for i, (name, overrides) in enumerate(rows.items()):
            for seed in args.seeds:
                cfg = compose("config", overrides=[*BASE, f"trainer.max_steps={args.steps}", f"trainer.seed={seed}",
                                                   *overrides, *extra])
                validate(cfg)
                start = time.perf_counter()
                s = run(cfg, Path(tmp) / f"{i}-{seed}")
                walls[name] = walls.get(name, 0.0) + time.perf_counter() - start
                losses.setdefault(name, []).append(s["val/loss"])
                print(f"{name.strip()} seed {seed}: val/loss {s['val/loss']:.4f} ({s['status']})", file=sys.stderr)
    base = losses.get("bf16")
    seeds = " | ".join(f"seed {seed}" for seed in args.seeds)
    print(f"| precision ({args.steps} steps) | val/loss {seeds} | mean | mean vs bf16 | worst seed vs its bf16 "
          "| wall s per run |")
    print("|---|" + "---|" * (len(args.seeds) + 4))
    for name, vals in losses.items():
        mean = statistics.mean(vals)
        rel = worst = "-"
        if base:  # paired by seed: each row's run against bf16's run of the same seed
            rel = f"{100 * (mean / statistics.mean(base) - 1):+.2f}%"
            worst = f"{max(100 * (v / b - 1) for v, b in zip(vals, base)):+.2f}%"
        cells = " | ".join(f"{v:.4f}" for v in vals)
        print(f"| {name.replace('  ', '&nbsp;&nbsp;')} | {cells} | {mean:.4f} | {rel} | {worst} | "
              f"{walls[name] / len(vals):.0f} |")

if __name__ == "__main__":
    main(sys.argv[1:])
