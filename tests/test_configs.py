"""Every config entry composes and validates; bad overrides fail at start with one clear message."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mptrain.config import PRECISION_ALIASES, validate
from mptrain.errors import ConfigError

from .conftest import CONF, compose_config, run_cli

GROUPS = ["model", "dataset", "precision", "optimizer", "scheduler", "trainer", "experiment"]
ENTRIES = sorted((g, p.stem) for g in GROUPS for p in (CONF / g).glob("*.yaml"))


def test_every_group_has_entries():
    groups_with_entries = {g for g, _ in ENTRIES}
    assert groups_with_entries >= {"model", "dataset", "precision", "optimizer", "scheduler", "trainer"}
    assert {"fp32", "amp", "bf16"} <= {n for g, n in ENTRIES if g == "precision"}


@pytest.mark.parametrize(("group", "name"), ENTRIES, ids=[f"{g}/{n}" for g, n in ENTRIES])
def test_entry_composes_and_validates(group, name):
    # entries that need a partner: token models need a token dataset; a text dataset needs a file
    partner = {
        ("model", "lstm"): ["dataset=synthetic_tokens"],
        ("model", "gru"): ["dataset=synthetic_tokens"],
        ("model", "gpt"): ["dataset=synthetic_tokens"],
        ("dataset", "text"): ["dataset.path=/etc/hostname", "model=lstm"],
        ("dataset", "synthetic_tokens"): ["model=gpt"],
        ("model", "hf_causal_lm"): ["dataset=synthetic_tokens"],
        ("dataset", "tokens"): ["dataset.path=/tmp", "model=gpt"],
        ("dataset", "hf"): ["dataset.path=/tmp"],
    }.get((group, name), [])
    cfg = compose_config([f"{group}={name}", *partner])
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "precision":  # an alias (precision=16-mixed) is its preset, named beside it
        assert (cfg.precision.mode, cfg.precision.alias) in ((name, None), (PRECISION_ALIASES.get(name), name))
    if group == "model" and "num_classes" in cfg.model:
        assert cfg.model.num_classes == cfg.dataset.num_classes  # facts flow by interpolation


def test_dataset_facts_flow_into_the_model():
    cfg = compose_config(["dataset=synthetic", "dataset.num_classes=7", "dataset.channels=5"])
    assert (cfg.model.num_classes, cfg.model.in_channels) == (7, 5)


def test_seed_flows_into_trainer():
    assert compose_config(["seed=3"]).trainer.seed == 3


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optimizer.lr=-1", "optimizer.lr=-1"),
        ("trainer.batch_size=0", "trainer.batch_size=0"),
        ("precision.loss_scale.backoff_factor=2", "precision.loss_scale.backoff_factor"),
        ("scheduler.gamma=0", "scheduler.gamma"),
    ],
)
def test_range_checks_name_the_key(override, fragment):
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("precision=fp4", "Could not find 'precision/fp4'"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("optimizer.lr=-1", "optimizer.lr=-1.0 is invalid: must be > 0"),
        ("trainer.batch_size=0", "trainer.batch_size=0 is invalid: must be >= 1"),
        ("trainer.nonsense=1", "trainer.nonsense is not a config key"),  # checked before Hydra: cli/keys.py
    ],
)
def test_bad_override_fails_with_one_clear_message(tmp_path, override, expected):
    proc = run_cli([override, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()
