"""precision=auto against the fixed presets, as a user gets them: whole runs, side by side, interleaved.

Each round runs every arm once, as `mptrain` from the command line (a fresh process: start-up, probe, plan,
training, validation, checkpoints, all counted), in turn, so that a change of load falls on every arm alike.
Reported per arm: the median over rounds of the whole process's wall time, the run's own samples/s (summary.json:
the whole run, probe included), the median time of an ordinary step, and its final validation accuracy (or loss);
then auto's ratio to the fastest fixed preset that reaches its accuracy (within 0.5 point; a language model: its
val/loss within 1%), which issue 34 asks to be >= 0.95, and what auto's measurement costs: the extra time of its
probe and re-check steps over its own ordinary steps, as a share of its wall time.

The child process times each step (`--child`: the training step wrapped, the CLI run as `python -m mptrain` would).

    python scripts/bench_auto.py                        # default CNN on digits, 1000 steps, fp32/bf16/amp/auto
    python scripts/bench_auto.py --model gpt --steps 300 --rounds 2
    python scripts/bench_auto.py --model gpt512 --steps 60 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

# nanoGPT's shakespeare-char recipe (char level, AdamW with warm-up and cosine decay: the gpt model's own recipe,
# dropout 0.2), scaled to a shared 2-core CPU (nanoGPT's 6 x 384 at 256 characters takes seconds a step here), on
# Python's LICENSE.txt (offline; tiny-shakespeare is not on disk); then a 512-wide GPT, as the README's GPT runs
MODELS = {
    "cnn": [],
    "gpt": ["model=gpt", "model.dim=128", "model.layers=4", "model.heads=4", "model.dropout=0.2",
            "dataset=text", "dataset.path=${python_stdlib:LICENSE.txt}", "diagnostics=off"],
    "gpt512": ["model=gpt", "model.dim=512", "model.layers=2", "model.heads=8", "model.dropout=0.2",
               "dataset=text", "dataset.path=${python_stdlib:LICENSE.txt}", "diagnostics=off"],
}


def child(times_path: str, argv: list[str]) -> None:
    """Run the CLI with every training step timed (wall seconds), written to `times_path` as {step: s}."""
    import mptrain.train.loop as loop

    steps: dict[int, float] = {}
    inner = loop.train_step

    def timed(c, batches, step_no, *args, **kwargs):
        start = time.perf_counter()
        out = inner(c, batches, step_no, *args, **kwargs)
        steps[step_no] = time.perf_counter() - start
        return out

    loop.train_step = timed
    sys.argv = ["mptrain", *argv]
    try:
        runpy.run_module("mptrain", run_name="__main__")
    finally:
        Path(times_path).write_text(json.dumps(steps))


def run(arm: str, overrides: list[str], steps: int, out: Path) -> dict:
    argv = [f"precision={arm}", f"trainer.max_steps={steps}", "trainer.progress_bar=false", f"hydra.run.dir={out}",
            *overrides]
    times_path = out.with_suffix(".steps.json")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(times_path), *argv], capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    acc = next((v for k, v in summary.items() if k.startswith("val/acc")), None)
    loss = next((v for k, v in summary.items() if k.startswith("val/loss")), None)
    step_s = {int(k): v for k, v in json.loads(times_path.read_text()).items()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plan_step = next((r["step"] for r in rows if r.get("event") == "precision_plan"), None)
    cfg = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    every = cfg["precision"].get("auto", {}).get("recheck_every")
    measured = {s for s in step_s if plan_step is not None and (s <= plan_step or (every and s % every == 0))}
    ordinary = statistics.median(t for s, t in step_s.items() if s not in measured and s > 1)
    extra = sum(step_s[s] - ordinary for s in measured)
    return {"wall_s": wall, "samples_per_s": summary["samples_per_s"], "step_ms": ordinary * 1e3, "acc": acc,
            "loss": loss, "plan": summary.get("auto_plan"), "plan_step": plan_step, "measured_steps": len(measured),
            "measure_share": extra / wall}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="cnn")
    ap.add_argument("--arms", default="fp32,bf16,amp,auto")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--overrides", nargs="*", default=[])
    args = ap.parse_args()
    arms = args.arms.split(",")
    overrides = [*MODELS[args.model], *args.overrides]
    results: dict[str, list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in arms:
                results[arm].append(run(arm, overrides, args.steps, Path(tmp) / f"{arm}{r}"))
                print(arm, r, results[arm][-1], flush=True)
    keys = ("wall_s", "samples_per_s", "step_ms", "measure_share")
    med = {a: {k: statistics.median(x[k] for x in rows) for k in keys}
           | {k: rows[-1][k] for k in ("acc", "loss", "plan", "plan_step")} for a, rows in results.items()}
    print(f"\n{args.model}, {args.steps} steps, {args.rounds} rounds (medians)")
    print("arm        wall s   samples/s   step ms   val acc   val loss")
    for a, m in med.items():
        print(f"{a:<9}{m['wall_s']:8.1f}{m['samples_per_s']:12.1f}{m['step_ms']:10.2f}   {m['acc']}   {m['loss']}")
    if "auto" not in med:
        return
    auto = med["auto"]

    def reaches(m: dict) -> bool:  # the preset's accuracy within 0.5 point of auto's (a language model: loss, 1%)
        if auto["acc"] is not None and m["acc"] is not None:
            return m["acc"] >= auto["acc"] - 0.005
        return auto["loss"] is None or m["loss"] is None or m["loss"] <= auto["loss"] * 1.01

    fixed = {a: m for a, m in med.items() if a != "auto" and reaches(m)}
    if fixed:
        best = max(fixed, key=lambda a: fixed[a]["samples_per_s"])
        b = fixed[best]
        print(f"\nauto / {best} (the fastest fixed preset reaching its accuracy): samples/s "
              f"{auto['samples_per_s'] / b['samples_per_s']:.3f}x, ordinary step time "
              f"{b['step_ms'] / auto['step_ms']:.3f}x (speed), wall time {auto['wall_s'] / b['wall_s'] - 1:+.1%}")
    print(f"auto's probe and re-checks: {auto['measure_share']:.1%} of its wall time (median); plan at step "
          f"{auto['plan_step']}: {auto['plan']}")


if __name__ == "__main__":
    main()
