"""hparams_search=optuna: a tiny study through the CLI, resumed from its SQLite file, read by mptrain-compare."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mptrain.cli.register import sweep_direction

from .conftest import compose_config, run_cli

QUICK = ["model=mlp", "model.width=16", "model.depth=2", "trainer.max_steps=20", "trainer.eval_every=20",
         "trainer.device=cpu", "trainer.progress_bar=false", "trainer.tensorboard=false", "checkpoint.enabled=false",
         "diagnostics=off"]
# learning rate searched; weight decay and loss scale fixed, so the study is about the learning rate
STUDY = ["-m", "hparams_search=optuna", "optimizer.weight_decay=0", "precision.loss_scale.init=1024", *QUICK]
BAD_LR = 1e-4


def test_direction_follows_the_metric():
    assert [sweep_direction(m) for m in ("val/acc", "val/loss", "val/ppl", "train_loss")] == \
        ["maximize", "minimize", "minimize", "minimize"]


def test_preset_composes_on_static_precision():
    cfg = compose_config(["hparams_search=optuna"])
    assert cfg.precision.mode == "static" and cfg.optimized_metric == "val/acc"


def test_missing_sweeper_plugin_is_one_line(tmp_path):
    code = ("import sys; sys.modules['hydra_plugins.hydra_optuna_sweeper'] = None; from mptrain.cli.main import main; "
            "sys.argv = ['mptrain', '-m', 'hparams_search=optuna']; main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("mptrain: error: hparams_search=optuna needs hydra-optuna-sweeper: "
                                   "pip install mptrain[optuna]")


def trials(sweep: Path) -> list:
    import optuna

    return optuna.load_study(study_name="mptrain", storage=f"sqlite:///{sweep}/optuna.db").trials


@pytest.mark.slow
def test_study_beats_a_bad_learning_rate_and_resumes(tmp_path):
    pytest.importorskip("optuna")
    bad = run_cli([*QUICK, "precision=static", "precision.loss_scale.init=1024", "optimizer.weight_decay=0",
                   f"optimizer.lr={BAD_LR}", f"hydra.run.dir={tmp_path}/bad"], cwd=tmp_path)
    assert bad.returncode == 0, bad.stderr
    bad_acc = json.loads((tmp_path / "bad" / "summary.json").read_text())["val/acc"]

    sweep = tmp_path / "sweep"
    proc = run_cli([*STUDY, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    done = trials(sweep)
    assert [t.number for t in done] == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in done)
    for t in done:  # job <n> ran trial <n>; the objective is that job's val/acc
        job = sweep / str(t.number)
        assert f"optimizer.lr={t.params['optimizer.lr']}" in yaml.safe_load(
            (job / ".hydra" / "overrides.yaml").read_text()
        )
        assert t.value == json.loads((job / "summary.json").read_text())["val/acc"]
    best = max(done, key=lambda t: t.value)
    assert best.value > bad_acc + 0.1 and best.params["optimizer.lr"] > BAD_LR
    first = (sweep / "0" / "summary.json").read_text()

    # the same sweep directory again: the study goes on, into new job directories
    proc = run_cli([*STUDY, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    done = trials(sweep)
    assert [t.number for t in done] == [0, 1, 2, 3]
    assert done[3].params != done[0].params  # not the seeded sampler's first proposal again
    assert (sweep / "0" / "summary.json").read_text() == first
    assert json.loads((sweep / "3" / "summary.json").read_text())["val/acc"] == done[3].value

    # mptrain-compare: one row per trial, the study's objective beside the summaries, best first
    out = subprocess.run([sys.executable, "-m", "mptrain.tools.compare", str(sweep), "--out", str(tmp_path / "cmp")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    table = list(csv.DictReader(open(tmp_path / "cmp" / "comparison.csv")))
    assert sorted(int(r["trial"]) for r in table) == [0, 1, 2, 3]
    for r in table:
        assert (
            float(r["objective"])
            == pytest.approx(done[int(r["trial"])].value)
            == pytest.approx(float(r["val/acc mean"]))
        )
    assert int(table[0]["trial"]) == max(done, key=lambda t: t.value).number
