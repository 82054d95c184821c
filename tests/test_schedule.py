"""precision.schedule (issue 35 part 1): a switch in the running process equals a stop at that step and a resume
into the new precision, bitwise; a resume across a switch is bitwise; a refused switch changes nothing."""

from __future__ import annotations

import json

import pytest

from mptrain.errors import ConfigError

from .conftest import read_jsonl, train
from .test_auto import cut_and_resumed
from .test_checkpoint import assert_same_tensors, final_state, stop_at
from .test_plan import MLP, needs_torchao

STEPS = 6
BASE = MLP + ["optimizer=adamw", "scheduler.warmup_steps=0", "diagnostics=off", "trainer.log_every=1",
              f"trainer.max_steps={STEPS}"]
AUTO = ["precision=auto", "precision.auto.formats=[fp8,bf16]", "precision.auto.objective=bits",
        "precision.auto.probe_steps=2", "precision.auto.recheck_every=2"]


def schedule(at, preset: str) -> str:
    return f"precision.schedule=[{{at: {at}, preset: {preset}}}]"


def weights_and_optimizer(run) -> dict:
    state = final_state(run)
    return ({k: state[k] for k in ("model", "optimizer", "scheduler")} | {"step": state["train_state"]["step"]}
            | {k: state["precision"].get(k) for k in ("master", "scaler")})  # the fp32 masters, the loss scale


def restart(tmp_path, monkeypatch, start: list[str], target: str, step: int):
    """The reference: the run in its first precision stopped after `step` (as by SIGTERM), resumed in `target`."""
    from mptrain.checkpoint.signals import Interrupted

    stop_at(monkeypatch, step)
    with pytest.raises(Interrupted):
        train(tmp_path / "restart", start)
    monkeypatch.undo()
    return train(tmp_path / "restart", [o for o in start if not o.startswith("precision=")]
                 + [f"precision={target}", "resume=auto"])


# (first precision and its settings, when, into)
CASES = [
    pytest.param(["precision=fp8", "precision.fp8.dim_multiple=1"], 3, "bf16", marks=needs_torchao, id="fp8-bf16"),
    pytest.param(["precision=bf16"], 0.5, "fp32", id="bf16-fp32-fraction"),
    pytest.param([*AUTO, "precision.fp8.dim_multiple=1"], 3, "bf16", marks=needs_torchao, id="auto-bf16"),
    pytest.param(["precision=amp"], 3, "master", id="amp-master"),  # a new optimizer over the fp32 masters
]


@pytest.mark.slow
@pytest.mark.parametrize(("start", "at", "target"), CASES)
def test_switch_equals_a_restart_into_the_new_precision(tmp_path, monkeypatch, start, at, target):
    step = int(at * STEPS) if isinstance(at, float) else at
    summary, run = train(tmp_path / "switch", BASE + start + [schedule(at, target)])
    _, ref = restart(tmp_path, monkeypatch, BASE + start, target, step)
    assert_same_tensors(weights_and_optimizer(run), weights_and_optimizer(ref))
    # recorded: an event row on the first step in the new precision, the summary, the plan's history
    (row,) = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "precision_switch"]
    first = start[0].removeprefix("precision=")
    assert (row["step"], row["after_step"], row["from"], row["to"]) == (step + 1, step, first, target)
    (switch,) = summary["precision_switches"]
    assert {k: switch[k] for k in ("step", "from", "to", "what")} == {"step": step, "from": first, "to": target,
                                                                     "what": f"preset={target}"}
    # what the precision switched out of did stays in the summary: auto's plan, fp8's layers
    ran = switch.get("ran", {})
    if first == "auto":
        assert ran["auto_planned"] is True and set(ran["auto_plan"].values()) <= {"fp8", "bf16"}
    if first == "fp8":
        assert ran["fp8_layers"] == 3 and ran["fp8_emulated"] is True
    if first in ("bf16", "amp"):
        assert "ran" not in switch
    assert [e["event"] for e in summary["events"] if e["event"] == "precision_switch"] == ["precision_switch"]
    plan = json.loads((run / "precision_plan.json").read_text())
    assert plan["history"][-1]["event"] == "switch" and plan["history"][-1]["step"] == step
    compute = {"master": "fp16"}.get(target, target)
    assert {e["format"] for n, e in plan.items() if n != "history" and e["kernel"] != "fp32"} <= {compute}
    assert summary["compute_dtype"] == compute


@pytest.mark.slow
@pytest.mark.parametrize("start", [
    pytest.param(["precision=fp8", "precision.fp8.dim_multiple=1", schedule(2, "bf16")], marks=needs_torchao, id="fp8"),
    pytest.param(["precision=amp", schedule(2, "master")], id="master"),
])
def test_resume_across_a_switch_is_bitwise(tmp_path, monkeypatch, start):
    """Switched after step 2, stopped at 4 and resumed: the run equals the uninterrupted one (the resume makes
    the switch before loading the checkpoint's state into the precision it was saved from)."""
    overrides = BASE + start
    ref, (summary, cut) = cut_and_resumed(tmp_path, monkeypatch, overrides, 4)
    assert summary["precision_switches"][0]["step"] == 2 and "plan_changed_on_resume" not in summary
    assert_same_tensors(final_state(ref), final_state(cut))
    assert read_jsonl(ref / "metrics.jsonl") == read_jsonl(cut / "metrics.jsonl")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        # bf16_pure's optimizer keeps its own bf16 state: a resume into it is refused, so is the switch
        (
            ["precision=bf16", schedule(2, "bf16_pure")],
            r"switch after step 2 \(preset=bf16_pure\) is refused: the optimizer",
        ),
        (["precision=bf16", schedule(2, "nomaster")], r"precision=bf16 -> nomaster needs a stop and a resume"),
        (["precision=bf16", schedule(2, "auto")], "precision=auto probes from the run's first step"),
        (["precision=bf16", schedule(6, "fp32")], r"at=6 switches after step 6, outside the run's 6 steps"),
        (["precision=bf16", schedule(1.5, "fp32")], r"precision.schedule\[0\].at=1.5 is invalid"),
        (["precision=bf16", schedule(2, "fp9")], r"precision.schedule\[0\].preset='fp9' is invalid"),
        (["precision=bf16", "precision.schedule=[{at: 2, layers: {head: fp9}}]"], "fp9"),
        # a glob that matches no module fails at set-up, naming the schedule's entry (not precision.layers)
        (["precision=bf16", "precision.schedule=[{at: 2, layers: {nope: fp32}}]"],
         r"^precision.schedule\[0\] \(after step 2, layers=\{'nope': 'fp32'\}\): its layers: nope matches no module"),
        ([*AUTO, "precision.schedule=[{at: 2, layers: {head: fp32}}]"], r"^precision.schedule\[0\] .*its layers with "
         "precision=auto"),
    ],
)
def test_a_refused_switch_is_one_line_and_touches_nothing(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match) as refused:
        train(tmp_path, BASE + overrides)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_layers_entry_moves_one_layer_and_keeps_the_preset(tmp_path):
    """{at: 2, layers: {head: fp32}} on bf16: the head computes in fp32 from step 3, the rest stays bf16."""
    summary, run = train(tmp_path, BASE + ["precision=bf16", "precision.schedule=[{at: 2, layers: {head: fp32}}]",
                                           "checkpoint.enabled=false"])
    plan = json.loads((run / "precision_plan.json").read_text())
    assert plan["head"]["format"] == "fp32" and plan["body.1"]["format"] == "bf16"
    assert summary["precision_switches"] == [{"step": 2, "from": "bf16", "to": "bf16",
                                              "what": "layers={'head': 'fp32'}"}]



ON_MIN = ["model=mlp", "model.width=16", "model.depth=2", "precision=dynamic", "precision.loss_scale.init=1",
          "precision.loss_scale.min=1", "precision.loss_scale.on_min=bf16", "trainer.loss_weight=1e6",
          "trainer.clip_grad_norm=1.0", "trainer.max_steps=4", "trainer.batch_size=32", "diagnostics=off",
          "scheduler.warmup_steps=0"]


@pytest.mark.slow
def test_on_min_bf16_is_a_switch_of_the_schedules(tmp_path, monkeypatch):
    """The scaler's switch to bf16 (loss scale at its minimum, step 1) is made by the schedule's mechanism: into
    precision=bf16, recorded in precision_plan.json's history (whose plan says bf16 from then on) and the summary,
    and equal, bitwise, to stopping after step 1 and resuming with precision=bf16."""
    summary, run = train(tmp_path / "switch", ON_MIN)
    assert summary["precision_switches"] == [{"step": 1, "from": "dynamic", "to": "bf16",
                                              "what": "loss_scale.on_min=bf16"}]
    assert summary["compute_dtype"] == "bf16" and summary["precision"] == "dynamic"
    _, ref = restart(tmp_path, monkeypatch, ON_MIN, "bf16", 1)
    assert_same_tensors(weights_and_optimizer(run), weights_and_optimizer(ref))
    plan = json.loads((run / "precision_plan.json").read_text())
    (switch,) = plan["history"]
    assert set(switch["before"].values()) == {"fp16"} and set(switch["formats"].values()) == {"bf16"}
    assert {e["format"] for n, e in plan.items() if n != "history"} == {"bf16"}


@pytest.mark.slow
def test_eval_of_a_switched_run_computes_in_the_precision_it_ended_in(tmp_path):
    """mptrain-eval rebuilds the run's model in its first preset, then makes the switches made by the checkpoint's
    step (as a resume does): bf16 -> fp32 after step 3, so the final checkpoint evaluates in fp32, as the run's own
    last validation did."""
    from mptrain.tools.eval import evaluate

    from .test_use import trained_run

    run, summary = trained_run(tmp_path, BASE + ["precision=bf16", schedule(3, "fp32")])
    record, _ = evaluate(run, "last")
    assert record["compute_dtype"] == "fp32" and record["val/loss"] == summary["val/loss"]


def cut_then_resumed(tmp_path, monkeypatch, overrides: list[str], cut: int, steps: int) -> dict:
    """The run stopped after step `cut` (SIGTERM), then resumed with trainer.max_steps=`steps`: the summary."""
    from mptrain.checkpoint.signals import Interrupted

    stop_at(monkeypatch, cut)
    with pytest.raises(Interrupted):
        train(tmp_path, overrides)
    monkeypatch.undo()
    summary, _ = train(tmp_path, [*overrides, f"trainer.max_steps={steps}", "resume=auto"])
    return summary


@pytest.mark.slow
def test_a_longer_run_at_resume_does_not_switch_twice(tmp_path, monkeypatch):
    """at=0.5 of 6 steps switched after step 3; resumed at step 4 with max_steps=10 (0.5 is step 5 now): the switch
    made stays made, once, and the run ends in its precision."""
    summary = cut_then_resumed(tmp_path, monkeypatch, BASE + ["precision=bf16", schedule(0.5, "fp32")], 4, 10)
    assert summary["precision_switches"] == [{"step": 3, "from": "bf16", "to": "fp32", "what": "preset=fp32"}]
    assert summary["compute_dtype"] == "fp32" and summary["steps"] == 10


@pytest.mark.slow
def test_a_shorter_run_at_resume_makes_a_passed_switch_at_the_resume(tmp_path, monkeypatch, caplog):
    """at=0.5 of 10 steps (after step 5), stopped at step 4; resumed with max_steps=6 (0.5 is step 3 now, already
    passed): the switch is made at the resume, after step 4, recorded there, and said."""
    overrides = [o for o in BASE if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=10"]
    summary = cut_then_resumed(tmp_path, monkeypatch, overrides + ["precision=bf16", schedule(0.5, "fp32")], 4, 6)
    assert summary["precision_switches"] == [{"step": 4, "from": "bf16", "to": "fp32", "what": "preset=fp32"}]
    assert summary["compute_dtype"] == "fp32"
    assert "falls after step 3 now (trainer.max_steps changed at resume)" in caplog.text


@pytest.mark.slow
def test_diagnostics_follow_a_switch_into_master_weights(tmp_path):
    """After amp -> master the optimizer updates fp32 masters, other tensors than the model's: the sampled rows
    still name every gradient by its parameter (read again at the switch), not param0, param1, ..."""
    from mptrain.run.layout import read_jsonl as rows_of

    overrides = [o for o in BASE if o != "diagnostics=off"] + ["diagnostics.every=1", "checkpoint.enabled=false",
                                                               "precision=amp", schedule(2, "master")]
    _, run = train(tmp_path, overrides)
    samples = [r for r in rows_of(run / "diagnostics.jsonl") if r.get("event") == "sample" and "grads" in r]
    names = [set(r["grads"]["params"]) for r in samples]
    assert [r["step"] for r in samples][-1] == STEPS and all(n == names[0] for n in names)
    assert "head.weight" in names[0] and not any(n.startswith("param") for n in names[0])
    # fp16 weights from the switch on (a CPU's amp is bf16 autocast): the advisor reads both views, not the first
    from mptrain.tools.advise import advise_run

    view = next(r for r in rows_of(run / "diagnostics.jsonl") if r.get("event") == "fp16_view")
    assert view["fp16_view"] == "actual"
    advice, lines = advise_run(run)
    assert advice["probe"]["fp16_view"] == f"hypothetical, actual from step {view['step']}"
    note = "  note: this run computed in fp16 in the steps of the actual view, so gradients it flushed"
    assert note in "\n".join(lines)
