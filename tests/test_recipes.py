"""Training recipes as format fields (issue 38): 2D weight scaling, the random Hadamard transform on the
weight-gradient GEMM, stochastic rounding of gradients; nvfp4_recipe. Each checked against an independent
reference: scipy's Hadamard matrices, a hand-worked 32x32 weight, the E2M1 grid written out, a plain PyTorch
three-GEMM reference built from `quantize` and matmuls."""

from __future__ import annotations

import math
import re

import pytest
import scipy.linalg
import torch
from torch import nn

from mptrain.errors import ConfigError
from mptrain.precision.convert import Applier, EmulatedLinear
from mptrain.precision.formats import BUILTINS, E2M1, Registry
from mptrain.precision.gemms import RecipeLinear, RecipeRandom, random_hadamard, rotate_tokens, sylvester
from mptrain.precision.plan import Rule, resolve

from .conftest import read_jsonl, train
from .test_checkpoint import assert_same_tensors, final_state, stop_at

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the non-negative E2M1 values (OCP MX v1.0)
RECIPE = BUILTINS.get("nvfp4_recipe")
TWIN = ("precision.formats.my4={element: e2m1, scaling: block, block: 16, scale_element: e4m3, tensor_scale: true, "
        "weight_scaling: 2d, wgrad_hadamard: 16, grad_rounding: stochastic}")
MLP = ["model=mlp", "model.width=32", "model.depth=2", "trainer.batch_size=32", "trainer.log_every=1",
       "diagnostics=off", "precision=bf16"]


def neighbours(x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid points (E2M1 times `scale`) just below and just above |x|, signed as x."""
    a = (x.abs() / scale).unsqueeze(-1)
    lo = torch.where(GRID <= a, GRID, torch.zeros(())).amax(-1)
    hi = torch.where(GRID >= a, GRID, torch.full((), math.inf)).amin(-1)
    return torch.copysign(lo * scale, x), torch.copysign(hi * scale, x)


# ---- the Hadamard transform -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4, 16, 64])
def test_sylvester_is_scipys_hadamard_and_the_random_one_is_orthonormal(n):
    h = torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float32)
    assert torch.equal(sylvester(n), h)
    assert torch.equal(h @ h.t(), n * torch.eye(n))  # H H^T = n I
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(n)).float() * 2 - 1
    m = random_hadamard(signs)
    assert torch.equal(m, h * signs / math.sqrt(n)) if n in (4, 16, 64) else torch.allclose(m, h * signs / n**0.5)
    assert torch.allclose(m.t() @ m, torch.eye(n), atol=1e-6)


def test_the_rotation_leaves_the_weight_gradient_exact_before_quantization():
    """dW = (H dy)^T (H x) over tiles of 16 tokens, 40 tokens padded to 48 with zeros: dy^T x again."""
    dy, x = torch.randn(40, 24, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    m = random_hadamard(RecipeRandom(seed=3).signs(16)).double()
    assert torch.allclose(rotate_tokens(dy, m).t() @ rotate_tokens(x, m), dy.t() @ x, atol=1e-12)


def test_the_sign_vector_is_seeded_shared_by_ranks_and_resumed():
    a, b, c = RecipeRandom(seed=5, rank=0), RecipeRandom(seed=5, rank=1), RecipeRandom(seed=6, rank=0)
    assert torch.equal(a.signs(16), b.signs(16)) and not torch.equal(a.signs(16), c.signs(16))
    assert set(a.signs(16).tolist()) == {-1.0, 1.0}
    d = RecipeRandom(seed=0)
    d.load_state_dict(a.state_dict())
    assert torch.equal(d.signs(16), a.signs(16))


# ---- stochastic rounding ---------------------------------------------------------------------------------------

def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    """Each draw is one of the two E2M1 grid points around x. The mean of K draws is unbiased: with p the
    fraction of the step [lo, hi] that |x| lies above lo, a draw is hi with probability p (to within the noise's
    resolution 2^-24), so the mean's standard deviation is (hi - lo) sqrt(p (1 - p) / K); 6 of those (plus the
    2^-24 resolution) bound it. A value on the grid comes back exactly, every time."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.empty(500).uniform_(-6, 6, generator=g), GRID, -GRID[1:]])
    lo, hi = neighbours(x)
    K = 4000
    draws = torch.stack([E2M1.quantize(x, torch.rand(x.shape, generator=g)) for _ in range(K)])
    assert ((draws == lo) | (draws == hi)).all()
    step = (hi - lo).abs()
    p = torch.where(step > 0, (x - lo).abs() / step.clamp(min=1e-30), torch.zeros(()))
    bound = 6 * step * torch.sqrt(p * (1 - p) / K) + step * 2.0**-24
    assert ((draws.double().mean(0) - x.double()).abs() <= bound.double()).all()
    assert torch.equal(draws[:, 500:], x[500:].expand(K, -1))  # on the grid: exact
    # round to nearest would be biased here: 2.4 always goes to 2
    assert E2M1.quantize(torch.tensor([2.4])).item() == 2.0 and 2.3 < draws[:, (x - 2.4).abs().argmin()].mean() < 2.5


def test_nvfp4_stochastic_rounds_within_the_blocks_own_grid():
    """A 4 x 16 tensor whose amax is 6 * 448 (so the fp32 tensor scale is 1) and whose block amaxes are 6 * 2^k:
    block scales 2^k (exact in e4m3), so each block's grid is E2M1 * 2^k, worked here by hand."""
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([448.0, 1.0, 0.25, 8.0])
    x = torch.empty(4, 16).uniform_(-1, 1, generator=g) * 6 * scales[:, None]
    x[:, 0] = 6 * scales  # each block's amax
    fmt = BUILTINS.get("nvfp4")
    lo, hi = neighbours(x, scales[:, None])
    K = 2000
    draws = torch.stack([fmt.quantize_stochastic(x, g) for _ in range(K)])
    assert ((draws == lo) | (draws == hi)).all()
    step = (hi - lo).abs()
    p = torch.where(step > 0, (x - lo).abs() / step.clamp(min=1e-30), torch.zeros(()))
    assert ((draws.double().mean(0) - x.double()).abs() <= 6 * step * torch.sqrt(p * (1 - p) / K) + step * 1e-6).all()
    # the scales are round-to-nearest's: the nearest grid point of the same grid
    nearest = torch.where((x - lo).abs() <= (hi - x).abs(), lo, hi)
    exact_ties = ((x - lo).abs() == (hi - x).abs())
    assert torch.equal(fmt.quantize(x)[~exact_ties], nearest[~exact_ties])


# ---- 2D weight scaling -----------------------------------------------------------------------------------------

def test_2d_scaling_hand_worked_on_a_32x32_weight():
    """Four 16 x 16 tiles with amax 2688 (= 448 * 6: the fp32 tensor scale is 1), 6, 12 and 0.75: tile scales 448,
    1, 2 and 0.125 (all exact in e4m3). Values on each tile's grid come back unchanged; off-grid ones go to the
    nearest grid point, worked by hand. 1D scaling (1 x 16 along rows) gives a row its own scale instead."""
    w = torch.zeros(32, 32)
    tiles = {(0, 0): 448.0, (0, 1): 1.0, (1, 0): 2.0, (1, 1): 0.125}
    for (i, j), s in tiles.items():
        t = w[16 * i:16 * i + 16, 16 * j:16 * j + 16]
        t.copy_(GRID.repeat(32)[:256].reshape(16, 16) * s)  # on the grid
        t[0, 0] = 6 * s  # the tile's amax
    w[17, 16:32] = 0.0  # a row of tile (1, 1) that 1D scaling would scale on its own
    w[17, 20] = 0.3 * 0.125  # -> 0.5 * 0.125 in the tile (midpoint 0.25 * 0.125)
    w[3, 5] = 2.4 * 448  # -> 2 * 448
    w[20, 2] = -5.1 * 2  # -> -6 * 2 (the midpoint of 4 and 6 is 5)
    w[30, 31] = 1.3 * 0.125  # -> 1.5 * 0.125 (midpoint 1.25)
    expected = w.clone()
    expected[17, 20], expected[3, 5], expected[20, 2], expected[30, 31] = 0.5 * 0.125, 2 * 448, -12.0, 1.5 * 0.125
    assert torch.equal(RECIPE.quantize_tiles(w), expected)
    # 1D: row 17's block (cols 16..31) holds 0.0375 alone, so it gets a scale of its own and keeps more of it
    one_d = BUILTINS.get("nvfp4").quantize(w)
    assert one_d[17, 20] != expected[17, 20] and abs(one_d[17, 20] - 0.0375) < abs(expected[17, 20] - 0.0375)


def test_2d_tiles_pad_a_ragged_weight():
    w = torch.randn(20, 40)
    padded = torch.zeros(32, 48)
    padded[:20, :40] = w
    assert torch.equal(RECIPE.quantize_tiles(w), RECIPE.quantize_tiles(padded)[:20, :40])


# ---- the three GEMMs ---------------------------------------------------------------------------------------------

def _inputs(tokens: int, fin: int, fout: int, seed: int):
    """Small integers times powers of two: every sum of the Hadamard rotation is exact in float32, whatever the
    order of the additions, so the reference and the module quantize the very same numbers."""
    g = torch.Generator().manual_seed(seed)
    ints = lambda *s: torch.randint(-8, 9, s, generator=g).float()  # noqa: E731
    return ints(2, tokens // 2, fin) / 8, ints(fout, fin) / 16, ints(fout) / 4, ints(2, tokens // 2, fout) / 32


@pytest.mark.parametrize("weight_scaling", ["2d", "1d"])
def test_three_gemm_gradients_equal_a_plain_pytorch_reference(weight_scaling):
    from dataclasses import replace

    fmt = replace(RECIPE, weight_scaling=weight_scaling)
    x, w, b, dy = _inputs(40, 48, 24, 7)  # 40 tokens: the rotation pads to 48
    random = RecipeRandom(seed=11)
    random.begin_step(3)
    g = torch.Generator().manual_seed(0)
    g.set_state(random.generator.get_state())  # the reference draws the same noise, in the same order
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    y = RecipeLinear.apply(xl, wl, bl, fmt, random)
    y.backward(dy)

    # the reference: quantize, matmul; stated with scipy's Hadamard and a block-diagonal matrix over the tokens
    q = fmt.quantize
    wq = fmt.quantize_tiles(w) if weight_scaling == "2d" else q(w)
    assert torch.equal(y, q(x) @ wq.t() + b)
    dy2, x2 = dy.reshape(40, 24), x.reshape(40, 48)
    w_dgrad = wq if weight_scaling == "2d" else q(w.t()).t()  # 1d: blocks along out_features for dx = dy W
    dx = fmt.quantize_stochastic(dy2, g) @ w_dgrad
    signs = random.signs(16)
    h = torch.block_diag(*[torch.tensor(scipy.linalg.hadamard(16), dtype=torch.float32) * signs / 4] * 3)
    pad = lambda t: torch.cat([t, torch.zeros(8, t.shape[1])])  # noqa: E731
    dw = fmt.quantize_stochastic((h @ pad(dy2)).t(), g) @ q((h @ pad(x2)).t()).t()
    assert torch.allclose(xl.grad, dx.reshape(x.shape), rtol=1e-6, atol=1e-7)
    assert torch.allclose(wl.grad, dw, rtol=1e-6, atol=1e-7)
    assert torch.equal(bl.grad, dy2.sum(0))  # the bias gradient from the unquantized dy
    assert not torch.allclose(wl.grad, dy2.t() @ x2, rtol=1e-2)  # quantized: not the exact one


def test_the_recipe_leaves_the_global_random_streams_alone():
    lin = _emulated_linear(RECIPE)
    before = torch.get_rng_state()
    lin(torch.randn(4, 48, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert torch.equal(torch.get_rng_state(), before)


def test_stochastic_rounding_streams_differ_by_rank_and_step_and_repeat_by_step():
    def noise(rank, step):
        r = RecipeRandom(seed=1, rank=rank)
        r.begin_step(step)
        return torch.rand(8, generator=r.generator)

    assert torch.equal(noise(0, 5), noise(0, 5))
    assert not torch.equal(noise(0, 5), noise(1, 5)) and not torch.equal(noise(0, 5), noise(0, 6))


def _emulated_linear(fmt, fin=48, fout=24) -> nn.Module:
    model = nn.Sequential(nn.Linear(fin, fout))
    plan = resolve(model, {"0": ("bf16", "autocast", "preset")}, [Rule("0", fmt.name, "test")], autocast="bf16")
    Applier(BUILTINS, torch.device("cpu"), "bf16").apply(model, plan)
    assert isinstance(model[0], EmulatedLinear)
    return model


def test_a_recipe_format_is_planned_for_linear_layers_only():
    assert BUILTINS.fits(RECIPE, nn.Linear(4, 4)) is None
    assert "Linear layers only" in BUILTINS.fits(RECIPE, nn.Conv2d(3, 4, 3))
    assert BUILTINS.fits("nvfp4", nn.Conv2d(3, 4, 3)) is None  # the plain format still covers Conv2d
    assert "weights 16x16, wgrad RHT-16, stochastic gradients" in BUILTINS.scaling(RECIPE)
    assert not BUILTINS.get("nvfp4").three_gemms and RECIPE.three_gemms


# ---- config-defined recipes -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "message"), [
    ("wgrad_hadamard: 12", "wgrad_hadamard must be 0 (off) or a power of two"),
    ("weight_scaling: 3d", "weight_scaling must be one of"),
    ("grad_rounding: up", "grad_rounding must be one of"),
])
def test_a_bad_recipe_field_is_one_line(extra, message):
    spec = {"element": "e2m1", "scaling": "block", "block": 16, "scale_element": "e4m3"}
    key, value = extra.split(": ")
    spec[key] = int(value) if value.isdigit() else value
    with pytest.raises(ConfigError, match=re.escape(f"precision.formats.x: {message}")) as e:
        Registry.from_config({"x": spec})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="weight_scaling=2d tiles the weight"):
        Registry.from_config({"x": {"element": "e4m3", "scaling": "tensor", "weight_scaling": "2d"}})


@pytest.mark.slow
def test_the_config_twin_of_nvfp4_recipe_trains_bit_identically(tmp_path):
    runs = {}
    for name, extra in (
        ("builtin", ["precision.layers={*: nvfp4_recipe}"]),
        ("twin", [TWIN, "precision.layers={*: my4}"]),
    ):
        summary, run = train(tmp_path / name, [*MLP, "trainer.max_steps=4", *extra])
        assert summary["status"] == "completed"
        runs[name] = run
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("samples_per_s", "wall_s", "time")} for r in rows]  # noqa: E731
    assert strip(read_jsonl(runs["builtin"] / "metrics.jsonl")) == strip(read_jsonl(runs["twin"] / "metrics.jsonl"))
    a, b = final_state(runs["builtin"]), final_state(runs["twin"])
    assert_same_tensors(a["model"], b["model"])
    assert a["precision"]["recipe_random"]["signs"] == b["precision"]["recipe_random"]["signs"]
    twin = Registry.from_config({"my4": {"element": "e2m1", "scaling": "block", "block": 16, "scale_element": "e4m3",
                                         "tensor_scale": True, "weight_scaling": "2d", "wgrad_hadamard": 16,
                                         "grad_rounding": "stochastic"}})
    assert twin.user["my4"]["wgrad_hadamard"] == 16  # the definition a resume checks holds the recipe


@pytest.mark.slow
def test_resume_is_bitwise_with_stochastic_rounding(tmp_path, monkeypatch):
    from mptrain.checkpoint.signals import Interrupted

    overrides = [*MLP, "precision.layers={*: nvfp4_recipe}", "trainer.max_steps=6"]
    _, ref = train(tmp_path / "ref", overrides)
    stop_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        train(tmp_path / "cut", overrides)
    monkeypatch.undo()
    summary, cut = train(tmp_path / "cut", [*overrides, "resume=auto"])
    assert summary["status"] == "completed"
    assert_same_tensors(final_state(ref), final_state(cut))
    assert read_jsonl(ref / "metrics.jsonl") == read_jsonl(cut / "metrics.jsonl")
    assert final_state(ref)["precision"]["recipe_random"]["seed"] == 0  # trainer.seed's default


# ---- the shadow measurement and the advisor --------------------------------------------------------------------

def test_the_shadow_measures_a_recipe_forward_output_gradient_and_weight_gradient():
    """On a Linear: err from the 2D-tiled weight, gerr from the stochastically rounded output gradient, wgerr
    from the recipe's weight-gradient GEMM (checked against the reference built from scipy's Hadamard matrix and
    the same noise); plain nvfp4 leaves wgerr unmeasured."""
    from mptrain.diagnostics.shadow import FIELDS, Shadow, rel_err

    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    x, g = torch.randn(2, 16, 48), torch.randn(2, 16, 24)
    shadow = Shadow(["nvfp4_recipe", "nvfp4"])
    with torch.no_grad():
        y = lin(x)
    shadow.forward(lin, "lin", (x,), {}, y)
    ref = RecipeRandom()  # the shadow's own streams: seed 0, rank 0, as they start
    shadow.grad("lin", lin, g)
    rows = {f: dict(zip(FIELDS, v)) for f, v in shadow.end()["lin"].items()}
    w, b = lin.weight.detach(), lin.bias.detach()
    assert rows["nvfp4_recipe"]["err"] == pytest.approx(
        rel_err(y, RECIPE.quantize(x) @ RECIPE.quantize_tiles(w).t() + b).item(), rel=1e-5)
    g2, x2 = g.reshape(32, 24), x.reshape(32, 48)
    assert rows["nvfp4_recipe"]["gerr"] == pytest.approx(
        rel_err(g2, RECIPE.quantize_stochastic(g2, ref.generator)).item(), rel=1e-5
    )
    h = torch.block_diag(*[torch.tensor(scipy.linalg.hadamard(16), dtype=torch.float32) * ref.signs(16) / 4] * 2)
    dw = RECIPE.quantize_stochastic((h @ g2).t(), ref.generator) @ RECIPE.quantize((h @ x2).t()).t()
    assert rows["nvfp4_recipe"]["wgerr"] == pytest.approx(rel_err(g2.t() @ x2, dw).item(), rel=1e-4)
    assert 0.05 < rows["nvfp4_recipe"]["wgerr"] < 1
    assert rows["nvfp4"]["wgerr"] is None and rows["nvfp4"]["gerr"] > 0


def test_the_advisor_proposes_the_recipe_for_some_layers_and_bf16_for_others():
    """fits: forward, gradient and weight-gradient errors within ERR_MAX; a layer whose recipe wgerr is over it
    stays in bf16, the others take nvfp4_recipe (fewer bits), and the plan's overrides say so."""
    from mptrain.tools.advise import fits, layer_plan, plan_override

    def fig(err, wgerr=None):
        f = {"err": err, "flush": 0.0, "sat": 0.0, "gerr": err, "gflush": 0.0, "gsat": 0.0, "wgerr": wgerr}
        return {**f, "fits": fits(f)}

    per_layer = {"blocks.0.fc": {"bf16": fig(0.004), "nvfp4_recipe": fig(0.08, 0.09)},
                 "blocks.1.fc": {"bf16": fig(0.004), "nvfp4_recipe": fig(0.08, 0.3)},
                 "head": {"bf16": fig(0.004), "nvfp4_recipe": fig(0.2, 0.05)}}
    plan = layer_plan(per_layer, fp16_viable=True, base="bf16")
    assert plan == {"blocks.0.fc": "nvfp4_recipe", "blocks.1.fc": "bf16", "head": "bf16"}
    assert plan_override(["precision=bf16"], plan) == ["precision=bf16", "precision.layers={blocks.0.fc: nvfp4_recipe}"]


@pytest.mark.slow
def test_a_probe_with_the_recipe_in_the_shadow_feeds_the_advisor(tmp_path):
    from mptrain.tools.advise import advise_run

    _, run = train(tmp_path, [*MLP, "trainer.max_steps=3", "diagnostics=default", "diagnostics.every=1",
                              "diagnostics.shadow=[bf16,nvfp4_recipe]"])
    rows = [r for r in read_jsonl(run / "diagnostics.jsonl") if "shadow" in r]
    assert rows and all(isinstance(v["nvfp4_recipe"][6], float) for r in rows for v in r["shadow"].values())
    advice, lines = advise_run(run, None, None)
    assert all("wgerr" in per["nvfp4_recipe"] for per in advice["per_layer"].values())
    assert any("wgrad" in line for line in lines)


@pytest.mark.slow
def test_precision_auto_plans_the_recipe_and_checkpoints_its_streams(tmp_path):
    """A recipe chosen by precision=auto after its probe (a replan in the running process) is converted with the
    run's random streams, which then go into the checkpoint."""
    summary, run = train(tmp_path, [*MLP[:-1], "precision=auto", "trainer.max_steps=4", "precision.auto.probe_steps=2",
                                    "precision.auto.formats=[nvfp4_recipe,bf16]", "precision.auto.tolerance=0.5",
                                    "precision.auto.objective=bits"])
    assert set(summary["auto_plan"].values()) == {"nvfp4_recipe"}
    assert final_state(run)["precision"]["recipe_random"]["seed"] == 0
