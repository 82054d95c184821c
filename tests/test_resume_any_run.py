"""Any run mptrain can start, resume=auto can continue (issue 37): every built-in model's checkpoints pass the
structure check and resume where they stopped; a user task with two optimizers does too; eval and sample
accept the runs they apply to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from mptrain.checkpoint.files import load_file
from mptrain.library.tasks import Task

from .conftest import CONF, REPO, TINY, compose_config, read_jsonl, run_cli, train

IMAGES = ["dataset=synthetic", "dataset.image_size=8", "dataset.train_size=64", "dataset.val_size=16",
          "dataset.pool_size=16"]
TOKENS = ["dataset=synthetic_tokens", "dataset.seq_len=8", "dataset.train_tokens=2000", "dataset.val_tokens=200"]
# each built-in model (conf/model/*.yaml), as small as it goes, on data it trains on
MODELS = {
    "cnn": ["model.width=4", *IMAGES],
    "mlp": ["model.width=8", "model.depth=1", *IMAGES],
    "resnet18": ["model.small_input=true", *IMAGES],
    "resnet50": ["model.small_input=true", *IMAGES],
    "torchvision": ["model.name=mobilenet_v3_small", *IMAGES, "dataset.image_size=32"],
    "dcgan": ["model.width=4", "model.latent_dim=4", *IMAGES],
    "lstm": ["model.embed_dim=8", "model.hidden_dim=8", "model.num_layers=1", *TOKENS],
    "gru": ["model.embed_dim=8", "model.hidden_dim=8", "model.num_layers=1", *TOKENS],
    "gpt": ["model.dim=8", "model.layers=1", "model.heads=1", *TOKENS],
    "timm": ["model.kwargs={depths:[1,1,1,1],dims:[8,8,8,8]}", *IMAGES, "dataset.image_size=32"],
    "hf_causal_lm": ["model.config.hidden_size=8", "model.config.intermediate_size=16",
                     "model.config.num_hidden_layers=1", "model.config.num_attention_heads=1",
                     "model.config.num_key_value_heads=1", "model.config.max_position_embeddings=16", *TOKENS],
    "hf_image_classification": ["model.config.hidden_size=8", "model.config.num_hidden_layers=1",
                                "model.config.num_attention_heads=1", "model.config.intermediate_size=16",
                                "model.config.image_size=8", "model.config.patch_size=4", *IMAGES],
}
SHORT = ["trainer.batch_size=8", "trainer.log_every=1", "trainer.eval_every=2", "scheduler=none", "diagnostics=off"]
SLOW_MODELS = {"resnet18", "resnet50", "torchvision", "timm", "hf_causal_lm", "hf_image_classification"}


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level("INFO", logger="mptrain")  # "resumed from ..." is an info line


def test_every_built_in_model_is_listed():
    assert set(MODELS) == {p.stem for p in (CONF / "model").glob("*.yaml")}


def two_attempts(tmp_path: Path, overrides: list[str]) -> tuple[dict, Path]:
    """Train 2 steps, then resume=auto to 3; return the second attempt's summary and the run directory."""
    train(tmp_path, [*SHORT, *overrides, "trainer.max_steps=2"])
    run_dir = tmp_path / "run"
    load_file(run_dir / "checkpoints" / "last.pt")  # the structure check passes
    summary, _ = train(tmp_path, [*SHORT, *overrides, "trainer.max_steps=3", "resume=auto"])
    (run_dir / ".hydra").mkdir(exist_ok=True)  # what the CLI keeps, for eval, sample and export
    OmegaConf.save(
        compose_config([*TINY, *SHORT, *overrides, "trainer.max_steps=3"]), run_dir / ".hydra" / "config.yaml"
    )
    return summary, run_dir


def assert_continued(summary: dict, run_dir: Path, caplog) -> None:
    """The second attempt continued the first (not a fresh start that set the records aside)."""
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert not list(run_dir.glob("previous_*")), "resume=auto started fresh"
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at step 2" in caplog.text


@pytest.mark.parametrize("model", [pytest.param(m, marks=[pytest.mark.slow] * (m in SLOW_MODELS)) for m in MODELS])
def test_every_built_in_model_resumes_where_it_stopped(tmp_path, caplog, model):
    summary, run_dir = two_attempts(tmp_path, [f"model={model}", *MODELS[model]])
    assert_continued(summary, run_dir, caplog)


def test_a_gan_run_resumes_and_eval_sample_export_accept_it(tmp_path, caplog):
    """Issue 37 case 1: a DCGAN checkpoint's optimizer is {discriminator, generator}."""
    from mptrain.tools.eval import evaluate
    from mptrain.tools.export import export
    from mptrain.tools.sample import main as sample_main

    summary, run_dir = two_attempts(tmp_path, ["model=dcgan", *MODELS["dcgan"]])
    assert_continued(summary, run_dir, caplog)
    assert set(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["optimizer"]) == {
        "discriminator", "generator"}
    record, out = evaluate(run_dir, "last")
    assert record["step"] == 3 and out == run_dir / "eval_last.json"
    # the GAN's validation draws its own noise, so the figures are near the logged ones, not equal
    assert record["val/loss"] == pytest.approx(record["val/loss_d"] + record["val/loss_g"])
    assert 0 < record["val/loss_d"] < 10 and 0 < record["val/loss_g"] < 10
    sample_main([str(run_dir), "--checkpoint", "last", "--count", "4"])
    assert (run_dir / "samples" / "seed_0.png").stat().st_size > 0
    export(run_dir, checkpoint="last")
    assert (run_dir / "export" / "model.safetensors").stat().st_size > 0


class TwoNets(nn.Module):
    """A user's model with two submodules, each trained by its own optimizer (TwoOptimizers)."""

    def __init__(self, **_):
        super().__init__()
        self.encoder = nn.Linear(64, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x.flatten(1))))


class TwoOptimizers(Task):
    """Classification, with the encoder and the head stepped by optimizers of their own."""

    parts = ("encoder", "head")

    def loss(self, model, batch, part="encoder"):
        x, y = batch
        return F.cross_entropy(model(x).float(), y)


def test_a_user_task_with_two_optimizers_resumes(tmp_path, caplog, monkeypatch):
    conf = tmp_path / "myconf" / "task"
    conf.mkdir(parents=True)
    (conf / "two.yaml").write_text(f"_target_: {__name__}.TwoOptimizers\n")
    monkeypatch.syspath_prepend(str(REPO))
    overrides = [f"hydra.searchpath=[file://{conf.parent}]", "task=two", "model=mlp",
                 f"model._target_={__name__}.TwoNets", "dataset.image_size=8", "dataset.channels=1"]
    summary, run_dir = two_attempts(tmp_path, overrides)
    assert_continued(summary, run_dir, caplog)
    optimizer = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["optimizer"]
    assert set(optimizer) == {"encoder", "head"}
    assert json.loads((run_dir / "summary.json").read_text())["task"] == "TwoOptimizers"


@pytest.mark.parametrize(("optimizer", "ok"), [
    ({"state": {}, "param_groups": []}, True),
    ({"discriminator": {"state": {}, "param_groups": []}, "generator": {"state": {}, "param_groups": []}}, True),
    ({}, False),
    ({"generator": {"state": {}}}, False),
    ({"generator": {"state": {}, "param_groups": []}, "discriminator": 3}, False),
    ({"state": [], "param_groups": []}, False),
])
def test_the_optimizer_check_takes_one_state_dict_or_one_per_part(optimizer, ok):
    from mptrain.checkpoint.contents import is_optimizer_state

    assert is_optimizer_state(optimizer) is ok


# ---- a run started with --config-dir (the README's own-model workflow) ---------------------------------

def saved_run(tmp_path: Path, config_dir: Path) -> Path:
    """A run directory's records as `mptrain --config-dir DIR model=tiny ...` leaves them."""
    import yaml

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=tiny", "trainer.max_steps=2"]))
    sources = [{"path": "hydra.conf", "schema": "pkg", "provider": "hydra"},
               {"path": str(CONF), "schema": "file", "provider": "main"},
               {"path": str(config_dir), "schema": "file", "provider": "command-line"}]
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"config_sources": sources}, "overrides": {"hydra": [f"hydra.run.dir={run_dir}"]}}}))
    return run_dir


def test_resume_puts_the_saved_overrides_after_hydras_options(tmp_path):
    from mptrain.cli.main import continue_the_run

    conf = tmp_path / "myconf"
    conf.mkdir()
    run_dir = saved_run(tmp_path, conf)
    argv = ["--config-dir", "myconf", f"hydra.run.dir={run_dir}", "resume=auto", "trainer.max_steps=3"]
    assert continue_the_run(argv) == ["--config-dir", "myconf", "model=tiny", f"hydra.run.dir={run_dir}",
                                      "resume=auto", "trainer.max_steps=3"]
    # without --config-dir now: the run's own comes back (its groups hold model=tiny)
    assert continue_the_run([f"hydra.run.dir={run_dir}", "resume=auto"]) == [
        "--config-dir", str(conf), "model=tiny", "trainer.max_steps=2", f"hydra.run.dir={run_dir}", "resume=auto"]


def test_resume_without_the_runs_config_dir_that_is_gone_is_one_line(tmp_path):
    from mptrain.cli.main import continue_the_run
    from mptrain.errors import ConfigError

    run_dir = saved_run(tmp_path, tmp_path / "gone")
    with pytest.raises(ConfigError, match=f"^the run was started with --config-dir {tmp_path / 'gone'}, which is no "
                                          "longer a directory; pass the directory its config groups are in"):
        continue_the_run([f"hydra.run.dir={run_dir}", "resume=auto"])


@pytest.mark.slow
def test_a_run_started_with_config_dir_resumes_from_the_cli(tmp_path):
    conf = tmp_path / "myconf" / "model"
    conf.mkdir(parents=True)
    (conf / "tiny.yaml").write_text("defaults:\n  - cnn\n  - _self_\nwidth: 4\n")
    run_dir = tmp_path / "run"
    quiet = ["trainer.device=cpu", "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.log_every=1"]
    first = run_cli(["--config-dir", "myconf", "model=tiny", "trainer.max_steps=2", *quiet, f"hydra.run.dir={run_dir}"],
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(["--config-dir", "myconf", f"hydra.run.dir={run_dir}", "resume=auto", "trainer.max_steps=3"],
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at step 2" in again.stdout + again.stderr
    alone = run_cli([f"hydra.run.dir={run_dir}", "resume=auto", "trainer.max_steps=4"], cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert f"the run's own config directories are used again: --config-dir {tmp_path / 'myconf'}" in alone.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at step 3" in alone.stdout + alone.stderr
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert not list(run_dir.glob("previous_*"))
    assert json.loads((run_dir / "summary.json").read_text())["model"].endswith(".SmallCNN")  # model=tiny


# ---- checkpoint.enabled=false: one rule (README, docs/checkpoints.md) -----------------------------------

def test_checkpoint_disabled_writes_last_pt_alone_on_a_stop_signal_and_the_run_resumes(tmp_path, monkeypatch, caplog):
    from mptrain.checkpoint.signals import Interrupted

    from .test_checkpoint import stop_at

    overrides = [
        "model.width=4",
        "trainer.max_steps=6",
        "trainer.batch_size=32",
        "trainer.log_every=1",
        "trainer.eval_every=2",
        "checkpoint.enabled=false",
        "checkpoint.keep_last=2",
        "checkpoint.every_steps=1",
        "diagnostics=off",
    ]
    stop_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        train(tmp_path, overrides)
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]  # no step_3.pt, no best.pt
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"] == 3
    summary, _ = train(tmp_path, [*overrides, "resume=auto"])
    assert_continued_to(summary, run_dir, 6, caplog)
    # the end of the run, every step (every_steps=1) and its validations wrote nothing: last.pt is the signal's
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"] == 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]


def assert_continued_to(summary: dict, run_dir: Path, steps: int, caplog) -> None:
    assert summary["status"] == "completed" and summary["steps"] == steps
    assert not list(run_dir.glob("previous_*")), "resume=auto started fresh"
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == list(range(1, steps + 1))
    assert "resumed from" in caplog.text


# ---- the general rule: every entry-point form, killed (SIGTERM, kill -9), resumed = uninterrupted ---------

STEPS = 120
BASE = ["trainer.device=cpu", "trainer.log_every=1", f"trainer.max_steps={STEPS}", "trainer.tensorboard=false",
        "trainer.progress_bar=false", "trainer.batch_size=16", "scheduler=none", "checkpoint.every_steps=10",
        "diagnostics=off"]
USER_MODEL = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's model, found on PYTHONPATH by model._target_."""

    def __init__(self, num_classes=10, in_channels=1, image_size=8, **_):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, 16), nn.Tanh())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.body(x))
'''
# each entry-point form: what its command starts with (form_args adds the run length and the directory)
FORMS = {
    "plain": ["model.width=4"],
    "config-dir": ["--config-dir", "myconf", "model=tiny"],
    "sweep member": ["-m", "seed=3", "model.width=4"],
    "experiment preset": ["experiment=paper_parity", "model.width=8", "model.depth=1"],
    "user _target_ model": ["model=mlp", "model._target_=mymodels.TinyNet"],
    "torchrun": ["model=mlp", "model.width=8", "model.depth=1"],  # 2 processes, gloo
}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def command(form: str, args: list[str]) -> list[str]:
    return [sys.executable, *(TORCHRUN if form == "torchrun" else []), "-m", "mptrain", *args]


def run_form(form: str, args: list[str], root: Path, env: dict) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(command(form, args), cwd=root, env=full_env, capture_output=True, text=True, timeout=600)


def form_setup(root: Path) -> dict:
    """The user's files every form may need (a config directory, a model module); the environment."""
    (root / "myconf" / "model").mkdir(parents=True, exist_ok=True)
    (root / "myconf" / "model" / "tiny.yaml").write_text("defaults:\n  - cnn\n  - _self_\nwidth: 4\n")
    (root / "mymodels.py").write_text(USER_MODEL)
    return {"PYTHONPATH": f"{root}{os.pathsep}{REPO}"}


def form_args(form: str, root: Path) -> tuple[list[str], Path]:
    """The command that starts the form's run into root, and the run directory it trains in."""
    if form == "sweep member":
        return [*FORMS[form], *BASE, f"hydra.sweep.dir={root / 'sweep'}"], root / "sweep" / "0"
    return [*FORMS[form], *BASE, f"hydra.run.dir={root / 'run'}"], root / "run"


def resume_args(form: str, root: Path) -> list[str]:
    """How a user continues it: the README's `resume=auto hydra.run.dir=<run>` alone; a sweep: the sweep again."""
    if form == "sweep member":
        return [*form_args(form, root)[0], "resume=auto"]
    return [f"hydra.run.dir={root / 'run'}", "resume=auto"]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """Each form's uninterrupted run."""
    return {}


def reference(references: dict, form: str, tmp_path_factory) -> Path:
    if form not in references:
        root = tmp_path_factory.mktemp("ref")
        env = form_setup(root)
        args, run_dir = form_args(form, root)
        proc = run_form(form, args, root, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        references[form] = run_dir
    return references[form]


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and sum(1 for line in path.read_text().splitlines() if '"loss"' in line) >= steps:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("training did not reach the step")


def losses_of(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("form", list(FORMS))
def test_any_run_killed_then_resumed_equals_the_uninterrupted_run(tmp_path, tmp_path_factory, references, form, kill):
    from .test_checkpoint import assert_same_tensors, final_state

    ref = reference(references, form, tmp_path_factory)
    env = form_setup(tmp_path)
    args, run_dir = form_args(form, tmp_path)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    full_env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(command(form, args), cwd=tmp_path, env=full_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_steps(run_dir, 25, proc)
    if kill == "SIGTERM":  # `kill <pid>`: torchrun passes it on to its workers
        proc.send_signal(signal.SIGTERM)
    else:  # the whole job at once, as an OOM killer or a lost node does (torchrun's workers too)
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    if form != "torchrun":  # torchrun's agent exits 1 whatever its workers did
        assert proc.returncode == (128 + signal.SIGTERM if kill == "SIGTERM" else -signal.SIGKILL), err[-3000:]
    if kill == "SIGTERM":
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"

    resumed = run_form(form, resume_args(form, tmp_path), tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert losses_of(run_dir) == losses_of(ref)  # every step once, each equal to the uninterrupted run's
    if (ref / "checkpoints" / "last.pt").is_file():
        assert_same_tensors(final_state(ref), final_state(run_dir))
