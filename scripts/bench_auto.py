"""precision=auto against the fixed presets, as a user gets them: whole runs, side by side, interleaved.

Each round runs every arm once, as `mptrain` from the command line (a fresh process: start-up, probe, plan,
training, validation, checkpoints, all counted), in turn, so that a change of load falls on every arm alike.
Reported per arm: the median over rounds of the whole process's wall time, the run's own samples/s (summary.json:
the whole run, probe included) and its final validation accuracy; then auto's ratio to the fastest fixed preset
that reaches its accuracy (within 0.5 point), which issue 34 asks to be >= 0.95, and what auto's probe costs the
user: its extra wall time over that preset, as a share of the preset's (where the plan equals the preset, that is the
probe and re-checks alone), with the step at which it planned.

    python scripts/bench_auto.py                                   # default CNN, 1000 steps, fp32/bf16/auto
    python scripts/bench_auto.py --overrides model=gpt dataset=shakespeare_char --steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(arm: str, overrides: list[str], steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mptrain", f"precision={arm}", f"trainer.max_steps={steps}",
           "trainer.progress_bar=false", f"hydra.run.dir={out}", *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    acc = next((v for k, v in summary.items() if k.startswith("val/acc")), None)
    row = {"wall_s": wall, "samples_per_s": summary["samples_per_s"], "acc": acc, "plan": summary.get("auto_plan")}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plan = next((r for r in rows if r.get("event") == "precision_plan"), None)
    if plan is not None:
        row["plan_step"] = plan["step"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="fp32,bf16,auto")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--overrides", nargs="*", default=[])
    args = ap.parse_args()
    arms = args.arms.split(",")
    results: dict[str, list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in arms:
                results[arm].append(run(arm, args.overrides, args.steps, Path(tmp) / f"{arm}{r}"))
                print(arm, r, results[arm][-1], flush=True)
    med = {a: {k: statistics.median(x[k] for x in rows) for k in ("wall_s", "samples_per_s")}
           | {"acc": rows[-1]["acc"], "plan": rows[-1]["plan"]} for a, rows in results.items()}
    print("\narm        wall s   samples/s   val acc")
    for a, m in med.items():
        print(f"{a:<9}{m['wall_s']:8.1f}{m['samples_per_s']:12.1f}   {m['acc']}")
    if "auto" in med:
        auto = med["auto"]
        fixed = {a: m for a, m in med.items() if a != "auto"
                 and (auto["acc"] is None or m["acc"] is None or m["acc"] >= auto["acc"] - 0.005)}
        if fixed:
            best = max(fixed, key=lambda a: fixed[a]["samples_per_s"])
            print(f"\nauto / {best} (the fastest fixed preset reaching its accuracy): samples/s "
                  f"{auto['samples_per_s'] / fixed[best]['samples_per_s']:.3f}x; auto's extra wall time "
                  f"{auto['wall_s'] / fixed[best]['wall_s'] - 1:+.1%}")
        print(f"auto's plan (at step {results['auto'][-1].get('plan_step')}): {auto['plan']}")


if __name__ == "__main__":
    main()
