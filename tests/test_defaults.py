"""Defaults fit for the model (issue 40): the GPT trains with nanoGPT's recipe, the ResNets with timm's, the
user's own choices win; trainer.per_device_batch_size as Lightning and Accelerate count the batch."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mptrain.config import DEFAULT_BATCH_SIZE, global_batch, validate
from mptrain.errors import ConfigError

from .conftest import TINY, compose_config, read_jsonl, train

TOKENS = ["dataset=synthetic_tokens"]


def test_the_gpt_gets_nanogpts_recipe():
    cfg = compose_config(["model=gpt", *TOKENS])
    # nanoGPT's shakespeare_char: AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on matrices; 100 warm-up
    # steps, cosine decay to lr / 10
    assert (cfg.optimizer.name, cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.optimizer.weight_decay) == \
        ("adamw", 1e-3, [0.9, 0.99], 0.1)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps, cfg.scheduler.min_lr_ratio) == ("cosine", 100, 0.1)
    assert compose_config(TOKENS + ["model=gpt"]).optimizer == cfg.optimizer  # whatever the order given


@pytest.mark.parametrize("model", ["resnet18", "resnet50", "cnn"])
def test_the_resnets_and_the_default_cnn_keep_sgd_with_momentum(model):
    cfg = compose_config([f"model={model}"])
    assert (cfg.optimizer.name, cfg.optimizer.momentum, cfg.optimizer.nesterov, cfg.scheduler.name) == \
        ("sgd", 0.9, True, "cosine")


@pytest.mark.parametrize(("overrides", "expected"), [
    (["optimizer=sgd"], ("sgd", 0.05)),  # a group chosen on the command line wins over the model's recipe
    (["optimizer.lr=3e-4"], ("adamw", 3e-4)),  # and so does a key
    (["optimizer=adamw"], ("adamw", 1e-3)),
])
def test_the_users_own_choices_win_over_the_models_recipe(overrides, expected):
    cfg = compose_config(["model=gpt", *TOKENS, *overrides])
    assert (cfg.optimizer.name, cfg.optimizer.lr) == expected
    if overrides == ["optimizer=adamw"]:
        assert cfg.optimizer.weight_decay == 0.01  # adamw's own entry, not nanoGPT's
    assert compose_config(["model=gpt", *TOKENS, "scheduler=none"]).scheduler.name == "none"


def test_the_gpt_recipe_is_what_trains(tmp_path):
    # the rows of a run: AdamW's first step from the warm-up's start (0.1 x 1e-3 at step 1, 100 warm-up steps)
    summary, run_dir = train(tmp_path, ["model=gpt", "model.dim=16", "model.layers=1", "model.heads=2", *TOKENS,
                                        "dataset.seq_len=16", "trainer.batch_size=4", "trainer.max_steps=2",
                                        "trainer.log_every=1", "checkpoint.enabled=false", "diagnostics=off"])
    lrs = [r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if "lr" in r]
    # linear warm-up from 0.1 x lr over 100 steps: lr after step k is lr * (0.1 + 0.9 * k / 100)
    assert lrs == pytest.approx([1e-3 * (0.1 + 0.9 * k / 100) for k in (1, 2)], rel=1e-9)


def test_per_device_batch_size_is_the_global_batch_over_the_processes(tmp_path):
    t = OmegaConf.create({"batch_size": None, "per_device_batch_size": 16})
    assert [global_batch(t, n) for n in (1, 2, 8)] == [16, 32, 128]
    assert global_batch(OmegaConf.create({"batch_size": 48, "per_device_batch_size": None}), 4) == 48
    assert global_batch(OmegaConf.create({"batch_size": None, "per_device_batch_size": None}), 4) == DEFAULT_BATCH_SIZE
    # one process: the same run as trainer.batch_size
    run = ["model=mlp", "model.width=8", "trainer.max_steps=3", "trainer.log_every=1", "checkpoint.enabled=false",
           "diagnostics=off"]
    _, per_device = train(tmp_path / "a", [*run, "trainer.per_device_batch_size=16"])
    _, global_ = train(tmp_path / "b", [*run, "trainer.batch_size=16"])
    _, default = train(tmp_path / "c", run)
    assert read_jsonl(per_device / "metrics.jsonl") != read_jsonl(default / "metrics.jsonl")  # 16, not 64
    strip = [{k: v for k, v in r.items() if k not in ("samples_per_s", "step_s")}
             for r in read_jsonl(per_device / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k not in ("samples_per_s", "step_s")}
                     for r in read_jsonl(global_ / "metrics.jsonl")]


def test_both_batch_sizes_given_is_one_line():
    with pytest.raises(ConfigError, match=r"^trainer.batch_size=32 is invalid: so is trainer.per_device_batch_size=8: "
                                          r"give one of them \(batch_size: the global batch"):
        validate(compose_config(TINY + ["trainer.batch_size=32", "trainer.per_device_batch_size=8"]))
