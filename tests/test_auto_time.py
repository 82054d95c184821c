"""precision=auto's objective=time (issue 34, first part): among the formats that hold, each layer gets the one
measured fastest on this device; emulated formats are not real speed here and are never chosen for it. The
decision is tested with stubbed times (not this machine's luck), the measurement itself on a real module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mptrain.config import validate
from mptrain.diagnostics.shadow import Figures
from mptrain.precision import Precision

from .conftest import TINY, compose_config

HOLDS = Figures(err=1e-3, gerr=1e-3)


def step(p: Precision, model: nn.Module, n: int) -> dict | None:
    """One training step as train/step.py runs it, for the planner's sake (no optimizer: the weights stay)."""
    p.begin_step(n, model)
    with p.autocast():
        out = model(torch.randn(4, 8, generator=torch.Generator().manual_seed(n)))
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return p.end_step(n, model, overflow=False)


def planned(formats: str, times: dict[str, dict[str, float]], probe_steps: int = 2):
    cfg = compose_config([*TINY, "precision=auto", f"precision.auto.formats={formats}",
                          f"precision.auto.probe_steps={probe_steps}"])
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    p.prepare_model(model)
    asked, dtypes = [], {}

    def stub(module, fmts, example, repeats):  # what this device would measure: a CPU without bf16 units for "0"
        name = "0" if module is model[0] else "2"
        asked.append((name, tuple(fmts), tuple(example.shape)))
        dtypes[name] = example.dtype
        return {f: times[name][f] for f in fmts}

    p.time_formats = stub
    events = {}
    for n in range(1, probe_steps + 2):
        events[n] = step(p, model, n)
        if p.planner.planned:
            break
    p.timed_dtypes = dtypes
    return p, asked, events


def test_each_layer_gets_the_fastest_format_that_holds():
    p, asked, events = planned("[bf16]", {"0": {"bf16": 2e-3, "fp32": 1e-3}, "2": {"bf16": 1e-3, "fp32": 3e-3}})
    assert p.planner.formats == {"0": "fp32", "2": "bf16"}
    assert asked == [("0", ("bf16", "fp32"), (4, 8)), ("2", ("bf16", "fp32"), (4, 8))]  # timed once, on step 1
    # the error of bf16 was measured (step 2) on "2" only: on "0" it was slower than fp32, so it could not pay
    errors = events[2]["errors"]
    assert list(errors["2"]) == ["bf16"] and isinstance(errors["2"]["bf16"], float) and errors["0"] == {}
    assert p.plan["0"].kernel == "fp32" and p.plan["2"].kernel == "autocast"
    assert "fastest that holds (fp32 1 ms, bf16 2 ms)" in p.plan["0"].why
    summary = p.planner.summary()
    assert summary["auto_objective"] == "time" and summary["auto_planned_layers_s"] == 2e-3
    # the same layers all in one format: fp32 1 + 3 ms, bf16 2 + 1 ms; the plan's 2 ms beats both
    assert summary["auto_planned_layers_s_if_all"] == {"bf16": 3e-3, "fp32": 4e-3}
    assert p.planner.history[-1]["times"]["0"] == {"bf16": 2e-3, "fp32": 1e-3}
    # each layer timed on the input it got in the probe (the bf16 preset's run): the batch in fp32 into "0", the
    # bf16 output of "0" (through Tanh) into "2", so that bf16 there is timed without an input cast it never has
    assert p.timed_dtypes == {"0": torch.float32, "2": torch.bfloat16}


def test_an_emulated_format_is_never_chosen_for_speed():
    """mxfp4 holds and has fewer bits, but runs emulated on this device: it is not even timed."""
    p, asked, _ = planned("[mxfp4,bf16]", {n: {"bf16": 1e-3, "fp32": 2e-3, "mxfp4": 1e-9} for n in ("0", "2")})
    assert p.planner.formats == {"0": "bf16", "2": "bf16"}
    assert all("mxfp4" not in fmts for _, fmts, _ in asked)


def test_a_format_only_as_fast_as_the_presets_leaves_the_layer_in_the_presets():
    """Timings within a few percent are noise, and a mix of formats adds casts between layers that no layer's own
    timing shows: fp32 2% faster than bf16 on "0" does not take it out of the safe preset's bf16, so the plan is
    the preset, uniform. 6% faster (clearly) does."""
    p, _, events = planned("[bf16]", {n: {"bf16": 1e-3, "fp32": 0.98e-3} for n in ("0", "2")})
    assert p.planner.formats == {"0": "bf16", "2": "bf16"} and set(events[2]["errors"]["0"]) == {"bf16"}
    p, _, _ = planned("[bf16]", {"0": {"bf16": 1e-3, "fp32": 0.94e-3}, "2": {"bf16": 1e-3, "fp32": 0.98e-3}})
    assert p.planner.formats == {"0": "fp32", "2": "bf16"}


def test_where_fp32_is_fastest_everywhere_the_plan_needs_no_error_measurement():
    """A CPU without bf16 units: fp32 wins every layer, so the plan is made on the first step, with no shadow
    measurement at all (the probe's cost is one timing), and each layer says why."""
    p, asked, events = planned("[bf16]", {n: {"bf16": 3e-3, "fp32": 1e-3} for n in ("0", "2")}, probe_steps=5)
    assert p.planner.planned and list(events) == [1]
    assert p.planner.formats == {"0": "fp32", "2": "fp32"} and events[1]["errors"] == {"0": {}, "2": {}}
    assert all("fastest that holds (fp32 1 ms, bf16 3 ms)" in p.plan[n].why for n in ("0", "2"))


def test_the_probe_resumes_between_its_timing_and_its_error_steps():
    """A checkpoint taken after the timing step holds the times: the resumed probe measures errors, not times."""
    times = {"0": {"bf16": 2e-3, "fp32": 1e-3}, "2": {"bf16": 1e-3, "fp32": 3e-3}}

    def build(stub):
        cfg = compose_config([*TINY, "precision=auto", "precision.auto.formats=[bf16]", "precision.auto.probe_steps=1"])
        validate(cfg)
        p = Precision(cfg.precision, torch.device("cpu"))
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
        p.prepare_model(model)
        p.time_formats = stub
        return p, model

    p, model = build(lambda module, fmts, x, r: {f: times["0" if module is model[0] else "2"][f] for f in fmts})
    assert step(p, model, 1) is None and not p.planner.planned  # timed; errors of bf16 on "2" come next
    state = p.state_dict()

    def again(*args):
        raise AssertionError("timed again after the resume")

    q, model = build(again)
    q.load_state_dict(state)
    event = step(q, model, 2)
    assert event["event"] == "precision_plan" and q.planner.formats == {"0": "fp32", "2": "bf16"}


def test_bits_keeps_the_fewest_bits_that_hold():
    cfg = compose_config(
        [*TINY, "precision=auto", "precision.auto.formats=[mxfp4,bf16]", "precision.auto.objective=bits"]
    )
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    p.prepare_model(model)
    p.planner.figures = {n: {"mxfp4": HOLDS} for n in ("0", "2")}
    p.planner._plan(1, model, p)
    assert p.planner.formats == {"0": "mxfp4", "2": "mxfp4"}


def test_time_formats_measures_the_module_as_the_run_converts_it():
    cfg = compose_config([*TINY, "precision=auto", "precision.auto.formats=[mxfp4,bf16]"])
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(64, 64))
    p.prepare_model(model)
    example = torch.randn(32, 64)
    before = torch.get_rng_state()
    times = p.time_formats(model[0], ["bf16", "fp32", "mxfp4"], example, repeats=2)
    assert set(times) == {"bf16", "fp32", "mxfp4"} and all(t > 0 for t in times.values())
    assert torch.equal(torch.get_rng_state(), before)
    assert type(model[0]) is nn.Linear and model[0].weight.grad is None  # the module itself is untouched


@pytest.mark.slow
def test_a_target_plans_by_the_roofline_and_may_choose_an_emulated_format():
    """precision.auto.target=h100: times are modeled for that GPU, not measured here, so fp8 (emulated on this CPU)
    is chosen where the roofline says an H100 runs it faster than bf16: a 2048-wide Linear at M = 2048 (1.27x),
    not a 64-wide one. Checked against the roofline's own figures for each module."""
    from mptrain.precision import roofline
    from mptrain.precision.planner import CLEARLY_FASTER

    cfg = compose_config([*TINY, "precision=auto", "precision.auto.formats=[fp8_e4m3,bf16]",
                          "precision.auto.probe_steps=1", "precision.auto.target=h100", "precision.fp8.dim_multiple=1",
                          "precision.auto.tolerance=inf"])
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2048), nn.Linear(2048, 2048))
    p.prepare_model(model)
    p.time_formats = lambda *a: (_ for _ in ()).throw(AssertionError("a target is modeled, not timed"))
    x = torch.randn(2048, 64)
    for n in (1, 2):
        p.begin_step(n, model)
        with p.autocast():
            model(x).float().sum().backward()
        p.end_step(n, model, overflow=False)
        if p.planner.planned:
            break
    expected = {}
    for name, width in (("0", 64), ("1", 64), ("2", 2048)):
        t = roofline.layer_times(model.get_submodule(name), (2048, width), ["fp8_e4m3", "bf16", "fp32"], "h100")
        # the planner's rule: the preset's bf16 unless clearly slower than fp32, then the fastest if clearly faster
        default = "bf16" if CLEARLY_FASTER * t["bf16"] <= t["fp32"] else "fp32"
        fastest = min(t, key=t.get)
        expected[name] = fastest if t[fastest] < CLEARLY_FASTER * t[default] else default
    assert p.planner.formats == expected and expected["0"] != "fp8_e4m3" and expected["2"] == "fp8_e4m3"
    assert "on h100, modeled" in p.plan["2"].why and p.plan["2"].emulated


def test_a_target_without_the_format_says_why_it_is_chosen_for_no_layer(caplog):
    """precision.auto.target=a100 with formats=[fp8]: an A100 has no fp8 tensor cores, so every layer is fp32 (the
    ladder's only other rung). Not silently: one log line and each layer's reason give the target's reason
    (roofline.why_not's own words), the plan's history records it, and the summary names the target. A memory
    budget there still counts the probe's bf16, which is no candidate (a KeyError before)."""
    import logging

    from mptrain.precision import roofline
    from mptrain.precision.formats import FP8

    cfg = compose_config([*TINY, "precision=auto", "precision.auto.formats=[fp8]", "precision.auto.probe_steps=1",
                          "precision.auto.target=a100", "precision.fp8.dim_multiple=1", "precision.auto.memory_gb=1"])
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    p.prepare_model(model)
    with caplog.at_level(logging.INFO, logger="mptrain"):
        for n in (1, 2):
            step(p, model, n)
            if p.planner.planned:
                break
    why = roofline.why_not(FP8, "a100")
    assert why.startswith("a100 has no fp8 rate")
    assert p.planner.formats == {"0": "fp32", "2": "fp32"}
    said = [r.getMessage() for r in caplog.records if "chosen for no layer" in r.getMessage()]
    assert said == [f"precision=auto: {FP8.name} is chosen for no layer on a100: {why}"]
    assert all(f"; {FP8.name}: {why}" in p.plan[n].why for n in ("0", "2"))
    assert p.planner.history[-1]["not_chosen"] == {FP8.name: why}
    assert p.planner.summary()["auto_target"] == "a100" and 0 < p.planner.summary()["auto_memory_gb"] < 1


def test_a_faster_format_over_tolerance_is_not_chosen():
    """The case time-first could get wrong: bf16 timed twice as fast everywhere, but its measured error is over
    the tolerance (here a tolerance no 8-bit mantissa meets). Speed never outranks accuracy: every layer fp32,
    and each layer's why marks the faster format as over tolerance."""
    cfg = compose_config([*TINY, "precision=auto", "precision.auto.formats=[bf16]", "precision.auto.probe_steps=2",
                          "precision.auto.tolerance=1e-9"])
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    p.prepare_model(model)
    p.time_formats = lambda module, fmts, x, r: {f: {"bf16": 1e-3, "fp32": 2e-3}[f] for f in fmts}
    for n in (1, 2):
        event = step(p, model, n)
    assert event["event"] == "precision_plan" and p.planner.formats == {"0": "fp32", "2": "fp32"}
    assert all(event["errors"][n]["bf16"] > 1e-9 for n in ("0", "2"))  # measured, and over
    assert all("bf16 1 ms over tolerance" in p.plan[n].why for n in ("0", "2"))


def budgeted(memory_gb: float) -> Precision:
    """precision=auto on two 64-wide Linears at 2048 rows, where fp32 is timed faster than bf16 (stubbed: a CPU
    without bf16 units), bf16 costing layer "0" 2 ms more and layer "2" 0.5 ms more; every format holds."""
    cfg = compose_config([*TINY, "precision=auto", "precision.auto.formats=[bf16]", "precision.auto.probe_steps=2",
                          "precision.auto.tolerance=inf", f"precision.auto.memory_gb={memory_gb!r}"])
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    p.prepare_model(model)
    p.count_state_with(lambda: 1e6)  # the run's weights, grads and optimizer state: 1 MB here
    times = {"0": {"bf16": 3e-3, "fp32": 1e-3}, "2": {"bf16": 1.5e-3, "fp32": 1e-3}}
    p.time_formats = lambda module, fmts, x, r: {f: times["0" if module is model[0] else "2"][f] for f in fmts}
    for n in range(1, 5):
        p.begin_step(n, model)
        with p.autocast():
            out = model(torch.randn(2048, 64, generator=torch.Generator().manual_seed(n)))
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)
        p.end_step(n, model, overflow=False)
        if p.planner.planned:
            return p
    raise AssertionError("no plan")


@pytest.mark.slow
def test_a_memory_budget_moves_the_layer_that_costs_least_time_per_byte():
    """precision.auto.memory_gb between two plans' predicted memory: the fastest plan (all fp32) is over it, so one
    layer moves to bf16, the one losing least time per byte saved ("2": 0.5 ms against 2 ms, the same bytes).
    What a layer saves, by hand: its fp32 input (2048 x 64 x 4 bytes) against bf16's input and weight copy
    (2 x (2048 x 64 + 64 x 64)). Under the smallest plan's memory: one line naming the budget, that memory and
    the fix."""
    from mptrain.errors import ConfigError

    gb = 2**30
    saved = 2048 * 64 * 4 - 2 * (2048 * 64 + 64 * 64)
    fastest = budgeted(1000.0)
    assert fastest.planner.formats == {"0": "fp32", "2": "fp32"}
    full = fastest.planner.summary()["auto_memory_gb"] * gb
    assert full > 1e6  # the state and the activations
    one = budgeted((full - saved / 2) / gb)
    assert one.planner.formats == {"0": "fp32", "2": "bf16"}
    assert one.planner.summary()["auto_memory_gb"] * gb == pytest.approx(full - saved, rel=1e-9)
    assert "for precision.auto.memory_gb=" in one.plan["2"].why and "memory_gb" not in one.plan["0"].why
    both = budgeted((full - 1.5 * saved) / gb)
    assert both.planner.formats == {"0": "bf16", "2": "bf16"}
    with pytest.raises(ConfigError) as refused:
        budgeted((full - 2 * saved - 1000) / gb)
    message = str(refused.value)
    assert message.startswith("precision.auto.memory_gb=") and "\n" not in message
    assert f"predicted at {(full - 2 * saved) / gb:.3g} GB" in message and "raise precision.auto.memory_gb" in message


def test_where_bf16_is_slower_auto_runs_the_fp32_presets_own_path():
    """A CPU without bf16 units (stubbed: bf16 3x fp32 on every layer): auto plans fp32 everywhere, and after the
    probe the model runs exactly as precision=fp32 runs it: autocast off, the plain torch.nn modules (no per-module
    wrapper casting back from bf16), the same outputs and gradients bit for bit."""
    p, _, _ = planned("[bf16]", {n: {"bf16": 3e-3, "fp32": 1e-3} for n in ("0", "2")})
    model = p._model
    assert p.planner.formats == {"0": "fp32", "2": "fp32"}
    assert all(type(m) is nn.Linear and "forward" not in vars(m) for m in (model[0], model[2]))
    cfg = compose_config([*TINY, "precision=fp32"])
    validate(cfg)
    fixed = Precision(cfg.precision, torch.device("cpu"))
    twin = fixed.prepare_model(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))
    outs, grads = [], []
    for prec, m in ((p, model), (fixed, twin)):
        with prec.autocast():
            y = m(x)
        y.sum().backward()
        outs.append(y)
        grads.append([q.grad.clone() for q in m.parameters()])
        m.zero_grad(set_to_none=True)
    assert outs[0].dtype == torch.float32 and torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    # the plain path is the plan's, not the run's: a layer demoted back into bf16 brings autocast back
    p.apply_formats(model, {"0": "bf16", "2": "fp32"}, {"0": "test", "2": "test"})
    assert p.autocast_format == "bf16" and "forward" in vars(model[2]) and p.plan["2"].kernel == "fp32"


def test_timing_stops_after_one_round_only_where_the_order_is_plain():
    """precision=auto's timing (timing.interleaved_medians with `apart`): a format 10x slower than the other in
    the warm-up and in the first round alike is not timed twice more; a near tie (1.1x) gets every round."""
    import time

    from mptrain.precision import timing

    calls: dict[str, int] = {}

    def sleeper(name: str, seconds: float):
        def run():
            calls[name] = calls.get(name, 0) + 1
            time.sleep(seconds)
        return run

    cpu = torch.device("cpu")
    t = timing.interleaved_medians({"fast": sleeper("fast", 0.002), "slow": sleeper("slow", 0.02)}, cpu, 3, apart=1.5)
    assert calls == {"fast": 2, "slow": 2} and t["slow"] > 1.5 * t["fast"]  # the warm-up and one round
    calls.clear()
    timing.interleaved_medians({"a": sleeper("a", 0.010), "b": sleeper("b", 0.011)}, cpu, 3, apart=1.5)
    assert calls == {"a": 4, "b": 4}
    calls.clear()
    timing.interleaved_medians({"fast": sleeper("fast", 0.002), "slow": sleeper("slow", 0.02)}, cpu, 3)
    assert calls == {"fast": 4, "slow": 4}  # without `apart`: every round
