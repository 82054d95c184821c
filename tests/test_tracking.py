"""logger=mlflow: a real run into a local MLflow store, read back through MLflow's own client."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from mptrain.run.tracking import MISSING_MESSAGE

from .conftest import TINY, compose_config, read_jsonl

mlflow = pytest.importorskip("mlflow")

RUN = ["model=mlp", "model.width=8", "model.depth=2", "precision=fp32", "trainer.max_steps=6", "trainer.log_every=2",
       "trainer.eval_every=3", "checkpoint.enabled=false", "diagnostics.every=2"]


@pytest.mark.slow
def test_mlflow_run_holds_the_config_every_metric_row_and_the_summary(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from mptrain.config import validate
    from mptrain.tools.report import main as report
    from mptrain.train.recipe import run

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    cfg = compose_config(TINY + RUN + ["logger=mlflow", f"logger.tracking_uri={uri}",
                                       f"logger.artifact_location={tmp_path}/artifacts", "logger.experiment=t"])
    validate(cfg)
    run_dir = tmp_path / "run"
    summary = run(cfg, run_dir)

    recorded = json.loads((run_dir / "mlflow.json").read_text())
    assert recorded["tracking_uri"] == uri
    client = MlflowClient(tracking_uri=uri)
    mlrun = client.get_run(recorded["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert client.get_experiment(mlrun.info.experiment_id).name == "t"

    # parameters: the resolved config, flattened by hand here
    params = mlrun.data.params
    assert params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert params["model.width"] == "8" and params["precision.mode"] == "fp32"
    assert params["logger.tracking_uri"] == uri
    leaves = []

    def walk(node, prefix=""):
        for k, v in node.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else leaves.append(prefix + k)

    walk(OmegaConf.to_container(cfg, resolve=True))
    assert set(params) == set(leaves)

    # metrics: every metrics.jsonl row, same names, steps and values
    rows = read_jsonl(run_dir / "metrics.jsonl")
    for key in ("loss", "lr", "val/acc", "val/loss"):
        expected = [(r["step"], float(r[key])) for r in rows if r.get(key) is not None]
        history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key))
        assert len(expected) >= 2 and history == expected  # the same float64s

    # the summary: numbers as summary/<key>, strings as tags, the whole file as an artifact
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == summary["status"] == "completed"
    assert mlrun.data.metrics["summary/val/acc"] == pytest.approx(on_disk["val/acc"])
    assert mlrun.data.metrics["summary/steps"] == on_disk["steps"] == 6
    assert mlrun.data.tags["summary.status"] == "completed" and mlrun.data.tags["summary.precision"] == "fp32"
    logged = json.loads(
        open(
            mlflow.artifacts.download_artifacts(
                run_id=mlrun.info.run_id, artifact_path="summary.json", tracking_uri=uri, dst_path=str(tmp_path / "dl")
            )
        ).read()
    )
    assert logged == on_disk

    # mptrain-report attaches its PNGs to the recorded run
    report([str(run_dir)])
    pngs = sorted(p.name for p in (run_dir / "report").glob("*.png"))
    assert len(pngs) == 4
    assert sorted(f.path for f in client.list_artifacts(mlrun.info.run_id, "report")) == [f"report/{n}" for n in pngs]


@pytest.mark.slow
def test_tensorboard_and_mlflow_together(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from mptrain.train.recipe import run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose_config(TINY + RUN + ["trainer.tensorboard=true", "diagnostics=off", "logger=mlflow",
                                       f"logger.tracking_uri={uri}", f"logger.artifact_location={tmp_path}/a"])
    run(cfg, tmp_path / "run")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    run_id = json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"]
    assert len(MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")) == 3  # steps 2, 4, 6


@pytest.mark.slow
def test_missing_mlflow_is_one_line_before_anything_is_written(tmp_path):
    # the extra made unimportable, as on an install without mptrain[mlflow]
    code = ("import sys; sys.modules['mlflow'] = None; from mptrain.cli.main import main; "
            f"sys.argv = ['mptrain', 'logger=mlflow', 'hydra.run.dir={tmp_path}/run', *{TINY + RUN!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"mptrain: error: {MISSING_MESSAGE}"
    assert "Traceback" not in proc.stderr
    written = {p.name for p in (tmp_path / "run").iterdir()} if (tmp_path / "run").exists() else set()
    assert written <= {".hydra", "train.log"}  # Hydra's own records only: no metrics, summary or mlflow.json
    assert not (tmp_path / "mlruns").exists()
