"""The `mptrain` command end to end: run directory contract, custom models, installed package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO, read_jsonl, run_cli, train

SUMMARY_KEYS = {"status", "precision", "compute_dtype", "steps", "epochs", "skipped_steps", "final_loss_scale",
                "train_loss", "val/acc", "val/loss", "samples_per_s", "peak_memory_mb", "wall_s"}


@pytest.mark.slow
def test_cli_run_writes_the_run_directory_contract(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["trainer.max_steps=12", "trainer.log_every=3", "trainer.eval_every=6", "trainer.device=cpu",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        assert (run_dir / ".hydra" / name).is_file()
    assert "model SmallCNN" in (run_dir / "train.log").read_text()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
    for r in train_rows:
        assert {"step", "epoch", "loss", "lr", "loss_scale", "skipped"} <= r.keys()
    val_rows = [r for r in rows if "val/acc" in r]
    assert [r["step"] for r in val_rows] == [6, 12]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert summary["val/acc"] == val_rows[-1]["val/acc"]
    assert 0.0 <= summary["val/acc"] <= 1.0


@pytest.mark.slow
def test_two_runs_in_the_same_second_get_different_directories(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "mptrain", "trainer.max_steps=1", "trainer.device=cpu",
                               "trainer.tensorboard=false"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 2
    assert all((r / "summary.json").is_file() for r in runs)


@pytest.mark.slow
def test_custom_target_model_from_an_outside_config_dir(tmp_path):
    """A user's own model class: a YAML with _target_ in their config dir, their module on PYTHONPATH."""
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class TinyMLP(nn.Module):
            def __init__(self, num_classes, in_channels, hidden, image_pixels):
                super().__init__()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_pixels, hidden),
                                         nn.ReLU(), nn.Linear(hidden, num_classes))
                self.hidden = hidden

            def forward(self, x):
                return self.net(x)
    """))
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "tiny_mlp.yaml").write_text(textwrap.dedent("""
        _target_: mymodels.TinyMLP
        num_classes: ${dataset.num_classes}
        in_channels: ${dataset.channels}
        hidden: 17
        image_pixels: 64
    """))
    run_dir = tmp_path / "run"
    proc = run_cli(["--config-dir", str(tmp_path / "myconf"), "model=tiny_mlp", "trainer.max_steps=20",
                    "trainer.device=cpu", "trainer.tensorboard=false", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "TinyMLP" in (run_dir / "train.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["model"] == "mymodels.TinyMLP"
    assert summary["val/acc"] > 0.5  # an MLP on digits learns well within 20 steps


@pytest.mark.parametrize("mode", ["fp32", "amp", "dynamic", "static", "bf16", "master", "noscale", "nomaster"])
def test_two_step_smoke_run_per_precision(tmp_path, mode):
    summary, run_dir = train(tmp_path, [f"precision={mode}", "trainer.max_steps=2", "trainer.log_every=1",
                                        "model.width=8"])
    assert summary["status"] == "completed"
    assert summary["steps"] == 2 and summary["precision"] == mode
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]


def test_default_run_reaches_95_percent_on_digits(tmp_path):
    """`mptrain` with no overrides: small CNN, digits, precision=amp (bf16 on this CPU)."""
    summary, _ = train(tmp_path, [])
    assert summary["status"] == "completed" and summary["precision"] == "amp"
    assert summary["val/acc"] >= 0.95


@pytest.mark.slow
def test_installed_wheel_finds_its_configs_from_any_directory(tmp_path):
    """A plain (non-editable) install ships conf/ inside the package: run it from an unrelated cwd."""
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                            "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    assert (target / "mptrain" / "conf" / "config.yaml").is_file()
    assert (target / "mptrain" / "conf" / "precision" / "amp.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", "import mptrain.cli.main as c; print(c.__file__); c.main()",
                           "trainer.max_steps=5", "trainer.device=cpu"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout  # the installed copy ran, not the source tree
    summaries = list((elsewhere / "outputs").glob("*/*/summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["steps"] == 5
    # --help from the wheel: its own template, groups and debug presets, schemas hidden
    proc = subprocess.run([sys.executable, "-c", "import mptrain.cli.main as c; c.main()", "--help"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mptrain") and "anomaly, fast, overfit, profile" in proc.stdout
    assert "_schema" not in proc.stdout


def test_building_the_wheel_is_quiet_and_ships_every_config(tmp_path):
    """`make install` printed ~800 lines of setuptools warnings ("Package 'mptrain.conf.arm' is absent from the
    `packages` configuration", issue 37 case 22): the wheel and the editable wheel build without one, and the
    wheel still holds every file of conf/ (as mptrain/conf/) and every module."""
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside pyproject.toml
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("conf", "mptrain", "hydra_plugins"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    code = ("import sys\nfrom setuptools import build_meta as b\n"
            "print('WHEEL', b.build_wheel(sys.argv[1]))\nprint('EDITABLE', b.build_editable(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code, str(out)], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "is absent from the `packages` configuration" not in log and "Warning:" not in log, log[-3000:]
    wheel = out / next(ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("WHEEL "))
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"mptrain/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    modules = {str(p.relative_to(REPO)) for d in ("mptrain", "hydra_plugins") for p in (REPO / d).rglob("*.py")}
    assert len(configs) > 50 and configs <= names, sorted(configs - names)[:5]
    assert modules <= names, sorted(modules - names)[:5]


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("0", "0")])
def test_the_cli_turns_on_huge_pages_for_cpu_tensors_unless_told_not_to(tmp_path, given, expected):
    # PyTorch's allocator reads THP_MEM_ALLOC_ENABLE once, at its first allocation: the CLI sets it at start,
    # before torch is imported; `import mptrain` (and the CLI module) change nothing
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    code = ("import os, sys, mptrain, mptrain.cli.main as cli\n"
            "assert 'torch' not in sys.modules, 'importing the CLI imported torch'\n"
            "assert os.environ.get('THP_MEM_ALLOC_ENABLE') == (None if len(sys.argv) < 2 else sys.argv[1])\n"
            "sys.argv = ['mptrain', '--cfg', 'job']\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(os.environ['THP_MEM_ALLOC_ENABLE'])")
    argv = [sys.executable, "-c", code] + ([given] if given is not None else [])
    proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == expected
