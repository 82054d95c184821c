"""Other tools' precision names (Lightning's 16-mixed, bf16-mixed, ...): each is its preset, recorded as it."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from mptrain.config import PRECISION_ALIASES

from .conftest import CONF, TINY, compose_config, read_jsonl

RUN = ["model=mlp", "model.width=32", "model.depth=3", "trainer.max_steps=4", "trainer.log_every=1",
       "trainer.eval_every=2", "checkpoint.enabled=false", "diagnostics=off", "trainer.batch_size=16"]
TIMES = {"samples_per_s", "step_s", "wall_s", "data_s", "tokens_per_s"}  # measured, not computed


def records(run_dir):
    rows = [{k: v for k, v in r.items() if k not in TIMES} for r in read_jsonl(run_dir / "metrics.jsonl")]
    return rows, json.loads((run_dir / "precision_plan.json").read_text())


def test_the_alias_table_is_the_alias_files():
    # each alias is a file of conf/precision/ (what `precision=<alias>` composes)
    assert {p.stem for p in (CONF / "precision").glob("*.yaml") if "-" in p.stem} == set(PRECISION_ALIASES)


@pytest.mark.parametrize("alias", sorted(PRECISION_ALIASES))
def test_every_alias_gives_the_same_run_as_its_preset(tmp_path, alias):
    from mptrain.config import validate
    from mptrain.train.recipe import run

    preset = PRECISION_ALIASES[alias]
    if preset == "fp8":
        pytest.importorskip("torchao")
    aliased, direct = (compose_config(TINY + RUN + [f"precision={name}"]) for name in (alias, preset))
    assert aliased.precision.alias == alias and direct.precision.alias is None
    assert OmegaConf.merge(aliased, {"precision": {"alias": None}}) == direct  # every other key is the preset's
    summaries = {}
    for name, cfg in (("a", aliased), ("p", direct)):
        validate(cfg)
        summaries[name] = run(cfg, tmp_path / name)
    assert records(tmp_path / "a") == records(tmp_path / "p")  # the same numbers, bit for bit (JSON round-trips)
    assert len(records(tmp_path / "a")[0]) >= 4
    assert summaries["a"]["precision"] == summaries["p"]["precision"] == preset
    assert summaries["a"]["precision_alias"] == alias and "precision_alias" not in summaries["p"]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["precision_alias"] == alias


def test_an_alias_contradicted_by_precision_mode_is_one_line(tmp_path):
    from mptrain.config import validate
    from mptrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^precision.alias='16-mixed' is invalid: names precision=dynamic, not "
                                          r"precision.mode=bf16; choose a preset by one name"):
        validate(compose_config(["precision=16-mixed", "precision.mode=bf16"]))
