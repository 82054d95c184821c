"""The bugs issue 33 found on the way, each with the case that showed it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from mptrain.config import validate
from mptrain.diagnostics.shadow import Figures
from mptrain.precision import Precision
from mptrain.precision.plan import planned_modules

from .conftest import TINY, compose_config


def test_a_demotion_skips_a_format_the_layer_cannot_run():
    """auto.formats=[mxfp4,fp8,bf16] on a Linear with 20 inputs (not a multiple of fp8's 16): mxfp4 over tolerance must
    demote to bf16, which it runs, not to fp8, which it would not (it was recorded "mxfp4 -> fp8" and ran bf16)."""
    cfg = compose_config(
        [
            *TINY,
            "precision=auto",
            "precision.auto.formats=[mxfp4,fp8,bf16]",
            "precision.auto.objective=bits",
            "precision.auto.probe_steps=1",
            "precision.auto.recheck_every=1",
        ]
    )
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32))
    p.prepare_model(model)
    planner = p.planner
    assert planner.ladder == ["mxfp4", "fp8", "bf16", "fp32"]
    planner.figures = {"0": {"mxfp4": Figures(err=0.01, gerr=0.01)}, "2": {"mxfp4": Figures(err=0.01, gerr=0.01)}}
    planner._plan(1, model, p)
    assert planner.formats == {"0": "mxfp4", "2": "mxfp4"}
    bad = {"0": {"mxfp4": Figures(err=0.9, gerr=0.9)}, "2": {"mxfp4": Figures(err=0.9, gerr=0.9)}}
    event = planner._recheck(2, model, p, bad)
    moves = {c["layer"]: (c["old"], c["new"]) for c in event["changes"]}
    assert moves == {"0": ("mxfp4", "bf16"), "2": ("mxfp4", "fp8")}  # 20x32 cannot take fp8; 32x32 can
    assert p.plan["0"].format == "bf16" and p.plan["0"].kernel == "autocast"


def test_a_parametrization_container_is_not_a_module_of_the_plan():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), weight_norm(nn.Linear(8, 4)))
    names = [n for n, _ in planned_modules(model)]
    assert names == ["0", "2"]  # not "2.parametrizations.weight"
    cfg = compose_config([*TINY, "precision=bf16"])
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    plan = p.resolve_plan(model)
    assert list(plan) == ["0", "2"]
    # the parametrized layer's own parameters: the bias, and weight_norm's g (4x1) and v (4x8)
    assert plan["2"].params == 4 + 4 + 32


def test_auto_never_plans_a_format_that_is_not_a_candidate():
    """precision.auto.formats=[fp32] planned every layer bf16 (issue 37 case 8): the ladder holds the candidates
    and fp32 only."""
    cfg = compose_config([*TINY, "precision=auto", "precision.auto.formats=[fp32]", "precision.auto.probe_steps=1"])
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    p.prepare_model(model)
    assert p.planner.ladder == ["fp32"]
    # bf16 measured and well within tolerance: still not chosen, it is not a candidate
    p.planner.figures = {n: {"bf16": Figures(err=1e-3, gerr=1e-3)} for n in ("0", "2")}
    p.planner._plan(1, model, p)
    assert p.planner.formats == {"0": "fp32", "2": "fp32"}
    assert {e.format for e in p.plan.values()} == {"fp32"} and {e.kernel for e in p.plan.values()} == {"fp32"}


def test_a_rule_autocast_cannot_run_is_refused_not_mislabelled():
    """A bf16/fp16 rule on an Embedding or a LayerNorm was recorded "fp16 autocast" while the module computed fp32
    (issue 37 case 7): the registry refuses it, and the entry says fp32 and why."""
    cfg = compose_config(
        [*TINY, "precision=amp", "precision.dtype=float16", "precision.layers={emb: fp16, norm: bf16}"]
    )
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.ModuleDict({"emb": nn.Embedding(10, 8), "norm": nn.LayerNorm(8), "head": nn.Linear(8, 4)})
    plan = p.resolve_plan(model)
    for name, kind in (("emb", "Embedding"), ("norm", "LayerNorm")):
        assert (plan[name].format, plan[name].kernel) == ("fp32", "fp32")
        assert f"refused (autocast does not lower {kind}: it computes in fp32)" in plan[name].why
    assert (plan["head"].format, plan["head"].kernel) == ("fp16", "autocast")


@pytest.mark.slow
def test_eval_of_an_old_checkpoint_runs_under_that_checkpoints_plan(tmp_path):
    """A run resumed with other precision.layers: mptrain-eval --checkpoint step_2.pt evaluated under the new plan
    (issue 37 case 6); it restores the checkpoint's own plan, names it in the record, and reproduces the val/loss
    the run logged at that step."""
    import json

    from mptrain.tools.eval import evaluate

    from .conftest import read_jsonl, run_cli

    run = tmp_path / "run"
    base = [*TINY, "model=mlp", "model.width=32", "precision=bf16", "diagnostics=off", "trainer.eval_every=2",
            "checkpoint.every_steps=2", "checkpoint.keep_last=3", f"hydra.run.dir={run}"]
    out = run_cli([*base, "trainer.max_steps=2", "precision.layers={head: fp32}"], tmp_path)
    assert out.returncode == 0, out.stderr[-1500:]
    out = run_cli([*base, "trainer.max_steps=4", "resume=auto", "precision.layers={head: bf16}"], tmp_path)
    assert out.returncode == 0, out.stderr[-1500:]
    logged = next(r["val/loss"] for r in read_jsonl(run / "metrics.jsonl") if r.get("step") == 2 and "val/loss" in r)
    record, _ = evaluate(run, "step_2.pt")
    assert record["plan"]["head"] == "fp32"
    assert record["val/loss"] == logged
    assert json.loads((run / "precision_plan.json").read_text())["head"]["format"] == "bf16"  # the run's own, kept


def test_a_tied_weight_is_counted_once_in_the_plan():
    """plan_params counted the GPT's tied embedding/head weight twice (issue 37 case 21)."""
    model = nn.ModuleDict({"wte": nn.Embedding(50, 16), "head": nn.Linear(16, 50, bias=False)})
    model["head"].weight = model["wte"].weight
    cfg = compose_config([*TINY, "precision=bf16"])
    validate(cfg)
    plan = Precision(cfg.precision, torch.device("cpu")).resolve_plan(model)
    assert plan["head"].params == 800 and plan["head"].shared == 800 and "shared" in plan["head"].record()
    assert sum(plan.summary()["plan_params"].values()) == 800 == sum(p.numel() for p in model.parameters())


def test_auto_records_an_infinite_tolerance_and_an_all_fp32_plan_truthfully(tmp_path):
    """auto_tolerance was null for tolerance=inf, and compute_dtype said bf16 when every layer was fp32 (issue 37
    case 21); a changed precision.auto.formats on resume is refused in one line (case 5)."""
    from .conftest import train

    args = ["model=mlp", "model.width=16", "diagnostics=off", "precision=auto", "precision.auto.probe_steps=1"]
    summary, _ = train(tmp_path / "inf", [*args, "precision.auto.tolerance=inf", "trainer.max_steps=2"])
    assert summary["auto_tolerance"] == "inf"
    summary, run = train(tmp_path / "fp32", [*args, "precision.auto.formats=[fp32]", "trainer.max_steps=2"])
    assert summary["compute_dtype"] == "fp32" and set(summary["auto_plan"].values()) == {"fp32"}


@pytest.mark.slow
def test_resuming_auto_with_other_candidates_is_refused(tmp_path):
    from .conftest import run_cli

    run = tmp_path / "run"
    args = [*TINY, "model=mlp", "model.width=16", "diagnostics=off", "precision=auto", "precision.auto.probe_steps=1",
            f"hydra.run.dir={run}"]
    assert run_cli([*args, "trainer.max_steps=2"], tmp_path).returncode == 0
    before = (run / "metrics.jsonl").read_text()
    out = run_cli([*args, "trainer.max_steps=4", "resume=auto", "precision.auto.formats=[fp32]"], tmp_path)
    assert out.returncode != 0 and "precision.auto.formats changed on resume" in out.stderr
    assert out.stderr.strip().count("\n") == 0 or "Traceback" not in out.stderr
    assert (run / "metrics.jsonl").read_text() == before


def test_an_fp8_rule_without_torchao_names_the_rule(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchao(name, *a, **k):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    cfg = compose_config([*TINY, "precision=amp", "precision.layers={head: fp8}"])
    validate(cfg)
    import pytest

    from mptrain.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"^precision.layers names torchao's float8 training .*pip install mptrain\[fp8\]$"
    ):
        Precision(cfg.precision, torch.device("cpu"))


def _precision(*overrides: str) -> Precision:
    cfg = compose_config([*TINY, *overrides])
    validate(cfg)
    return Precision(cfg.precision, torch.device("cpu"))


def test_fp8_and_emulated_formats_leave_a_computed_weight_alone():
    """fp8 on a weight-normed Linear was a torchao TypeError traceback, an MX rule an AttributeError blamed on the
    task (issue 37 cases 13, 14): such a layer stays in the run's format and its entry says why."""
    from torch.nn.utils import weight_norm as old_weight_norm

    def model():
        return nn.Sequential(nn.Linear(32, 32), weight_norm(nn.Linear(32, 32)), old_weight_norm(nn.Linear(32, 32)),
                             nn.Linear(32, 32), nn.Linear(32, 32))

    p = _precision("precision=fp8")
    m = model()
    p.prepare_model(m)
    assert p.fp8_layers == ["3"]  # 0 first, 4 last, 1 and 2 computed weights
    assert "weight computed by weight_norm" in p.plan["1"].why and "weight computed" in p.plan["2"].why
    x = torch.randn(4, 32)
    with p.autocast():
        m(x).sum().backward()
    p = _precision("precision=bf16", "precision.layers={*: mxfp4}")
    plan = p.resolve_plan(model())
    assert plan["1"].format == "bf16" and "is computed (weight_norm or a parametrization)" in plan["1"].why
    assert plan["3"].format == "mxfp4"


def test_an_fp16_rule_on_an_lstm_on_a_cpu_is_refused():
    """oneDNN has no fp16 LSTM: the rule failed inside loss() (issue 37 case 15)."""
    p = _precision("precision=amp", "precision.layers={rnn: fp16}")
    plan = p.resolve_plan(nn.ModuleDict({"rnn": nn.LSTM(8, 8), "head": nn.Linear(8, 2)}))
    assert plan["rnn"].format == "bf16" and "LSTM has no float16 kernel on a CPU" in plan["rnn"].why


def test_lazy_modules_are_refused_in_one_line():
    import pytest

    from mptrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^the model has lazy modules \(0\)") as e:
        _precision("precision=bf16").resolve_plan(nn.Sequential(nn.LazyLinear(4), nn.ReLU()))
    assert "\n" not in str(e.value)


def test_every_format_the_advisor_can_name_is_one_a_rule_takes():
    """The advisor named fp8_row, which precision.layers refused as unknown (issue 37 case 10): its candidates and
    a rule's formats are the one registry's names."""
    from mptrain.precision.formats import BUILTINS
    from mptrain.precision.plan import user_rules

    rules = user_rules({f"m{i}": name for i, name in enumerate(BUILTINS)})
    assert [r.format for r in rules] == list(BUILTINS) and "fp8_row" in BUILTINS


def test_a_demotion_relabels_only_the_demoted_layer():
    """After one demotion every layer's reason read "auto (demoted at step N)" (issue 37 case 11)."""
    cfg = compose_config(
        [*TINY, "precision=auto", "precision.auto.formats=[mxfp4,bf16]", "precision.auto.objective=bits"]
    )
    validate(cfg)
    p = Precision(cfg.precision, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
    p.prepare_model(model)
    p.planner.figures = {n: {"mxfp4": Figures(err=0.01, gerr=0.01)} for n in ("0", "2")}
    p.planner._plan(3, model, p)
    p.planner._recheck(6, model, p, {"0": {"mxfp4": Figures(err=0.9)}, "2": {"mxfp4": Figures(err=0.01, gerr=0.01)}})
    assert p.plan["0"].why.startswith("auto (demoted at step 6)") and p.plan["0"].format == "bf16"
    assert p.plan["2"].why.startswith("auto (step 3)") and p.plan["2"].format == "mxfp4"
