"""mptrain-estimate's predicted step time against a real run's, on this device (issue 34: within +-30% for fp32 and
bf16 on a CPU).

For each model and preset, in turn, each round: `mptrain-estimate --json` (device timing mode: one measured step,
then the median of --estimate-steps timed steps) and a short real run, `mptrain` from the command line with the same
overrides and the settings estimate composes (diagnostics, checkpoints, the progress bar and TensorBoard off), so
that the two time the same training step. The measured step time is the run's samples per step over its samples/s
(summary.json: the run's training time, validation and the first, warm-up step excluded). The arms are interleaved
round by round, so that a change of the machine's load falls on all of them; the table gives the medians over
rounds and predicted / measured.

    python scripts/bench_estimate.py                       # the default CNN and the README's GPT, fp32 and bf16
    python scripts/bench_estimate.py --models cnn --rounds 5 --steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {
    "cnn": [],  # the default run: the small CNN on digits
    "gpt": ["model=gpt", "model.dim=64", "model.layers=2", "dataset=text",  # the README's GPT
            "dataset.path=${python_stdlib:LICENSE.txt}", "trainer.eval_every=100"],
}
QUIET = ["diagnostics.enabled=false", "checkpoint.enabled=false", "trainer.progress_bar=false",
         "trainer.tensorboard=false"]  # what mptrain-estimate composes: both time the same step


def predicted(overrides: list[str], preset: str, steps: int) -> float:
    cmd = [sys.executable, "-m", "mptrain.tools.estimate", "--json", "--presets", preset, "--steps", str(steps),
           *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mptrain-estimate {preset} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)["presets"][preset]["step_time_s"]


def measured(overrides: list[str], preset: str, steps: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "mptrain", f"precision={preset}", f"trainer.max_steps={steps}", *QUIET,
           f"hydra.run.dir={out}", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mptrain precision={preset} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return summary["samples"] / summary["steps"] / summary["samples_per_s"]  # samples a step over samples/s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated among {', '.join(MODELS)}")
    ap.add_argument("--presets", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=200, help="steps of each real run")
    ap.add_argument("--estimate-steps", type=int, default=20, help="mptrain-estimate --steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--overrides", nargs="*", default=[], help="added to every model's overrides (trainer.device=...)")
    args = ap.parse_args()
    arms = [(m, p) for m in args.models.split(",") for p in args.presets.split(",")]
    rows: dict[tuple[str, str], dict[str, list[float]]] = {a: {"predicted": [], "measured": []} for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for model, preset in arms:
                overrides = [*MODELS[model], *args.overrides]
                row = rows[model, preset]
                row["predicted"].append(predicted(overrides, preset, args.estimate_steps))
                row["measured"].append(measured(overrides, preset, args.steps, Path(tmp) / f"{model}-{preset}-{r}"))
                print(f"round {r}: {model} {preset}: predicted {row['predicted'][-1] * 1e3:.2f} ms, "
                      f"measured {row['measured'][-1] * 1e3:.2f} ms", flush=True)
    print("\n| model | preset | predicted ms | measured ms | predicted / measured |\n|---|---|---|---|---|")
    for (model, preset), row in rows.items():
        p, m = statistics.median(row["predicted"]), statistics.median(row["measured"])
        print(f"| {model} | {preset} | {p * 1e3:.2f} | {m * 1e3:.2f} | {p / m:.2f} |")


if __name__ == "__main__":
    main()
