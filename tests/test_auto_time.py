"""precision=auto's objective=time (issue 34, first part): among the formats that hold, each layer gets the one
measured fastest on this device; emulated formats are not real speed here and are never chosen for it. The
decision is tested with stubbed times (not this machine's luck), the measurement itself on a real module."""

from __future__ import annotations

import torch
from torch import nn

from mptrain.config import validate
from mptrain.diagnostics.shadow import Figures
from mptrain.precision import Precision

from .conftest import TINY, compose_config

HOLDS = Figures(err=1e-3, gerr=1e-3)


def planned(formats: str, times: dict[str, dict[str, float]]):
    cfg = compose_config([*TINY, "precision=auto", f"precision.auto.formats={formats}", "precision.auto.probe_steps=1"])
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    p.prepare_model(model)
    asked = []

    def stub(module, fmts, example, repeats):  # what this device would measure: a CPU without bf16 units for "0"
        name = "0" if module is model[0] else "2"
        asked.append((name, tuple(fmts)))
        return {f: times[name][f] for f in fmts}

    p.time_formats = stub
    pl = p.planner
    pl._examples = {"0": torch.randn(4, 8), "2": torch.randn(4, 8)}
    pl.figures = {n: dict.fromkeys(("bf16", "mxfp4"), HOLDS) for n in ("0", "2")}
    pl._plan(1, model, p)
    return p, asked


def test_each_layer_gets_the_fastest_format_that_holds():
    p, asked = planned("[bf16]", {"0": {"bf16": 2e-3, "fp32": 1e-3}, "2": {"bf16": 1e-3, "fp32": 3e-3}})
    assert p.planner.formats == {"0": "fp32", "2": "bf16"}
    assert p.plan["0"].kernel == "fp32" and p.plan["2"].kernel == "autocast"
    assert "fastest that holds (fp32 1 ms, bf16 2 ms)" in p.plan["0"].why
    summary = p.planner.summary()
    assert summary["auto_objective"] == "time" and summary["auto_planned_layers_s"] == 2e-3
    assert p.planner.history[-1]["times"]["0"] == {"bf16": 2e-3, "fp32": 1e-3}


def test_an_emulated_format_is_never_chosen_for_speed():
    """mxfp4 holds and has fewer bits, but runs emulated on this device: it is not even timed."""
    p, asked = planned("[mxfp4,bf16]", {n: {"bf16": 1e-3, "fp32": 2e-3, "mxfp4": 1e-9} for n in ("0", "2")})
    assert p.planner.formats == {"0": "bf16", "2": "bf16"}
    assert all("mxfp4" not in fmts for _, fmts in asked)


def test_bits_keeps_the_fewest_bits_that_hold():
    cfg = compose_config([*TINY, "precision=auto", "precision.auto.formats=[mxfp4,bf16]", "precision.auto.objective=bits"])
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
