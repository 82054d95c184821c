"""precision=auto (issue 24 part 4): a plan from the probe's shadow figures, applied in place, re-checked and
demoted; resumed bitwise. The nets are tests/judge_nets.py's Outlier (a constant 1e8 channel into mid1)."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from torch import nn

from mptrain.errors import ConfigError
from mptrain.precision.convert import Applier, EmulatedLinear
from mptrain.precision.formats import BUILTINS
from mptrain.precision.plan import Rule, resolve

from .conftest import read_jsonl, train
from .test_checkpoint import assert_same_tensors, final_state, stop_at
from .test_judge import CASE2

# fp8 = torchao's recipe (dynamic per-tensor scales; emulated on CPU); dim_multiple=1 lets mid1 (33 inputs)
# take it, so that measurement, not a shape constraint, keeps it out
AUTO = CASE2 + ["precision=auto", "precision.auto.formats=[fp8,bf16]", "precision.auto.objective=bits",
                "precision.fp8.dim_multiple=1",
                "precision.auto.probe_steps=3", "precision.auto.recheck_every=2", "trainer.log_every=1",
                "diagnostics=off"]


def events(run, name):
    return [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == name]


def cut_and_resumed(tmp_path, monkeypatch, overrides: list[str], at: int) -> tuple:
    """The uninterrupted run's directory, and (summary, directory) of the same run stopped at step `at` (as by
    SIGTERM) and resumed."""
    from mptrain.checkpoint.signals import Interrupted

    _, ref = train(tmp_path / "ref", overrides)
    stop_at(monkeypatch, at)
    with pytest.raises(Interrupted) as stopped:
        train(tmp_path / "cut", overrides)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    monkeypatch.undo()
    return ref, train(tmp_path / "cut", [*overrides, "resume=auto"])


def test_auto_keeps_the_outlier_layer_out_of_fp8(tmp_path):
    """(a) mid1 reads the 1e8 channel: per-tensor e4m3 flushes its other 32 inputs, error ~1; mid2 sees tanh
    outputs and takes fp8. The plan is applied (mid2 becomes a Float8Linear), logged, written and summarised."""
    summary, run = train(tmp_path, AUTO + ["trainer.max_steps=5", "checkpoint.enabled=false"])
    plan = json.loads((run / "precision_plan.json").read_text())
    assert plan["mid1"]["format"] == "bf16" and plan["mid2"]["format"] == "fp8"
    assert plan["mid2"]["kernel"] == "float8" and plan["mid1"]["kernel"] == "autocast"
    (made,) = plan["history"]
    assert made["step"] == 3 and made["event"] == "plan" and made["formats"]["mid2"] == "fp8"
    assert made["errors"]["mid1"]["fp8"] > 0.9 > 0.1 > made["errors"]["mid2"]["fp8"]
    (row,) = events(run, "precision_plan")
    assert row["step"] == 3 and row["formats"] == made["formats"]
    assert summary["auto_plan"] == made["formats"] and summary["auto_demotions"] == 0
    assert summary["plan_modules"]["fp8"] == sum(f == "fp8" for f in made["formats"].values())


def test_replan_keeps_the_parameter_objects():
    """The optimizer holds the model's parameters: a mid-run change of format must not replace them
    (bf16 -> emulated fp8_e4m3 -> fp32 and back), and the emulated forward is the format's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    params = list(model.parameters())
    base = {n: ("bf16", "autocast", "preset") for n in ("0", "2")}
    applier = Applier(BUILTINS, torch.device("cpu"), "bf16", True)

    def plan(fmt):
        return resolve(model, base, [Rule("0", fmt, "auto")], autocast="bf16")

    old = plan("bf16")
    applier.apply(model, old)
    for fmt in ("fp8_e4m3", "fp32", "bf16"):
        new = plan(fmt)
        assert applier.replan(model, old, new) == ["0"]
        old = new
        assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == 4
        assert isinstance(model[0], EmulatedLinear) == (fmt == "fp8_e4m3")
        assert type(model[0]) is (EmulatedLinear if fmt == "fp8_e4m3" else nn.Linear)
        if fmt == "fp8_e4m3":
            x = torch.randn(3, 8)
            q = lambda t: t.to(torch.float8_e4m3fn).float()  # noqa: E731
            ref = torch.nn.functional.linear(q(x), q(model[0].weight), model[0].bias)
            assert torch.equal(model[0](x).detach(), ref.detach())
    assert "forward" not in model[0].__dict__  # fp32's own-autocast wrapper is gone again


def test_auto_demotes_a_layer_when_the_channel_appears(tmp_path):
    """(b) The channel appears at step 6 (after 5 training forwards): mid1 took fp8 in the probe; a re-check
    within two of its appearance demotes it to bf16, as an event row, in the plan's history and the summary."""
    summary, run = train(tmp_path, AUTO + ["+model.after=5", "trainer.max_steps=10", "checkpoint.enabled=false"])
    plan = json.loads((run / "precision_plan.json").read_text())
    assert plan["history"][0]["formats"]["mid1"] == "fp8"  # ordinary inputs in the probe
    demotes = events(run, "precision_demote")
    assert demotes, plan["history"]
    first = demotes[0]
    assert 6 <= first["step"] <= 6 + 2 * 2
    (change,) = [c for c in first["changes"] if c["layer"] == "mid1"]
    assert (change["old"], change["new"]) == ("fp8", "bf16") and change["err"] > 0.1
    assert plan["mid1"]["format"] == "bf16" and plan["mid2"]["format"] == "fp8"
    assert [h["event"] for h in plan["history"]][:2] == ["plan", "demote"]
    assert summary["auto_demotions"] >= 1 and summary["auto_plan"]["mid1"] == "bf16"


def test_auto_resume_across_a_demotion_is_bitwise(tmp_path, monkeypatch):
    """(c) Stopped at step 7 (after the demotion at 6), resumed to 10: weights, optimizer, precision state and
    metrics rows equal the uninterrupted run's."""
    ref, (summary, cut) = cut_and_resumed(tmp_path, monkeypatch, AUTO + ["+model.after=5", "trainer.max_steps=10"], 7)
    assert summary["status"] == "completed" and summary["auto_plan"]["mid1"] == "bf16"
    assert events(ref, "precision_demote")[0]["step"] <= 7  # the cut is after the demotion
    assert_same_tensors(final_state(ref), final_state(cut))
    assert read_jsonl(ref / "metrics.jsonl") == read_jsonl(cut / "metrics.jsonl")
    assert "plan_changed_on_resume" not in summary


def test_auto_refuses_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="precision.auto.formats"):
        train(tmp_path / "a", CASE2 + ["precision=auto", "precision.auto.formats=[fp9]", "trainer.max_steps=1"])
    with pytest.raises(ConfigError, match="precision.auto.tolerance"):
        train(tmp_path / "b", CASE2 + ["precision=auto", "precision.auto.tolerance=0", "trainer.max_steps=1"])
    with pytest.raises(ConfigError, match="precision.layers with precision=auto"):
        train(tmp_path / "c", CASE2 + ["precision=auto", "precision.layers={mid2: fp8}", "trainer.max_steps=1"])
    assert not (tmp_path / "a" / "run").exists() and not (tmp_path / "c" / "run").exists()
