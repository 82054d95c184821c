"""The precision engine against independent numbers: GradScaler, hand-worked sequences, exact fp16 facts."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mptrain.library.optim import build_optimizer
from mptrain.precision import LossScaler, LossScalingError, Precision

from .conftest import compose_config, read_jsonl, train

CPU = torch.device("cpu")


def make_precision(mode: str, *overrides: str) -> tuple[Precision, object]:
    cfg = compose_config([f"precision={mode}", *overrides])
    return Precision(cfg.precision, CPU), cfg


def sgd(params, lr=1.0):
    return build_optimizer(compose_config(["optimizer=sgd", f"optimizer.lr={lr}", "optimizer.momentum=0",
                                           "optimizer.nesterov=false", "optimizer.weight_decay=0"]).optimizer, params)


# ---- 1. the loss scaler ----------------------------------------------------------------------

def scale_trajectory_reference(overflow_at: set[int], steps: int, **kw) -> list[float]:
    """torch.amp.GradScaler's scale after each step, with inf injected into a gradient at `overflow_at`."""
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", **kw)
    out = []
    for i in range(steps):
        scaler.scale((w * 2.0).sum()).backward()
        if i in overflow_at:
            w.grad[1] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        out.append(scaler.get_scale())
    return out


def scale_trajectory_mptrain(overflow_at: set[int], steps: int, *overrides: str) -> list[float]:
    """The same through mptrain's precision engine (precision=dynamic, fp16 autocast)."""
    p, _ = make_precision("dynamic", *overrides)
    model = nn.Linear(3, 1)
    p.prepare_model(model)
    opt = sgd(p.optimizer_params(), lr=1e-3)
    x = torch.ones(2, 3)
    out = []
    for i in range(steps):
        with p.autocast():
            y = model(x)
        p.backward(y.float().sum())
        if i in overflow_at:
            model.weight.grad[0, 1] = float("inf")
        p.step(opt)
        out.append(p.loss_scale)
    return out


def test_default_scale_trajectory_equals_gradscaler_with_growth_events():
    # defaults: init 2^16, x2 after 2000 clean steps, x0.5 on overflow
    overflow_at = {0, 1, 5, 2100, 2101, 4300}
    steps = 4500
    ours = scale_trajectory_mptrain(overflow_at, steps)
    ref = scale_trajectory_reference(overflow_at, steps)
    assert ours == ref
    assert max(ref) > ref[10] and min(ref) < 2.0**16  # the window holds growths and back-offs


def test_scale_trajectory_equals_gradscaler_with_custom_settings():
    overflow_at = {2, 3, 4, 11, 12, 30}
    # (kept below fp16's 65504 so that only the injected overflows happen)
    ref = scale_trajectory_reference(overflow_at, 40, init_scale=8.0, growth_factor=3.0, backoff_factor=0.25,
                                     growth_interval=3)
    ours = scale_trajectory_mptrain(
        overflow_at,
        40,
        "precision.loss_scale.init=8",
        "precision.loss_scale.growth_factor=3",
        "precision.loss_scale.backoff_factor=0.25",
        "precision.loss_scale.growth_interval=3",
        "precision.loss_scale.min=0.001",
    )
    assert ours == ref
    assert len(set(ref)) > 4


def run_scaler(scaler: LossScaler, pattern: str) -> list[float]:
    """Feed a pattern of O (overflow) and C (clean) steps; return the scale after each."""
    out = []
    for c in pattern:
        scaler.update(c == "O")
        out.append(scaler.scale)
    return out


def test_hysteresis_tolerates_consecutive_overflows_by_hand():
    # default (Megatron-LM): the count refills only at the growth after CCC, so the O after
    # "OC" finds it spent and backs off
    s = LossScaler("dynamic", init=8, growth_interval=3, hysteresis=2, min=1, max=1024)
    #                       O  O  O  C  C  C  O  C  O  O
    assert run_scaler(s, "OOOCCCOCOO") == [8, 4, 2, 2, 2, 4, 4, 4, 2, 1]
    assert s.skipped == 6
    # consecutive_hysteresis (DeepSpeed's option): the C refills it, so "OCO" is tolerated
    s = LossScaler("dynamic", init=8, growth_interval=3, hysteresis=2, min=1, max=1024, consecutive_hysteresis=True)
    assert run_scaler(s, "OOOCCCOCOO") == [8, 4, 2, 2, 2, 4, 4, 4, 4, 2]
    assert s.skipped == 6


def test_scale_respects_max_and_min_and_on_min():
    s = LossScaler("dynamic", init=16, growth_interval=1, max=32)
    assert run_scaler(s, "CCC") == [32, 32, 32]

    s = LossScaler("dynamic", init=4, min=1, on_min="clamp")
    assert run_scaler(s, "OOOO") == [2, 1, 1, 1]
    assert s.skipped == 4

    s = LossScaler("dynamic", init=4, min=1, on_min="raise")
    assert run_scaler(s, "OO") == [2, 1]
    with pytest.raises(LossScalingError, match="3 overflowing steps in a row"):
        s.update(True)


def test_static_scale_never_moves_but_skips():
    s = LossScaler("static", init=128, growth_interval=1)
    assert run_scaler(s, "COCOO") == [128] * 5
    assert s.skipped == 3


def test_on_min_raise_stops_the_run_with_summary_failed(tmp_path):
    """An unstoppable overflow: the run ends with one message and status failed, not endless skips."""
    from mptrain.errors import TrainingFailed

    with pytest.raises(TrainingFailed, match="precision=bf16"):
        train(tmp_path, ["precision=dynamic", "model.width=4", "trainer.max_steps=50", "precision.loss_scale.init=4",
                         "precision.loss_scale.min=2", "optimizer.lr=1e30"])
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "minimum" in summary["error"]
    assert summary["steps"] < 50


# ---- 2. master weights ------------------------------------------------------------------------

def one_weight_model(mode: str) -> tuple[Precision, nn.Linear, torch.optim.Optimizer]:
    p, _ = make_precision(mode)
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    p.prepare_model(model)
    return p, model, sgd(p.optimizer_params(), lr=1.0)


def update_step(p: Precision, model: nn.Module, opt, grad: float) -> None:
    x = p.cast_inputs(torch.ones(1, 1))
    with p.autocast():
        y = model(x)
    p.backward((y.float() * grad).sum())  # d loss / d w = grad
    assert p.step(opt).applied


def test_update_of_2_pow_minus_12_is_lost_without_master_weights():
    p, model, opt = one_weight_model("nomaster")
    assert model.weight.dtype == torch.float16
    for _ in range(2):
        update_step(p, model, opt, 2.0**-12)
        assert model.weight.item() == 1.0  # 1 - 2^-12 rounds back to 1.0 in fp16


def test_update_of_2_pow_minus_12_accumulates_in_fp32_master_weights():
    p, model, opt = one_weight_model("master")
    assert model.weight.dtype == torch.float16
    master = p.optimizer_params()[0]
    assert master.dtype == torch.float32
    update_step(p, model, opt, 2.0**-12)
    assert master.item() == 1.0 - 2.0**-12  # exact in fp32
    assert model.weight.item() == 1.0  # the fp16 copy cannot show it yet (ties to even)
    update_step(p, model, opt, 2.0**-12)
    assert master.item() == 1.0 - 2.0**-11
    assert model.weight.item() == 1.0 - 2.0**-11  # now representable in fp16: the model moved


def test_master_mode_keeps_norm_layers_fp32_and_trains_with_adamw():
    p, _ = make_precision("master")
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LayerNorm(4 * 36), nn.Linear(4 * 36, 3)
    )
    p.prepare_model(model)
    assert model[0].weight.dtype == torch.float16 and model[5].weight.dtype == torch.float16
    assert model[1].weight.dtype == torch.float32 and model[1].running_mean.dtype == torch.float32
    assert model[4].weight.dtype == torch.float32
    assert all(q.dtype == torch.float32 for q in p.optimizer_params())
    opt = build_optimizer(compose_config(["optimizer=adamw", "optimizer.lr=1e-2"]).optimizer, p.optimizer_params())
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(15):
        logits = model(p.cast_inputs(x))
        loss = nn.functional.cross_entropy(logits.float(), y)
        losses.append(loss.item())
        p.backward(loss)
        p.step(opt)
    assert losses[-1] < 0.5 * losses[0]
    # the fp16 model equals the rounded masters
    for q, m in zip(p.master.model_params, p.master.masters):
        assert torch.equal(q, m.half())


# ---- 3. loss scaling recovers underflowing gradients ------------------------------------------

@pytest.mark.parametrize(("mode", "expected_weight"), [("noscale", 1.0), ("static", 1.0 - 2.0**-6)])
def test_gradient_of_2_pow_minus_26_underflows_without_scaling(mode, expected_weight):
    """d loss / d w = 2^-26 flows through an fp16 activation: zero in fp16 (< 2^-24) unless scaled.
    With static S=1024 it travels as 2^-16 and is unscaled to exactly 2^-26; lr 2^20 makes it 2^-6."""
    p, _ = make_precision(mode, "precision.loss_scale.init=1024")
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    p.prepare_model(model)
    opt = sgd(p.optimizer_params(), lr=2.0**20)
    with p.autocast():
        y = model(torch.ones(1, 1))
    assert y.dtype == torch.float16
    p.backward((y.float() * 2.0**-26).sum())
    if mode == "static":
        assert model.weight.grad.item() == 2.0**-26 * 1024  # still scaled: unscaling happens in step
    else:
        assert model.weight.grad.item() == 0.0
    assert p.step(opt).applied
    assert model.weight.item() == expected_weight


# ---- 4. clipping and accumulation ---------------------------------------------------------------

def test_clipping_sees_the_unscaled_norm():
    torch.manual_seed(0)
    ref_model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    model = copy.deepcopy(ref_model)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))

    nn.functional.cross_entropy(ref_model(x), y).backward()
    ref_norm = nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)

    p, _ = make_precision("dynamic")  # scale 2^16: a norm of scaled gradients would be 65536x larger
    p.prepare_model(model)
    opt = sgd(p.optimizer_params(), lr=0.5)
    with p.autocast():
        logits = model(x)
    p.backward(nn.functional.cross_entropy(logits.float(), y))
    result = p.step(opt, clip_grad_norm=0.1)
    assert result.applied
    torch.testing.assert_close(result.grad_norm, ref_norm, rtol=1e-2, atol=0)
    # the applied update equals the fp32 reference's clipped update
    with torch.no_grad():
        for q in ref_model.parameters():
            q -= 0.5 * q.grad
    for q, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(q, r, rtol=0, atol=2e-3)


@pytest.mark.parametrize("mode", ["fp32", "dynamic"])
def test_accumulating_k_micro_batches_matches_one_big_batch(mode, monkeypatch):
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    small = copy.deepcopy(big)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))

    p_big, _ = make_precision(mode)
    p_big.prepare_model(big)
    opt_big = sgd(p_big.optimizer_params(), lr=0.1)
    with p_big.autocast():
        logits = big(x)
    p_big.backward(nn.functional.cross_entropy(logits.float(), y))
    p_big.step(opt_big)

    p_small, _ = make_precision(mode)
    p_small.prepare_model(small)
    opt_small = sgd(p_small.optimizer_params(), lr=0.1)
    k = 4
    calls = []
    if p_small.scaler.enabled:
        original = p_small.scaler.unscale_
        monkeypatch.setattr(p_small.scaler, "unscale_", lambda grads: calls.append(1) or original(grads))
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        with p_small.autocast():
            logits = small(xs)
        p_small.backward(nn.functional.cross_entropy(logits.float(), ys) / k)
    p_small.step(opt_small)
    if p_small.scaler.enabled:
        assert len(calls) == 1  # unscaled exactly once per optimizer step
    tol = 1e-6 if mode == "fp32" else 2e-3
    for a, b in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


# ---- 5. overflow skips the step bit for bit ---------------------------------------------------

@pytest.mark.parametrize("mode", ["dynamic", "static", "master"])
def test_overflowing_step_is_skipped_bit_identically_and_backs_off(mode):
    torch.manual_seed(0)
    p, _ = make_precision(mode)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    p.prepare_model(model)
    opt = build_optimizer(compose_config(["optimizer=adamw"]).optimizer, p.optimizer_params())

    def step(x):
        with p.autocast():
            logits = model(p.cast_inputs(x))
        p.backward(nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1])))
        return p.step(opt)

    assert step(torch.randn(2, 4)).applied  # a clean step creates optimizer state
    params_before = [t.detach().clone() for t in model.parameters()]
    masters_before = [t.detach().clone() for t in p.optimizer_params()]
    state_before = copy.deepcopy(opt.state_dict())
    scale_before = p.loss_scale

    result = step(torch.full((2, 4), 1e5))  # fp16 forward overflows: 1e5 > 65504
    assert not result.applied
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(masters_before, p.optimizer_params()))
    state_after = opt.state_dict()
    for key, st in state_before["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_after["state"][key][name]))
    assert p.scaler.skipped == 1
    if mode == "static":
        assert p.loss_scale == scale_before
    else:
        assert p.loss_scale == scale_before / 2


def test_skipped_first_step_does_not_advance_the_schedule_and_is_counted(tmp_path):
    """Scale 2^100 overflows on step 1, then backs off to 2^10: no lr_scheduler warning, one skip."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, run_dir = train(
            tmp_path,
            [
                "precision=dynamic",
                "model.width=4",
                "trainer.max_steps=3",
                "trainer.log_every=1",
                "precision.loss_scale.init=1.2676506002282294e30",
                "precision.loss_scale.backoff_factor=8.077935669463161e-28",
                "scheduler=step",
                "scheduler.warmup_steps=0",
            ],
        )
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["skipped"] for r in rows] == [1, 0, 0]
    assert rows[0]["loss_scale"] == 1024.0
    assert summary["skipped_steps"] == 1 and summary["final_loss_scale"] == 1024.0


# ---- hardware checks and the auto dtype --------------------------------------------------------

def test_amp_auto_picks_bf16_on_cpu_and_says_why():
    p, _ = make_precision("amp")
    assert p.compute_dtype == torch.bfloat16 and not p.scaler.enabled
    assert "bfloat16 is native" in p.describe()
    p, _ = make_precision("amp", "precision.dtype=float16")
    assert p.compute_dtype == torch.float16 and p.scaler.enabled and p.scaler.kind == "dynamic"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_cuda_requested_without_gpu_fails_early(tmp_path):
    from .conftest import run_cli

    proc = run_cli(["trainer.device=cuda", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "trainer.device=cuda but no CUDA GPU is visible" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fp32_accumulation_flags_are_set_during_the_run_and_restored(monkeypatch):
    p, _ = make_precision("dynamic")
    m = torch.backends.cuda.matmul
    before = m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction
    with p.backend_flags():
        assert m.allow_fp16_reduced_precision_reduction is False
        assert m.allow_bf16_reduced_precision_reduction is False
    assert (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction) == before


# ---- 6. accuracy parity on digits -------------------------------------------------------------

@pytest.mark.slow
def test_mixed_precision_modes_match_fp32_on_digits(tmp_path):
    """Same seed and steps: amp, dynamic, static and master within 1.5 points of fp32 (fp16 is emulated
    on this CPU, so the run is short: 2 epochs)."""
    acc = {}
    for mode in ["fp32", "amp", "dynamic", "static", "master"]:
        summary, _ = train(tmp_path / mode, [f"precision={mode}", "trainer.max_steps=44", "scheduler.warmup_steps=5"])
        acc[mode] = summary["val/acc"]
    assert acc["fp32"] > 0.95
    for value in acc.values():
        assert abs(value - acc["fp32"]) <= 0.015, acc


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "amp", "dynamic", "static", "bf16", "master", "noscale", "nomaster"])
def test_torch_compile_works_in_every_precision_mode(tmp_path, mode):
    """trainer.compile=true: the compiled run trains, and its checkpoint holds the plain (uncompiled) model."""
    summary, run_dir = train(tmp_path, [f"precision={mode}", "model=mlp", "trainer.compile=true", "trainer.max_steps=4",
                                        "trainer.log_every=1"])
    assert summary["status"] == "completed" and summary["steps"] == 4
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert all(np.isfinite(losses))
