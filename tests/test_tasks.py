"""Tasks as a config group: a task defined here (not in mptrain) trains with everything mptrain offers;
the GAN goes through the same step (accumulation, diagnostics); one step function for every caller."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch.nn.functional as F

from mptrain.checkpoint.signals import Interrupted
from mptrain.errors import ConfigError
from mptrain.library.tasks import Task

from .conftest import REPO, read_jsonl, run_cli, train
from .test_checkpoint import assert_same_tensors, final_state, stop_at


class DigitRegression(Task):
    """Regress the digit's value (0..9) with a mean-squared error; report val/mse."""

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x).float().squeeze(1), y.float())

    def validation_sums(self, model, batch):
        x, y = batch
        return {"mse": ((model(x).float().squeeze(1) - y.float()) ** 2).sum(), "count": y.numel()}


def user_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "myconf" / "task"
    conf.mkdir(parents=True)
    (conf / "regression.yaml").write_text("_target_: tests.test_tasks.DigitRegression\n")
    return tmp_path / "myconf"


REGRESSION = ["task=regression", "model.num_classes=1", "optimizer=adamw", "optimizer.lr=3e-3",
              "checkpoint.monitor=val/mse", "checkpoint.mode=min", "trainer.batch_size=32"]


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("fp32", marks=pytest.mark.slow),
        pytest.param("bf16", marks=pytest.mark.slow),
        pytest.param("dynamic", marks=pytest.mark.slow),
    ],
)
def test_user_task_trains_from_the_cli(tmp_path, mode):
    conf = user_conf(tmp_path)
    run_dir = tmp_path / "run"
    r = run_cli(["--config-dir", str(conf), *REGRESSION, f"precision={mode}", "trainer.max_steps=60",
                 "trainer.eval_every=20", "trainer.device=cpu", "trainer.progress_bar=false",
                 "trainer.tensorboard=false", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["task"] == "DigitRegression"
    vals = [row["val/mse"] for row in read_jsonl(run_dir / "metrics.jsonl") if "val/mse" in row]
    assert len(vals) == 3 and vals[-1] < 0.5 * vals[0], vals
    # independent check of the reported metric: the digits' variance is ~8.3, predicting the mean gives that
    assert 0 < vals[-1] < 8.3
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    diag = read_jsonl(run_dir / "diagnostics.jsonl")
    assert any(row.get("event") == "sample" and row["grads"]["params"] for row in diag)
    if mode == "dynamic":
        assert summary["compute_dtype"] == "fp16" and summary["final_loss_scale"] > 1


@pytest.mark.slow
def test_user_task_resumes_bit_identically(tmp_path, monkeypatch):
    conf = user_conf(tmp_path)
    overrides = [f"hydra.searchpath=[file://{conf}]", *REGRESSION, "precision=dynamic", "trainer.max_steps=12",
                 "trainer.log_every=1", "trainer.eval_every=4", "model.width=4",
                 "precision.loss_scale.growth_interval=2"]
    monkeypatch.syspath_prepend(str(REPO))
    train(tmp_path / "ref", overrides)
    stop_at(monkeypatch, 6)
    with pytest.raises(Interrupted) as stopped:
        train(tmp_path / "cut", overrides)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(REPO))
    summary, cut_dir = train(tmp_path / "cut", [*overrides, "resume=auto"])
    assert summary["status"] == "completed" and summary["steps"] == 12
    ref_dir = tmp_path / "ref" / "run"
    assert_same_tensors(final_state(ref_dir), final_state(cut_dir))
    assert read_jsonl(ref_dir / "metrics.jsonl") == read_jsonl(cut_dir / "metrics.jsonl")


@pytest.mark.slow
def test_gan_honours_accumulation_and_records_diagnostics(tmp_path, monkeypatch):
    from mptrain.train.components import Components

    seen: list[bytes] = []
    original = Components.to_device

    def counting(self, batch):
        if self.model.training and isinstance(batch, (tuple, list)):  # training micro-batches (validation: eval mode)
            seen.extend(row.numpy().tobytes() for row in batch[0])
        return original(self, batch)

    monkeypatch.setattr(Components, "to_device", counting)
    summary, run_dir = train(tmp_path, ["model=dcgan", "model.width=8", "model.latent_dim=16", "trainer.batch_size=16",
                                        "trainer.accumulate_grad_batches=2", "trainer.max_epochs=1",
                                        "diagnostics.every=5", "optimizer=adamw", "optimizer.lr=2e-3"])
    assert summary["status"] == "completed" and summary["epochs"] == 1
    n_train = round(1797 * 0.8)  # digits' fixed split (dataset.val_fraction=0.2)
    # one epoch: every full accumulation window of 2 x 16 samples, each sample once
    assert len(seen) == summary["steps"] * 2 * 16 == (n_train // 32) * 32
    assert len(set(seen)) >= len(seen) - 2  # (the digits hold a couple of identical images)
    rows = [r for r in read_jsonl(run_dir / "diagnostics.jsonl") if r.get("event") == "sample"]
    assert len(rows) >= 4
    names = set(rows[0]["grads"]["params"])
    assert any(n.startswith("generator.") for n in names) and any(n.startswith("discriminator.") for n in names)
    assert rows[0]["grads"]["overall"]["count"] == sum(r["count"] for r in rows[0]["grads"]["params"].values())
    assert any(n.startswith("generator.") for n in rows[0]["update_underflow"]["params"])


def test_cli_loop_and_bench_share_the_step_function():
    import importlib.util

    import mptrain.train.loop
    import mptrain.train.step

    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert mptrain.train.loop.train_step is mptrain.train.step.train_step
    assert bench.train_step is mptrain.train.step.train_step


def test_model_declared_task_is_the_default_and_task_overrides(tmp_path):
    from .conftest import compose_config

    assert compose_config([]).task is None
    assert compose_config(["task=gan"]).task._target_ == "mptrain.library.models.gan.Adversarial"
    with pytest.raises(Exception, match="trains a language_modeling task but the dataset serves classification"):
        train(tmp_path, ["task=language_modeling", "trainer.max_steps=1"])


def test_import_graph_has_no_cycle():
    from .test_layout import imports, modules

    graph = {mod: imports(mod, path) for mod, path in modules().items()}
    edges = {m: {d for d in ds if d in graph and d != m and not d.startswith(m + ".")} for m, ds in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]) if d in path else d)
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_torch_distributed_only_in_the_distributed_code():
    users = sorted(p.name for p in (REPO / "mptrain").rglob("*.py") if "torch.distributed" in p.read_text()
                   and "import torch.distributed" in p.read_text())
    assert set(users) <= {"distributed.py", "fsdp.py"}, users


class ElementwiseLoss(Task):
    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).float(), y, reduction="none")  # forgot the mean


class FloatLoss(Task):
    def loss(self, model, batch):
        return 1.5


class CountLoss(Task):
    def loss(self, model, batch):
        x, y = batch
        return (model(x).argmax(1) == y).sum()  # an integer count: no gradient


class KeepdimLoss(Task):
    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).float(), y, reduction="none").mean(0, keepdim=True)  # shape (1,)


class MeanLoss(Task):
    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).float(), y, reduction="none").mean()  # the same number, shape ()


@pytest.mark.parametrize(
    "task, message",
    [
        pytest.param(
            "ElementwiseLoss", r"loss\(\) returned a tensor of shape \(8,\), not a scalar", marks=pytest.mark.slow
        ),
        pytest.param("FloatLoss", r"loss\(\) returned a float, not a tensor", marks=pytest.mark.slow),
        pytest.param(
            "CountLoss",
            r"loss\(\) returned a int64 tensor that does not depend on the model's parameters",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_task_loss_that_cannot_train_is_one_line(tmp_path, task, message):
    conf = tmp_path / "myconf" / "task"
    conf.mkdir(parents=True)
    (conf / "bad.yaml").write_text(f"_target_: tests.test_tasks.{task}\n")
    run_dir = tmp_path / "run"
    r = run_cli(["--config-dir", str(conf.parent), "task=bad", "model=mlp", "model.width=4", "trainer.batch_size=8",
                 "trainer.max_steps=2", "trainer.device=cpu", "trainer.progress_bar=false", "diagnostics=off",
                 "trainer.tensorboard=false", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mptrain: error: task {task}: ") and re.search(message, last), last
    # found on one batch before the run directory changed (issue 25): nothing written
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_a_one_element_loss_trains_like_a_scalar(tmp_path, monkeypatch):
    """A (1,)-shaped loss is the same number as its scalar: the run matches the scalar task's exactly."""
    monkeypatch.syspath_prepend(str(REPO))
    common = ["model=mlp", "model.width=4", "trainer.batch_size=8", "trainer.max_steps=3", "trainer.log_every=1",
              "precision=fp32", "diagnostics=off"]
    conf = tmp_path / "myconf" / "task"
    conf.mkdir(parents=True)
    (conf / "keepdim.yaml").write_text("_target_: tests.test_tasks.KeepdimLoss\n")
    (conf / "mean.yaml").write_text("_target_: tests.test_tasks.MeanLoss\n")
    search = f"hydra.searchpath=[file://{conf.parent}]"
    ref, ref_dir = train(tmp_path / "ref", [search, "task=mean", *common])
    mine, my_dir = train(tmp_path / "mine", [search, "task=keepdim", *common])
    assert mine["status"] == "completed"
    losses = [[r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for d in (ref_dir, my_dir)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


@pytest.mark.slow
def test_a_task_target_that_cannot_be_imported_says_why(tmp_path):
    conf = tmp_path / "myconf" / "task"
    conf.mkdir(parents=True)
    (conf / "nope.yaml").write_text("_target_: no_such_module.Task\n")
    r = run_cli(["--config-dir", str(conf.parent), "task=nope", "model=mlp", "trainer.device=cpu", "debug=fast",
                 f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last == ("mptrain: error: task._target_=no_such_module.Task cannot be imported "
                    "(ModuleNotFoundError(\"No module named 'no_such_module'\") Are you sure that module "
                    "'no_such_module' is installed?); check the name and put its module on PYTHONPATH"), last


# ---- docs/tasks.md's runnable example, run as written (issue 37 case 19) -----------------------------------------

def docs_example(tmp_path: Path) -> str:
    """Write the files of docs/tasks.md's runnable example where their first line names them, as written;
    return its command (continuation lines joined)."""
    text = (REPO / "docs" / "tasks.md").read_text()
    section = text.split("## A task of your own (runnable)", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S)
    commands = []
    for block in blocks:
        first = block.splitlines()[0]
        if first.startswith("# ") and first.endswith((".py", ".yaml")):
            path = tmp_path / first[2:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block)
        else:
            commands.append(block.replace("\\\n", " "))
    assert len(blocks) == 3 and len(commands) == 1, blocks
    return commands[0].strip()


def mptrain_on_path(tmp_path: Path) -> dict:
    """An environment whose `mptrain` is this checkout's, as an installed one would be, whatever the command
    sets PYTHONPATH to."""
    import os
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "mptrain"
    shim.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                    "from mptrain.cli.main import main\nsys.exit(main())\n")
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}


def test_the_task_docs_example_module_imports(tmp_path):
    # the fast half: the example's module imports (it imported mptrain.tasks, which no longer exists)
    import runpy

    docs_example(tmp_path)
    module = runpy.run_path(str(tmp_path / "mytasks.py"))
    assert issubclass(module["DigitRegression"], Task)


@pytest.mark.slow
def test_the_task_docs_example_runs_exactly_as_written(tmp_path):
    import subprocess

    command = docs_example(tmp_path)
    assert command.startswith("PYTHONPATH=. mptrain --config-dir myconf task=regression"), command
    r = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=mptrain_on_path(tmp_path), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    (summary_path,) = (tmp_path / "outputs").glob("*/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed" and summary["task"] == "DigitRegression"
    assert summary["precision"] == "dynamic" and summary["compute_dtype"] == "fp16"
    vals = [row["val/mse"] for row in read_jsonl(summary_path.parent / "metrics.jsonl") if "val/mse" in row]
    # it learns: predicting the mean digit gives the digits' variance, ~8.3
    assert len(vals) >= 2 and vals[-1] < 0.5 * vals[0] and vals[-1] < 8.3, vals
    assert (summary_path.parent / "checkpoints" / "best.pt").is_file()  # checkpoint.monitor=val/mse


@pytest.mark.parametrize("key", ["task", "model", "optimizer"])
def test_a_user_module_whose_own_import_fails_shows_that_error(tmp_path, monkeypatch, key):
    # issue 37 case 19: it said "cannot be imported ... put its module on PYTHONPATH", blaming the module's path
    module = f"broken_{key}"
    (tmp_path / f"{module}.py").write_text("import torch\nfrom mptrain.tasks import Task\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = {"task": [f"+task._target_={module}.Thing"], "model": [f"model._target_={module}.Thing"],
                 "optimizer": ["optimizer=torch", f"optimizer._target_={module}.Thing"]}[key]
    with pytest.raises(ConfigError) as refused:
        train(tmp_path, ["model=mlp", "trainer.max_steps=1", *overrides])
    assert str(refused.value) == (
        f"{key}._target_={module}.Thing: its module was found but importing it failed with ModuleNotFoundError: "
        f"No module named 'mptrain.tasks' at {tmp_path / module}.py:2 (from mptrain.tasks import Task); "
        "mptrain.tasks is now mptrain.library.tasks; fix that import")
    assert not (tmp_path / "run").exists()


def test_a_user_module_that_is_not_there_still_names_pythonpath(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^model._target_=no_such_module.Net cannot be imported \(No module named 'no_such_module'\); "
        r"put its module on PYTHONPATH$",
    ):
        train(tmp_path, ["model=mlp", "model._target_=no_such_module.Net", "trainer.max_steps=1"])
