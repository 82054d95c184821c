"""precision=auto across processes (issue 36): 2 CPU ranks under torchrun (gloo). Each rank measures its own
shard of the probe; the figures are reduced over the ranks before a decision, so every rank applies one plan.

The net is tests/judge_nets.py's Outlier (a constant 1e8 channel into the middle layer mid1), with the channel
on rank 1 only: rank 0's own figures would put mid1 in fp8, so only the reduction keeps the ranks' plans one.
Each rank writes, at every training forward, which class and format each layer computes in: the proof that the
ranks' plans are identical at every step."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO, read_jsonl, run_cli
from .test_distributed import torchrun
from .test_judge import CASE2

RANK_OUTLIER = textwrap.dedent("""
    import json
    import os

    from tests.judge_nets import Outlier

    LAYERS = ("inp", "mid1", "mid2", "head")


    def describe(m):
        fmt = getattr(m, "fmt", None)
        own = "forward" in vars(m)  # a per-layer autocast wrapper
        return type(m).__name__ + (f":{fmt.name}" if fmt is not None else "") + (":own" if own else "")


    class RankOutlier(Outlier):
        '''Outlier whose 1e8 channel reaches mid1 on rank `outlier_rank` only; every training forward appends
        the layers' classes and formats to <log_dir>/rank<r>.jsonl.'''

        def __init__(self, num_classes, log_dir, outlier_rank=1, after=0, **_):
            super().__init__(num_classes=num_classes, after=after)
            self.rank, self.log_dir = int(os.environ.get("RANK", 0)), log_dir
            if self.rank != outlier_rank:
                self.massive.value = 0.0

        def forward(self, x):
            if self.training:
                with open(os.path.join(self.log_dir, f"rank{self.rank}.jsonl"), "a") as f:
                    f.write(json.dumps({n: describe(getattr(self, n)) for n in LAYERS}) + "\\n")
            return super().forward(x)
""")

# fp8 = torchao's recipe (emulated on CPU); objective=bits: the fewest bits that hold (timing is not what is
# tested); dim_multiple=1 lets mid1 (33 inputs) take fp8, so that measurement, not a shape, keeps it out
AUTO = ["trainer.device=cpu", "trainer.batch_size=32", "trainer.tensorboard=false", "trainer.progress_bar=false",
        *[a for a in CASE2 if not a.startswith("model._target_")], "model._target_=rankoutlier.RankOutlier",
        "precision=auto", "precision.auto.formats=[fp8,bf16]", "precision.auto.objective=bits",
        "precision.fp8.dim_multiple=1", "precision.auto.probe_steps=3", "precision.auto.recheck_every=2",
        "trainer.log_every=1", "diagnostics=off"]


def setup(tmp_path: Path, log_dir: Path) -> tuple[list[str], dict]:
    (tmp_path / "rankoutlier.py").write_text(RANK_OUTLIER)
    log_dir.mkdir(parents=True)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return [*AUTO, f"+model.log_dir={log_dir}"], env


def per_rank(log_dir: Path) -> tuple[list[dict], list[dict]]:
    return read_jsonl(log_dir / "rank0.jsonl"), read_jsonl(log_dir / "rank1.jsonl")


def plan_of(run: Path) -> dict:
    return json.loads((run / "precision_plan.json").read_text())


@pytest.mark.slow  # torchrun
def test_ddp_plans_once_for_both_ranks_and_resumes_on_one(tmp_path):
    """The outlier reaches mid1 on rank 1 only. Alone, rank 0 puts mid1 in fp8 (the single-process run below);
    under DDP both ranks keep it in bf16 and put mid2 in fp8, from step 4 on, at every step alike. Resumed on one
    process, the run keeps its plan and logs the change of world size."""
    args, env = setup(tmp_path, tmp_path / "alone")
    alone = run_cli([*args, "trainer.max_steps=4", "checkpoint.enabled=false", f"hydra.run.dir={tmp_path}/alone_run"],
                    cwd=tmp_path, env=env)  # RANK unset: rank 0, no outlier
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert plan_of(tmp_path / "alone_run")["history"][0]["formats"]["mid1"] == "fp8"

    args, env = setup(tmp_path, tmp_path / "ddp")
    run = tmp_path / "run"
    proc = torchrun([*args, "trainer.max_steps=5", f"hydra.run.dir={run}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = plan_of(run)
    (made,) = plan["history"]
    assert made["step"] == 3 and made["ranks"] == 2
    assert made["formats"]["mid1"] == "bf16" and made["formats"]["mid2"] == "fp8"
    assert made["errors"]["mid1"]["fp8"] > 0.9  # rank 1's figure: the worst over the ranks
    rank0, rank1 = per_rank(tmp_path / "ddp")
    assert len(rank0) == 5 and rank0 == rank1  # one plan on both ranks at every step
    assert rank0[2]["mid2"] == "Linear" and rank0[3]["mid2"] == "Float8Linear" and rank0[3]["mid1"] == "Linear"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["auto_ranks"] == 2 and summary["auto_plan"] == made["formats"]

    one = run_cli([*args, "trainer.max_steps=7", "resume=auto", f"hydra.run.dir={run}"], cwd=tmp_path, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["world_size"] == 1 and summary["auto_plan"] == made["formats"]
    assert "plan_changed_on_resume" not in summary and plan_of(run)["history"] == [made]
    (change,) = [e for e in summary["events"] if e["event"] == "world_size_change"]
    assert (change["step"], change["old"], change["new"]) == (5, 2, 1)
    assert "the checkpoint was written by 2 processes and this run has 1" in (run / "train.log").read_text()
    resumed = read_jsonl(tmp_path / "ddp" / "rank0.jsonl")[5:]
    assert len(resumed) == 2 and all(r == rank0[4] for r in resumed)  # the plan, restored before the first step


@pytest.mark.slow  # torchrun
def test_ddp_demotion_on_drift_seen_by_one_rank_is_taken_by_both(tmp_path):
    """The channel appears after 5 training forwards, on rank 1 only: the probe puts mid1 in fp8 on both ranks;
    a re-check (every 2 steps) finds rank 1's error and both ranks demote mid1 to bf16 at the same step."""
    args, env = setup(tmp_path, tmp_path / "logs")
    run = tmp_path / "run"
    proc = torchrun([*args, "+model.after=5", "trainer.max_steps=8", "checkpoint.enabled=false",
                     f"hydra.run.dir={run}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = plan_of(run)
    assert plan["history"][0]["formats"]["mid1"] == "fp8"
    (demote,) = [h for h in plan["history"] if h["event"] == "demote"]
    assert demote["step"] in (6, 8) and demote["ranks"] == 2
    (change,) = demote["changes"]
    assert (change["layer"], change["old"], change["new"]) == ("mid1", "fp8", "bf16") and change["err"] > 0.1
    rank0, rank1 = per_rank(tmp_path / "logs")
    assert len(rank0) == 8 and rank0 == rank1
    assert rank0[demote["step"] - 1]["mid1"] == "Float8Linear"
    if demote["step"] < 8:
        assert rank0[demote["step"]]["mid1"] == "Linear"
