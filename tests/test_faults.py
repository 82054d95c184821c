"""Fault injection: the real CLI killed inside a checkpoint write, a validation or a metrics write, then resumed;
divergence, SIGTERM during validation and Ctrl-C twice, end to end.

The moment is hit deterministically by HOOK, a wrapper run as `python -c HOOK <overrides>` that patches one
mptrain function (in the child only) to signal its own process on its k-th call, then runs mptrain.cli.main.main().
The product code has no test hook.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import read_jsonl, run_cli
from .test_checkpoint import assert_same_tensors, final_state

pytestmark = pytest.mark.slow

STEPS = 20
CLI = ["model=mlp", "model.width=16", "model.depth=2", "trainer.device=cpu", "trainer.batch_size=64",
       "trainer.log_every=1", "checkpoint.every_steps=2", "trainer.eval_every=3", "scheduler=none",
       "trainer.tensorboard=false", "trainer.progress_bar=false", f"trainer.max_steps={STEPS}"]

# MPTRAIN_FAULT=<where>:<calls>:<fraction>:<signal>[:atexit]
#   where: save (mptrain.checkpoint.callback.save_atomic), validate (mptrain.train.loop.validate), log (RunWriter.log)
#   calls: comma-separated call numbers (1-based) on which to send the signal
#   fraction: how far into the call: the share of the temp file's bytes written, of the validation
#             batches run, of the metrics line written
#   atexit: also send the signal once more while the interpreter shuts down
HOOK = r"""
import atexit, io, json, math, os, signal, sys
import torch
import mptrain.checkpoint.callback, mptrain.cli.main, mptrain.train.loop, mptrain.run.layout, mptrain.run.writer

where, calls, fraction, name, *more = os.environ.pop("MPTRAIN_FAULT").split(":")
calls, fraction, signum = {int(k) for k in calls.split(",")}, float(fraction), getattr(signal, name)
count = [0]

def due():
    count[0] += 1
    return count[0] in calls

def send():
    os.kill(os.getpid(), signum)  # SIGKILL never returns; the others run mptrain's handler here

if where == "save":
    real_save, real_fdopen = mptrain.checkpoint.callback.save_atomic, os.fdopen

    class Torn:
        # the temp file: the signal arrives once `limit` bytes of it are written
        def __init__(self, f, limit):
            self.f, self.limit, self.written = f, limit, 0
        def write(self, data):
            data, n = bytes(data), len(data)
            if self.written <= self.limit < self.written + n:
                cut = self.limit - self.written
                self.f.write(data[:cut]); self.f.flush(); os.fsync(self.f.fileno())
                send()
                self.f.write(data[cut:])
            else:
                self.f.write(data)
            self.written += n
            return n
        def __getattr__(self, key):
            return getattr(self.f, key)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def save_atomic(obj, path, *args, **kwargs):
        if not due():
            return real_save(obj, path, *args, **kwargs)
        if signum != signal.SIGKILL:
            # a handled signal runs its handler in Python code: torch.save's own writes are C++ calling
            # the file's write, so send it where save_atomic's Python code runs, at the temp file's fsync
            real_fsync = os.fsync
            def fsync(fd):
                os.fsync = real_fsync
                send()
                return real_fsync(fd)
            os.fsync = fsync
            try:
                return real_save(obj, path, *args, **kwargs)
            finally:
                os.fsync = real_fsync
        buf = io.BytesIO(); torch.save(obj, buf)
        limit = int(fraction * buf.tell())
        os.fdopen = lambda fd, mode="r", *a, **k: Torn(real_fdopen(fd, mode, *a, **k), limit)
        try:
            return real_save(obj, path, *args, **kwargs)
        finally:
            os.fdopen = real_fdopen

    mptrain.checkpoint.callback.save_atomic = save_atomic
elif where == "validate":
    real_validate = mptrain.train.loop.validate

    def validate(c):
        if not due():
            return real_validate(c)
        task, batches, seen = c.task, len(c.val_loader), [0]
        real_sums = task.validation_sums
        def sums(*a, **k):
            seen[0] += 1
            if seen[0] == max(1, math.ceil(fraction * batches)):
                send()
            return real_sums(*a, **k)
        task.validation_sums = sums
        try:
            return real_validate(c)
        finally:
            del task.validation_sums

    mptrain.train.loop.validate = validate
elif where == "log":
    real_log = mptrain.run.writer.RunWriter.log

    def log(self, row):
        if due():  # a torn line: part of the row, then the signal
            line = json.dumps(mptrain.run.layout.json_safe(row)) + "\n"
            self._metrics.write(line[:int(fraction * len(line))]); self._metrics.flush()
            send()
        return real_log(self, row)

    mptrain.run.writer.RunWriter.log = log
if more == ["atexit"]:
    atexit.register(send)  # registered first, so it runs last: after mptrain's own exit work
sys.argv = ["mptrain", *sys.argv[1:]]
mptrain.cli.main.main()
"""


def run_faulted(run_dir: Path, cwd: Path, fault: str, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPTRAIN_FAULT": fault}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-c", HOOK, *CLI, f"hydra.run.dir={run_dir}", *extra], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def val_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "val/acc" in r]


def improving(rows: list[dict]) -> list[int]:
    """The steps whose validation accuracy beat every earlier one (where best.pt is written)."""
    best, steps = None, []
    for r in val_rows(rows):
        if best is None or r["val/acc"] > best:
            best = r["val/acc"]
            steps.append(r["step"])
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    proc = run_cli([*CLI, f"hydra.run.dir={root}/run"], cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def save_calls(reference: Path) -> int:
    """save_atomic calls in the uninterrupted run: last.pt every 2 steps and at the end, best.pt on improvement
    (a hard link of last.pt, no save_atomic call, where it improves on a step that saves last.pt)."""
    saved = {s for s in range(1, STEPS + 1) if s % 2 == 0 or s == STEPS}
    return len(saved) + len([s for s in improving(read_jsonl(reference / "metrics.jsonl")) if s not in saved])


# (moment, seed, of): seed i of `of` draws the call from the i-th of `of` equal spans of the run's calls, so the
# kills spread over early (before the first checkpoint), middle and late moments
CASES = [("save", 0, 3), ("save", 1, 3), ("save", 2, 3), ("validate", 0, 2), ("validate", 1, 2), ("log", 0, 2),
         ("log", 1, 2)]


@pytest.mark.parametrize(("where", "seed", "of"), CASES, ids=[f"{w}-{s}" for w, s, _ in CASES])
def test_kill_at_a_random_moment_then_resume_auto_matches_an_uninterrupted_run(tmp_path, reference, where, seed, of):
    rows = read_jsonl(reference / "metrics.jsonl")
    calls = {"save": save_calls(reference), "validate": len(val_rows(rows)), "log": len(rows)}[where]
    rng = random.Random(f"{where}-{seed}")
    k, fraction = rng.randint(1 + seed * calls // of, (seed + 1) * calls // of), rng.random()
    run_dir = tmp_path / "run"
    killed = run_faulted(run_dir, tmp_path, f"{where}:{k}:{fraction}:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, f"the hook did not fire (call {k} of {calls}): {killed.stderr}"
    fresh = not any((run_dir / "checkpoints").glob("*.pt"))  # killed before a checkpoint was complete

    for _ in range(3):  # resume=auto until the run completes (one attempt should do)
        proc = run_cli([*CLI, f"hydra.run.dir={run_dir}", "resume=auto"], cwd=tmp_path)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # every step exactly once
    assert read_jsonl(run_dir / "metrics.jsonl") == rows
    assert read_jsonl(run_dir / "diagnostics.jsonl") == read_jsonl(reference / "diagnostics.jsonl")
    assert_same_tensors(final_state(reference), final_state(run_dir))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert not [p for p in run_dir.rglob("*.tmp") if "previous_" not in str(p)], "a killed write left a temp file"
    if fresh:  # the killed attempt's records were set aside, not appended to
        assert (run_dir / "previous_1" / "metrics.jsonl").is_file()


def test_divergence_stops_naming_the_step_and_a_lower_lr_resume_completes(tmp_path):
    """precision=fp32, lr=1e4: the loss overflows at step 39. The run stops there with one line; every
    checkpoint holds finite weights; the checkpoint whose weights gave the inf loss (step 38) is moved
    to checkpoints/diverged/, so resume=auto with a lower lr continues from step 37 and completes.

    No extra host sync per step: the check is MetricsLogger's (callbacks.py), which reads the loss only on
    a metrics row, where the row needs it anyway (one .tolist() of loss and grad norm); train_step and
    the loop read nothing. The finiteness of weights is checked only when a checkpoint is written."""
    diverge = ["precision=fp32", "checkpoint.every_steps=1", "trainer.eval_every=1", "trainer.max_steps=40"]
    run_dir = tmp_path / "run"
    proc = run_cli([*CLI, *diverge, "optimizer.lr=1e4", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mptrain: error: loss is inf at step 39"), proc.stderr
    ckpts = run_dir / "checkpoints"
    for name in ("step_37.pt", "best.pt", "diverged/step_38.pt"):
        ckpt = torch.load(ckpts / name, weights_only=True)
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), name
        for state in ckpt["optimizer"]["state"].values():
            assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), name
    assert not (ckpts / "last.pt").exists() and not (ckpts / "step_38.pt").exists()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    best = torch.load(ckpts / "best.pt", weights_only=True)["train_state"]
    assert best["step"] == improving([r for r in rows if r.get("val/loss") is not None])[-1]

    proc = run_cli([*CLI, *diverge, "optimizer.lr=0.05", "resume=auto", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {r["lr"] for r in rows if r["step"] > 37} == {0.05}  # the new lr, not the checkpoint's


def test_sigterm_during_validation_writes_best_pt_of_that_validation(tmp_path, reference):
    """Bug 8: the stop signal arrives half-way through a validation that improves val/acc; best.pt must
    hold that validation's step and metric, and last.pt that step."""
    val = val_rows(read_jsonl(reference / "metrics.jsonl"))
    improved = improving(val)
    k = next(i for i, r in enumerate(val, 1) if r["step"] == improved[min(1, len(improved) - 1)])
    run_dir = tmp_path / "run"
    proc = run_faulted(run_dir, tmp_path, f"validate:{k}:0.5:SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    step = val[k - 1]["step"]
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["train_state"]
    assert best["step"] == step and best["best_metric"] == val[k - 1]["val/acc"]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"] == step
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("second", ["checkpoint", "shutdown"])
def test_ctrl_c_twice_exits_130_without_a_traceback(tmp_path, second):
    """First Ctrl-C inside the write of best.pt at step 3 (the run goes on to step 4 and its stop checkpoint);
    the second inside that stop checkpoint's write (last.pt stays step 2's), or while the interpreter shuts
    down after it (last.pt is step 4's)."""
    run_dir = tmp_path / "run"
    fault = "save:2,3:0.5:SIGINT" if second == "checkpoint" else "save:2:0.5:SIGINT:atexit"
    proc = run_faulted(run_dir, tmp_path, fault)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"]
    assert last == (2 if second == "checkpoint" else 4)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
