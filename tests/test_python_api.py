"""The way in from Python (issue 40): mptrain.train / evaluate / sample from a script, with objects passed
directly, agree bit for bit with the mptrain command on the same config; callbacks from config and from Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO, read_jsonl, run_cli

TIMES = {"samples_per_s", "step_s", "wall_s", "data_s", "tokens_per_s"}  # measured, not computed
QUICK = ["trainer.device=cpu", "trainer.progress_bar=false", "trainer.tensorboard=false", "diagnostics=off",
         "checkpoint.keep_last=0", "scheduler.warmup_steps=2"]

# a user's own code, which mptrain has never seen: a model, its data, its loss, a callback
USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class TinyNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.GELU(), nn.Linear(width, 3))

    def forward(self, x):
        return self.body(x)


def blobs(n_train: int = 192, n_val: int = 64):
    g = torch.Generator().manual_seed(7)  # its own generator: the data are the same whoever builds them
    x = torch.randn(n_train + n_val, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


class SquaredError:
    """A task mptrain does not ship: mean squared error against the one-hot class (not cross-entropy)."""
    name = "squared_error"
    metrics = ("val/loss", "val/acc")

    def loss(self, model, batch):
        x, y = batch
        out = model(x).float()
        return ((out - nn.functional.one_hot(y, 3).float()) ** 2).mean()

    def validation_sums(self, model, batch):
        x, y = batch
        out = model(x).float()
        err = ((out - nn.functional.one_hot(y, 3).float()) ** 2).mean(dim=1)
        return {"loss": err.sum(), "acc": (out.argmax(1) == y).sum(), "count": len(y)}

    def validation_metrics(self, totals):
        return {"val/loss": totals["loss"] / totals["count"], "val/acc": totals["acc"] / totals["count"]}


class Counter:
    """Only two of the Callback hooks: the rest get Callback's defaults."""
    def __init__(self, path: str = "counts.json"):
        self.path, self.steps, self.validations = path, [], []

    def on_step_end(self, c, state, out):
        self.steps.append(state.step)

    def on_validation_end(self, c, state, metrics):
        self.validations.append((state.step, metrics["val/acc"]))

    def close(self):
        import json
        with open(self.path, "w") as f:
            json.dump({"steps": self.steps, "validations": self.validations}, f)
'''


@pytest.fixture
def user_code(tmp_path):
    (tmp_path / "mymod.py").write_text(USER_MODULE)
    conf = tmp_path / "myconf"
    for group, target in (("model", "mymod.TinyNet"), ("dataset", "mymod.blobs"), ("task", "mymod.SquaredError")):
        (conf / group).mkdir(parents=True)
        (conf / group / "mine.yaml").write_text(f"_target_: {target}\n")
    return tmp_path


def python(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in read_jsonl(run_dir / "metrics.jsonl")]


@pytest.mark.slow
def test_objects_passed_from_a_script_train_evaluate_and_agree_with_the_command_bitwise(user_code):
    tmp = user_code
    run = ["trainer.max_steps=12", "trainer.batch_size=32", "trainer.eval_every=6", "trainer.log_every=3",
           "optimizer=adamw", "optimizer.lr=0.01", "precision=bf16", *QUICK]
    cli = run_cli(["--config-dir", "myconf", "model=mine", "dataset=mine", "task=mine", *run,
                   "callbacks=[{_target_: mymod.Counter, path: cli_counts.json}]", "hydra.run.dir=runs/cli"],
                  cwd=tmp, env={"PYTHONPATH": f"{tmp}{os.pathsep}{REPO}"})
    assert cli.returncode == 0, cli.stderr
    proc = python(f"""
        import json, sys, torch
        import mptrain
        from mymod import TinyNet, blobs, SquaredError, Counter
        assert "torch" in sys.modules  # (imported by mymod) -- mptrain itself imported nothing heavy
        data, task, counter = blobs(), SquaredError(), Counter("py_counts.json")
        torch.manual_seed(0)  # as the command seeds before it builds the model (seed=0)
        model = TinyNet()
        summary = mptrain.train({run + ["hydra.run.dir=runs/py"]!r}, model=model, datasets=data, task=task,
                                callbacks=[counter])
        assert counter.steps == list(range(1, 13)), counter.steps
        evaluated = mptrain.evaluate(summary["run_dir"], model=TinyNet(), datasets=blobs(), task=SquaredError())
        try:
            mptrain.evaluate(summary["run_dir"])
        except mptrain.errors.ConfigError as e:
            refused = str(e)
        print(json.dumps({{"summary": summary, "evaluated": evaluated, "refused": refused}}))
    """, tmp)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    summary, evaluated = out["summary"], out["evaluated"]
    cli_dir, py_dir = tmp / "runs" / "cli", tmp / "runs" / "py"
    assert summary["run_dir"] == "runs/py" and summary["status"] == "completed" and summary["steps"] == 12

    # the same numbers, bit for bit, as the command on the same config (JSON floats round-trip exactly)
    assert rows(py_dir) == rows(cli_dir) and len(rows(cli_dir)) >= 6
    cli_summary = json.loads((cli_dir / "summary.json").read_text())
    for key in ("train_loss", "val/loss", "val/acc", "steps", "final_loss_scale", "compute_dtype"):
        assert summary[key] == cli_summary[key], key
    # what the record says of the passed objects, and the run directory as the command writes it
    config = json.loads(json.dumps(__import__("yaml").safe_load((py_dir / ".hydra" / "config.yaml").read_text())))
    assert config["model"] == {"name": "TinyNet", "passed": "mymod.TinyNet"}
    assert config["task"] == {"name": "squared_error", "passed": "mymod.SquaredError"}
    assert config["dataset"]["passed"] == "torch.utils.data.dataset.TensorDataset"
    assert summary["model"] == "TinyNet" and summary["task"] == "squared_error"
    assert {p.name for p in py_dir.iterdir()} >= {".hydra", "train.log", "metrics.jsonl", "summary.json",
                                                 "checkpoints", "eval_best.json"}
    assert "step 12" in (py_dir / "train.log").read_text()

    # evaluate: the checkpoint's metrics, those of the run's own last validation (step 12) and of mptrain-eval
    last_val = [r for r in read_jsonl(py_dir / "metrics.jsonl") if "val/acc" in r][-1]
    assert evaluated["step"] == 12 and evaluated["val/acc"] == last_val["val/acc"]
    assert evaluated["val/loss"] == last_val["val/loss"] and evaluated["path"] == "runs/py/eval_best.json"
    cli_eval = subprocess.run([sys.executable, "-m", "mptrain.tools.eval", "runs/cli"], cwd=tmp, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{REPO}"})
    assert cli_eval.returncode == 0, cli_eval.stderr
    assert json.loads((cli_dir / "eval_best.json").read_text())["val/acc"] == evaluated["val/acc"]
    assert out["refused"] == ("this run's model was an object passed to mptrain.train (mymod.TinyNet), which its "
                              "config cannot rebuild; pass it again (model=...) to mptrain.evaluate / mptrain.sample")

    # callbacks: the config's (from the command) and the object (from Python) saw every step and validation
    cli_counts = json.loads((tmp / "cli_counts.json").read_text())
    py_counts = json.loads((tmp / "py_counts.json").read_text())
    assert cli_counts == py_counts and cli_counts["steps"] == list(range(1, 13))
    assert [s for s, _ in cli_counts["validations"]] == [6, 12]
    assert cli_counts["validations"][-1][1] == last_val["val/acc"]


@pytest.mark.slow
def test_a_language_model_passed_from_python_samples_as_the_command_does(tmp_path):
    # no dropout: a passed model was initialised before the run seeded, so its draws during training would
    # start elsewhere in the random stream than a model the run builds itself (docs/python.md)
    run = ["model=gpt", "model.dim=32", "model.layers=1", "model.heads=2", "model.dropout=0", "dataset=text",
           "dataset.path=${python_stdlib:LICENSE.txt}", "dataset.seq_len=32", "trainer.max_steps=6",
           "trainer.batch_size=8", "trainer.eval_every=6", *QUICK]
    cli = run_cli([*run, "hydra.run.dir=runs/cli"], cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    cli_text = subprocess.run([sys.executable, "-m", "mptrain.tools.sample", "runs/cli", "--prompt", "The ",
                               "--tokens", "40", "--seed", "3"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    assert cli_text.returncode == 0, cli_text.stderr
    proc = python(f"""
        import json, torch
        import mptrain
        from mptrain.library.models.language import GPT

        def gpt():  # the model the run's data ask for: vocab_size from the text's characters
            vocab = len(json.load(open("runs/cli/vocab.json"))["tokens"])
            return GPT(vocab_size=vocab, seq_len=32, dim=32, layers=1, heads=2, dropout=0.0)

        torch.manual_seed(0)
        summary = mptrain.train({run + ["hydra.run.dir=runs/py"]!r}, model=gpt())
        text = mptrain.sample(summary["run_dir"], "The ", tokens=40, seed=3, model=gpt())
        print(json.dumps({{"text": text}}))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = json.loads(proc.stdout.strip().splitlines()[-1])["text"]
    assert rows(tmp_path / "runs" / "py") == rows(tmp_path / "runs" / "cli")
    assert "The " + text == cli_text.stdout.rstrip("\n") and len(text) == 40  # char tokens: 40 characters


def test_bad_input_is_an_mptrain_error_and_nothing_is_made(tmp_path, monkeypatch):
    import mptrain
    from mptrain.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^trainer.max_step is not a config key; did you mean trainer.max_steps\?"):
        mptrain.train(["trainer.max_step=3"])
    with pytest.raises(ConfigError, match=r"^optimizer.lr=-1.0 is invalid: must be > 0"):
        mptrain.train(["optimizer.lr=-1", "hydra.run.dir=runs/x"])
    with pytest.raises(ConfigError, match=r"^-m: mptrain.train takes overrides"):
        mptrain.train(["-m", "seed=0,1"])
    with pytest.raises(ConfigError, match=r"^model= passed a str, not a torch.nn.Module"):
        mptrain.train(["trainer.device=cpu", "hydra.run.dir=runs/y"], model="resnet")
    assert list(tmp_path.iterdir()) == []  # no run directory, no outputs/
