"""The rough edges a new user met in the first hour (issue 27), each with its regression test."""

from __future__ import annotations

import io
import json
import logging
import signal
import warnings

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console

from mptrain.checkpoint.callback import Interrupted
from mptrain.cli.keys import check_override_keys
from mptrain.cli.main import error_line, quiet_third_party_logs
from mptrain.errors import ConfigError, Diverged
from mptrain.precision import Precision
from mptrain.tools.advise import device_note
from mptrain.tools.compare import bar_limits
from mptrain.tools.compare import main as compare_main
from mptrain.tools.report import heat_range
from mptrain.train.callbacks.console import print_summary
from mptrain.train.callbacks.metrics import CompileNotice, divergence_advice
from mptrain.train.recipe import emulated_fp16

from .conftest import REPO, compose_config, run_cli, train

# ---- warnings for silently slow choices -------------------------------------------------------------

@pytest.mark.parametrize("preset", ["dynamic", "master"])
def test_fp16_on_a_cpu_warns_once_naming_bf16(preset):
    p = Precision(compose_config([f"precision={preset}"]).precision, torch.device("cpu"))
    message = emulated_fp16(p, torch.device("cpu"))
    assert "emulates" in message and "precision=bf16" in message


@pytest.mark.parametrize("preset", ["amp", "bf16"])
def test_no_slowness_warning_where_a_cpu_computes_natively(preset):
    p = Precision(compose_config([f"precision={preset}"]).precision, torch.device("cpu"))
    assert emulated_fp16(p, torch.device("cpu")) is None


def test_build_logs_the_fp16_warning_once(caplog):
    from mptrain.train.recipe import build

    cfg = compose_config(["precision=dynamic", "model=mlp", "trainer.device=cpu", "trainer.max_steps=1"])
    with caplog.at_level("WARNING", logger="mptrain"):
        build(cfg)
    assert sum("emulates" in r.getMessage() for r in caplog.records) == 1


def test_advise_on_a_cpu_does_not_call_fp16_faster():
    note = device_note(["precision=dynamic", "precision.loss_scale.init=1024"], "cpu")
    assert "not faster here" in note and "precision=bf16" in note and "safe" in note
    assert device_note(["precision=dynamic"], "cuda:0") is None
    assert device_note(["precision=bf16"], "cpu") is None


def test_compile_says_it_is_compiling_and_how_long_it_took(caplog):
    with caplog.at_level("INFO", logger="mptrain"):
        notice = CompileNotice()
        assert "compiling the model" in caplog.text
        notice.on_step_end(None, None, None)
        notice.on_step_end(None, None, None)
    took = [r.getMessage() for r in caplog.records if "the first step took" in r.getMessage()]
    assert len(took) == 1 and took[0].startswith("compiled: the first step took ")


# ---- messages ----------------------------------------------------------------------------------------

def test_a_requested_stop_is_not_printed_as_an_error():
    assert error_line(Interrupted(signal.SIGINT, 7)).startswith("mptrain: stopped: stopped by SIGINT at step 7")
    assert error_line(ConfigError("x")) == "mptrain: error: x"


def test_fp32_divergence_names_lr_and_clipping_not_loss_scaling(tmp_path):
    with pytest.raises(Diverged) as e:
        train(tmp_path, ["precision=fp32", "optimizer.lr=1e12", "trainer.max_steps=20", "trainer.log_every=1",
                         "diagnostics=off", "checkpoint.enabled=false"])
    message = str(e.value)
    assert "optimizer.lr" in message and "trainer.clip_grad_norm" in message
    assert "loss scal" not in message and "precision=dynamic" not in message
    assert "precision=dynamic" in divergence_advice(torch.float16)  # where loss scaling does help


@pytest.mark.parametrize("arg,suggestion", [("trainer.max_step=5", "trainer.max_steps"),
                                            ("precision.loss_scale.int=8", "precision.loss_scale.init"),
                                            ("chekpoint.enabled=false", "checkpoint.enabled"),
                                            ("optimizer.learning_rate=0.1", None)])
def test_a_mistyped_key_gets_did_you_mean(arg, suggestion):
    with pytest.raises(ConfigError) as e:
        check_override_keys([arg])
    key = arg.split("=")[0]
    assert str(e.value).startswith(f"{key} is not a config key; ")
    assert (f"did you mean {suggestion}?" in str(e.value)) if suggestion else "mptrain --cfg job" in str(e.value)


def test_valid_overrides_pass_the_key_check():
    check_override_keys(
        [
            "trainer.max_steps=5",
            "precision=bf16",
            "model.width=3",
            "dataset.root=/d",
            "+foo=1",
            "++trainer.seed=2",
            "~task",
            "hydra.run.dir=x",
            "hydra/launcher=slurm",
            "seed=1",
            "resume=auto",
            "precision.loss_scale.init=8",
            "trainer.profile.wait=1",
            "precision.fp8.recipe=rowwise",
            "-m",
            "--cfg",
            "job",
            "experiment=paper_parity",
            "debug=fast",
            "mygroup.key=1",
        ]
    )


def test_the_cli_names_the_key_instead_of_hydras_plus_advice(tmp_path):
    proc = run_cli(["trainer.max_step=5", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("mptrain: error: trainer.max_step is not a config key; "
                                                    "did you mean trainer.max_steps?")
    assert "+trainer" not in proc.stderr and not (tmp_path / "run").exists()


def test_warmup_warning_only_past_half_the_run(caplog):
    from mptrain.config import check_warmup

    cfg = compose_config([])  # the default cosine schedule: 20 warm-up steps
    with caplog.at_level("WARNING", logger="mptrain"):
        assert check_warmup(cfg.scheduler, total_steps=40)
        assert check_warmup(cfg.scheduler, total_steps=220)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="mptrain"):
        assert not check_warmup(cfg.scheduler, total_steps=30)
    assert len(caplog.records) == 1 and "only after step 20" in caplog.text


def test_alembic_setup_lines_are_silenced():
    plugins = logging.getLogger("alembic.runtime.plugins")
    before = logging.getLogger("alembic").level
    try:
        quiet_third_party_logs()
        assert not plugins.isEnabledFor(logging.INFO) and plugins.isEnabledFor(logging.WARNING)
    finally:
        logging.getLogger("alembic").setLevel(before)


def test_pyproject_has_no_setuptools_license_warning():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert not [w for w in caught if "license" in str(w.message).lower()]


# ---- readable outputs --------------------------------------------------------------------------------

def fake_job(path, precision, seed, acc):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"precision={precision}", f"seed={seed}"]))
    (path / "summary.json").write_text(json.dumps({"status": "completed", "precision": precision, "val/acc": acc,
                                                   "samples_per_s": 100.0, "peak_memory_mb": 10.0}))


def test_compare_keeps_its_columns_when_piped(tmp_path, capsys):
    for i, (precision, seed, acc) in enumerate(
        [("fp32", 0, 0.9), ("fp32", 1, 0.92), ("amp", 0, 0.91), ("amp", 1, 0.9)]
    ):
        fake_job(tmp_path / str(i), precision, seed, acc)
    compare_main([str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("┃"))
    for column in ("val/acc mean", "diff vs fp32", "final loss scale", "peak memory vs fp32", "status"):
        assert column in header  # each column name whole on the header line: nothing folded
    assert len(header) > 80


def test_compare_error_bars_fit_the_axes():
    means, stds = [0.9, 0.5, float("nan")], [0.05, 0.3, float("nan")]
    lo, hi = bar_limits(means, stds)
    assert lo <= 0.5 - 0.3 and hi >= 0.9 + 0.05  # every bar's whole error bar inside
    assert lo >= 0.0  # no bar reaches below 0: the axis does not either
    lo, hi = bar_limits([-1.0], [0.5])
    assert lo < -1.5 and hi > -0.5
    assert bar_limits([float("nan")], [0.0]) is None


def test_report_heat_map_scale_starts_at_the_data_minimum():
    healthy = np.array([[0.01, 0.02], [0.015, 0.04]])
    assert heat_range(healthy) == (0.01, 0.04, None)
    vmin, vmax, note = heat_range(np.zeros((3, 2)))
    assert vmin < vmax and "every value is 0" in note
    assert heat_range(np.full((2, 2), np.nan))[2] == "no finite values recorded"


def test_summary_table_shows_every_validation_metric():
    summary = {"status": "completed", "precision": "amp", "steps": 3, "train_loss": 1.5, "val/loss": 1.2,
               "val/ppl": 3.32, "val/bleu": 0.25, "samples_per_s": 10.0}
    out = io.StringIO()
    print_summary(summary, Console(file=out, width=120))
    text = out.getvalue()
    for key in ("val/loss", "val/ppl", "val/bleu", "train_loss", "samples_per_s"):
        assert key in text
    assert text.index("train_loss") < text.index("val/ppl") < text.index("samples_per_s")


# ---- records -------------------------------------------------------------------------------------------

def test_gitignore_holds_the_run_outputs():
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert {"outputs/", "multirun/", "mlruns/"} <= set(ignored)


@pytest.mark.slow
def test_a_refused_run_leaves_no_empty_directory(tmp_path):
    run_dir = tmp_path / "outputs" / "2026-01-01" / "12-00-00-1"
    proc = run_cli(["trainer.batch_size=100000", "trainer.device=cpu", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2 and "mptrain: error: trainer.batch_size=100000" in proc.stderr
    assert not run_dir.exists() and not run_dir.parent.exists()  # neither the run's nor its date's directory
    assert not (tmp_path / "outputs").exists()  # this run made outputs/ too: as it was before
    other = tmp_path / "outputs" / "2025-12-31" / "09-00-00"  # outputs/ holding another run stays as it is
    other.mkdir(parents=True)
    proc = run_cli(["trainer.batch_size=100000", "trainer.device=cpu", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2 and not run_dir.parent.exists()
    assert sorted((tmp_path / "outputs").rglob("*")) == sorted([other.parent, other])
