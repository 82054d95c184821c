"""Checkpoints and exact resume: bit-identical continuation, signals, bad files, failed saves."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mptrain.checkpoint.callback import Checkpointer
from mptrain.checkpoint.signals import Interrupted
from mptrain.errors import CheckpointError

from .conftest import compose_config, read_jsonl, run_cli, train

SMALL = ["model.width=4", "trainer.log_every=1"]


def stop_at(monkeypatch, step: int) -> None:
    """Deliver a real SIGTERM to this process right after optimizer step `step`."""
    original = Checkpointer.on_step_end

    def hook(self, c, state, out=None):
        if state.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, c, state, out)

    monkeypatch.setattr(Checkpointer, "on_step_end", hook)


def assert_same_tensors(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return {k: ckpt[k] for k in ("model", "optimizer", "precision", "scheduler", "train_state")}


def stripped_rows(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("fp32", ["trainer.batch_size=256", "dataset.val_fraction=0.5"]),  # 3 steps per epoch: crosses epochs
        ("dynamic", ["trainer.batch_size=16", "precision.loss_scale.growth_interval=2"]),
        ("master", ["trainer.batch_size=16", "precision.loss_scale.growth_interval=2", "optimizer=adamw"]),
    ],
)
def test_stop_and_resume_is_bit_identical(tmp_path, monkeypatch, mode, extra):
    n = 6
    overrides = [f"precision={mode}", f"trainer.max_steps={2 * n}", *SMALL, *extra]
    ref_summary, ref_dir = train(tmp_path / "ref", overrides)

    stop_at(monkeypatch, n)
    with pytest.raises(Interrupted) as stopped:
        train(tmp_path / "cut", overrides)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    cut_dir = tmp_path / "cut" / "run"
    assert json.loads((cut_dir / "summary.json").read_text())["status"] == "interrupted"
    assert torch.load(cut_dir / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"] == n
    monkeypatch.undo()

    summary, _ = train(tmp_path / "cut", [*overrides, "resume=auto"])
    assert summary["status"] == "completed" and summary["steps"] == 2 * n
    assert_same_tensors(final_state(ref_dir), final_state(cut_dir))
    assert stripped_rows(ref_dir) == stripped_rows(cut_dir)
    if mode != "fp32":  # the window held a growth event and a skipped step
        scales = [r["loss_scale"] for r in stripped_rows(ref_dir) if "loss_scale" in r]
        assert ref_summary["skipped_steps"] >= 1 and max(scales) > 2.0**16


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    summary, run_dir = train(tmp_path, [*SMALL, "trainer.max_steps=3", "resume=auto"])
    assert summary["status"] == "completed" and summary["steps"] == 3


def test_fresh_start_into_a_run_with_checkpoints_is_refused(tmp_path):
    train(tmp_path, [*SMALL, "trainer.max_steps=2"])
    before = digest(tmp_path / "run")
    with pytest.raises(CheckpointError, match="resume=auto"):
        train(tmp_path, [*SMALL, "trainer.max_steps=2"])
    assert digest(tmp_path / "run") == before


def test_checkpoint_contents_are_plain_containers(tmp_path):
    _, run_dir = train(tmp_path, [*SMALL, "trainer.max_steps=2", "precision=master", "trainer.batch_size=16"])
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["format_version"] == 1 and ckpt["torch_version"] == str(torch.__version__)
    assert {
        "model",
        "precision",
        "optimizer",
        "scheduler",
        "train_state",
        "rng",
        "config",
        "mptrain_version",
    } <= ckpt.keys()
    assert {"python", "numpy", "torch"} <= ckpt["rng"].keys()
    assert ckpt["config"]["precision"]["mode"] == "master"
    assert ckpt["precision"]["scaler"]["scale"] == 2.0**16
    assert all(m.dtype == torch.float32 for m in ckpt["precision"]["master"]["masters"])
    assert ckpt["train_state"]["step"] == 2


# ---- bad files ------------------------------------------------------------------------------------

def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/mptrain_pwned",))


def corrupt(kind: str, good: Path, bad: Path) -> None:
    data = good.read_bytes()
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        bad.write_bytes(b"\x80\x02this is not a checkpoint" * 100)
    elif kind == "pickle_runs_code":
        torch.save({"format_version": 1, "evil": RunsCode()}, bad)
    elif kind == "newer_format":
        ckpt = torch.load(good, weights_only=True)
        ckpt["format_version"] = 99
        torch.save(ckpt, bad)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "truncated or corrupt"),
        ("garbage", "truncated or corrupt"),
        ("pickle_runs_code", "would run code"),
        ("newer_format", "format_version 99"),
        ("missing", "does not exist"),
    ],
)
def test_bad_checkpoint_file_is_refused_and_nothing_is_overwritten(tmp_path, kind, message):
    _, good_dir = train(tmp_path / "good", [*SMALL, "trainer.max_steps=2"])
    bad = tmp_path / "bad.pt"
    corrupt(kind, good_dir / "checkpoints" / "last.pt", bad)
    target = tmp_path / "target"
    train(target, [*SMALL, "trainer.max_steps=1"])
    before = digest(target / "run")
    with pytest.raises(CheckpointError, match=message):
        train(target, [*SMALL, "trainer.max_steps=4", f"resume={bad}"])
    assert digest(target / "run") == before
    assert not Path("/tmp/mptrain_pwned").exists()


def test_checkpoint_of_another_model_names_the_shapes(tmp_path):
    _, good_dir = train(tmp_path / "good", [*SMALL, "trainer.max_steps=2"])
    with pytest.raises(CheckpointError, match=r"another model: .*\[4, 1, 3, 3\] in the checkpoint vs \[8, 1, 3, 3\]"
                                              r".*\. Resume with the checkpoint's model settings, or start a new run"):
        train(tmp_path / "other", ["model.width=8", "trainer.max_steps=4", f"resume={good_dir}/checkpoints/last.pt"])


@pytest.mark.slow
def test_damaged_last_falls_back_to_newest_step_file(tmp_path):
    overrides = [*SMALL, "trainer.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=2"]
    ref, ref_dir = train(tmp_path / "ref", overrides)
    _, run_dir = train(
        tmp_path / "cut",
        [*SMALL, "trainer.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=2", "scheduler=none"],
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == ["step_2.pt", "step_4.pt"]
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"\0" * 100)
    summary, _ = train(tmp_path / "cut", [*SMALL, "trainer.max_steps=6", "checkpoint.every_steps=2", "resume=auto",
                                          "scheduler=none"])
    assert summary["steps"] == 6
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed from step 4, no duplicate rows


def test_failed_save_stops_cleanly_with_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import mptrain.checkpoint.files as ck

    _, run_dir = train(tmp_path, [*SMALL, "trainer.max_steps=2", "checkpoint.every_steps=1", "scheduler=none"])
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        train(tmp_path, [*SMALL, "trainer.max_steps=4", "checkpoint.every_steps=1", "resume=auto", "scheduler=none"])
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"] == 2


# ---- real processes and real signals ---------------------------------------------------------------

CLI = [
    "trainer.device=cpu",
    "model.width=4",
    "trainer.log_every=1",
    "trainer.max_steps=300",
    "trainer.tensorboard=false",
    "trainer.progress_bar=false",
    "precision=fp32",
    "scheduler=none",
]


def start(run_dir: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mptrain", *CLI, f"hydra.run.dir={run_dir}", *extra], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_rows(run_dir: Path, rows: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= rows:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("training did not start")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ref")
    proc = run_cli([*CLI, f"hydra.run.dir={root}/run"], cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "run"


@pytest.mark.parametrize("signum", [
    pytest.param(signal.SIGTERM, marks=pytest.mark.slow),  # signals run in the slow suite, as tests/test_faults.py does
    pytest.param(signal.SIGINT, marks=pytest.mark.slow),
    pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
])
def test_signal_checkpoints_and_resume_matches_uninterrupted(tmp_path, reference_run, signum):
    run_dir = tmp_path / "run"
    proc = start(run_dir, tmp_path)
    wait_for_rows(run_dir, 20, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 300
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"] == summary["steps"]

    proc = run_cli([*CLI, f"hydra.run.dir={run_dir}", "resume=auto"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(final_state(reference_run), final_state(run_dir))
    assert stripped_rows(reference_run) == stripped_rows(run_dir)


@pytest.mark.slow
def test_sigkill_never_leaves_an_unreadable_checkpoint(tmp_path, reference_run):
    """Save every step (so kills land inside saves too), kill -9 three times, resume each time."""
    run_dir = tmp_path / "run"
    for attempt, rows in enumerate([15, 60, 120]):
        proc = start(run_dir, tmp_path, "checkpoint.every_steps=1", *(["resume=auto"] if attempt else []))
        wait_for_rows(run_dir, rows, proc)
        time.sleep(0.013 * (attempt + 1))
        proc.kill()
        proc.wait(timeout=60)
        ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)  # never unreadable
        assert ckpt["train_state"]["step"] > 0
    proc = run_cli([*CLI, f"hydra.run.dir={run_dir}", "resume=auto", "checkpoint.every_steps=1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(final_state(reference_run), final_state(run_dir))
    assert stripped_rows(reference_run) == stripped_rows(run_dir)


@pytest.mark.slow
def test_hydra_records_of_every_attempt_are_kept(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli([*CLI, "trainer.max_steps=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    for steps in (5, 7):
        proc = run_cli([*CLI, f"trainer.max_steps={steps}", "resume=auto", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    hydra = run_dir / ".hydra"
    assert "trainer.max_steps=3" in (hydra / "attempt_1" / "overrides.yaml").read_text()
    assert "trainer.max_steps=5" in (hydra / "attempt_2" / "overrides.yaml").read_text()
    assert "trainer.max_steps=7" in (hydra / "overrides.yaml").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 7


def test_config_changes_on_resume_are_logged(tmp_path, caplog):
    train(tmp_path, [*SMALL, "trainer.max_steps=2"])
    with caplog.at_level("INFO", logger="mptrain"):
        train(tmp_path, [*SMALL, "trainer.max_steps=3", "resume=auto", "seed=5"])
    text = caplog.text
    assert "trainer.max_steps changed 2 -> 3 (given now): the run continues on another course" in text
    assert "seed changed 0 -> 5" in text and "WARNING" in text


def test_compose_has_checkpoint_group():
    cfg = compose_config([])
    assert cfg.checkpoint.monitor == "val/acc" and cfg.resume is None
