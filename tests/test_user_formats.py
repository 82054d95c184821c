"""User formats (issue 33): defined in config alone, or by `_target_` to a Format subclass, and usable wherever a
built-in is: a plan, the shadow, the advisor, precision=auto, estimate, report. Nothing under mptrain/ is touched:
the formats come from this file's overrides and tests/formats_pkg."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mptrain.errors import ConfigError
from mptrain.precision.formats import BUILTINS, Registry

from .conftest import REPO, read_jsonl, run_cli, train
from .formats_pkg.int8 import int8_row

# e3m2 with an e8m0 scale per 32: the config-defined twin of the built-in mxfp6_e3m2
TWIN = "precision.formats.my6={element: {ebits: 3, mbits: 2}, scaling: block, block: 32, scale_element: e8m0}"
INT8 = "precision.formats.int8={_target_: tests.formats_pkg.int8.int8_row}"
MLP = ["model=mlp", "model.width=32", "model.depth=2", "trainer.batch_size=32", "trainer.log_every=1",
       "diagnostics=off"]


def test_config_element_defaults_follow_ocp_and_ieee():
    """bias 2^(e-1)-1; max: every exponent code finite when saturating (OCP), the top code inf/NaN otherwise (IEEE):
    hand-worked for e3m2 (28), e2m1 (6), e5m2 (57344) and e5m10 (65504)."""
    r = Registry.from_config({
        "a": {"element": {"ebits": 3, "mbits": 2}}, "b": {"element": {"ebits": 2, "mbits": 1}},
        "c": {"element": {"ebits": 5, "mbits": 2, "overflow": "inf"}},
        "d": {"element": {"ebits": 5, "mbits": 10, "overflow": "inf"}}})
    assert [(r.get(n).element.bias, r.get(n).max) for n in "abcd"] == [(3, 28.0), (1, 6.0), (15, 57344.0),
                                                                       (15, 65504.0)]
    x = torch.linspace(-70000, 70000, 4001)
    assert torch.equal(r.get("d").quantize(x), x.half().float())  # the IEEE twin rounds as PyTorch's fp16 cast


def test_the_twin_quantizes_as_the_builtin():
    r = Registry.from_config({"my6": {"element": {"ebits": 3, "mbits": 2}, "scaling": "block", "block": 32,
                                      "scale_element": "e8m0"}})
    x = torch.randn(64, 96) * torch.logspace(-6, 6, 96)
    assert torch.equal(r.get("my6").quantize(x), BUILTINS.get("mxfp6_e3m2").quantize(x))
    assert r.cost("my6") == BUILTINS.cost("mxfp6_e3m2")


def test_the_target_format_is_its_own_quantize():
    r = Registry.from_config({"int8": {"_target_": "tests.formats_pkg.int8.int8_row"}})
    fmt = r.get("int8")
    assert type(fmt).__name__ == "Int8Row" and fmt.name == "int8" and fmt.bits == 8
    x = torch.randn(4, 50)
    s = x.abs().amax(-1, keepdim=True) / 127  # numpy-free hand computation of symmetric int8
    assert torch.allclose(fmt.quantize(x), torch.round(x / s) * s)


@pytest.mark.parametrize(("spec", "message"), [
    ({"element": {"ebits": 3}}, "precision.formats.x.element: needs ebits and mbits"),
    ({"element": "e9m9"}, "precision.formats.x.element='e9m9': unknown element"),
    ({"element": "e3m2", "scaling": "block"}, "scaling=block needs block"),
    ({"element": "e3m2", "scaling": "diagonal"}, "precision.formats.x.scaling='diagonal' is invalid"),
    ({"element": "e3m2", "rounding": "up"}, "unknown key rounding"),
    ({"element": {"ebits": 3, "mbits": 2, "max": 1000}}, "must be positive and at most 28.0"),
    ({"_target_": "tests.formats_pkg.nothing.here"}, "cannot be imported"),
    ({"_target_": "torch.zeros", "size": [2]}, "returned Tensor, not a mptrain.precision.formats.Format"),
])
def test_a_bad_definition_is_one_line(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        Registry.from_config({"x": spec})
    assert "\n" not in str(e.value)


def test_a_builtin_name_cannot_be_redefined():
    with pytest.raises(ConfigError, match="precision.formats.bf16 redefines the built-in format bf16"):
        Registry.from_config({"bf16": {"element": "e3m2"}})


def test_the_config_twin_trains_bit_identically_to_the_builtin(tmp_path):
    runs = {}
    for name, extra in (
        ("builtin", ["precision.layers={*: mxfp6_e3m2}"]),
        ("twin", [TWIN, "precision.layers={*: my6}"]),
    ):
        summary, run = train(tmp_path / name, [*MLP, "precision=bf16", "trainer.max_steps=4", *extra])
        assert summary["status"] == "completed"
        runs[name] = run
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("samples_per_s", "wall_s", "time")} for r in rows]  # noqa: E731
    assert strip(read_jsonl(runs["builtin"] / "metrics.jsonl")) == strip(read_jsonl(runs["twin"] / "metrics.jsonl"))
    a = torch.load(runs["builtin"] / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(runs["twin"] / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    plan = json.loads((runs["twin"] / "precision_plan.json").read_text())
    assert {e["format"] for e in plan.values() if e["kernel"] == "emulated"} == {"my6"}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["my6", "int8"])
def test_a_user_format_in_plan_shadow_auto_advisor_estimate_and_report(tmp_path, which, capsys, monkeypatch):
    define = TWIN if which == "my6" else INT8
    # a plan and the shadow
    summary, planned = train(tmp_path / "plan", [*MLP, "precision=bf16", "trainer.max_steps=3", define,
                                             f"precision.layers={{head: {which}}}", "diagnostics=default",
                                             "diagnostics.every=1", f"diagnostics.shadow=[bf16,{which}]"])
    plan = json.loads((planned / "precision_plan.json").read_text())
    assert plan["head"]["format"] == which and plan["head"]["kernel"] == "emulated"
    rows = [r for r in read_jsonl(planned / "diagnostics.jsonl") if "shadow" in r]
    assert rows and all(isinstance(r["shadow"]["head"][which][0], float) for r in rows)
    # the advisor reads the run's own registry: the format is a candidate it can recommend
    from mptrain.tools.advise import advise_run

    advice, _ = advise_run(planned, None, None)
    assert which in {f for per in advice["per_layer"].values() for f in per}
    # precision=auto with the user format as a candidate (tolerance wide enough that it holds)
    summary, run = train(
        tmp_path / "auto",
        [
            *MLP,
            "precision=auto",
            "precision.auto.objective=bits",
            "trainer.max_steps=4",
            define,
            f"precision.auto.formats=[{which},bf16]",
            "precision.auto.probe_steps=2",
            "precision.auto.tolerance=0.5",
        ],
    )
    assert which in summary["auto_plan"].values()
    # estimate (a plan with the format) and report (on the planned run)
    from mptrain.tools import estimate, report

    monkeypatch.chdir(tmp_path)
    assert estimate.main(["--presets", "bf16", *MLP, "trainer.device=cpu", define,
                          f"precision.layers={{head: {which}}}"]) == 0
    assert "| `bf16` |" in capsys.readouterr().out
    report.main([str(planned)])
    assert (planned / "report").is_dir() and which in capsys.readouterr().out


@pytest.mark.slow
def test_resume_refuses_a_changed_definition_and_continues_the_same(tmp_path):
    args = [*MLP, "precision=bf16", TWIN, "precision.layers={head: my6}", "trainer.device=cpu",
            "trainer.progress_bar=false", "trainer.tensorboard=false"]
    run = tmp_path / "run"
    assert run_cli([*args, "trainer.max_steps=2", f"hydra.run.dir={run}"], tmp_path).returncode == 0
    changed = TWIN.replace("block: 32", "block: 16")
    before = (run / "metrics.jsonl").read_text()
    out = run_cli([changed, "trainer.max_steps=4", "resume=auto", f"hydra.run.dir={run}", *args[-3:]], tmp_path)
    assert out.returncode != 0 and "precision.formats.my6 differs from the run's own definition" in out.stderr
    assert (run / "metrics.jsonl").read_text() == before  # refused before the directory changed
    out = run_cli(["trainer.max_steps=4", "resume=auto", f"hydra.run.dir={run}", *args[-3:]], tmp_path)
    assert out.returncode == 0, out.stderr[-1500:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_int8_row_is_importable_as_documented():
    assert int8_row().scaling == "row" and os.path.isdir(REPO / "tests" / "formats_pkg")
