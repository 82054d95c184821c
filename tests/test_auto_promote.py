"""precision=auto promotes a demoted layer back (issue 35 part 2): after `promote_after` consecutive re-checks
within tolerance one rung down; the count restarts on every miss and every move (hysteresis)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mptrain.config import AutoConfig
from mptrain.diagnostics.shadow import Figures
from mptrain.precision.formats import BUILTINS
from mptrain.precision.planner import Planner

from .conftest import read_jsonl, train
from .test_auto import cut_and_resumed, events
from .test_checkpoint import assert_same_tensors, final_state
from .test_judge import CASE2

GOOD, BAD = 0.01, 0.9  # a relative error within, and over, the tolerance (0.1)


class Policy:
    """What the planner calls on the precision: the fp8 shape rule's multiple, and the in-place move."""

    dim_multiple = 1

    def __init__(self):
        self.applied: list[dict] = []

    def apply_formats(self, model, formats, why):
        self.applied.append(dict(formats))


def planner(promote_after: int) -> tuple[Planner, nn.Module, Policy]:
    cfg = OmegaConf.structured(AutoConfig(formats=["fp8_e4m3", "bf16"], objective="bits", probe_steps=1,
                                          recheck_every=1, promote_after=promote_after))
    p = Planner(cfg, torch.device("cpu"), "bf16", BUILTINS)
    p.planned, p.formats, p.chosen = True, {"fc": "fp8_e4m3"}, {"fc": "fp8_e4m3"}
    return p, nn.ModuleDict({"fc": nn.Linear(16, 16)}), Policy()


def drive(promote_after: int, fp8_errors: list[float]) -> tuple[list[tuple[int, str]], Planner]:
    """One re-check per error of fp8_e4m3 on fc (bf16 always holds); the moves as (step, new format)."""
    p, model, policy = planner(promote_after)
    moves = []
    for step, err in enumerate(fp8_errors, 1):
        figures = {"fc": {"fp8_e4m3": Figures(err=err, gerr=GOOD), "bf16": Figures(err=GOOD, gerr=GOOD)}}
        row = p._recheck(step, model, policy, figures)
        if row is not None:
            (change,) = row["changes"]
            moves.append((step, change["new"]))
            assert row["event"] == {"fp8_e4m3": "precision_promote", "bf16": "precision_demote"}[change["new"]]
            assert policy.applied[-1] == {"fc": change["new"]}
    return moves, p


def test_promotion_needs_promote_after_clean_rechecks_in_a_row():
    """Over the threshold and back: bad, then good and bad alternating (the layer stays demoted: no clean
    streak of 3), then three good (promoted), then bad (demoted again)."""
    errors = [BAD, GOOD, BAD, GOOD, GOOD, BAD, GOOD, GOOD, GOOD, BAD, GOOD]
    moves, p = drive(3, errors)
    assert moves == [(1, "bf16"), (9, "fp8_e4m3"), (10, "bf16")]
    assert p.streak == {"fc": 1}  # step 11: one clean re-check since the last demotion
    assert [h["event"] for h in p.history] == ["demote", "promote", "demote"]
    assert p.summary()["auto_promotions"] == 1 and p.summary()["auto_demotions"] == 2


def test_without_hysteresis_the_layer_flaps():
    """The same alternation with promote_after=1 moves on every re-check; promote_after=0 never promotes."""
    errors = [BAD, GOOD] * 4
    assert len(drive(1, errors)[0]) == len(errors)
    assert len(drive(3, errors)[0]) == 1
    assert drive(0, [BAD] + [GOOD] * 6)[0] == [(1, "bf16")]


def test_promotion_stops_at_the_planned_format_and_the_state_round_trips():
    """A layer at its plan is never promoted below it; the count and the plan's choice are checkpointed."""
    moves, p = drive(2, [GOOD] * 5)
    assert moves == [] and p.streak == {}
    moves, p = drive(3, [BAD, GOOD, GOOD])
    q, _, _ = planner(3)
    q.load_state_dict(p.state_dict())
    assert (q.streak, q.chosen, q.formats) == ({"fc": 2}, {"fc": "fp8_e4m3"}, {"fc": "bf16"})


# a transient 1e8 channel into fc2 during training steps 7..12; fp8 = torchao's per-tensor recipe (emulated on
# CPU), dim_multiple=1 so that fc2 (33 inputs) may take it; re-check every 2 steps, promote after 3
TRANSIENT = CASE2 + ["model._target_=tests.judge_nets.Transient", "+model.after=6", "+model.until=12",
                     "diagnostics=off", "trainer.log_every=1", "precision.fp8.dim_multiple=1"]
AUTO = TRANSIENT + ["precision=auto", "precision.auto.formats=[fp8,bf16]", "precision.auto.objective=bits",
                    "precision.auto.probe_steps=3", "precision.auto.recheck_every=2",
                    "precision.auto.promote_after=3"]
STEPS = ["trainer.max_steps=30"]


@pytest.mark.slow
def test_fc2_is_demoted_while_the_outlier_is_there_and_promoted_after(tmp_path):
    summary, run = train(tmp_path / "auto", AUTO + STEPS + ["checkpoint.enabled=false"])
    plan = json.loads((run / "precision_plan.json").read_text())
    assert plan["history"][0]["formats"]["fc2"] == "fp8"
    (demote,) = [r for r in events(run, "precision_demote") if any(c["layer"] == "fc2" for c in r["changes"])]
    (promote,) = [r for r in events(run, "precision_promote") if any(c["layer"] == "fc2" for c in r["changes"])]
    assert 7 <= demote["step"] <= 12  # while the channel is there
    assert promote["step"] >= 12 + 3 * 2  # three clean re-checks after it went
    assert [(c["old"], c["new"]) for c in promote["changes"]] == [("bf16", "fp8")]
    assert [h["event"] for h in plan["history"]] == ["plan", "demote", "promote"]
    assert plan["fc2"]["format"] == "fp8" and summary["auto_promotions"] == 1 and summary["auto_demotions"] == 1
    bf16, _ = train(tmp_path / "bf16", TRANSIENT + STEPS + ["precision=bf16", "checkpoint.enabled=false"])
    assert abs(summary["val/acc"] - bf16["val/acc"]) <= 0.02, (summary["val/acc"], bf16["val/acc"])


@pytest.mark.slow
def test_resume_between_demotion_and_promotion_is_bitwise(tmp_path, monkeypatch):
    """Stopped mid-streak (after the demotion, before the promotion) and resumed: the count was checkpointed, so
    the promotion lands on the same step and the run equals the uninterrupted one."""
    ref, (summary, cut) = cut_and_resumed(tmp_path, monkeypatch, AUTO + ["trainer.max_steps=22"], 16)
    assert summary["auto_promotions"] == 1 and events(ref, "precision_promote")[0]["step"] > 16
    assert_same_tensors(final_state(ref), final_state(cut))
    assert read_jsonl(ref / "metrics.jsonl") == read_jsonl(cut / "metrics.jsonl")
