"""precision=fp8 through torchao, emulated on CPU: the layer filter, the cast statistics, training parity
with bf16, plain checkpoints, exact resume, and the one-line error when torchao is missing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mptrain.config import Fp8Config
from mptrain.errors import ConfigError, HardwareError
from mptrain.precision import fp8

from .conftest import REPO, compose_config, read_jsonl, train

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao not installed (pip install mptrain[fp8])")

# A GPT small enough for emulated fp8 on a shared CPU: every Linear's dimensions are multiples of 16.
GPT = ["model=gpt", "dataset=synthetic_tokens", "model.dim=32", "model.layers=2", "model.heads=2", "model.dropout=0.0",
       "dataset.seq_len=16", "dataset.train_tokens=20000", "dataset.val_tokens=1000", "trainer.batch_size=16"]
MLP = ["model=mlp", "dataset=digits", "trainer.batch_size=32", "optimizer.lr=0.05"]


def fp8_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(Fp8Config), kw)


def convert(model: nn.Module, **settings):
    """precision=fp8 (with precision.fp8 `settings`) converting `model` as a run does: the registry's plan applied
    by the Applier. Returns the precision object (fp8_layers, fp8_emulated, its plan)."""
    from mptrain.precision import Precision

    cfg = compose_config(["precision=fp8"]).precision
    cfg.fp8 = OmegaConf.merge(cfg.fp8, settings)
    p = Precision(cfg, torch.device("cpu"))
    p.prepare_model(model)
    return p


def ladder() -> nn.Sequential:
    """Linear layers with known dimensions: 0 first, 5 last, 2 and 3 not multiples of 16."""
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 48), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 64),
                         nn.Linear(64, 32), nn.Linear(32, 10))


# ---- which layers convert ---------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "expected"), [
    ({}, ["1", "5"]),  # 0 first, 6 last, 2 (48x40) and 4 (40x64) not multiples of 16
    ({"skip_first": False}, ["0", "1", "5"]),
    ({"skip_last": False, "dim_multiple": 8}, ["1", "2", "4", "5"]),  # 6 is 32x10
    ({"exclude": ["5"]}, ["1"]),
    ({"include": ["[01]"], "skip_first": False}, ["0", "1"]),
])
def test_plan_follows_the_filter(settings, expected):
    decisions = fp8.plan(ladder(), fp8_cfg(**settings))
    assert list(decisions) == ["0", "1", "2", "4", "5", "6"]
    assert [n for n, why in decisions.items() if why is None] == expected


def test_plan_reasons_name_the_setting():
    decisions = fp8.plan(ladder(), fp8_cfg(exclude=["1"]))
    assert decisions["0"].startswith("first Linear") and decisions["6"].startswith("last Linear")
    assert decisions["2"] == "48x40 not multiples of 16" and "exclude" in decisions["1"]


@needs_torchao
def test_convert_swaps_exactly_the_planned_layers_and_keeps_the_parameters():
    model = ladder()
    params = {n: p for n, p in model.named_parameters()}
    p = convert(model)
    assert (p.fp8_layers, p.fp8_emulated) == (["1", "5"], True)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {
        "0": "Linear",
        "1": "Float8Linear",
        "2": "Linear",
        "4": "Linear",
        "5": "Float8Linear",
        "6": "Linear",
    }
    assert all(p is params[k] for k, p in model.named_parameters())  # same tensors: an optimizer sees no change
    assert p.applier.apply(model, p.plan) == []  # again (FSDP): nothing more converts


@needs_torchao
def test_float8_linear_computes_through_e4m3():
    """The converted layer's output is the matmul of e4m3-rounded, per-tensor-scaled operands."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32, bias=False), nn.Linear(32, 32))
    convert(model)
    x = torch.randn(8, 32)
    w = model[1].weight.detach()

    def q(t):  # independent: scale = 448 / amax, round to e4m3, scale back
        s = 448.0 / t.abs().max()
        return (t * s).to(torch.float8_e4m3fn).float() / s

    expected = q(x) @ q(w).t()
    assert torch.allclose(model[1](x), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(model[1](x), x @ w.t(), rtol=1e-4, atol=1e-4)  # and fp8 is not fp32


# ---- cast statistics ----------------------------------------------------------------------------------

def test_cast_stats_hand_worked():
    x = torch.tensor([896.0, 1.0, 2.0**-20, 0.0])
    amax, smin, smax, n, under, sub, over, under_u, over_u = fp8.cast_stats(x, torch.float8_e4m3fn).tolist()
    # scale = 448 / 896 = 0.5: 448 (max), 0.5 (normal), 2^-21 (below e4m3's 2^-10 rounding limit: 0), 0
    assert (amax, smin, smax, n) == (896.0, 0.5, 0.5, 4.0)
    assert (under, sub, over) == (1.0, 0.0, 0.0)
    assert (under_u, over_u) == (1.0, 1.0)  # unscaled: 2^-20 flushes, 896 > 448 overflows
    # overflow means rounding past the max (448 + half its ulp of 32), not a last-bit excess
    assert fp8.cast_stats(torch.tensor([460.0, 470.0]), torch.float8_e4m3fn).tolist()[8] == 1.0
    assert fp8.cast_stats(torch.tensor([61439.0, 61440.0]), torch.float8_e5m2).tolist()[8] == 1.0
    # e5m2: max 57344, smallest subnormal 2^-16; scale 64: 2^-14 is e5m2's smallest normal
    y = torch.tensor([896.0, 2.0**-20, 2.0**-21, 2.0**-30])
    amax, s, _, _, under, sub, over, under_u, _ = fp8.cast_stats(y, torch.float8_e5m2).tolist()
    assert (amax, s) == (896.0, 64.0)
    assert (under, sub, over) == (1.0, 1.0, 0.0)  # scaled: 2^-14 normal, 2^-15 subnormal, 2^-24 -> 0
    assert under_u == 3.0  # unscaled, 2^-20, 2^-21 and 2^-30 all lie below 2^-17 (half e5m2's smallest subnormal)


def test_cast_stats_rowwise_scales_each_row_and_rounds_to_powers_of_two():
    x = torch.tensor([[3.0, 1.0], [100.0, -0.001]])
    amax, smin, smax, *_ = fp8.cast_stats(x, torch.float8_e4m3fn, rowwise=True, pow2=True).tolist()
    assert amax == 100.0
    assert smin == 4.0 and smax == 128.0  # 448/100 = 4.48 -> 4, 448/3 = 149.3 -> 128


@needs_torchao
def test_cast_stats_scale_matches_torchao():
    from torchao.float8.float8_utils import tensor_to_scale

    x = torch.randn(64, 32) * 3
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert fp8.cast_stats(x, dtype)[1].item() == tensor_to_scale(x, dtype).item()


@needs_torchao
def test_fp8_stats_record_every_converted_layer_on_sampled_steps_only():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 16), nn.Linear(16, 4)
    )
    convert(model)
    stats = fp8.Fp8Stats(model)
    assert set(stats.modules) == {"2", "4"}
    seen = {}
    model[2].register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), out=o))
    x = torch.randn(8, 16)

    model(x).sum().backward()  # not sampled: no hooks, nothing recorded
    assert stats.end() == {}

    stats.begin()
    seen["out"] = None
    out = model(x)
    seen["out"].register_hook(lambda g: seen.update(g=g.detach()))
    out.square().sum().backward()
    layers = stats.end()
    assert set(layers) == {"2", "4"} and set(layers["2"]) == {"input", "weight", "grad"}
    rec = layers["2"]
    assert rec["input"]["amax"] == pytest.approx(seen["x"].abs().max().item())
    assert rec["weight"]["amax"] == pytest.approx(model[2].weight.abs().max().item())
    assert rec["grad"]["amax"] == pytest.approx(seen["g"].abs().max().item())
    assert rec["grad"]["scale"] == pytest.approx(57344.0 / seen["g"].abs().max().item(), rel=1e-6)  # e5m2
    assert rec["input"]["overflow"] == 0.0 and rec["input"]["overflow_unscaled"] == 0.0
    assert stats.summary()["diag/fp8_grad_amax"] >= rec["grad"]["amax"]
    assert len(model[2]._forward_hooks) == 1 and len(model[4]._forward_hooks) == 0  # only the test's own hook is left


# ---- training, checkpoints, resume ------------------------------------------------------------------

@needs_torchao
# the GPT with the recipe this comparison was sized for (SGD, 20 warm-up steps): its own (nanoGPT's AdamW, 100
# warm-up steps) would still be warming up at step 30
@pytest.mark.parametrize("model", [pytest.param([*GPT, "optimizer=sgd", "scheduler=cosine"], marks=pytest.mark.slow),
                                   MLP], ids=["gpt", "mlp"])
def test_fp8_trains_within_a_few_percent_of_bf16(tmp_path, model):
    runs = {p: train(tmp_path / p, [f"precision={p}", "trainer.max_steps=30", "diagnostics=off",
                                     "checkpoint.enabled=false", *model])[0] for p in ("bf16", "fp8")}
    key = "val/loss"
    first = read_jsonl(tmp_path / "fp8" / "run" / "metrics.jsonl")[0]["loss"]
    assert runs["fp8"]["status"] == "completed" and runs["fp8"][key] < 0.8 * first  # it learned
    assert abs(runs["fp8"][key] - runs["bf16"][key]) <= 0.05 * runs["bf16"][key]
    assert runs["fp8"][key] != runs["bf16"][key]  # and fp8 really computed something else


@needs_torchao
def test_checkpoint_is_plain_and_loads_into_the_unconverted_model(tmp_path):
    from mptrain.library.models.language import GPT as GPTModel

    _, run_dir = train(tmp_path, ["precision=fp8", "trainer.max_steps=4", "diagnostics=off", *GPT])
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    state = ckpt["model"]
    assert all(type(v) is torch.Tensor for v in state.values())
    plain = GPTModel(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2, dropout=0.0)
    plain.load_state_dict(state)  # strict: the same keys as the unconverted model
    # a converted model loaded from the checkpoint computes exactly what the plain model converted afterwards does
    converted = GPTModel(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2, dropout=0.0)
    convert(converted)
    converted.load_state_dict(state)
    convert(plain)
    tokens = torch.randint(0, 64, (4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(plain(tokens), converted(tokens))
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in state.items())


@needs_torchao
@pytest.mark.slow
def test_resume_is_bitwise(tmp_path):
    from .test_checkpoint import assert_same_tensors, final_state

    base = ["precision=fp8", "trainer.max_steps=8", "checkpoint.every_steps=4", "checkpoint.keep_last=2",
            "trainer.log_every=2", "optimizer=adamw", "optimizer.lr=3e-3", *GPT]
    _, ref = train(tmp_path / "ref", base)
    half = ref / "checkpoints" / "step_4.pt"
    summary, cut = train(tmp_path / "cut", [*base, f"resume={half}"])
    assert summary["steps"] == 8
    assert_same_tensors(final_state(ref), final_state(cut))
    assert read_jsonl(ref / "metrics.jsonl")[2:] == read_jsonl(cut / "metrics.jsonl")


@needs_torchao
def test_rowwise_recipe_trains(tmp_path):
    summary, _ = train(tmp_path, ["precision=fp8", "precision.fp8.recipe=rowwise", "trainer.max_steps=6",
                                  "diagnostics=off", "checkpoint.enabled=false", *GPT])
    assert summary["status"] == "completed" and summary["train_loss"] < 4.2  # ln(64) = 4.16 at the start


@needs_torchao
@pytest.mark.slow
def test_fp8_under_torch_compile(tmp_path):
    summary, _ = train(tmp_path, ["precision=fp8", "trainer.compile=true", "trainer.max_steps=4", "diagnostics=off",
                                  "checkpoint.enabled=false", *GPT])
    assert summary["status"] == "completed" and summary["train_loss"] == summary["train_loss"]


# ---- errors -----------------------------------------------------------------------------------------

def test_missing_torchao_is_one_line_and_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # what `import torchao` does when it is not installed
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(fp8.Fp8MissingError, match=r"^precision=fp8 needs torchao: pip install mptrain\[fp8\]$"):
        train(tmp_path, ["precision=fp8", *MLP])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_torchao_from_the_cli(tmp_path):
    code = ("import sys; sys.modules['torchao'] = None; sys.modules['torchao.float8'] = None; "
            "from mptrain.cli.main import main; main()")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", code, "precision=fp8", "trainer.device=cpu", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1] == "mptrain: error: precision=fp8 needs torchao: pip install mptrain[fp8]"
    )
    assert not run_dir.exists() or not any(run_dir.iterdir())  # refused before the run directory changed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "precision.fp8.recipe=blockwise",
            "precision.fp8.recipe='blockwise' is invalid: choose tensorwise, rowwise, rowwise_with_gw_hp",
        ),
        ("precision.fp8.dim_multiple=0", "precision.fp8.dim_multiple=0 is invalid"),
    ],
)
def test_bad_fp8_settings(override, message):
    from mptrain.config import validate

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_config(["precision=fp8", override]))


@needs_torchao
def test_fp8_refuses_a_float16_dtype_and_fp8_kernels_on_cpu():
    from mptrain.precision import Precision

    cfg = compose_config(["precision=fp8", "precision.dtype=float16"]).precision
    with pytest.raises(ConfigError, match="precision=fp8 runs the layers it does not convert in bfloat16"):
        Precision(cfg, torch.device("cpu"))
    cfg = compose_config(["precision=fp8", "precision.fp8.emulate=false"]).precision
    with pytest.raises(HardwareError, match="needs fp8 kernels"):
        Precision(cfg, torch.device("cpu"))
    p = Precision(compose_config(["precision=fp8"]).precision, torch.device("cpu"))
    assert "emulated: cpu has no fp8 kernels" in p.describe() and "e5m2 gradients" in p.describe()



# ---- mptrain-report and mptrain-compare -------------------------------------------------------------

@needs_torchao
@pytest.mark.slow  # plots: ~20 s on a quiet 2-core machine
def test_report_draws_fp8_layers_and_compare_has_fp8_rows(tmp_path):
    import csv
    import json

    from mptrain.library.models.vision import MLP as MLPModel
    from mptrain.tools.compare import main as compare_main
    from mptrain.tools.report import make_report

    short = ["trainer.max_steps=4", "diagnostics.first_steps=2", *MLP]
    runs = {p: train(tmp_path / p, [f"precision={p}", *short]) for p in ("bf16", "fp8")}
    run_dir = runs["fp8"][1]
    # the per-layer records the diagnostics collector adds to its sample rows, from the run's own weights
    model = MLPModel(num_classes=10, in_channels=1, image_size=8)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"])
    convert(model)
    stats = fp8.Fp8Stats(model)
    path = run_dir / "diagnostics.jsonl"
    rows = read_jsonl(path)
    for row in rows:
        if row.get("event") == "sample":
            stats.begin()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(torch.randn(32, 1, 8, 8))
            out.float().logsumexp(1).mean().backward()
            row["fp8"] = stats.end()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = make_report(run_dir)
    assert (run_dir / "report" / "fp8.png") in paths and (run_dir / "report" / "fp8.png").stat().st_size > 10_000

    for p, (_, d) in runs.items():
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(f"- precision={p}\n")
    compare_main([str(d) for _, d in runs.values()] + ["--out", str(tmp_path / "cmp")])
    table = {r["precision"]: r for r in csv.DictReader(open(tmp_path / "cmp" / "comparison.csv"))}
    acc = {p: s["val/acc"] for p, (s, _) in runs.items()}
    assert float(table["fp8"]["diff vs bf16"]) == pytest.approx(acc["fp8"] - acc["bf16"])
    assert float(table["bf16"]["diff vs bf16"]) == 0.0
