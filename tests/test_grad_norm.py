"""The gradient norm in every metrics row: the total norm of the unscaled gradients of that step, checked
against torch.nn.utils.clip_grad_norm_ on an independent recomputation of the step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mptrain.config import validate
from mptrain.train.recipe import build

from .conftest import TINY, compose_config, read_jsonl, train

BASE = ["model=mlp", "model.width=16", "model.depth=2", "scheduler=none", "trainer.log_every=1", "trainer.max_steps=3",
        "trainer.batch_size=32", "checkpoint.every_steps=1", "checkpoint.keep_last=5", "diagnostics=off"]


def test_grad_norm_equals_clip_grad_norm_of_the_step(tmp_path):
    _, run_dir = train(tmp_path, [*BASE, "precision=fp32"])
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    # recompute step 2 by hand: the weights after step 1, the second batch of epoch 0, a float32 loss
    cfg = compose_config([*TINY, *BASE, "precision=fp32"])
    validate(cfg)
    c = build(cfg)
    c.base_model.load_state_dict(torch.load(run_dir / "checkpoints" / "step_1.pt", weights_only=True)["model"])
    c.train_loader.sampler.set_epoch(0)
    batches = iter(c.train_loader)
    next(batches)
    x, y = next(batches)
    loss = F.cross_entropy(c.base_model(x).float(), y)
    loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(c.base_model.parameters(), max_norm=float("inf")).item()
    assert rows[1]["step"] == 2 and rows[1]["grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_grad_norm_is_of_the_unscaled_gradients(tmp_path):
    """A static scale of 1024 (fp16) reports the same first-step norm as fp32, not 1024 times it."""
    norms = {}
    for mode in (["precision=fp32"], ["precision=static", "precision.dtype=float16", "precision.loss_scale.init=1024"]):
        _, run_dir = train(tmp_path / mode[0], [*BASE, *mode])
        norms[mode[0]] = [r["grad_norm"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r][0]
    assert norms["precision=static"] == pytest.approx(norms["precision=fp32"], rel=2e-2)
