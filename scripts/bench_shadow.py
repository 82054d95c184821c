"""What the diagnostics' shadow measurement costs, side by side in one process.

Three arms take turns run by run on the same model and data, each sampling every step (diagnostics.every=1):
(a) diagnostics off, (b) diagnostics without shadow (diagnostics.shadow=[]), (c) diagnostics with the default
shadow formats (the device's native ones: bf16 on a CPU), (d) with five formats listed (bf16, fp16, fp8, fp8_row,
mxfp8: emulated on a CPU). From the median step times, a sampled step's extra cost is scaled to the default interval
(1 step in diagnostics.every=100), as docs/benchmarks.md does for the diagnostics themselves: the share of a
run's wall time is extra / (100 * plain step).

    python scripts/bench_shadow.py                          # SmallCNN on digits, fp32 and bf16 (~1.5 min, 2 cores)
    python scripts/bench_shadow.py --model resnet18 --dataset synthetic --image-size 64 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import StepTimer, fit_in, mptrain_components  # noqa: E402  (the page's own loop runner)
from hydra import initialize_config_dir  # noqa: E402

from mptrain.cli.register import register  # noqa: E402
from mptrain.diagnostics import Diagnostics  # noqa: E402

ALL = "[bf16,fp16,fp8,fp8_row,mxfp8]"
ARMS = {"off": ["diagnostics=off"], "diag": ["diagnostics.shadow=[]"], "shadow": [],
        "all": [f"diagnostics.shadow={ALL}"]}


def step_time(overrides: list[str], n: int, warmup: int, tmp: Path) -> float:
    cfg, loop = mptrain_components(overrides, n)
    diag = None
    tmp.mkdir(parents=True, exist_ok=True)
    if cfg.diagnostics.enabled:
        diag = Diagnostics(cfg.diagnostics, loop.base_model, loop.precision, tmp)
    timer = StepTimer()
    try:
        fit_in(cfg, loop, tmp, timer, diag)
    finally:
        if diag is not None:
            diag.close()
    steps = [b - a for a, b in zip(timer.times, timer.times[1:])][warmup:]
    return statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=100, help="the interval to scale to (diagnostics.every)")
    args = ap.parse_args()
    base = [f"model={args.model}", f"dataset={args.dataset}", f"trainer.device={args.device}",
            "trainer.progress_bar=false", "trainer.tensorboard=false", "checkpoint.enabled=false",
            "diagnostics.every=1", "diagnostics.first_steps=0", "trainer.eval_every=100000"]
    if args.image_size:
        base.append(f"dataset.image_size={args.image_size}")
    print(f"model={args.model} dataset={args.dataset} device={args.device}, {args.steps} steps per run "
          f"({args.warmup} warm-up), {args.repeats} alternating repeats; median step times")
    print("| precision | step, diagnostics off | sampled step: no shadow | default shadow | five formats | "
          f"at every={args.every}: diagnostics, default shadow | of which shadow | with five formats |")
    print("|---|---|---|---|---|---|---|---|")
    with initialize_config_dir(config_dir=register(), version_base="1.3"), tempfile.TemporaryDirectory() as tmp:
        for prec in args.precisions.split(","):
            times = {k: [] for k in ARMS}
            for r in range(args.repeats):
                for arm, extra in ARMS.items():
                    times[arm].append(step_time(base + [f"precision={prec}", *extra], args.steps, args.warmup,
                                                Path(tmp) / f"{prec}-{arm}-{r}"))
            t = {k: statistics.median(v) for k, v in times.items()}
            share = lambda a, b, t=t: (t[a] - t[b]) / (args.every * t["off"])  # noqa: E731
            print(f"| `{prec}` | {t['off'] * 1e3:.0f} ms | {t['diag'] * 1e3:.0f} ms | {t['shadow'] * 1e3:.0f} ms | "
                  f"{t['all'] * 1e3:.0f} ms | {share('shadow', 'off'):+.2%} | {share('shadow', 'diag'):+.2%} | "
                  f"{share('all', 'off'):+.2%} |", flush=True)


if __name__ == "__main__":
    main()
