"""trainer.ema: the fp32 average equals its recomputation from the run's own weights, is validated as
val_ema/..., stays fp32 under bf16 weights, and resumes bitwise."""

from __future__ import annotations

import json

import pytest
import torch

from mptrain.config import validate
from mptrain.train.recipe import build

from .conftest import TINY, compose_config, read_jsonl, train
from .test_checkpoint import assert_same_tensors, final_state

RUN = ["model=cnn", "model.width=4", "trainer.batch_size=32", "trainer.max_steps=6", "scheduler=none",
       "diagnostics=off", "trainer.ema.enabled=true", "trainer.log_every=2", "trainer.eval_every=3"]

LINEAR = "head.2.weight"  # SmallCNN's output layer


@pytest.mark.slow
def test_average_equals_its_recomputation_from_the_weights_of_each_step(tmp_path):
    overrides = [*RUN, "trainer.ema.decay=0.8", "precision=fp32", "checkpoint.every_steps=1", "checkpoint.keep_last=10"]
    _, run_dir = train(tmp_path, overrides)
    cfg = compose_config([*TINY, *overrides])
    validate(cfg)
    ema = {k: v.float() for k, v in build(cfg).base_model.state_dict().items()}  # the same seeded initial weights
    for step in range(1, 7):
        ckpt = torch.load(run_dir / "checkpoints" / f"step_{step}.pt", weights_only=True)
        for k, w in ckpt["model"].items():
            if w.is_floating_point():
                ema[k] = 0.8 * ema[k] + 0.2 * w.float()
                torch.testing.assert_close(ckpt["ema"]["shadow"][k], ema[k], rtol=1e-6, atol=1e-7, msg=f"{step} {k}")
            else:
                assert torch.equal(ckpt["ema"]["shadow"][k], w)  # num_batches_tracked is copied
        assert not torch.equal(ckpt["ema"]["shadow"][LINEAR], ckpt["model"][LINEAR])  # an average, not a copy
    # its memory: 4 bytes for every float entry of the state_dict (batch-norm statistics too), per parameter
    summary = json.loads((run_dir / "summary.json").read_text())
    floats = sum(v.numel() for v in ckpt["model"].values() if v.is_floating_point())
    params = sum(p.numel() for p in build(cfg).base_model.parameters())
    assert summary["memory_per_param"]["ema"] == pytest.approx(4 * floats / params, abs=1e-3)


def test_under_master_weights_the_average_follows_the_fp32_masters(tmp_path):
    """precision=master: the model holds fp16 weights, the optimizer fp32 masters. The average is recomputed
    from each step's saved masters; averaging the fp16 copies instead is off by their rounding (2^-11)."""
    overrides = [*RUN, "model=mlp", "trainer.ema.decay=0.8", "precision=master", "checkpoint.every_steps=1",
                 "checkpoint.keep_last=10"]
    _, run_dir = train(tmp_path, overrides)
    cfg = compose_config([*TINY, *overrides])
    validate(cfg)
    model = build(cfg).base_model  # the same seeded initial weights, as fp32
    names = [n for n, p in model.named_parameters()]
    ema = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    off_by_rounding = False
    for step in range(1, 7):
        ckpt = torch.load(run_dir / "checkpoints" / f"step_{step}.pt", weights_only=True)
        masters = dict(zip(names, ckpt["precision"]["master"]["masters"]))  # every MLP parameter has one
        assert ckpt["model"][names[0]].dtype == torch.float16
        for n in names:
            ema[n] = 0.8 * ema[n] + 0.2 * masters[n]
            torch.testing.assert_close(ckpt["ema"]["shadow"][n], ema[n], rtol=1e-6, atol=1e-7, msg=f"{step} {n}")
            # the fp16 copy the model computes with is not the master (so the check above tells them apart)
            off_by_rounding |= not torch.allclose(ckpt["model"][n].float(), masters[n], rtol=1e-5, atol=0)
    assert off_by_rounding


@pytest.mark.slow
def test_turned_on_at_a_resume_it_starts_from_the_checkpoints_masters(tmp_path):
    """A master-weights run without EMA, resumed from step 2 with trainer.ema on: the average starts from the
    step-2 fp32 masters (not the fp16 copies, not a fresh model) and follows the recurrence from there."""
    base = [*RUN, "model=mlp", "precision=master", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
            "trainer.ema.enabled=false", "trainer.max_steps=4"]
    _, ref = train(tmp_path / "ref", base)
    _, cut = train(tmp_path / "cut", [*base, "trainer.ema.enabled=true", "trainer.ema.decay=0.8",
                                      f"resume={ref / 'checkpoints' / 'step_2.pt'}"])
    names = list(torch.load(ref / "checkpoints" / "step_2.pt", weights_only=True)["model"])  # MLP: parameters only

    def masters(run, step):
        ckpt = torch.load(run / "checkpoints" / f"step_{step}.pt", weights_only=True)
        return ckpt, dict(zip(names, ckpt["precision"]["master"]["masters"]))

    _, ema = masters(ref, 2)
    for step in (3, 4):
        ckpt, now = masters(cut, step)
        ema = {n: 0.8 * ema[n] + 0.2 * now[n] for n in names}
        for n in names:
            torch.testing.assert_close(ckpt["ema"]["shadow"][n], ema[n], rtol=1e-6, atol=1e-7, msg=f"{step} {n}")


@pytest.mark.slow
def test_val_ema_is_the_live_validation_when_the_average_is_the_live_weights(tmp_path):
    summary, run_dir = train(tmp_path, [*RUN, "trainer.ema.decay=1e-9", "precision=fp32", "checkpoint.enabled=false"])
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/acc" in r]
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert r["val_ema/acc"] == pytest.approx(r["val/acc"], abs=1e-9)
        assert r["val_ema/loss"] == pytest.approx(r["val/loss"], rel=1e-5)
    assert summary["val_ema/acc"] == rows[-1]["val_ema/acc"]


@pytest.mark.slow
def test_a_real_average_validates_differently(tmp_path):
    slow, _ = train(tmp_path / "slow", [*RUN, "trainer.ema.decay=0.99", "precision=fp32", "checkpoint.enabled=false"])
    assert slow["val_ema/loss"] != pytest.approx(slow["val/loss"], rel=1e-3)


@pytest.mark.slow
def test_average_stays_fp32_under_bf16_weights(tmp_path):
    _, run_dir = train(tmp_path, [*RUN, "precision=bf16_pure", "trainer.ema.decay=0.9"])
    ckpt = final_state(run_dir) | {"ema": torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["ema"]}
    assert ckpt["model"][LINEAR].dtype == torch.bfloat16
    assert ckpt["ema"]["shadow"][LINEAR].dtype == torch.float32


def test_resume_is_bitwise(tmp_path):
    base = [*RUN, "precision=amp", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]
    _, ref = train(tmp_path / "ref", base)
    _, cut = train(tmp_path / "cut", [*base, f"resume={ref / 'checkpoints' / 'step_2.pt'}"])
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    assert_same_tensors(a["ema"], b["ema"])
    assert_same_tensors(final_state(ref), final_state(cut))
    assert read_jsonl(ref / "metrics.jsonl")[1:] == read_jsonl(cut / "metrics.jsonl")


def test_a_decay_without_the_switch_is_refused_not_ignored(tmp_path):
    # issue 37 (21): trainer.ema.decay=0.99 alone trained with no average and no word
    from mptrain.errors import ConfigError

    off = [o for o in RUN if o != "trainer.ema.enabled=true"]
    with pytest.raises(ConfigError, match=r"^trainer.ema.decay=0.99 is invalid: no average is kept while "
                                          r"trainer.ema.enabled=false; add trainer.ema.enabled=true"):
        train(tmp_path, [*off, "trainer.ema.decay=0.99"])
    assert not (tmp_path / "run").exists()
    validate(compose_config([*off, "trainer.ema.decay=0.99", "trainer.ema.enabled=true"]))  # with it: accepted
    validate(compose_config(off))  # neither: no average, as asked


def test_a_new_decay_on_resume_leaves_the_weights_and_is_recorded_for_the_average(tmp_path, caplog):
    # issue 37 (left open): trainer.ema was not in SAFE_TO_CHANGE, so a resume with another decay warned "the run
    # continues on another course" (its weights do not change) and recorded it as a resume_change
    import logging

    base = [*RUN, "model=mlp", "precision=fp32", "trainer.ema.decay=0.8", "checkpoint.every_steps=1",
            "checkpoint.keep_last=10", "trainer.max_steps=4"]
    _, ref = train(tmp_path / "ref", base)
    with caplog.at_level(logging.INFO, logger="mptrain"):
        resumed, cut = train(tmp_path / "cut", [*base, "trainer.ema.decay=0.5",
                                                f"resume={ref / 'checkpoints' / 'step_2.pt'}"])
    lines = [r.getMessage() for r in caplog.records]
    assert "resume: trainer.ema.decay changed 0.8 -> 0.5 (given now; the steps already taken are unaffected)" in lines
    assert not [m for m in lines if "another course" in m or "is not the run the checkpoint began" in m], lines
    assert resumed["events"] == [{"event": "ema_change", "step": 2, "key": "trainer.ema.decay", "from": 0.8, "to": 0.5}]
    ema = torch.load(ref / "checkpoints" / "step_2.pt", weights_only=True)["ema"]["shadow"]
    for step in (3, 4):
        mine = torch.load(cut / "checkpoints" / f"step_{step}.pt", weights_only=True)
        theirs = torch.load(ref / "checkpoints" / f"step_{step}.pt", weights_only=True)
        for k, w in mine["model"].items():
            assert torch.equal(w, theirs["model"][k]), (step, k)  # the weights' course is the straight run's
            ema[k] = 0.5 * ema[k] + 0.5 * w.float()  # the average follows the new decay from the resume on
            torch.testing.assert_close(mine["ema"]["shadow"][k], ema[k], rtol=1e-6, atol=1e-7, msg=f"{step} {k}")
