"""Issue 24: precision judgement. The advisor's bounds from activations and activation gradients, the shadow
measurement per format, --verify. Each case has its own small model (tests/judge_nets.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from mptrain.diagnostics.ranges import ROOT, ModuleRanges
from mptrain.diagnostics.shadow import FIELDS, Shadow
from mptrain.errors import TrainingFailed
from mptrain.tools.advise import MASTER_THRESHOLD, advise_run, gather, read_diagnostics, update_fractions

from .conftest import read_jsonl, train
from .judge_nets import LayerScaled

# Case 1: logistic regression on inputs in units of 2^-15, weights 2^15 larger, SGD lr 0.1 * 2^30
CASE1 = ["model=mlp", "model._target_=tests.judge_nets.TinyUnits", "optimizer.lr=107374182.4",
         "optimizer.weight_decay=0", "trainer.batch_size=16", "scheduler.warmup_steps=0"]
# Case 2: a constant 1e8 channel into mid1 (Adam: the fixed outlier weight gets no update)
CASE2 = ["model=mlp", "model._target_=tests.judge_nets.Outlier", "optimizer.name=adamw", "optimizer.lr=0.01",
         "optimizer.weight_decay=0", "scheduler.warmup_steps=0"]


def test_module_ranges_match_plain_pytorch():
    """Largest |input|, |output|, |weight| and |output gradient| of every module (the model too), against
    retain_grad on the same forward; gradients are divided by the loss scale they were computed at."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(7, 5) * 3
    ranges = ModuleRanges(model)
    ranges.begin()
    out = model(x)
    (out.square().sum() * 8.0).backward()  # "loss scale" 8
    got = ranges.end(loss_scale=8.0)
    h0 = model[0](x)
    h0.retain_grad()
    h1 = model[1](h0)
    h1.retain_grad()
    y = model[2](h1)
    y.retain_grad()
    y.square().sum().backward()
    expect = {ROOT: (x, y, None, y), "0": (x, h0, model[0].weight, h0), "1": (h0, h1, None, h1),
              "2": (h1, y, model[2].weight, y)}
    assert set(got) == set(expect)
    for name, (i, o, w, g) in expect.items():
        assert got[name]["in"] == pytest.approx(i.abs().max().item(), rel=1e-6), name
        assert got[name]["out"] == pytest.approx(o.abs().max().item(), rel=1e-6), name
        assert got[name]["grad"] == pytest.approx(g.grad.abs().max().item(), rel=1e-5), name
        if w is not None:
            assert got[name]["w"] == pytest.approx(max(w.abs().max().item(), model[int(name)].bias.abs().max().item()))
        else:
            assert "w" not in got[name]
    assert not model[0]._forward_hooks  # the hooks are gone after the step


@pytest.mark.slow
def test_case1_scale_is_bounded_by_the_output_gradient_not_only_the_weights(tmp_path):
    """Weight gradients 2^15 below their usual size, the logits' gradient ordinary. Bounded by the weights
    alone the range's middle overflows on every step; the advice, bounded by the model's output gradient too,
    skips none."""
    _, probe = train(tmp_path / "probe", CASE1 + ["precision=fp32", "trainer.max_steps=12", "diagnostics.every=1",
                                                           "diagnostics.shadow=[]"])
    advice, lines = advise_run(probe)
    f = advice["fp16"]
    assert f["viable"] and f["top_set_by"] == ROOT
    by = f["s_hi_by"]
    assert by["activation_gradients"] < by["weights"] - 4  # the bound that was missing is far below
    # the bound is exactly the largest recorded output gradient, from the rows themselves
    rows = [r for r in read_jsonl(probe / "diagnostics.jsonl") if r["event"] == "sample"]
    g = max(r["modules"][ROOT]["grad"] for r in rows)
    assert g * 2.0 ** by["activation_gradients"] <= 65504 < g * 2.0 ** (by["activation_gradients"] + 1)
    assert 0.01 < g <= 1 / 16  # ordinary: the loss's gradient, at most 1/batch
    assert f["s"] <= f["s_hi"] == by["activation_gradients"]
    above = by["activation_gradients"] + 2  # inside the range the weights alone allowed
    assert f["s_lo"] <= above < by["weights"]
    assert any("set by (model)" in line for line in lines)
    runs = {"advised": advice["recommended_overrides"],
            "above": ["precision=static", f"precision.loss_scale.init={2 ** above}"]}
    skipped = {}
    for name, extra in runs.items():
        try:
            train(
                tmp_path / name, CASE1 + ["trainer.max_steps=4", "diagnostics=off", "checkpoint.enabled=false", *extra]
            )
        except TrainingFailed as e:  # every step skipped: the run applied no update, so it ends failed
            assert "no update was applied" in str(e)
        skipped[name] = json.loads((tmp_path / name / "run" / "summary.json").read_text())["skipped_steps"]
    assert skipped == {"advised": 0, "above": 4}


def test_case2_massive_channel_rules_out_fp16_and_names_the_layer(tmp_path):
    """A constant 1e8 channel into mid1: from a bf16 probe the advisor says fp16 is not viable (no loss scale
    helps a forward overflow), names mid1 and the value, and recommends bf16. fp16 itself confirms it: dynamic
    scaling backs off to its minimum and stops."""
    _, probe = train(tmp_path / "probe", CASE2 + ["precision=bf16", "trainer.max_steps=4", "diagnostics.every=1",
                                                  "diagnostics.shadow=[bf16,fp16,fp8,fp8_row,mxfp8]"])
    advice, lines = advise_run(probe)
    f = advice["fp16"]
    assert not f["viable"] and not f["feasible"]
    name, what, value = f["forward_overflow"][0]
    assert (name, what) == ("mid1", "in") and value == pytest.approx(1e8, rel=2**-8)  # 1e8 as bf16 holds it
    assert advice["verdict"].startswith("fp16 is not viable: mid1's input reaches 1e+08")
    assert advice["recommended_overrides"] == ["precision=bf16"]
    assert not any(n == "mid2" for n, _, _ in f["forward_overflow"])
    # fp8 from measurement: the outlier sets mid1's e4m3 scale (per tensor and per row: each row holds it) and
    # the other 64 inputs of each row flush; mid2's inputs are ordinary
    per = advice["per_layer"]
    for fp8 in ("fp8", "fp8_row"):
        assert per["mid1"][fp8]["flush"] == pytest.approx(64 / 65) and per["mid1"][fp8]["err"] > 0.9
        assert not per["mid1"][fp8]["fits"]
        assert per["mid2"][fp8]["flush"] == 0.0 and per["mid2"][fp8]["err"] < 0.1 and per["mid2"][fp8]["fits"]
    assert per["mid1"]["fp16"]["err"] == "inf"  # as advice.json writes it (JSON has no inf)
    assert json.loads((probe / "advice.json").read_text())["per_layer"]["mid1"]["fp16"]["err"] == "inf"
    plan = advice["recommended_plan"]
    assert plan["mid1"] == "bf16" and plan["mid2"] == "fp8"
    layers = advice["plan_overrides"]
    assert layers[0] == "precision=bf16" and layers[1].startswith("precision.layers={") and "mid2: fp8" in layers[1]
    assert "mid1" not in layers[1]  # mid1 stays in the verdict's bf16
    assert any(line.strip().startswith("mid1: planned bf16") for line in lines)
    # issue 34: every format of the plan but bf16 and fp32 runs emulated on this CPU; the advice names each with
    # its slowdown measured here (fp8's emulation does the fp32 GEMM and casts around it: slower than fp32)
    slow = advice["emulated_slowdown_vs_fp32"]
    assert set(slow) == set(plan.values()) - {"bf16", "fp32"} and slow["fp8"] > 1
    assert (f"note: fp8 in the per-layer plan is emulated on this CPU (measured here: {slow['fp8']:.1f}x fp32's time"
            in "\n".join(lines))
    from mptrain.precision.scaler import LossScalingError
    with pytest.raises(LossScalingError, match="minimum"):
        train(tmp_path / "fp16", CASE2 + ["precision=dynamic", "precision.loss_scale.init=8", "trainer.max_steps=8",
                                          "diagnostics=off", "checkpoint.enabled=false"])


@pytest.mark.parametrize("precision", ["bf16_pure", "nomaster"])
def test_case3_16bit_weights_use_the_runs_own_lost_updates(tmp_path, precision):
    """With 16-bit weights an update that rounded away is an exact zero: the histogram of applied updates hides
    it. The advisor reports the summary's own diag/update_underflow and says to keep FP32 master weights."""
    summary, run = train(tmp_path, ["model=mlp", f"precision={precision}", "optimizer.lr=0.001",
                                    "scheduler.warmup_steps=0", "trainer.max_steps=3", "diagnostics.every=1",
                                    "diagnostics.shadow=[]"])
    advice, lines = advise_run(run)
    m = advice["master_weights"]
    assert m["fp16"] == pytest.approx(summary["diag/update_underflow"], rel=1e-12)
    assert m["fp16"] > 0.5 > MASTER_THRESHOLD
    assert any("keep FP32 master weights" in line for line in lines)
    _, samples, _ = read_diagnostics(run)
    _, _, ratio = gather(samples)
    assert update_fractions(ratio)["fp16"] < 0.1  # what the advisor used to read: the loss hidden
    if precision == "bf16_pure":
        assert m["bf16"] == pytest.approx(summary["diag/bf16_lost_nearest"], rel=1e-12)
    meta = json.loads((run / "diagnostics.jsonl").read_text().splitlines()[0])
    assert meta["weights"] == ["bfloat16" if precision == "bf16_pure" else "float16"]
    assert math.isfinite(m["fp16"])


# ---- shadow measurement ---------------------------------------------------------------------------------------

def shadow_figures_of(module: nn.Module, x: torch.Tensor, formats, grad: torch.Tensor | None = None) -> dict:
    """{format: {field: value}} for the model itself (ROOT), measured through the collector's hooks."""
    shadow = Shadow(formats)
    ranges = ModuleRanges(module, shadow)
    ranges.begin()
    y = module(x)
    if grad is not None:
        y.backward(grad)
    ranges.remove()
    rows = shadow.end()[ROOT]
    return {f: dict(zip(FIELDS, v)) for f, v in rows.items()}


def identity_linear(n: int) -> nn.Linear:
    lin = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n))
    return lin


def test_shadow_outlier_flushes_the_rest_under_fp8_and_overflows_fp16():
    """One row: a 1e8 outlier and 32 ones through an identity Linear. e4m3 per tensor (and per row: one row)
    scales by 448/1e8, so every 1 becomes 4.5e-6, below e4m3's smallest subnormal 2^-9: 32 of the 33 nonzero
    inputs flush, and the output keeps only the outlier: relative error sqrt(32)/sqrt(1e16 + 32). fp16 holds
    the ones but not 1e8 (one of 33 overflows, the output is inf). bf16 rounds 1e8 = 190.7 * 2^19 to 191 * 2^19
    (8 significant bits)."""
    x = torch.ones(1, 33)
    x[0, 0] = 1e8
    fig = shadow_figures_of(identity_linear(33), x, ["fp8", "fp8_row", "fp16", "bf16"])
    for f in ("fp8", "fp8_row"):
        assert fig[f]["flush"] == pytest.approx(32 / 33) and fig[f]["sat"] == 0.0
        assert fig[f]["err"] == pytest.approx(math.sqrt(32) / math.sqrt(1e16 + 32), rel=1e-3)
    assert fig["fp16"]["err"] == "inf" and fig["fp16"]["sat"] == pytest.approx(1 / 33) and fig["fp16"]["flush"] == 0
    bf16_1e8 = torch.tensor(1e8).bfloat16().item()
    assert bf16_1e8 == 191 * 2**19
    assert fig["bf16"]["err"] == pytest.approx(abs(bf16_1e8 - 1e8) / math.sqrt(1e16 + 32), rel=1e-4)
    assert fig["bf16"]["flush"] == fig["bf16"]["sat"] == 0.0


def test_shadow_known_flush_fraction_and_rounding_error():
    """fp16's smallest subnormal is 2^-24: of 2^-20 .. 2^-29, the values 2^-25 (a tie, to even: 0) and below
    flush, 5 of 10. 1 + 2^-11 is a tie between fp16's 1 and 1 + 2^-10: to even, 1; relative error
    2^-11 / (1 + 2^-11) of that output element."""
    x = torch.exp2(-torch.arange(20, 30, dtype=torch.float32)).reshape(1, 10)
    assert shadow_figures_of(identity_linear(10), x, ["fp16"])["fp16"]["flush"] == pytest.approx(0.5)
    y = torch.tensor([[1 + 2.0**-11]])
    fig = shadow_figures_of(identity_linear(1), y, ["fp16"])["fp16"]
    assert fig["err"] == pytest.approx(2.0**-11 / (1 + 2.0**-11), rel=1e-6)


def test_shadow_gradient_figures_and_mx_saturation():
    """The output gradient of a Linear: e5m2 per tensor keeps a gradient of ones and one 2^10 outlier exactly
    (powers of two), so its error is 0. mxfp8: a block whose largest value is 1.9 * 2^3 gets the shared scale
    2^(3 - 8); 1.9 * 2^8 = 486.4 is past e4m3's 448 and saturates: 1 of the 32."""
    lin = identity_linear(32)
    x = torch.full((1, 32), 0.5)
    x[0, 0] = 1.9 * 8
    g = torch.ones(1, 32)
    g[0, 5] = 2.0**10
    fig = shadow_figures_of(lin, x, ["fp8", "mxfp8"], grad=g)
    assert fig["fp8"]["gerr"] == 0.0 and fig["fp8"]["gflush"] == 0.0
    assert fig["mxfp8"]["sat"] == pytest.approx(1 / 32)
    q = 448 * 2.0**-5
    assert fig["mxfp8"]["err"] == pytest.approx(abs(q - 1.9 * 8) / math.sqrt((1.9 * 8) ** 2 + 31 * 0.25), rel=1e-4)


def test_shadow_does_not_change_training(tmp_path):
    """The shadow re-runs draw dropout masks from the saved RNG and use copies of the batch-norm statistics:
    a net with dropout inside attention and batch norm trains bitwise the same with and without it."""
    runs = {}
    for name, shadow in (("on", "[bf16,fp8,mxfp8]"), ("off", "[]")):
        _, run = train(
            tmp_path / name,
            [
                "model=mlp",
                "model._target_=tests.judge_nets.DropNorm",
                "precision=fp32",
                "trainer.max_steps=2",
                "diagnostics.every=1",
                f"diagnostics.shadow={shadow}",
                "trainer.log_every=1",
                "checkpoint.enabled=false",
            ],
        )
        runs[name] = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
        rows = [r for r in read_jsonl(run / "diagnostics.jsonl") if r["event"] == "sample"]
        assert all(("shadow" in r) == (name == "on") for r in rows)
        if name == "on":
            assert set(rows[0]["shadow"]) == {"attn", "norm", "head"}
    assert runs["on"] == runs["off"] and len(runs["on"]) == 2


@pytest.mark.parametrize("precision", ["master", "bf16_pure"])
def test_shadow_of_a_module_that_calls_others_under_16bit_weights(precision):
    """A model with its own parameter (a layer scale) around modules with theirs, prepared by the preset as a
    run is (16-bit weights, input casts on its parts): the reference is the float32 model (every parameter in
    it float32, no cast), the candidate the model with every parameter and the input rounded to the format,
    its output too; against the same computed by hand on float32 copies."""
    from mptrain.precision import Precision

    from .conftest import compose_config

    torch.manual_seed(0)
    engine = Precision(compose_config([f"precision={precision}"]).precision, torch.device("cpu"))
    net = engine.prepare_model(LayerScaled(image_size=4))
    x = torch.randn(5, 1, 4, 4)
    fig = shadow_figures_of(net, x, ["bf16", "fp16"])
    x = engine.cast_inputs(x)  # what the model itself computed on
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        ref_net, q_net = copy.deepcopy(net).float(), copy.deepcopy(net).float()
        for m in (*ref_net.modules(), *q_net.modules()):
            m._forward_pre_hooks.clear()  # the preset's casts: plain float32 copies
        with torch.no_grad():
            for p in q_net.parameters():
                p.copy_(p.to(dtype).float())
            ref = ref_net(x.float())
            got = q_net(x.float().to(dtype).float()).to(dtype).float()
        expected = (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item()
        assert expected > 0 and fig[name]["err"] == pytest.approx(expected, rel=1e-5), name


def test_shadow_measures_converted_modules_inside_a_block_through_their_torch_base():
    """A block whose Linear layers are torchao's Float8Linear: its shadow figures are those of the same block
    with plain nn.Linear layers (the reference is float32, not the fp8 the layers compute in now)."""
    float8 = pytest.importorskip("torchao.float8")
    torch.manual_seed(0)
    plain = LayerScaled(image_size=4)
    converted = copy.deepcopy(plain)
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name("tensorwise"), emulate=True)
    float8.convert_to_float8_training(converted, config=config, module_filter_fn=lambda m, fqn: fqn.startswith("mlp"))
    assert type(converted.mlp[0]).__name__ == "Float8Linear"
    x = torch.randn(16, 1, 4, 4)
    want, got = shadow_figures_of(plain, x, ["bf16", "fp8"]), shadow_figures_of(converted, x, ["bf16", "fp8"])
    for name in ("bf16", "fp8"):
        assert got[name]["err"] == pytest.approx(want[name]["err"], rel=1e-6) and want[name]["err"] > 0


@pytest.mark.parametrize("precision", ["master", "bf16_pure"])
def test_shadow_trains_a_layer_scaled_model_in_16bit_weights(precision, tmp_path):
    """The model itself holds a parameter and its parts carry the preset's input casts: its shadow row is
    measured (a float32 reference, not the fp16 one the casts would make, nor a dtype error)."""
    summary, run = train(tmp_path, ["model=mlp", "model._target_=tests.judge_nets.LayerScaled",
                                    f"precision={precision}", "trainer.max_steps=2", "diagnostics.every=1",
                                    "diagnostics.shadow=[bf16]", "checkpoint.enabled=false"])
    assert summary["status"] == "completed"
    rows = [r for r in read_jsonl(run / "diagnostics.jsonl") if r["event"] == "sample"]
    root = rows[0]["shadow"][ROOT]["bf16"]
    err = root[FIELDS.index("err")]
    # bf16 keeps 8 significant bits: a relative error near 2^-9, not 0 (same format) nor fp16-sized rounding
    assert 2.0**-12 < err < 2.0**-6, root


# ---- --verify ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_verify_needs_the_probes_checkpoint(tmp_path):
    _, run = train(tmp_path, ["model=mlp", "precision=fp32", "trainer.max_steps=3", "diagnostics.every=1",
                              "diagnostics.shadow=[]", "checkpoint.enabled=false"])
    proc = subprocess.run([sys.executable, "-m", "mptrain.tools.advise", "--verify", str(run)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0
    assert "no checkpoints/last.pt" in proc.stderr and "checkpoint.enabled=true" in proc.stderr
    assert not (run / "advice.json").exists() and not (run / "verify").exists()


@pytest.mark.slow
def test_case1_advice_verifies_and_trains_fp16_to_fp32_accuracy_a_too_large_scale_fails(tmp_path):
    """The issue's test: the case-1 net's advised S trains fp16 to fp32's accuracy within a point and --verify
    passes; S four times past the activation-gradient bound fails --verify, is not recommended, exits 3."""
    _, probe = train(tmp_path / "probe", CASE1 + ["precision=fp32", "trainer.max_steps=30", "diagnostics.every=1",
                                                  "diagnostics.shadow=[]"])
    advice, lines = advise_run(probe, verify_steps=15)
    assert advice["verified"] is True, advice["verification"]["reasons"]
    v = advice["verification"]
    assert v["advised"]["skipped"] == 0 and v["advised"]["steps"] == v["probe"]["steps"] == 15
    assert "  VERIFIED" in lines
    saved = json.loads((probe / "advice.json").read_text())
    assert saved["verified"] is True and saved["recommended_overrides"] == advice["recommended_overrides"]
    acc = {}
    for name, extra in {"fp32": ["precision=fp32"], "advised": advice["recommended_overrides"]}.items():
        summary, _ = train(tmp_path / name, CASE1 + ["trainer.max_steps=60", "diagnostics=off",
                                                     "checkpoint.enabled=false", *extra])
        assert summary["skipped_steps"] == 0
        acc[name] = summary["val/acc"]
    assert acc["fp32"] > 0.9 and abs(acc["advised"] - acc["fp32"]) <= 0.01, acc
    too_large = 2 ** (advice["fp16"]["s_hi"] + 2)
    proc = subprocess.run([sys.executable, "-m", "mptrain.tools.advise", str(probe), "--steps", "6", "--overrides",
                           "precision=static", f"precision.loss_scale.init={too_large}"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr
    assert "  FAILED: 6 of 6 steps skipped (allowed 0)" in proc.stdout
    failed = json.loads((probe / "advice.json").read_text())
    # the trial of other overrides failed; the recommendation itself was not tried this time (not verified)
    assert failed["verification"]["verified"] is False and failed["verified"] is None
    assert failed["verification"]["overrides"] == ["precision=static", f"precision.loss_scale.init={too_large}"]
    assert failed["rejected_overrides"] == ["precision=static", f"precision.loss_scale.init={too_large}"]
    assert failed["rejected_overrides"] != failed["recommended_overrides"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["precision.bogus=1"], "precision.bogus is not a config key"),
    (["precision=nosuch"], "Could not find 'precision/nosuch'"),
])
def test_verify_overrides_that_cannot_compose_are_one_line(overrides, message):
    # found by a hostile pass: a bad key ended --verify in Hydra's traceback
    from mptrain.errors import MptrainError
    from mptrain.tools.verify import _compose

    with pytest.raises(MptrainError, match=message):
        _compose(overrides)
