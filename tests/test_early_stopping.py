"""trainer.early_stopping stops at the step its rule implies (recomputed here from the run's own validation
rows), records why in summary.json, and a resume stops where the straight run did."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch

from mptrain.errors import ConfigError

from .conftest import read_jsonl, train

RUN = [
    "model=mlp",
    "model.width=16",
    "model.depth=1",
    "trainer.batch_size=64",
    "optimizer.lr=0.5",
    "trainer.max_steps=60",
    "trainer.eval_every=3",
    "trainer.log_every=3",
    "diagnostics=off",
    "scheduler=none",
]


def expected_stop(values: list[tuple[int, float]], patience: int, min_delta: float, mode: str) -> int | None:
    """The rule, written out independently: the step of the validation that makes `patience` in a row
    without an improvement of more than min_delta over the best so far."""
    best, bad = None, 0
    for step, v in values:
        better = best is None or (v < best - min_delta if mode == "min" else v > best + min_delta)
        if better:
            best, bad = v, 0
        else:
            bad += 1
            if bad == patience:
                return step
    return None


@pytest.mark.parametrize(("monitor", "mode", "min_delta"),
                         [("val/loss", "min", 0.02), pytest.param("val/acc", "max", 0.01, marks=pytest.mark.slow)])
def test_stops_where_the_rule_says(monitor, mode, min_delta, tmp_path):
    # the full run's validation curve, then the same run with early stopping
    _, full = train(tmp_path / "full", [*RUN, "checkpoint.enabled=false"])
    curve = [(r["step"], r[monitor]) for r in read_jsonl(full / "metrics.jsonl") if monitor in r]
    stop = expected_stop(curve, 2, min_delta, mode)
    assert stop is not None and stop < 60, curve  # the case exercises a stop
    summary, run_dir = train(tmp_path / "es", [*RUN, "trainer.early_stopping.enabled=true",
                                               f"trainer.early_stopping.monitor={monitor}",
                                               "trainer.early_stopping.patience=2",
                                               f"trainer.early_stopping.min_delta={min_delta}"])
    assert summary["status"] == "completed" and summary["steps"] == stop
    assert summary["stop_reason"].startswith(f"early_stopping: {monitor} did not improve by more than {min_delta}")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == stop and any("loss" in r and r["step"] == stop for r in rows)
    assert (run_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_resume_before_the_stop_stops_at_the_same_step(tmp_path):
    es = [
        "trainer.early_stopping.enabled=true",
        "trainer.early_stopping.patience=2",
        "trainer.early_stopping.min_delta=0.02",
        "trainer.early_stopping.monitor=val/loss",
        "checkpoint.every_steps=6",
        "checkpoint.keep_last=20",
    ]
    straight, ref = train(tmp_path / "ref", [*RUN, *es])
    assert straight["steps"] > 12
    resumed, _ = train(tmp_path / "cut", [*RUN, *es, f"resume={ref / 'checkpoints' / 'step_12.pt'}"])
    assert resumed["steps"] == straight["steps"] and resumed["stop_reason"] == straight["stop_reason"]


def test_no_metric_to_monitor_is_refused_before_the_run_dir(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.early_stopping needs a metric"):
        train(tmp_path, [*RUN, "trainer.early_stopping.enabled=true", "checkpoint.monitor=null"])
    assert not (tmp_path / "run").exists()


def test_an_early_stop_before_any_logged_row_is_completed(tmp_path):
    # found by a hostile pass: eval every 2 steps, log every 10; the rule stops at step 4, before any row read a
    # gradient norm, and the run was called "did not train" (status failed, exit 1)
    summary, run_dir = train(tmp_path, [*RUN, "trainer.log_every=10", "trainer.eval_every=2",
                                        "trainer.early_stopping.enabled=true", "trainer.early_stopping.patience=1",
                                        "trainer.early_stopping.min_delta=0.5", "checkpoint.enabled=false"])
    assert summary["status"] == "completed" and summary["steps"] == 4, summary
    assert summary["stop_reason"]


def test_an_unknown_monitor_is_refused_before_the_run_directory_changes(tmp_path):
    # found by a hostile pass: monitor=val/nope trained to the end and never stopped, silently
    with pytest.raises(
        ConfigError, match=r"trainer.early_stopping.monitor='val/nope' is not a metric this run reports \(val/"
    ):
        train(
            tmp_path / "run", [*RUN, "trainer.early_stopping.enabled=true", "trainer.early_stopping.monitor=val/nope"]
        )
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# a resumed early-stopped run under another rule (found by a hostile pass: it trained nothing, kept the old
# stop_reason and listed the change as if applied); an unchanged one is finished like a completed run
ES = ["trainer.early_stopping.enabled=true", "trainer.early_stopping.monitor=val/loss",
      "trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=0.02"]


def tree(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def stopped(tmp_path):
    summary, run_dir = train(tmp_path, [*RUN, *ES])
    assert summary["stop_reason"].startswith("early_stopping:") and summary["steps"] < 60, summary
    return summary, run_dir, tmp_path


def test_an_unchanged_resume_of_an_early_stopped_run_changes_no_file(stopped, caplog):
    summary, run_dir, tmp_path = stopped
    before = tree(run_dir)
    with caplog.at_level(logging.INFO, logger="mptrain"):
        again, _ = train(tmp_path, [*RUN, *ES, "resume=auto"])
    assert again == summary and tree(run_dir) == before
    assert any("is finished, stopped early (early_stopping: val/loss" in r.getMessage() for r in caplog.records)


def test_a_rule_that_still_says_stop_changes_no_file(stopped):
    summary, run_dir, tmp_path = stopped
    before = tree(run_dir)
    again, _ = train(tmp_path, [*RUN, *ES, "trainer.early_stopping.patience=1", "resume=auto"])
    assert again == summary and tree(run_dir) == before


def test_early_stopping_off_on_resume_trains_to_max_steps(stopped, caplog):
    summary, run_dir, tmp_path = stopped
    with caplog.at_level(logging.INFO, logger="mptrain"):
        done, _ = train(tmp_path, [*RUN, "trainer.early_stopping.enabled=false", "resume=auto"])
    assert done["status"] == "completed" and done["steps"] == 60 and "stop_reason" not in done, done
    # the rule does not steer the weights: no "another course" warning and no resume_change in the record (issue 37)
    lines = [r.getMessage() for r in caplog.records]
    assert ("resume: trainer.early_stopping.enabled changed True -> False (given now; the steps already taken are "
            "unaffected)") in lines
    assert "events" not in done and not [m for m in lines if "another course" in m], lines
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps[-1] == 60 and max(s for s in steps if s <= summary["steps"]) == summary["steps"]


@pytest.mark.slow
def test_a_raised_patience_continues_as_the_straight_run_with_it(stopped):
    summary, run_dir, tmp_path = stopped
    wider = [*ES, "trainer.early_stopping.patience=4"]
    ref, ref_dir = train(tmp_path / "ref", [*RUN, *wider])
    curve = [(r["step"], r["val/loss"]) for r in read_jsonl(ref_dir / "metrics.jsonl") if "val/loss" in r]
    assert ref["steps"] > summary["steps"]  # the case exercises a continuation
    assert ref["steps"] == (expected_stop(curve, 4, 0.02, "min") or 60)
    done, _ = train(tmp_path, [*RUN, *wider, "resume=auto"])
    assert done["steps"] == ref["steps"] and done.get("stop_reason") == ref.get("stop_reason")
    timing = ("wall_s", "samples_per_s", "peak_memory_mb")  # the record is the straight run's: no resume_change
    assert {k: v for k, v in done.items() if k not in timing} == {k: v for k, v in ref.items() if k not in timing}
    a = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(ref_dir / "checkpoints" / "last.pt", weights_only=False)
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    assert a["train_state"]["early_stopping"] == b["train_state"]["early_stopping"]
    # every row the same, the stopped attempt's included (eval_every and log_every divide the stop step)
    assert read_jsonl(run_dir / "metrics.jsonl") == read_jsonl(ref_dir / "metrics.jsonl")

def test_early_stopping_without_validation_data_is_refused_in_one_line(tmp_path, caplog):
    import numpy as np
    data = tmp_path / "data"
    data.mkdir()
    np.random.default_rng(0).integers(0, 50, 4000).astype(np.uint16).tofile(data / "train.bin")
    gpt = ["model=gpt", "model.dim=16", "model.layers=1", "model.heads=2", "trainer.batch_size=4", "dataset=tokens",
           f"dataset.path={data}", "dataset.vocab_size=50", "dataset.seq_len=8", "trainer.max_steps=2",
           "scheduler=none", "diagnostics=off"]
    with pytest.raises(ConfigError, match=r"^trainer.early_stopping watches validation metrics, but dataset .* has no "
                                          r"validation data; .*trainer.early_stopping.enabled=false$") as e:
        train(tmp_path, [*gpt, "trainer.early_stopping.enabled=true"])
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
    # without early stopping it trains, and says nothing of a best.pt it cannot write
    with caplog.at_level(logging.INFO, logger="mptrain"):
        summary, run_dir = train(tmp_path, gpt)
    assert summary["status"] == "completed" and not (run_dir / "checkpoints" / "best.pt").exists()
    assert not [r for r in caplog.records if "best.pt" in r.getMessage()]
