"""logger=wandb: a real offline run, read back from W&B's own run file (nothing leaves the machine)."""

from __future__ import annotations

import json
import struct
import time

import pytest

from mptrain.errors import ConfigError
from mptrain.run import wandb_logger

from .conftest import TINY, compose_config, read_jsonl

wandb = pytest.importorskip("wandb")

RUN = ["model=mlp", "model.width=8", "model.depth=2", "precision=fp32", "trainer.max_steps=6", "trainer.log_every=2",
       "trainer.eval_every=3", "checkpoint.enabled=false", "diagnostics=off", "logger=wandb"]


@pytest.fixture
def logged_out(tmp_path, monkeypatch):
    """No W&B credentials anywhere, no mode chosen: a user who never ran `wandb login`."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def read_wandb_records(path):
    """W&B's .wandb file, read by hand: a 7-byte header (':W&B', magic, version), then LevelDB-log blocks of
    32 KiB whose chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) carry protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, chunk, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_offline_run_files_hold_the_config_every_metric_row_the_summary_and_the_plan(tmp_path, logged_out):
    from mptrain.config import validate
    from mptrain.train.recipe import run

    cfg = compose_config(TINY + RUN + ["logger.experiment=proj"])
    validate(cfg)
    run_dir = tmp_path / "run"
    summary = run(cfg, run_dir)

    recorded = json.loads((run_dir / "wandb.json").read_text())
    assert recorded["mode"] == "offline"  # not logged in: nothing is uploaded
    (folder,) = (run_dir / "wandb").glob(f"offline-run-*-{recorded['id']}")
    # W&B's service writes the file on its own thread and may still be at it when finish() returns: read it once
    # it holds the run's exit record (as `wandb sync` would, after mptrain's process has ended)
    deadline = time.monotonic() + 60
    while True:
        try:
            records = read_wandb_records(folder / f"run-{recorded['id']}.wandb")
        except Exception:  # a chunk still being written does not parse yet
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    by_kind = {}
    for r in records:
        by_kind.setdefault(r.WhichOneof("record_type"), []).append(r)

    (run_record,) = by_kind["run"]
    assert run_record.run.project == "proj" and run_record.run.display_name == "run"
    config = {item.key: json.loads(item.value_json) for item in run_record.run.config.update}
    assert config["optimizer"]["lr"] == cfg.optimizer.lr
    assert config["model"]["width"] == 8 and config["logger"]["name"] == "wandb"

    # every metrics.jsonl row: same steps, names and values (the step is W&B's _step)
    history = []
    for r in by_kind["history"]:
        items = {"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
        history.append(({k: v for k, v in items.items() if not k.startswith("_")}, items["_step"]))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    # a validation row shares its step with a training row: W&B merges rows of one step into one
    expected: dict[int, dict] = {}
    for row in rows:
        expected.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step" and v is not None
                                                     and not isinstance(v, str)})
    assert {step: values for values, step in history} == expected
    assert [s for _, s in history] == [2, 3, 4, 6] and "val/acc" in expected[3] and "loss" in expected[2]

    # the summary and the precision plan
    updates = {}
    for r in by_kind["summary"]:
        updates.update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert updates["status"] == on_disk["status"] == summary["status"] == "completed"
    assert updates["steps"] == 6 and updates["val/acc"] == on_disk["val/acc"]
    plan = {}
    for r in by_kind.get("config", []):
        plan.update({i.key: json.loads(i.value_json) for i in r.config.update if i.key == "precision_plan"})
    assert plan["precision_plan"] == json.loads((run_dir / "precision_plan.json").read_text())
    (exit_record,) = by_kind["exit"]
    assert exit_record.exit.exit_code == 0


def test_mode_follows_the_login_and_wandb_mode(tmp_path, logged_out, monkeypatch):
    assert wandb_logger.resolve_mode(None) == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_logger.resolve_mode(None) == "online"  # `wandb login` wrote this file
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # logged in elsewhere, not to this host
    assert wandb_logger.resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_logger.resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_logger.resolve_mode(None) == "disabled"
    assert wandb_logger.resolve_mode("offline") == "offline"  # logger.mode decides over the environment
    monkeypatch.setenv("WANDB_MODE", "nope")
    with pytest.raises(ConfigError, match="WANDB_MODE=nope is not a W&B mode; choose online, offline, disabled"):
        wandb_logger.resolve_mode(None)


@pytest.mark.parametrize("problem, message", [
    ("missing", wandb_logger.MISSING_MESSAGE),
    ("mode", "WANDB_MODE=upload is not a W&B mode; choose online, offline, disabled"),
])
def test_a_tracker_that_cannot_run_is_refused_before_the_run_directory_changes(tmp_path, logged_out, monkeypatch,
                                                                               problem, message):
    import sys

    from mptrain.train.recipe import run

    if problem == "missing":  # as on an install without mptrain[wandb]
        monkeypatch.setitem(sys.modules, "wandb", None)
    else:
        monkeypatch.setenv("WANDB_MODE", "upload")
    cfg = compose_config(TINY + RUN)
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path / "run")
    assert str(e.value) == message
    assert not (tmp_path / "run").exists()
