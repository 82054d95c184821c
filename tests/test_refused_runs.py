"""A run refused at set-up prints its one-line error and nothing that describes a run: no "run directory: ..."
line, no precision or fp8 set-up lines, and no directory (mptrain/run/directory.py's HeldLines)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from mptrain.config import validate
from mptrain.errors import MptrainError
from mptrain.run.directory import RunDir
from mptrain.train.recipe import run

from .conftest import REPO, TINY, compose_config, run_cli

MLP = ["model=mlp", "model.width=64", "model.depth=2", "trainer.max_steps=2", "scheduler.warmup_steps=0"]
# the lines a committed run logs while it is set up (the CLI's, the recipe's, the precision plan's)
SET_UP = ("run directory", "precision=", "precision plan", "fp8:", "model MLP")
FP8_BAD_MONITOR = ["precision=fp8", "trainer.early_stopping.enabled=true", "trainer.early_stopping.monitor=val/nope"]


def job(tmp_path, overrides: list[str], caplog) -> list[str]:
    """The recipe inside a RunDir as the CLI runs it (Hydra made the directory); the mptrain lines logged."""
    cfg = compose_config([*TINY, *MLP, *overrides])
    validate(cfg)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    caplog.set_level(logging.INFO, logger="mptrain")
    with RunDir(run_dir) as held:
        logging.getLogger("mptrain").info("run directory: %s", run_dir)
        run(cfg, held)
    return [r.getMessage() for r in caplog.records if r.name.startswith("mptrain")]


def test_fp8_set_up_lines_wait_for_the_checks(tmp_path, caplog):
    with pytest.raises(MptrainError, match="early_stopping.monitor='val/nope' is not a metric"):
        job(tmp_path, FP8_BAD_MONITOR, caplog)
    lines = [r.getMessage() for r in caplog.records]
    assert not [m for m in lines if m.startswith(SET_UP)], lines
    assert os.listdir(tmp_path / "run") == []  # the lock is gone too: the CLI removes the empty directory

    caplog.clear()
    (tmp_path / "ok").mkdir()
    ok = job(tmp_path / "ok", ["precision=fp8"], caplog)
    info = [r.getMessage() for r in caplog.records if r.name.startswith("mptrain") and r.levelno == logging.INFO]
    assert info[0].startswith("run directory: ")  # committed: every set-up line, in the order logged (warnings,
    # such as fp8's emulation on a CPU, are shown at once)
    for start in SET_UP:
        assert any(m.startswith(start) for m in ok), start


def test_a_warning_still_reaches_the_user_of_a_refused_run(tmp_path, caplog):
    with pytest.raises(MptrainError, match="val/nope"):
        job(tmp_path, [*FP8_BAD_MONITOR, "scheduler.warmup_steps=20"], caplog)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("scheduler.warmup_steps=20 covers more than half") for m in warned)


def refused_cleanly(proc: subprocess.CompletedProcess, run_dir, error: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"mptrain: error: {error}")
    said = proc.stdout + proc.stderr
    assert [line for line in said.splitlines() if "][mptrain" in line and "[WARNING]" not in line] == [], said
    assert "run directory" not in said
    assert os.listdir(run_dir.parents[2]) == []  # outputs/<date>/<run>: none of the three is left


@pytest.mark.slow
def test_a_rule_matching_nothing_refused_from_the_cli(tmp_path):
    run_dir = tmp_path / "outputs" / "2026-01-01" / "run"
    proc = run_cli([*TINY, *MLP, "precision=bf16", "precision.layers={nothing: fp32}", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path)
    refused_cleanly(proc, run_dir, "precision.layers: nothing matches no module with parameters")


@pytest.mark.slow
def test_a_scheduler_failing_within_the_run_refused_from_the_cli(tmp_path):
    """StepLR(step_size=0) would raise ZeroDivisionError at the first step, after the run directory is written."""
    run_dir = tmp_path / "outputs" / "2026-01-01" / "run"
    proc = run_cli([*TINY, *MLP, "scheduler=none", "scheduler._target_=torch.optim.lr_scheduler.StepLR",
                    "scheduler.kwargs={step_size: 0}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    refused_cleanly(proc, run_dir, "scheduler._target_=torch.optim.lr_scheduler.StepLR fails at step 1 of the run's 2: "
                                   "ZeroDivisionError")


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "error"), [
    (FP8_BAD_MONITOR, "trainer.early_stopping.monitor='val/nope' is not a metric"),
    (["precision=bf16", "precision.fp8.emulate=false", "precision.layers={head: fp8}"],
     "precision.fp8.emulate=false needs fp8 kernels"),
])
def test_fp8_refused_from_the_cli(tmp_path, overrides, error):
    run_dir = tmp_path / "outputs" / "2026-01-01" / "run"
    proc = run_cli([*TINY, *MLP, *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    refused_cleanly(proc, run_dir, error)


@pytest.mark.slow
def test_fp8_without_torchao_refused_from_the_cli(tmp_path):
    code = ("import sys; sys.modules['torchao'] = None; sys.modules['torchao.float8'] = None; "
            "from mptrain.cli.main import main; main()")
    run_dir = tmp_path / "outputs" / "2026-01-01" / "run"
    proc = subprocess.run([sys.executable, "-c", code, *TINY, *MLP, "precision=fp8", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    refused_cleanly(proc, run_dir, "precision=fp8 needs torchao")
