"""Multirun sweeps, the comparison table, experiment presets and launchers."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import compose_config, run_cli

QUICK = ["trainer.max_steps=6", "trainer.device=cpu", "model.width=4", "trainer.tensorboard=false",
         "trainer.progress_bar=false", "checkpoint.enabled=false", "diagnostics.every=3"]


def summaries(sweep: Path) -> dict[Path, dict]:
    return {p.parent: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("sweep")
    proc = run_cli(["-m", "precision=fp32,bf16", "optimizer.lr=0.05,1e30", "seed=0,1", *QUICK,
                    f"hydra.sweep.dir={root}/multi"], cwd=root, timeout=900)
    return root / "multi", proc


@pytest.mark.slow
def test_multirun_gives_one_directory_per_job_and_reports_the_failures(sweep):
    sweep_dir, proc = sweep
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 8
    s = summaries(sweep_dir)
    assert len(s) == 8
    statuses = {tuple(yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())): v["status"] for d, v in s.items()}
    for overrides, status in statuses.items():
        assert status == ("failed" if "optimizer.lr=1e+30" in overrides else "completed"), overrides
    assert proc.returncode != 0  # Hydra reports the failed jobs at the end, after running every job
    assert "loss is nan" in proc.stderr or "loss is inf" in proc.stderr


@pytest.mark.slow
def test_compare_numbers_equal_those_from_the_summaries(sweep, tmp_path):
    sweep_dir, _ = sweep
    proc = subprocess.run(
        [sys.executable, "-m", "mptrain.tools.compare", str(sweep_dir), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "COLUMNS": "250"},
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["group"]: r for r in csv.DictReader(open(tmp_path / "comparison.csv"))}
    # overrides shared by every job (the QUICK settings) are left out of the group names
    assert set(rows) == {"precision=fp32 optimizer.lr=0.05", "precision=bf16 optimizer.lr=0.05",
                         "precision=fp32 optimizer.lr=1e+30", "precision=bf16 optimizer.lr=1e+30"}

    def acc(prec: str, lr: str) -> list[float]:
        out = []
        for d, v in summaries(sweep_dir).items():
            ov = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
            if f"precision={prec}" in ov and f"optimizer.lr={lr}" in ov:  # noqa: B023
                out.append(v["val/acc"])
        return out

    fp32, bf16 = acc("fp32", "0.05"), acc("bf16", "0.05")
    assert len(fp32) == len(bf16) == 2
    r = rows["precision=bf16 optimizer.lr=0.05"]
    assert float(r["val/acc mean"]) == pytest.approx(statistics.fmean(bf16))
    assert float(r["val/acc std"]) == pytest.approx(statistics.stdev(bf16))
    assert float(r["diff vs fp32"]) == pytest.approx(statistics.fmean(bf16) - statistics.fmean(fp32))
    assert r["seeds"] == "0,1" and r["completed"] == "2/2"
    failed = rows["precision=bf16 optimizer.lr=1e+30"]
    assert failed["completed"] == "0/2" and "failed" in failed["status"]
    assert math.isnan(float(failed["val/acc mean"]))
    assert "failed" in proc.stdout
    assert (tmp_path / "comparison.md").read_text().count("\n") == 2 + 4
    from PIL import Image

    with Image.open(tmp_path / "comparison.png") as img:
        assert img.size[0] > 800


@pytest.mark.slow
def test_compare_accepts_a_list_of_run_directories(sweep, tmp_path):
    sweep_dir, _ = sweep
    dirs = sorted(str(p.parent) for p in sweep_dir.glob("*/summary.json"))[:2]
    proc = subprocess.run([sys.executable, "-m", "mptrain.tools.compare", *dirs, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list(csv.DictReader(open(tmp_path / "comparison.csv")))) >= 1


def test_compare_on_a_directory_without_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mptrain.tools.compare", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "no runs under" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("preset", ["paper_parity", "loss_scale_ablation", "master_weights_ablation", "lm_parity"])
def test_presets_compose_and_declare_their_sweeps(preset):
    cfg = compose_config([f"experiment={preset}"])
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True)
    raw = OmegaConf.load(Path(__file__).parent.parent / "conf" / "experiment" / f"{preset}.yaml")
    params = raw.hydra.sweeper.params
    assert "seed" in params and len(str(params.seed).split(",")) == 3
    if preset == "lm_parity":
        assert cfg.model._target_.endswith("RecurrentLM") and Path(cfg.dataset.path).is_file()
    else:
        assert cfg.model._target_ == "mptrain.library.models.vision.MLP"


@pytest.mark.parametrize(
    "arm", ["fp32", "noscale", "static_1", "static_8", "static_128", "static_1024", "static_32768", "dynamic"]
)
def test_loss_scale_arms_select_the_right_scaling(arm):
    cfg = compose_config(["experiment=loss_scale_ablation", f"+arm={arm}"])
    mode, _, scale = arm.partition("_")
    assert cfg.precision.mode == mode
    if scale:
        assert cfg.precision.loss_scale.init == float(scale) and cfg.precision.loss_scale.kind == "static"


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "precision=fp32,bf16", *QUICK,
                    f"hydra.sweep.dir={tmp_path}/multi", "hydra.launcher.timeout_min=10"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summaries(tmp_path / "multi")
    assert sorted(v["precision"] for v in s.values()) == ["bf16", "fp32"]
    assert all(v["status"] == "completed" for v in s.values())


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "precision=fp32,bf16", *QUICK,
                    f"hydra.sweep.dir={tmp_path}/multi"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summaries(tmp_path / "multi")
    assert len(s) == 2 and all(v["status"] == "completed" for v in s.values())


@pytest.mark.slow
def test_a_sweep_ends_by_printing_its_directory_and_the_compare_command(tmp_path):
    proc = run_cli(["-m", "precision=fp32,bf16", *QUICK, "trainer.max_steps=2", "diagnostics=off",
                    "hydra.sweep.dir=multirun/my sweep"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["sweep directory: multirun/my sweep",
                                             "compare its runs: mptrain-compare 'multirun/my sweep'"]
    # the printed command works as printed, from where the sweep was started
    command = proc.stdout.splitlines()[-1].split(": ", 1)[1]
    done = subprocess.run(command.replace("mptrain-compare", f"{sys.executable} -m mptrain.tools.compare", 1),
                          shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "multirun" / "my sweep" / "comparison.md").is_file()
