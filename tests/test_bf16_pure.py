"""precision=bf16_pure: bf16 weights and optimizer state, updates rounded nearest | stochastic | kahan.

Checked against hand-worked bf16 facts, plain PyTorch optimizers and binomial bounds."""

from __future__ import annotations

import io
import math
import shutil
import signal

import numpy as np
import pytest
import torch
from torch import nn

from mptrain.config import validate
from mptrain.errors import ConfigError
from mptrain.library.models.vision import SmallCNN
from mptrain.precision import Precision
from mptrain.precision.bf16_pure import (
    UPDATES,
    PureBf16AdamW,
    PureBf16SGD,
    memory_per_param,
    stochastic_round_bf16,
    update_rounding_stats,
)

from .conftest import compose_config, read_jsonl, train
from .test_checkpoint import assert_same_tensors, final_state, stop_at

CPU = torch.device("cpu")


def one_weight(update: str, n: int = 1, seed: int = 0) -> tuple[nn.Parameter, PureBf16SGD]:
    w = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    return w, PureBf16SGD([w], lr=1.0, update=update, seed=seed)


def sgd_step(w: nn.Parameter, opt, grad: float) -> None:
    w.grad = torch.full_like(w, grad)
    opt.step()


# ---- 1. hand-checked bf16 facts: an update of 2^-10 to a weight of 1.0 --------------------------

def test_update_of_2_pow_minus_10_is_lost_under_nearest():
    w, opt = one_weight("nearest")
    for _ in range(8):
        sgd_step(w, opt, 2.0**-10)
        assert w.item() == 1.0  # 1 - 2^-10 is a quarter of the way to 1 - 2^-8: rounds back to 1


def test_update_of_2_pow_minus_10_accumulates_exactly_under_kahan():
    w, opt = one_weight("kahan")
    sgd_step(w, opt, 2.0**-10)
    assert w.item() == 1.0 and opt.state[w]["compensation"].item() == -(2.0**-10)  # carried, not lost
    sgd_step(w, opt, 2.0**-10)
    assert w.item() == 1.0 and opt.state[w]["compensation"].item() == -(2.0**-9)  # 1 - 2^-9: a tie, to even
    for k in range(3, 17):
        sgd_step(w, opt, 2.0**-10)
        if k % 4 == 0:  # every fourth step the weight has moved exactly k * 2^-10
            assert w.item() == 1.0 - k * 2.0**-10 and opt.state[w]["compensation"].item() == 0.0
    assert w.dtype == torch.bfloat16 and opt.state[w]["compensation"].dtype == torch.bfloat16


def test_update_of_2_pow_minus_10_is_kept_in_expectation_under_stochastic():
    n = 200_000
    w, opt = one_weight("stochastic", n=n)
    sgd_step(w, opt, 2.0**-10)
    values = set(w.float().unique().tolist())
    assert values == {1.0, 1.0 - 2.0**-8}  # only the two bf16 neighbours
    p_down = 0.25  # 1 - 2^-10 lies a quarter of the way from 1 to 1 - 2^-8
    frac = float((w == 1.0 - 2.0**-8).float().mean())
    sigma = math.sqrt(p_down * (1 - p_down) / n)
    assert abs(frac - p_down) < 5 * sigma, frac
    assert abs(float(w.detach().float().mean()) - (1 - 2.0**-10)) < 5 * sigma * 2.0**-8


@pytest.mark.parametrize("f", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stochastic_rounding_rounds_up_with_probability_equal_to_the_distance(f, sign):
    n = 100_000
    lo = 1.5  # bf16 spacing in [1, 2) is 2^-7
    x = torch.full((n,), sign * (lo + f * 2.0**-7), dtype=torch.float32)
    y = stochastic_round_bf16(x, torch.Generator().manual_seed(3)).float()
    up = float((y.abs() == lo + 2.0**-7).float().mean())
    assert set(y.abs().unique().tolist()) <= {lo, lo + 2.0**-7}
    assert abs(up - f) < 5 * math.sqrt(f * (1 - f) / n), up


def test_stochastic_rounding_keeps_bf16_values_and_non_finite_ones():
    exact = torch.tensor([0.0, -0.0, 1.0, -3.0, 2.0**-130, 3.3895313892515355e38], dtype=torch.bfloat16).float()
    special = torch.tensor([math.inf, -math.inf, math.nan])
    for _ in range(20):
        assert torch.equal(stochastic_round_bf16(exact), exact.bfloat16())
        out = stochastic_round_bf16(special).float()
        assert out[0] == math.inf and out[1] == -math.inf and math.isnan(out[2])


# ---- 2. the optimizers follow PyTorch's rules ----------------------------------------------------

CASES = [
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", dict(lr=0.1, momentum=0.8, nesterov=False, weight_decay=0.0)),
    ("sgd", dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.05)),
    ("adamw", dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)),
]


def make(name: str, params, update: str, **kw):
    return (PureBf16SGD if name == "sgd" else PureBf16AdamW)(params, update=update, seed=0, **kw)


def reference(name: str, params, **kw):
    return (torch.optim.SGD if name == "sgd" else torch.optim.AdamW)(params, foreach=False, **kw)


@pytest.mark.parametrize(("name", "kw"), CASES)
@pytest.mark.parametrize("update", UPDATES)
def test_float32_parameters_update_exactly_as_pytorch(name, kw, update):
    """Norm layers keep fp32 weights: there every rule is PyTorch's own fp32 update."""
    torch.manual_seed(0)
    w0 = torch.randn(6, 5)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt_a, opt_b = make(name, [a], update, **kw), reference(name, [b], **kw)
    for _ in range(12):
        g = torch.randn(6, 5)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert "compensation" not in opt_a.state[a]


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_nearest_equals_pytorch_with_weights_and_state_rounded_to_bf16_after_every_step(name, kw):
    torch.manual_seed(1)
    w0 = torch.randn(64, 32).bfloat16()
    a = nn.Parameter(w0.clone())
    b = nn.Parameter(w0.float())  # the reference: fp32 PyTorch, rounded to bf16 by hand each step
    opt_a, opt_b = make(name, [a], "nearest", **kw), reference(name, [b], **kw)
    for _ in range(10):
        g = torch.randn(64, 32).bfloat16()
        a.grad, b.grad = g.clone(), g.float()
        opt_a.step()
        opt_b.step()
        with torch.no_grad():
            b.copy_(b.bfloat16().float())
            for k, v in opt_b.state[b].items():
                if k != "step":
                    v.copy_(v.bfloat16().float())
    assert a.dtype == torch.bfloat16 and all(
        v.dtype == torch.bfloat16 for k, v in opt_a.state[a].items() if k != "step"
    )
    same = (a.float() == b).float().mean().item()
    ulp = (b.abs() * 2.0**-7).clamp_min(1e-30)
    assert same > 0.995 and bool(((a.float() - b).abs() <= ulp).all()), same  # rarely one ulp apart (summation order)


def test_stochastic_rounding_is_reproducible_under_its_seed():
    def run(seed):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(1000).bfloat16())
        opt = PureBf16AdamW([w], lr=1e-3, update="stochastic", seed=seed)
        for _ in range(5):
            w.grad = torch.randn(1000).bfloat16()
            opt.step()
        return w.detach().clone()

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


@pytest.mark.parametrize("update", UPDATES)
def test_state_dict_round_trip_continues_bitwise(update):
    torch.manual_seed(0)
    grads = [torch.randn(300).bfloat16() for _ in range(8)]
    w = nn.Parameter(torch.randn(300).bfloat16())
    opt = PureBf16AdamW([w], lr=1e-3, update=update, seed=1)
    for g in grads[:4]:
        w.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save({"w": w.detach().clone(), "opt": opt.state_dict()}, buf)
    for g in grads[4:]:
        w.grad = g.clone()
        opt.step()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain tensors only
    w2 = nn.Parameter(saved["w"])
    opt2 = PureBf16AdamW([w2], lr=1e-3, update=update, seed=99)  # the checkpoint's generator state wins
    opt2.load_state_dict(saved["opt"])
    for g in grads[4:]:
        w2.grad = g.clone()
        opt2.step()
    assert torch.equal(w, w2)
    assert_same_tensors(opt.state_dict(), opt2.state_dict())


# ---- 3. a task where nearest loses most updates ---------------------------------------------------

def regression(update: str | None, steps: int = 600) -> tuple[float, dict]:
    """Least squares with weights near 1 and a small learning rate: most fp32 updates are below
    2^-8 of their weights. Returns the final loss (fp32 arithmetic) and the last step's stats."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen)
    target = x @ (1.0 + 0.5 * torch.rand(32, generator=gen))
    dtype = torch.float32 if update is None else torch.bfloat16
    w = nn.Parameter(torch.ones(32, dtype=dtype))
    opt = (torch.optim.SGD([w], lr=2e-3) if update is None else PureBf16SGD([w], lr=2e-3, update=update, seed=0))
    stats = {}
    for i in range(steps):
        loss = ((x @ w.float() - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if update is not None and i == steps // 2:
            opt.request_stats()
        opt.step()
        stats = getattr(opt, "last_stats", None) or stats
    with torch.no_grad():
        return float(((x @ w.float() - target) ** 2).mean()), stats


@pytest.mark.slow
def test_kahan_and_stochastic_track_fp32_where_nearest_loses_most_updates():
    start = regression(None, steps=0)[0]
    fp32 = regression(None)[0]
    results = {u: regression(u) for u in UPDATES}
    assert results["nearest"][1]["lost_nearest"] > 0.5  # most updates round away
    assert fp32 < 0.02 * start  # fp32 fits the target
    assert results["nearest"][0] > 0.9 * start  # nearest barely moves
    for u in ("kahan", "stochastic"):
        assert abs(results[u][0] - fp32) < 0.01 * start, (u, results[u][0], fp32)
    assert results["kahan"][1]["compensation_ratio"] > 0.1  # the buffer carries a real share


def test_update_rounding_stats_by_hand():
    before = [torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.bfloat16), torch.ones(3)]
    intended = [torch.tensor([-(2.0**-10), -(2.0**-7), 0.0, 2.0**-9]), torch.full((3,), 1e-9)]
    after = [torch.tensor([1.0, 1.0 - 2.0**-7, 2.0, 1.0], dtype=torch.bfloat16), torch.ones(3)]
    comp = [torch.tensor([-(2.0**-10), 0.0, 0.0, 2.0**-9], dtype=torch.bfloat16), None]
    s = update_rounding_stats(before, intended, after, comp)
    # 2^-10 lost; 2^-7 kept; 0 is no update; +2^-9 up from 1.0 is a quarter ulp (2^-7 above 1): lost
    assert s["lost_nearest"] == 2 / 3 and s["changed"] == 1 / 4 and s["bf16_elements"] == 4
    total = 2.0**-10 + 2.0**-7 + 2.0**-9
    assert s["compensation_ratio"] == pytest.approx((2.0**-10 + 2.0**-9) / total)


# ---- 4. config, memory, runs -----------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "match"), [
    (["precision=fp32", "precision.update=kahan"], "applies only to precision=bf16_pure"),
    (["precision=bf16_pure", "precision.update=round"], "choose one of nearest, stochastic, kahan"),
])
def test_bad_update_settings_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_config(overrides))


def test_bf16_pure_refuses_a_float16_dtype():
    cfg = compose_config(["precision=bf16_pure", "precision.dtype=float16"])
    with pytest.raises(ConfigError, match="bfloat16 weights"):
        Precision(cfg.precision, CPU)


def mlp_with_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20), nn.Linear(20, 3, bias=False))


def memory_after_one_step(mode: str, optimizer: str, *overrides: str) -> dict:
    cfg = compose_config([f"precision={mode}", f"optimizer={optimizer}", *overrides])
    p = Precision(cfg.precision, CPU)
    torch.manual_seed(0)
    model = p.prepare_model(mlp_with_norm())
    opt = p.build_optimizer(cfg.optimizer, p.optimizer_params())
    with p.autocast():
        loss = model(p.cast_inputs(torch.randn(4, 10))).float().sum()
    p.backward(loss)
    assert p.step(opt).applied
    return memory_per_param(list(model.parameters()), opt, p)


def test_memory_per_param_by_hand():
    n_norm, n = 40, 10 * 20 + 20 + 40 + 20 * 3  # LayerNorm keeps fp32 weights in every mode
    n_low = n - n_norm
    fp32 = memory_after_one_step("fp32", "adamw")
    assert fp32 == {
        "weights": 4.0,
        "grads": 4.0,
        "optimizer_state": 8.0,
        "master": 0.0,
        "compensation": 0.0,
        "total": 16.0,
    }
    master = memory_after_one_step("master", "adamw", "precision.loss_scale.init=1")
    low = (2 * n_low + 4 * n_norm) / n  # fp16 weights, fp32 norm
    assert master == pytest.approx({"weights": low, "grads": 4.0, "optimizer_state": 8.0, "master": 4 * n_low / n,
                                    "compensation": 0.0, "total": low + 12 + 4 * n_low / n}, abs=1e-3)
    pure = memory_after_one_step("bf16_pure", "adamw", "precision.update=kahan")
    assert pure == pytest.approx({"weights": low, "grads": low, "optimizer_state": 2 * low, "master": 0.0,
                                  "compensation": 2 * n_low / n, "total": 4 * low + 2 * n_low / n}, abs=1e-3)
    assert pure["total"] < 0.65 * master["total"]  # (a larger share of fp32 norm weights here than in real models)
    sgd = memory_after_one_step("bf16_pure", "sgd", "precision.update=stochastic")  # momentum 0.9: one buffer
    assert sgd["optimizer_state"] == pytest.approx(low, abs=1e-3) and sgd["compensation"] == 0.0


def test_bf16_pure_run_holds_bf16_weights_and_state_with_fp32_norm_layers(tmp_path):
    summary, run_dir = train(tmp_path, ["precision=bf16_pure", "precision.update=kahan", "model.width=4",
                                        "trainer.max_steps=3", "optimizer=adamw"])
    assert summary["status"] == "completed" and summary["precision"] == "bf16_pure"
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    dtypes = {k: v.dtype for k, v in ckpt["model"].items() if v.is_floating_point()}
    cnn = SmallCNN(width=4)  # which entries belong to BatchNorm layers, from the model itself
    norm = {f"{m}.{k}" for m, mod in cnn.named_modules() if isinstance(mod, nn.BatchNorm2d)
            for k, v in mod.state_dict().items() if v.is_floating_point()}
    assert norm and set(dtypes) == {k for k, v in cnn.state_dict().items() if v.is_floating_point()}
    assert {k for k, d in dtypes.items() if d == torch.float32} == norm
    assert {d for k, d in dtypes.items() if k not in norm} == {torch.bfloat16}
    state = ckpt["optimizer"]["state"]
    assert ckpt["optimizer"]["rng_state"].dtype == torch.uint8
    assert any(s["compensation"].dtype == torch.bfloat16 for s in state.values() if "compensation" in s)
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.bfloat16, torch.float32}
    # the summary reports memory per parameter, counted here from the checkpoint itself
    n = sum(v.numel() for k, v in ckpt["model"].items() if "running" not in k and "num_batches" not in k)
    weights = sum(v.numel() * v.element_size() for k, v in ckpt["model"].items()
                  if "running" not in k and "num_batches" not in k)
    comp = sum(
        s["compensation"].numel() * s["compensation"].element_size() for s in state.values() if "compensation" in s
    )
    mem = summary["memory_per_param"]
    assert mem["weights"] == pytest.approx(weights / n, abs=1e-3) and mem["compensation"] == pytest.approx(
        comp / n, abs=1e-3
    )
    # sampled diagnostics rows carry what rounding did to the update; the summary its mean
    rows = [r for r in read_jsonl(run_dir / "diagnostics.jsonl") if r.get("event") == "sample"]
    assert rows and all(0 <= r["bf16_update"]["lost_nearest"] <= 1 for r in rows)
    assert summary["diag/bf16_lost_nearest"] == pytest.approx(
        sum(r["bf16_update"]["lost_nearest"] for r in rows) / len(rows)
    )
    # mptrain-report draws them: the series it plots are the rows' own figures
    from mptrain.tools.report import bf16_update_series, make_report

    steps, lost, carried = bf16_update_series(rows)
    assert steps == [r["step"] for r in rows] and lost == [r["bf16_update"]["lost_nearest"] for r in rows]
    assert carried == [r["bf16_update"]["compensation_ratio"] for r in rows]
    paths = make_report(run_dir)
    assert run_dir / "report" / "bf16_update.png" in paths
    assert (run_dir / "report" / "bf16_update.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("update", "optimizer"), [("stochastic", "adamw"), ("kahan", "sgd")])
def test_stop_and_resume_is_bit_identical(tmp_path, monkeypatch, update, optimizer):
    n = 4
    overrides = ["precision=bf16_pure", f"precision.update={update}", f"optimizer={optimizer}", "model=mlp",
                 "model.width=8", "trainer.batch_size=32", f"trainer.max_steps={2 * n}", "trainer.log_every=1"]
    train(tmp_path / "ref", overrides)
    stop_at(monkeypatch, n)
    with pytest.raises(Exception) as stopped:
        train(tmp_path / "cut", overrides)
    assert getattr(stopped.value, "exit_code", None) == 128 + signal.SIGTERM
    monkeypatch.undo()
    summary, _ = train(tmp_path / "cut", [*overrides, "resume=auto"])
    assert summary["steps"] == 2 * n
    assert_same_tensors(final_state(tmp_path / "ref" / "run"), final_state(tmp_path / "cut" / "run"))


@pytest.mark.parametrize(
    "arm", ["fp32", "master", "nomaster", "bf16_pure_nearest", "bf16_pure_stochastic", "bf16_pure_kahan"]
)
def test_master_weights_ablation_arms(arm):
    cfg = compose_config(["experiment=master_weights_ablation", f"+arm={arm}"])
    validate(cfg)
    mode, _, update = arm.partition("_pure_")
    assert cfg.precision.mode == (f"{mode}_pure" if update else mode)
    assert cfg.precision["update"] == (update or "nearest")  # (attribute access would find DictConfig.update)


@pytest.mark.slow
def test_digits_ablation_kahan_and_stochastic_match_fp32_nearest_does_not(tmp_path):
    """The MLP with plain SGD at a small learning rate: most updates are below 2^-8 of their weights."""
    common = ["model=mlp", "scheduler=none", "trainer.max_steps=100", "optimizer.lr=0.01", "optimizer.momentum=0",
              "optimizer.nesterov=false", "optimizer.weight_decay=0", "checkpoint.enabled=false"]
    acc = {}
    for arm in ["fp32", "nearest", "stochastic", "kahan"]:
        mode = ["precision=fp32"] if arm == "fp32" else ["precision=bf16_pure", f"precision.update={arm}"]
        acc[arm] = train(tmp_path / arm, mode + common)[0]["val/acc"]
    assert acc["fp32"] - acc["nearest"] > 0.08, acc
    for arm in ("stochastic", "kahan"):
        assert abs(acc[arm] - acc["fp32"]) < 0.03, acc
    assert np.isfinite(list(acc.values())).all()


def test_memory_per_param_counts_every_optimizer_of_a_gan():
    from mptrain.library.optim import MultiOptimizer

    a, b = nn.Linear(4, 4).bfloat16(), nn.Linear(4, 2, bias=False)  # 20 bf16 + 8 fp32 parameters
    opt = MultiOptimizer({"d": PureBf16SGD(a.parameters(), lr=0.1, momentum=0.9, update="kahan"),
                          "g": PureBf16SGD(b.parameters(), lr=0.1, momentum=0.9, update="kahan")})
    for q in [*a.parameters(), *b.parameters()]:
        q.grad = torch.ones_like(q)
    for o in opt.optimizers.values():
        o.step()
    mem = memory_per_param([*a.parameters(), *b.parameters()], opt)
    per = (20 * 2 + 8 * 4) / 28
    assert mem == pytest.approx({"weights": per, "grads": per, "optimizer_state": per, "master": 0.0,
                                 "compensation": 20 * 2 / 28, "total": 3 * per + 40 / 28}, abs=1e-3)


# ---- 5. the grouped (foreach, chunked) update is the per-parameter rule ------------------------------

def grouped_run(name: str, update: str, chunk_numel: int | None, alone: bool = False, compile: bool = False):
    """Six tensors (one fp32) in two param groups, some without a gradient on some steps; `alone`: one
    optimizer per parameter (the per-parameter rule, no grouping at all)."""
    torch.manual_seed(0)
    shapes = [(33, 7), (5,), (8, 3, 3, 3), (1000,), (17,), (4, 4)]
    ps = [nn.Parameter(torch.randn(s) if i == 1 else torch.randn(s).bfloat16()) for i, s in enumerate(shapes)]
    kw = (
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
        if name == "sgd"
        else dict(lr=0.01, weight_decay=0.1)
    )
    cls = PureBf16SGD if name == "sgd" else PureBf16AdamW
    if alone:
        opts = [cls([{"params": [p], "lr": kw["lr"] * (0.5 if i >= 3 else 1)}], update=update, seed=0, **kw)
                for i, p in enumerate(ps)]
    else:
        opts = [cls([{"params": ps[:3]}, {"params": ps[3:], "lr": kw["lr"] * 0.5}], update=update, seed=0,
                    compile=compile, **kw)]
    for o in opts:
        o.chunk_numel = chunk_numel
    for step in range(6):
        for i, p in enumerate(ps):  # late starters get their own step count / fresh momentum buffer
            p.grad = None if (step < 2 and i in (0, 4)) or (step == 4 and i == 3) else torch.randn_like(p) * 0.01
        for o in opts:
            o.step()
    return ps, opts


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("update", ["nearest", "kahan"])
def test_grouped_update_equals_one_optimizer_per_parameter_bitwise(name, update):
    ps, (opt,) = grouped_run(name, update, chunk_numel=300)  # chunks of one or two tensors
    ref, ref_opts = grouped_run(name, update, chunk_numel=None, alone=True)
    for p, q, o in zip(ps, ref, ref_opts):
        assert torch.equal(p, q) and p.dtype == q.dtype
        assert opt.state[p].keys() == o.state[q].keys()
        for k, v in opt.state[p].items():
            assert torch.equal(v, o.state[q][k]), k


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_stochastic_noise_is_drawn_per_bf16_tensor_in_parameter_order(name):
    a, (opt_a,) = grouped_run(name, "stochastic", chunk_numel=300)
    b, (opt_b,) = grouped_run(name, "stochastic", chunk_numel=None)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # the chunking does not change the stream
    # the generator has drawn 16-bit noise for each bf16 tensor with a gradient, step by step, nothing else
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        for i, p in enumerate(a):
            if p.dtype == torch.bfloat16 and not ((step < 2 and i in (0, 4)) or (step == 4 and i == 3)):
                torch.randint(0, 1 << 16, p.shape, dtype=torch.int32, generator=gen)
    assert torch.equal(opt_a.generator.get_state(), gen.get_state())


# ---- 6. compile=True: one compiled function per tensor (bf16_fused.py) -------------------------------

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("g++") is None,
                                    reason="torch.compile on CPU needs a C++ compiler")


@pytest.mark.slow
@needs_compiler
def test_compiled_kahan_accumulates_2_pow_minus_10_exactly():
    """The compiler must not drop the bf16 rounding that the compensation measures."""
    w = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = PureBf16SGD([w], lr=1.0, update="kahan", seed=0, compile=True)
    for k in range(1, 9):
        sgd_step(w, opt, 2.0**-10)
        if k == 1:
            assert w[0].item() == 1.0 and opt.state[w]["compensation"][0].item() == -(2.0**-10)
        if k % 4 == 0:
            assert bool((w == 1.0 - k * 2.0**-10).all()) and bool((opt.state[w]["compensation"] == 0).all())


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_compiled_update_matches_the_eager_one(name):
    for update in UPDATES:
        a, (opt_a,) = grouped_run(name, update, chunk_numel=None)
        b, (opt_b,) = grouped_run(name, update, chunk_numel=None, compile=True)
        assert torch.equal(opt_a.generator.get_state(), opt_b.generator.get_state())  # the same noise
        # (x, y, scale): a contracted multiply-add may move a bf16 value by one ulp of its scale, rarely; the
        # compensation holds what the weight's rounding dropped, so it moves by up to one ulp of the weight
        triples = [(p, q, p) for p, q in zip(a, b)] + [
            (v, opt_b.state[q][k], p if k == "compensation" else v)
            for p, q in zip(a, b) for k, v in opt_a.state[p].items() if k != "step"]
        for x, y, scale in triples:
            ulp = (scale.float().abs() * 2.0**-7).clamp_min(2.0**-126)
            assert bool(((x.float() - y.float()).abs() <= ulp).all()), (update, x.shape)
            assert (x == y).float().mean() > 0.99, update


def test_compile_update_is_refused_outside_bf16_pure():
    with pytest.raises(ConfigError, match="compile_update.*applies only to precision=bf16_pure"):
        validate(compose_config(["precision=amp", "precision.compile_update=true"]))


@pytest.mark.slow
@needs_compiler
def test_compile_update_run_matches_the_eager_run(tmp_path):
    common = ["precision=bf16_pure", "precision.update=kahan", "optimizer=adamw", "model=mlp", "model.width=8",
              "trainer.batch_size=32", "trainer.max_steps=4"]
    eager, _ = train(tmp_path / "eager", common)
    compiled, _ = train(tmp_path / "compiled", [*common, "precision.compile_update=true"])
    assert compiled["status"] == "completed"
    a, b = final_state(tmp_path / "eager" / "run"), final_state(tmp_path / "compiled" / "run")
    for k, v in a["model"].items():
        if v.is_floating_point():
            assert v.dtype == b["model"][k].dtype
            ulp = (v.float().abs() * 2.0**-7).clamp_min(2.0**-126)
            assert bool(((v.float() - b["model"][k].float()).abs() <= ulp).all()), k
