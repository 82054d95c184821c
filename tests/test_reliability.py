"""Issue 14: what a run directory and its checkpoints survive (docs/checkpoints.md, "What can go wrong")."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mptrain.checkpoint.files import NonFiniteCheckpoint, find_resumable, finite_state, load_file, save_atomic
from mptrain.config import check_monitor, check_warmup, validate
from mptrain.errors import CheckpointError, ConfigError
from mptrain.precision import Precision
from mptrain.run.directory import prepare_records
from mptrain.run.layout import JsonlError, OutputError, read_jsonl, write_json_atomic
from mptrain.run.lock import RunDirError, RunLock

from .conftest import compose_config, run_cli, train

QUICK = ["trainer.device=cpu", "trainer.progress_bar=false", "trainer.tensorboard=false", "model.width=4",
         "trainer.max_steps=2", "diagnostics=off"]


def fake_checkpoint(step: int, weight: float = 1.0) -> dict:
    """The fields a resume reads, with a tiny model and an SGD momentum buffer."""
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"format_version": 1, "config": {}, "precision": {"mode": "fp32"}, "scheduler": {}, "loop": {}, "rng": {},
            "train_state": {"step": step, "epoch": 0, "step_in_epoch": step, "samples": step},
            "model": model.state_dict(), "optimizer": opt.state_dict()}


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. divergence never reaches a checkpoint ---------------------------------------------------------

def test_finite_state_names_the_first_non_finite_tensor():
    rng = np.random.default_rng(0)
    arrays = {f"w{i}": rng.standard_normal(5).astype(np.float32) for i in range(6)}
    arrays["w3"][2] = np.nan
    arrays["w5"][0] = np.inf
    expected = next(k for k, a in arrays.items() if not np.isfinite(a).all())  # numpy's answer
    state = {k: torch.from_numpy(a) for k, a in arrays.items()}
    assert finite_state(state, None) == f"model.{expected}"
    # finite float16 values near the top of the range do not count as overflow
    assert finite_state({"h": torch.full((4,), 65504.0, dtype=torch.float16)}, {"state": {}}) is None
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg_sq": torch.tensor([1.0, -math.inf])}}}
    assert finite_state({"w": torch.ones(2)}, opt) == "optimizer.state.0.exp_avg_sq"


def test_non_finite_checkpoint_is_not_written_and_the_previous_one_stays(tmp_path):
    good = fake_checkpoint(step=4)
    save_atomic(good, tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    bad = fake_checkpoint(step=5)
    bad["model"]["bias"][1] = math.nan
    with pytest.raises(NonFiniteCheckpoint, match=r"step 5: model\.bias holds inf or NaN"):
        save_atomic(bad, tmp_path / "last.pt", also=tmp_path / "step_5.pt")
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no step file, no temp file


def test_resume_auto_picks_the_newest_finite_checkpoint(tmp_path):
    save_atomic(fake_checkpoint(step=2), tmp_path / "step_2.pt")
    poisoned = fake_checkpoint(step=4)
    poisoned["optimizer"]["state"][0]["momentum_buffer"][0, 0] = math.inf
    torch.save(poisoned, tmp_path / "last.pt")  # written by an older mptrain, without the check
    os.link(tmp_path / "last.pt", tmp_path / "step_4.pt")
    path, ckpt = find_resumable(tmp_path)
    assert path.name == "step_2.pt" and ckpt["train_state"]["step"] == 2


# ---- 12. hard links are one file, not a backup ---------------------------------------------------------

def test_linked_step_file_is_not_counted_as_a_backup(tmp_path, caplog):
    save_atomic(fake_checkpoint(step=2), tmp_path / "step_2.pt")
    save_atomic(fake_checkpoint(step=4), tmp_path / "last.pt", also=tmp_path / "step_4.pt")
    assert os.stat(tmp_path / "last.pt").st_ino == os.stat(tmp_path / "step_4.pt").st_ino
    with open(tmp_path / "last.pt", "r+b") as f:  # damage in place: both names see it
        f.truncate(100)
    caplog.set_level("WARNING", logger="mptrain")
    path, ckpt = find_resumable(tmp_path)
    assert path.name == "step_2.pt"
    assert sum("skipping checkpoint" in r.message for r in caplog.records) == 1  # last.pt only, not step_4.pt again


# ---- 3. torn lines ---------------------------------------------------------------------------------------

def test_jsonl_reader_drops_a_torn_last_line_and_refuses_a_bad_middle_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(JsonlError, match="line 2 is not JSON"):
        read_jsonl(path)


# ---- 2. records exact across attempts -------------------------------------------------------------------

def write_rows(path: Path, rows: list[dict], torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def test_resume_cuts_every_per_step_file_back_to_the_checkpoint(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in range(1, 8)], torn='{"step": 8, "l')
    meta = {"event": "meta", "bins": [1, 2]}
    write_rows(tmp_path / "diagnostics.jsonl", [meta] + [{"event": "sample", "step": s} for s in (1, 2, 4, 6)])
    os.chmod(tmp_path / "metrics.jsonl", 0o640)
    prepare_records(tmp_path, resume_step=4)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert read_jsonl(tmp_path / "diagnostics.jsonl") == [meta] + [{"event": "sample", "step": s} for s in (1, 2, 4)]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")  # the torn tail is gone, appends start clean
    assert (tmp_path / "metrics.jsonl").stat().st_mode & 0o777 == 0o640


def test_fresh_start_sets_earlier_records_aside(tmp_path):
    for attempt in (1, 2):
        write_rows(tmp_path / "metrics.jsonl", [{"step": 1, "attempt": attempt}])
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.pt").write_bytes(b"damaged")
        prepare_records(tmp_path, resume_step=None)
        kept = tmp_path / f"previous_{attempt}"
        assert read_jsonl(kept / "metrics.jsonl") == [{"step": 1, "attempt": attempt}]
        assert (kept / "checkpoints" / "last.pt").read_bytes() == b"damaged"
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_torn_metrics_line_does_not_block_resume_auto(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli([*QUICK, "trainer.log_every=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')
    again = run_cli(
        [*QUICK, "trainer.log_every=1", "trainer.max_steps=3", f"hydra.run.dir={run_dir}", "resume=auto"], cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


# ---- 5. one run per directory -------------------------------------------------------------------------------

HOLD = ("import sys, time; from pathlib import Path; from mptrain.run.lock import RunLock; "
        "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)")


def test_second_run_into_a_held_directory_is_refused_naming_the_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"in use by another mptrain run \\(pid {holder.pid}\\)"):
            RunLock(tmp_path).acquire()
        holder.kill()  # kill -9: the kernel drops the lock
        holder.wait()
        lock = RunLock(tmp_path).acquire()
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        lock.release()
        assert not (tmp_path / ".lock").exists()
    finally:
        holder.kill()
        holder.wait()


# the holder forks a child (as a DataLoader worker is forked) that outlives it: the lock must end with the holder
HOLD_AND_FORK = ("import os, sys, time; from pathlib import Path; from mptrain.run.lock import RunLock; "
                 "RunLock(Path(sys.argv[1])).acquire(); child = os.fork(); "
                 "(time.sleep(60), os._exit(0)) if child == 0 else None; print('held', child, flush=True); "
                 "time.sleep(60)")


def test_a_killed_runs_lock_ends_with_it_not_with_its_forked_children(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        word, child = holder.stdout.readline().split()
        child = int(child)
        holder.kill()  # kill -9 of the run; its forked child lives on
        os.kill(child, 0)  # still alive
        lock = RunLock(tmp_path).acquire()  # at once, not reaped yet: the dead holder's lock is waited for
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        lock.release()
    finally:
        holder.kill()
        holder.wait()
        if child:
            os.kill(child, 9)


def test_a_lock_leaves_nothing_behind_in_the_process_once_released(tmp_path):
    """A long multirun process takes one lock per job: a released lock is not kept alive by a fork callback, and
    a child forked after the release has no lock to close (the next job's lock still closes in a child)."""
    import gc
    import weakref

    lock = RunLock(tmp_path).acquire()
    lock.release()
    ref = weakref.ref(lock)
    del lock
    gc.collect()
    assert ref() is None
    held = RunLock(tmp_path).acquire()
    pid = os.fork()
    if pid == 0:  # the child: its copy of the held lock's file is closed at the fork
        os._exit(0 if held._fd is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and held._fd is not None  # the parent still holds it
    held.release()


# ---- 9. file modes --------------------------------------------------------------------------------------------

def test_summary_and_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "summary.json", {"status": "completed"})
        save_atomic(fake_checkpoint(step=1), tmp_path / "last.pt", also=tmp_path / "step_1.pt")
    finally:
        os.umask(old)
    for name in ("summary.json", "last.pt", "step_1.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


# ---- 7. write failures -----------------------------------------------------------------------------------------

FULL = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
from mptrain.checkpoint.files import save_atomic
from mptrain.errors import CheckpointError
from tests.test_reliability import fake_checkpoint
d = Path(sys.argv[1])
save_atomic(fake_checkpoint(step=1), d / "last.pt")
big = fake_checkpoint(step=2)
big["model"]["weight"] = __import__("torch").ones(1 << 20)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    save_atomic(big, d / "last.pt")
except CheckpointError as e:
    print(e)
"""


@pytest.mark.slow
def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", FULL, str(tmp_path)], capture_output=True, text=True, cwd=repo,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"could not write checkpoint {tmp_path / 'last.pt'}: File too large" in proc.stdout
    assert "previous checkpoint is intact" in proc.stdout and "Traceback" not in proc.stderr
    assert load_file(tmp_path / "last.pt")["train_state"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# ---- 10. values that pass the range checks and cannot work ----------------------------------------------------

@pytest.mark.parametrize("override", ["optimizer.lr=inf", "optimizer.weight_decay=inf", "optimizer=adamw",
                                      "trainer.loss_weight=inf", "precision.loss_scale.init=inf",
                                      "trainer.device=cuda:abc"])
def test_unworkable_values_are_refused(override):
    overrides = [override] + (["optimizer.eps=inf"] if override == "optimizer=adamw" else [])
    key = overrides[-1].split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(overrides))


def test_static_scale_above_fp16_max_is_named(caplog):
    # a warning, not a refusal: with tiny gradients (a small trainer.loss_weight) such a scale is what
    # mptrain-advise recommends, and it works (tests/test_advise.py)
    cfg = compose_config(["precision=static", "precision.dtype=float16", "precision.loss_scale.init=131072"])
    with caplog.at_level("WARNING"):
        Precision(cfg.precision, torch.device("cpu"))
    assert "above float16's largest value" in caplog.text
    ok = compose_config(["precision=static", "precision.dtype=float16", "precision.loss_scale.init=32768"])
    assert Precision(ok.precision, torch.device("cpu")).loss_scale == 32768


def test_warmup_longer_than_the_run_is_named_and_unknown_monitor_refused(caplog):
    cfg = compose_config(["scheduler=cosine", "scheduler.warmup_steps=10"])
    assert check_warmup(cfg.scheduler, total_steps=20) and not caplog.records  # exactly half: no warning
    with caplog.at_level("WARNING", logger="mptrain"):
        assert not check_warmup(cfg.scheduler, total_steps=19)
    assert "warmup_steps=10 covers more than half of the run (19 steps)" in caplog.text
    assert len(caplog.records) == 1
    check_monitor("val/acc", ["val/loss", "val/acc"])
    with pytest.raises(ConfigError, match="val/ppl"):
        check_monitor("val/ppl", ["val/loss", "val/acc"])


# ---- 11. bad checkpoint files ------------------------------------------------------------------------------------

class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/mptrain_pwned_rel",))


def test_bad_resume_files_get_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_file(tmp_path)
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"format_version": 1, "x": RunsCode()}, protocol=4))
    with pytest.raises(CheckpointError, match=r"would run code when loaded \(posix\.system\)"):
        load_file(tmp_path / "plain.pkl")
    crafted = fake_checkpoint(step=3)
    crafted["train_state"]["step"] = "3"
    torch.save(crafted, tmp_path / "crafted.pt")
    with pytest.raises(CheckpointError, match=r"malformed: train_state\.step is '3'"):
        load_file(tmp_path / "crafted.pt")
    crafted = fake_checkpoint(step=3)
    crafted["format_version"] = "1"
    torch.save(crafted, tmp_path / "crafted.pt")
    with pytest.raises(CheckpointError, match="malformed: format_version"):
        load_file(tmp_path / "crafted.pt")
    assert not Path("/tmp/mptrain_pwned_rel").exists()


# ---- 4 and 11. refused runs change nothing; one line, no traceback ---------------------------------------------

@pytest.mark.slow
def test_refused_run_changes_nothing_in_its_directory(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli([*QUICK, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = digest(run_dir)
    for bad in (["optimizer.lr=inf", "resume=auto"], ["model.width=8", "resume=auto"], []):  # value, model, fresh
        proc = run_cli([*QUICK, *bad, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("mptrain: error: "), proc.stderr
        assert "Traceback" not in proc.stderr
        assert digest(run_dir) == before, bad  # no attempt_<k>, no overrides.yaml, no train.log line, no .lock


def test_unusable_run_directory_and_bad_yaml_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run_cli([*QUICK, f"hydra.run.dir={tmp_path / 'afile'}"], cwd=tmp_path)
    assert proc.returncode == 2 and "is a file, not a directory" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "broken.yaml").write_text("name: x\n  bad: [1,\n")
    proc = run_cli(["--config-dir", str(tmp_path / "conf"), "model=broken"], cwd=tmp_path)
    assert proc.returncode == 2 and "broken.yaml line 2, column 6: invalid YAML" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- 6. a signal stops the whole sweep -----------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_stops_a_sweep_and_records_unfinished_jobs(tmp_path):
    sweep = tmp_path / "multi"
    args = ["-m", "seed=0,1,2", "trainer.device=cpu", "trainer.progress_bar=false", "trainer.tensorboard=false",
            "model.width=4", "trainer.max_steps=100000", "trainer.log_every=1", "diagnostics=off",
            f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "mptrain", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (sweep / "0" / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "sweep stopped by SIGTERM" in err and "Traceback" not in err
    statuses = {d.name: json.loads((d / "summary.json").read_text())["status"] for d in sweep.iterdir() if d.is_dir()}
    assert statuses == {"0": "interrupted", "1": "interrupted", "2": "interrupted"}
    assert (sweep / "0" / "checkpoints" / "last.pt").is_file() and not (sweep / "1" / "checkpoints").exists()
    assert all((sweep / j / ".hydra" / "overrides.yaml").is_file() for j in ("0", "1", "2"))


# ---- 12. faults of a user's own pieces and of the run's files (docs/checkpoints.md, "What can go wrong") ----------

RUN = ["model=mlp", "model.width=8", "model.depth=1", "trainer.max_steps=2", "trainer.log_every=1"]


@pytest.mark.parametrize(("override", "message"), [
    ("model._target_=torch.nn.Linear", "model._target_=torch.nn.Linear failed: TypeError: "),
    ("model._target_=collections.OrderedDict", "returned a OrderedDict, not a torch.nn.Module"),
    ("model.num_classes=3", "the model's output has 3 classes but the data have label 9"),
])
def test_user_model_faults_are_one_line_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        train(tmp_path, [*RUN, override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unwritable_metrics_or_summary_is_one_line_naming_the_file(tmp_path):
    _, run_dir = train(tmp_path, RUN)
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").mkdir()  # opening it for appending fails
    with pytest.raises(OutputError, match=r"could not open .*metrics\.jsonl: Is a directory"):
        train(tmp_path, [*RUN, "trainer.max_steps=3", "resume=auto"])
    (run_dir / "metrics.jsonl").rmdir()
    (run_dir / "summary.json").unlink()
    (run_dir / "summary.json").mkdir()  # the rename over it fails at the end of a completed run
    with pytest.raises(OutputError, match=r"could not write .*summary\.json: Is a directory"):
        train(tmp_path, [*RUN, "trainer.max_steps=4", "resume=auto"])
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"] == 4


def test_recipe_warns_of_a_long_warmup_and_refuses_an_unknown_monitor(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="mptrain"):
        train(tmp_path / "a", [*RUN, "scheduler=cosine", "scheduler.warmup_steps=5"])
    assert "scheduler.warmup_steps=5 covers more than half of the run (2 steps)" in caplog.text
    with pytest.raises(ConfigError, match="checkpoint.monitor='val/ppl'"):
        train(tmp_path / "b", [*RUN, "checkpoint.monitor=val/ppl"])
    assert not (tmp_path / "b" / "run").exists()  # refused before the run directory was made


def test_resume_with_another_lr_applies_it_at_the_schedules_position(tmp_path):
    """The optimizer's state_dict carries its lr: a resume with optimizer.lr changed must not keep the old one.
    Cosine, no warm-up, over the run's max_steps T: a row's lr (after its step) is lr * 0.5 * (1 + cos(pi * s / T));
    the first attempt has T = 3, the resumed one T = 6."""
    sched = ["scheduler=cosine", "scheduler.warmup_steps=0", "trainer.max_steps=6"]
    train(tmp_path, [*RUN, *sched, "trainer.max_steps=3", "optimizer.lr=0.05"])
    summary, run_dir = train(tmp_path, [*RUN, *sched, "optimizer.lr=0.2", "resume=auto"])
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "lr" in r]
    expected = {
        s: 0.05 * 0.5 * (1 + math.cos(math.pi * s / 3)) if s <= 3 else 0.2 * 0.5 * (1 + math.cos(math.pi * s / 6))
        for s in range(1, 7)
    }
    assert {r["step"]: r["lr"] for r in rows} == pytest.approx(expected, rel=1e-12)
    assert summary["status"] == "completed"
