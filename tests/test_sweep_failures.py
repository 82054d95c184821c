"""A sweep job that fails in an unexpected way (issue 37 case 13, the part that is not fp8's): it keeps its
records like any failed job, the sweep goes on and says how many failed, and mptrain-compare lists it; a job
folder without records is named, never dropped silently."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from .test_hostile import cli

QUICK = ["model.width=4", "trainer.max_steps=2", "trainer.batch_size=32", "trainer.device=cpu",
         "trainer.progress_bar=false", "trainer.tensorboard=false", "checkpoint.enabled=false", "diagnostics=off"]


@pytest.mark.slow
def test_an_unexpected_error_in_a_sweep_job_is_recorded_and_compared(tmp_path, monkeypatch, caplog):
    from mptrain.tools.compare import main as compare
    from mptrain.train import recipe

    real_build = recipe.build

    def build(cfg, *args, **kwargs):  # a library's TypeError during set-up, in the first job only
        if cfg.seed == 0:
            raise TypeError("unsupported operand type(s) for *: 'Parametrization' and 'Float8'")
        return real_build(cfg, *args, **kwargs)

    monkeypatch.setattr(recipe, "build", build)
    sweep = tmp_path / "multi"
    code, err = cli(["-m", "seed=0,1", *QUICK, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert code == 1, err
    line = (f"mptrain: error: unexpected TypeError: unsupported operand type(s) for *: 'Parametrization' and "
            f"'Float8'; the traceback is in {sweep / '0' / 'train.log'}")
    assert line in err.splitlines() and "Traceback" not in err
    assert "mptrain: error: 1 of 2 jobs failed: 0: unexpected TypeError" in err
    statuses = {job: json.loads((sweep / job / "summary.json").read_text())["status"] for job in ("0", "1")}
    assert statuses == {"0": "failed", "1": "completed"}  # the sweep went on after the failure
    assert (sweep / "0" / ".hydra" / "overrides.yaml").read_text().splitlines()[0] == "- seed=0"
    log = (sweep / "0" / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and log.rstrip().endswith("and 'Float8'")

    monkeypatch.undo()
    (sweep / "2").mkdir()  # a job killed before anything was recorded
    mptrain_log = logging.getLogger("mptrain")
    mptrain_log.addHandler(caplog.handler)  # Hydra's logging set-up took pytest's handler off the root logger
    try:
        compare([str(sweep), "--out", str(tmp_path / "cmp")])
    finally:
        mptrain_log.removeHandler(caplog.handler)
    assert f"{sweep / '2'} is a job of the sweep without records" in caplog.text
    with open(tmp_path / "cmp" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["completed"], r["status"]) for r in rows] == [("1/2", "failed (0)")], rows  # seed 0 failed


def test_compare_names_a_sweep_job_without_records(tmp_path, caplog):
    from mptrain.tools.compare import main as compare

    sweep = tmp_path / "multi"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (sweep / "0" / "summary.json").write_text(json.dumps({"status": "completed", "precision": "amp", "seed": 0,
                                                          "val/acc": 0.5}))
    (sweep / "1").mkdir()  # killed before mptrain recorded anything
    with caplog.at_level(logging.WARNING, logger="mptrain"):
        compare([str(sweep), "--out", str(tmp_path / "cmp")])
    assert f"{sweep / '1'} is a job of the sweep without records (no .hydra/overrides.yaml)" in caplog.text
    assert str(sweep / "0") not in caplog.text
