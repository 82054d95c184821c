"""Data parallel on CPU: 2 processes under torchrun with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from .conftest import read_jsonl, run_cli

BASE = ["model=mlp", "trainer.device=cpu", "trainer.batch_size=32", "trainer.log_every=1", "trainer.tensorboard=false",
        "trainer.progress_bar=false", "scheduler=none", "optimizer.nesterov=false", "diagnostics=off"]


def torchrun(args: list[str], cwd: Path, env: dict | None = None, nproc: int = 2, timeout: int = 600):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "mptrain",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def model_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    single = run_cli([*BASE, "trainer.max_steps=5", f"hydra.run.dir={tmp_path}/single"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = torchrun([*BASE, "trainer.max_steps=5", f"hydra.run.dir={tmp_path}/ddp"], cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = model_state(tmp_path / "single"), model_state(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)  # summation order differs
    # validation is reduced over both ranks' shards: the same accuracy as one process on the whole set
    sa = json.loads((tmp_path / "single" / "summary.json").read_text())
    sb = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert sb["val/acc"] == pytest.approx(sa["val/acc"], abs=2 / 359)  # at most a borderline sample flips
    assert sb["val/loss"] == pytest.approx(sa["val/loss"], rel=1e-3)


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_one_run_directory_with_rank_zero_files(tmp_path):
    proc = torchrun([*BASE, "trainer.max_steps=4"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / ".hydra" / "config.yaml").is_file() and not list((run / ".hydra").glob("attempt_*"))
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # written once, by rank 0
    log = (run / "train.log").read_text()
    assert log.count("model MLP") == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.suffix == ".pt")[:1] == ["best.pt"]


OVERFLOW_MODEL = textwrap.dedent("""
    import os
    import torch
    from torch import nn

    class OverflowOnRank1(nn.Module):
        '''An MLP whose forward overflows fp16 on rank 1 only, at its 3rd training call; it logs a
        checksum of its weights each call so the test can see both ranks hold the same weights.'''

        def __init__(self, num_classes, log_dir):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, num_classes))
            self.calls, self.log_dir = 0, log_dir

        def forward(self, x):
            rank = int(os.environ.get("RANK", 0))
            if self.training:
                self.calls += 1
                with open(os.path.join(self.log_dir, f"rank{rank}.txt"), "a") as f:
                    f.write(f"{self.calls} {sum(p.double().sum().item() for p in self.parameters()):.12f}\\n")
            out = self.net(x)
            if self.training and rank == 1 and self.calls == 3:
                out = out * 1e6  # beyond fp16: inf on this rank only
            return out
""")


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_overflow_on_one_rank_is_skipped_on_both(tmp_path):
    (tmp_path / "overflowmodel.py").write_text(OVERFLOW_MODEL)
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "overflow.yaml").write_text(
        f"_target_: overflowmodel.OverflowOnRank1\nnum_classes: ${{dataset.num_classes}}\nlog_dir: {tmp_path}\n")
    proc = torchrun(["--config-dir", str(tmp_path / "conf"), *[a for a in BASE if not a.startswith("model=")],
                     "model=overflow", "precision=dynamic", "trainer.max_steps=5", f"hydra.run.dir={tmp_path}/run"],
                    cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0]
    assert rows[2]["loss_scale"] == 2.0**15
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()  # identical weights throughout
    lines = (tmp_path / "rank0.txt").read_text().splitlines()
    assert lines[2].split()[1] == lines[3].split()[1]  # step 3 changed nothing on either rank


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_torchrun_resume_continues_the_run(tmp_path):
    first = torchrun([*BASE, "trainer.max_steps=4", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun([*BASE, "trainer.max_steps=7", "resume=auto", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    rows = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows == [1, 2, 3, 4, 5, 6, 7]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 7


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_batch_not_divisible_by_world_size_fails_with_one_line(tmp_path):
    proc = torchrun(
        [*BASE, "trainer.batch_size=33", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "trainer.batch_size=33 (the global batch) is not divisible by the 2 processes" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_nccl_without_gpus_fails_with_one_line(tmp_path):
    proc = torchrun(
        [*BASE, "trainer.dist_backend=nccl", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "trainer.dist_backend=nccl needs CUDA GPUs" in proc.stderr


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_mismatched_configs_across_ranks_fail(tmp_path):
    # a rank-dependent value through an environment interpolation: each rank resolves its own seed
    proc = torchrun(
        [*BASE, "trainer.max_steps=2", "seed=${oc.env:RANK}", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "ranks run different configs" in proc.stderr


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_fp16_gradient_compression_trains(tmp_path):
    proc = torchrun([*BASE, "trainer.max_steps=3", "trainer.grad_compression=fp16", f"hydra.run.dir={tmp_path}/run"],
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_bf16_compression_on_gloo_is_refused(tmp_path):
    proc = torchrun([*BASE, "trainer.max_steps=2", "trainer.grad_compression=bf16", f"hydra.run.dir={tmp_path}/run"],
                    cwd=tmp_path)
    assert proc.returncode != 0
    assert "grad_compression=bf16 needs the nccl backend" in proc.stderr


@pytest.mark.slow
def test_fsdp_trains_and_round_trips_a_sharded_checkpoint(tmp_path):
    """FSDP2 with MixedPrecisionPolicy(bf16 params, fp32 reduce): sharded checkpoints through
    torch.distributed.checkpoint (.metadata commits), then torchrun resume continues the run."""
    args = [*BASE, "trainer.strategy=fsdp", "precision=bf16", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            f"hydra.run.dir={tmp_path}/run"]
    first = torchrun([*args, "trainer.max_steps=4"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    sharded = tmp_path / "run" / "checkpoints" / "sharded"
    assert sorted(p.name for p in sharded.iterdir()) == ["step_2", "step_4"]
    for step in ("step_2", "step_4"):
        files = {p.name for p in (sharded / step).iterdir()}
        assert ".metadata" in files and "extra.pt" in files and len([f for f in files if f.endswith(".distcp")]) == 2
    second = torchrun([*args, "trainer.max_steps=6", "resume=auto"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    rows = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows == [1, 2, 3, 4, 5, 6]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["val/acc"] > 0.3  # learning (chance is 0.1)

    straight = torchrun([*BASE, "trainer.strategy=fsdp", "precision=bf16", "trainer.max_steps=6",
                         f"hydra.run.dir={tmp_path}/straight"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    ref = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["val/loss"] == pytest.approx(ref["val/loss"], rel=1e-5)  # the resumed run is the same run


@pytest.mark.slow
def test_fsdp_needs_torchrun(tmp_path):
    proc = run_cli(
        [*BASE, "trainer.strategy=fsdp", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path
    )
    assert proc.returncode == 2 and "trainer.strategy=fsdp shards the model across processes" in proc.stderr


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_fsdp_with_fp16_loss_scaling_trains(tmp_path):
    proc = torchrun(
        [
            *BASE,
            "trainer.strategy=fsdp",
            "precision=dynamic",
            "trainer.max_steps=3",
            "trainer.clip_grad_norm=1.0",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["status"] == "completed"
        and summary["compute_dtype"] == "fp16"
        and summary["final_loss_scale"] == 2.0**16
    )
    assert summary["world_size"] == 2


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_a_task_with_several_networks_is_refused_at_start_under_torchrun(tmp_path):
    """The GAN steps its two networks separately, which would bypass DDP's all-reduce: one line at start,
    before the run directory changes."""
    proc = torchrun(["model=dcgan", "trainer.device=cpu", "trainer.batch_size=32", "trainer.max_steps=2",
                     f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "task gan steps 2 networks separately" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # a torchrun or multi-run case: CI's slow suite runs it
def test_overflow_trace_on_rank_zero_does_not_reach_the_other_rank(tmp_path):
    """Diagnostics run on rank 0 only: its overflow trace (a forward and backward) must not start a gradient
    all-reduce that rank 1 never joins (gloo aborted with a collective mismatch)."""
    proc = torchrun([*[a for a in BASE if a != "diagnostics=off"], "precision=static", "precision.loss_scale.init=1e38",
                     "diagnostics.trace_after=2", "trainer.max_steps=4", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    # every step overflows, so the run applied no update: it ends failed with one line (not `completed`), after
    # writing its records on both ranks' behalf
    assert proc.returncode == 1 and "no update was applied: all 4 steps were skipped" in proc.stderr, proc.stderr[
        -3000:
    ]
    traces = [r for r in read_jsonl(tmp_path / "run" / "diagnostics.jsonl") if r.get("event") == "trace"]
    assert len(traces) == 1 and traces[0]["step"] == 2 and traces[0]["backward"] is not None
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["skipped"] == 1 for r in rows)
