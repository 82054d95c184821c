"""debug= presets: fast, overfit, profile, anomaly (conf/debug/, mptrain/train/callbacks/profiler.py,
mptrain/library/data/loading.py)."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from omegaconf import OmegaConf

from mptrain.config import ProfileConfig, validate
from mptrain.errors import TrainingFailed
from mptrain.library.data.loading import digits, make_loader, overfit
from mptrain.library.models.vision import MLP
from mptrain.train.callbacks.profiler import ProfileSteps, anomaly_detection

from .conftest import CONF, compose_config, read_jsonl, train

PRESETS = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))


def test_the_four_presets_exist():
    assert PRESETS == ["anomaly", "fast", "overfit", "profile"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_validates(name):
    cfg = compose_config([f"debug={name}"])
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)
    t = cfg.trainer
    assert (t.overfit_batches > 0, t.profile.enabled, t.detect_anomaly) == (
        name == "overfit", name == "profile", name == "anomaly")
    if name in ("fast", "overfit", "profile"):
        assert not cfg.checkpoint.enabled and not cfg.diagnostics.enabled
    if name == "profile":  # the run lasts past the profiler's schedule
        assert t.max_steps > t.profile.wait + t.profile.warmup + t.profile.active - 1


def test_preset_keeps_a_users_other_choices():
    cfg = compose_config(["debug=fast", "model=mlp", "precision=fp32", "trainer.max_steps=3"])
    assert cfg.model._target_ == "mptrain.library.models.vision.MLP" and cfg.precision.mode == "fp32"
    assert cfg.trainer.max_steps == 3  # the command line wins over the preset


def test_debug_fast_runs_two_steps_validates_each_and_saves_nothing(tmp_path):
    summary, run_dir = train(tmp_path, ["debug=fast", "model.width=8"])
    assert summary["status"] == "completed" and summary["steps"] == 2
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/acc" in r] == [1, 2]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "tensorboard").exists()
    assert not (run_dir / "diagnostics.jsonl").exists()


@pytest.fixture(scope="module")
def data():
    return digits()


def test_overfit_repeats_the_first_samples_and_validates_on_them(data):
    small = overfit(data, 32)
    assert len(small.train) == len(data.train)  # an epoch keeps its number of steps
    first = torch.stack([data.train[i][0] for i in range(32)])
    seen = torch.stack([small.train[i][0] for i in range(0, len(small.train), 7)])
    # every training sample is one of the first 32, and validation holds exactly those 32
    assert all(any(torch.equal(s, f) for f in first) for s in seen)
    assert torch.equal(torch.stack([small.val[i][0] for i in range(len(small.val))]), first)


def test_overfit_drives_the_loss_to_about_zero(data):
    """One batch, repeated: a working model and loss memorise it (what debug=overfit checks)."""
    torch.manual_seed(0)
    small = overfit(data, 32)
    loader = make_loader(small.train, 32, train=True, seed=0)
    model = MLP(num_classes=10, in_channels=1, image_size=8, width=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) == 60:
            break
    assert losses[0] > 1.5  # ~ln(10) at the start
    model.eval()
    x, y = next(iter(make_loader(small.val, 32, train=False, seed=0)))
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(x), y).item()
    assert final < 0.05 and (model(x).argmax(1) == y).all()


def tiny_steps(steps: int, hook) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, steps + 1):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        hook(step)


def test_profile_records_the_active_steps_writes_a_trace_and_logs_top_ops(tmp_path, caplog):
    cfg = ProfileConfig(enabled=True, wait=1, warmup=2, active=3, row_limit=5)
    prof = ProfileSteps(cfg, tmp_path, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="mptrain"):
        tiny_steps(9, prof.step)
        table = prof.close()
    assert prof.steps == [4, 5, 6]  # after 1 waiting and 2 warm-up steps
    traces = list((tmp_path / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    step_spans = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert len(step_spans) == 3
    assert any(e.get("name") == "aten::addmm" for e in events)  # the Linear layers' forward
    # the table's rows are row_limit ops of the recorded steps (which ones lead depends on the machine's timing)
    rows = [line.split()[0] for line in table.splitlines()
            if line.strip() and not line.startswith("-") and not line.lstrip().startswith(("Name", "Self CPU time"))]
    names = {e.get("name", "") for e in events}
    names |= {re.sub(r"#\d+$", "*", n) for n in names}  # the table merges ProfilerStep#4..#6 as ProfilerStep*
    # a row's first word is its name, or the name's first word ("autograd::engine::evaluate_function: ...")
    assert 1 <= len(rows) <= 5 and all(any(n.split()[0] == r for n in names if n) for r in rows), rows
    assert (tmp_path / "profile" / "top_ops.txt").read_text().strip() == table.strip()
    assert "top ops by self_cpu_time_total" in caplog.text
    assert prof.close() is None  # closing twice is harmless


def test_profile_of_a_run_shorter_than_its_warm_up_says_so(tmp_path, caplog):
    prof = ProfileSteps(ProfileConfig(enabled=True, wait=2, warmup=2, active=2), tmp_path, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="mptrain"):
        tiny_steps(3, prof.step)
        assert prof.close() is None
    assert "raise trainer.max_steps" in caplog.text
    assert not list((tmp_path / "profile").glob("*.pt.trace.json"))


def nan_backward() -> torch.Tensor:
    """sqrt at 0 with a zero upstream gradient: its backward computes 0 / 0 = NaN."""
    w = torch.zeros(3, requires_grad=True)
    (torch.sqrt(w) * 0).sum().backward()
    return w.grad


def test_anomaly_detection_names_the_op_whose_backward_made_a_nan():
    assert torch.isnan(nan_backward()).all()  # unnoticed without it
    with pytest.raises(TrainingFailed, match="SqrtBackward0"), pytest.warns(UserWarning), anomaly_detection(True):
        assert torch.is_anomaly_enabled()
        nan_backward()
    assert not torch.is_anomaly_enabled()  # restored for whatever runs next in this process
    with anomaly_detection(False):
        assert not torch.is_anomaly_enabled()
        nan_backward()


# End to end through the recipe.


def test_mptrain_debug_overfit_drives_the_loss_to_about_zero(tmp_path):
    summary, run_dir = train(tmp_path, ["debug=overfit", "model=mlp", "trainer.max_steps=60", "trainer.eval_every=60"])
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert losses[0] > 1.0 and losses[-1] < 0.05
    assert summary["val/acc"] == 1.0 and summary["val/loss"] < 0.05


def test_mptrain_debug_profile_writes_a_trace_and_a_table(tmp_path):
    summary, run_dir = train(tmp_path, ["debug=profile", "model.width=8"])
    assert summary["steps"] == 6
    assert len(list((run_dir / "profile").glob("*.pt.trace.json"))) == 1
    assert "aten::" in (run_dir / "profile" / "top_ops.txt").read_text()
