"""The time model for a named target (precision/roofline.py) and `mptrain-estimate --target`, checked against
torchao's own roofline (torchao.testing.training.roofline_utils, the independent reference) and by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torchao.testing.training.roofline_utils import get_float8_mem_sympy, get_gemm_time_sympy, get_specs

from mptrain.errors import ConfigError
from mptrain.library.models.language import GPT
from mptrain.precision import roofline
from mptrain.precision.formats import BF16, FP8, FP8_ROW, FP32, Registry, get_format
from mptrain.precision.formats.builtin import FP8_ROW_HP
from mptrain.precision.formats.targets import Target
from mptrain.tools.estimate import main
from mptrain.tools.modeled import trace

TORCHAO_GPU = "NVIDIA H100"


def torchao_times(m: int, k: int, n: int, recipe: str) -> tuple[float, float]:
    """(bf16, fp8) forward+backward seconds of an M x K x N Linear as torchao's float8_roofline.py sums them:
    the three bf16 GEMMs, against the three fp8 GEMMs plus the fp8 casts (fusion modeling off)."""
    bf16 = get_gemm_time_sympy(m, k, n, torch.bfloat16, None, None, TORCHAO_GPU)
    fp8 = (get_gemm_time_sympy(m, k, n, torch.float8_e4m3fn, recipe, None, TORCHAO_GPU)
           + get_float8_mem_sympy(m, k, n, recipe, None, False, TORCHAO_GPU))
    return float(bf16), float(fp8)


def test_one_gemm_by_hand():
    """A compute-bound and a memory-bound Linear in bf16 on an H100 (989.5 TFLOP/s dense bf16, 3.35 TB/s), at
    78% of the peak and 92% of the bandwidth; each of the three GEMMs moves and computes the same amount."""
    peak, bandwidth = 1979e12 / 2 * 0.78, 3.35e12 * 0.92
    # M = 8192, K = N = 4096: 2MKN = 2.75e11 flops -> 356 us; (MK + KN + MN) x 2 bytes = 168 MB -> 54 us
    flops, moved = 2 * 8192 * 4096 * 4096, (8192 * 4096 + 4096 * 4096 + 8192 * 4096) * 2
    assert flops / peak > moved / bandwidth
    assert roofline.seconds(roofline.Shape(8192, 4096, 4096), BF16, "h100") == pytest.approx(3 * flops / peak)
    # M = 65536, K = N = 256: 8.6e9 flops -> 11 us; (MK + KN + MN) x 2 bytes = 67 MB -> 22 us: memory-bound
    flops, moved = 2 * 65536 * 256 * 256, (65536 * 256 + 256 * 256 + 65536 * 256) * 2
    assert moved / bandwidth > flops / peak > 2e-6
    assert roofline.seconds(roofline.Shape(65536, 256, 256), BF16, "h100") == pytest.approx(3 * moved / bandwidth)
    # fp32 (67 TFLOP/s on CUDA cores) against tf32 (494.5 TFLOP/s) on the compute-bound shape
    big = roofline.Shape(8192, 4096, 4096)
    assert roofline.seconds(big, FP32, "h100") == pytest.approx(3 * 2 * 8192 * 4096**2 / (67e12 * 0.78))
    assert roofline.seconds(big, FP32, "h100", tf32=True) == pytest.approx(3 * 2 * 8192 * 4096**2 / (494.5e12 * 0.78))


@pytest.mark.parametrize("fmt", [FP8, FP8_ROW, FP8_ROW_HP], ids=lambda f: f.recipe)
def test_same_as_torchao_given_torchao_figures(fmt):
    """With torchao's own H100 figures (its 2.4 TB/s H100 variant) our model gives torchao's times exactly: GEMMs,
    casts, kernel launches, for each torchao recipe; only the table's figures differ."""
    specs = get_specs(TORCHAO_GPU)
    theirs = Target("torchao-h100", TORCHAO_GPU, {BF16.rate: specs["bf16_peak_tops"], FP8.rate: specs["fp8_peak_tops"]},
                    specs["peak_mem_bw_bytes_sec"], "torchao/testing/training/roofline_utils.py")
    for m, k, n in [(8192, 1024, 1024), (8192, 4096, 4096), (8192, 4096, 16384), (8192, 64, 64), (1024, 8192, 512),
                    (65536, 2048, 1024)]:
        bf16, fp8 = torchao_times(m, k, n, fmt.recipe)
        shape = roofline.Shape(m, k, n)
        assert roofline.seconds(shape, BF16, theirs) == pytest.approx(bf16, rel=1e-12)
        assert roofline.seconds(shape, fmt, theirs) == pytest.approx(fp8, rel=1e-12)


def test_mxfp8_within_a_percent_of_torchao_given_its_b200_figures():
    """MX (a scale per 32 along each layout): torchao's mxfp8_cublas roofline, but our casts also write the e8m0
    scales (1 byte per 32 values), which torchao leaves out: ours is at most 1% slower."""
    specs = get_specs("NVIDIA B200")
    theirs = Target("torchao-b200", "NVIDIA B200", {FP8.rate: specs["fp8_peak_tops"]}, specs["peak_mem_bw_bytes_sec"],
                    "torchao/testing/training/roofline_utils.py")
    mx = get_format("mxfp8")
    for m, k, n in [(8192, 1024, 1024), (8192, 4096, 16384), (8192, 64, 64)]:
        ref = float(get_gemm_time_sympy(m, k, n, torch.float8_e4m3fn, None, "mxfp8_cublas", "NVIDIA B200")
                    + get_float8_mem_sympy(m, k, n, None, "mxfp8_cublas", False, "NVIDIA B200"))
        assert ref <= roofline.seconds(roofline.Shape(m, k, n), mx, theirs) <= 1.01 * ref


def test_the_issues_reference_ratios_are_torchaos():
    """issue 34's figures (H100, M = 8192, tensorwise): fp8 at 0.72x, 1.36x, 1.50x, 0.23x the speed of bf16."""
    for (k, n), ratio in {(1024, 1024): 0.72, (4096, 4096): 1.36, (4096, 16384): 1.50, (64, 64): 0.23}.items():
        bf16, fp8 = torchao_times(8192, k, n, FP8.recipe)
        assert bf16 / fp8 == pytest.approx(ratio, abs=0.006)


def gpt_linears(dim: int, heads: int, batch: int, seq: int) -> list[tuple[str, nn.Linear, tuple[int, ...]]]:
    """(name, module, its input's shape) of each Linear in one forward of a one-block GPT on the meta device."""
    with torch.device("meta"):
        gpt = GPT(vocab_size=64, seq_len=seq, dim=dim, layers=1, heads=heads)
    shapes, _ = trace(gpt, torch.empty(batch, seq, dtype=torch.long, device="meta"), 2)
    return [(n, m, shapes[n]) for n, m in gpt.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("dim,heads", [(4096, 32), (64, 4)])
def test_fp8_or_bf16_agrees_with_torchao_per_linear(dim, heads):
    """On an H100 (datasheet figures), the faster of bf16 and fp8 for each Linear of a GPT at M = 8192 is torchao's
    choice wherever torchao's two times differ by more than 10%."""
    compared = 0
    for name, module, shape in gpt_linears(dim, heads, 4, 2048):
        m = math.prod(shape[:-1])
        assert m == 8192
        for fmt in (FP8, FP8_ROW):
            ours = roofline.layer_times(module, shape, [BF16.name, fmt.name], "h100")
            bf16, fp8 = torchao_times(m, module.in_features, module.out_features, fmt.recipe)
            if abs(bf16 - fp8) > 0.1 * max(bf16, fp8):
                compared += 1
                assert (ours[fmt.name] < ours[BF16.name]) == (fp8 < bf16), (name, fmt.recipe, bf16 / fp8)
    assert compared >= 8  # most of the 5 Linears x 2 recipes differ by more than 10% in torchao's model


def test_conv2d_as_implicit_gemm_and_what_is_not_modeled():
    conv = nn.Conv2d(3, 16, 3, padding=1, stride=2)
    shape = roofline.shape_of(conv, (8, 3, 32, 32))
    assert shape == roofline.Shape(8 * 16 * 16, 3 * 9, 16, 1, 8 * 3 * 32 * 32)
    grouped = roofline.shape_of(nn.Conv2d(32, 32, 3, padding=1, groups=4), (2, 32, 8, 8))
    assert (grouped.M, grouped.K, grouped.N, grouped.groups) == (2 * 64, 8 * 9, 8, 4)
    assert roofline.layer_times(nn.LayerNorm(64), (8, 64), [BF16.name], "h100") == {}


def test_a_format_the_target_lacks_has_no_time_and_says_why():
    linear = nn.Linear(1024, 1024, device="meta")
    times = roofline.layer_times(linear, (8192, 1024), [BF16.name, FP8.name], "a100")
    assert times[FP8.name] == math.inf and times[BF16.name] < math.inf
    assert roofline.why_not(FP8, "a100").startswith("a100 has no fp8 rate")
    registry = Registry.from_config({"mine": {"element": "e3m2"}})  # a user's format: no rate, modeled nowhere
    assert roofline.layer_times(linear, (8192, 1024), ["mine"], "b200", registry) == {"mine": math.inf}
    assert roofline.why_not(registry.get("mine"), "b200") == ("mine has no hardware rate: no GPU runs it natively, "
                                                              "so no target models it")
    nvfp4 = get_format("nvfp4")  # emulated here, native on a B200: modeled at the B200's fp4 rate
    assert roofline.layer_times(linear, (8192, 1024), [nvfp4.name], "h100")[nvfp4.name] == math.inf
    assert roofline.layer_times(linear, (8192, 1024), [nvfp4.name], "b200")[nvfp4.name] < math.inf


def test_an_unknown_target_is_one_line_naming_the_known(capsys):
    with pytest.raises(ConfigError, match=r"^unknown target 'h900'; known targets: h100, h200, b200, a100, l4$"):
        roofline.target("h900")
    assert main(["--target", "h900", "--presets", "bf16", "model=mlp"]) == 2
    err = capsys.readouterr().err
    assert err == "mptrain-estimate: error: unknown target 'h900'; known targets: h100, h200, b200, a100, l4\n"


def gpt(dim: int, heads: int) -> list[str]:
    """A one-block GPT at M = 4 x 2048 = 8192 rows per Linear."""
    return ["model=gpt", "dataset=synthetic_tokens", f"model.dim={dim}", "model.layers=1", f"model.heads={heads}",
            "dataset.seq_len=2048", "trainer.batch_size=4", "precision.fp8.skip_first=false",
            "precision.fp8.skip_last=false"]


@pytest.mark.slow
@pytest.mark.parametrize("dim,heads", [(4096, 32), (64, 4)])
def test_estimate_target_decides_fp8_or_bf16_as_torchao(dim, heads, capsys):
    """issue 34's criterion through the CLI, the GPT built on the meta device: per Linear, fp8 (the fp8 preset's
    time) against bf16 (the bf16 preset's) is torchao's choice wherever torchao's two times differ by > 10%."""
    assert main(["--json", "--target", "h100", "--presets", "bf16,fp8", *gpt(dim, heads)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "h100" and set(out["presets"]) == {BF16.name, FP8.name}
    bf16, fp8 = out["presets"][BF16.name]["layers"], out["presets"][FP8.name]["layers"]
    compared = 0
    for name, layer in fp8.items():
        if "shape" not in layer:
            continue
        assert layer["format"] == FP8.name and layer["shape"]["M"] == 8192
        assert layer["emulated_here"] or torch.cuda.is_available()  # modeled native; a run here would emulate
        theirs_bf16, theirs_fp8 = torchao_times(*layer["shape"].values(), FP8.recipe)
        if abs(theirs_bf16 - theirs_fp8) > 0.1 * max(theirs_bf16, theirs_fp8):
            compared += 1
            assert (layer["time_s"] < bf16[name]["time_s"]) == (theirs_fp8 < theirs_bf16), name
    assert compared == 5  # qkv, proj, the two MLP layers, the head


@pytest.mark.slow
def test_estimate_target_json_and_refusal(capsys):
    """M = batch x sequence, a layer's time is the model's, memory is counted, what is not modeled is listed,
    and fp8 on an A100 (no fp8 tensor cores) is refused with the reason."""
    assert main(["--json", "--target", "h100", "--presets", "bf16", *gpt(4096, 32)]) == 0
    row = json.loads(capsys.readouterr().out)["presets"][BF16.name]
    proj = row["layers"]["blocks.0.attn.proj"]
    assert proj["shape"] == {"M": 8192, "K": 4096, "N": 4096} and proj["format"] == BF16.name
    assert proj["time_s"] == pytest.approx(roofline.seconds(roofline.Shape(8192, 4096, 4096), BF16, "h100"))
    assert row["step_time_s"] > sum(v["time_s"] for v in row["layers"].values()) and row["memory_mb"] > 0
    assert row["not_modeled"]["blocks.0.ln1"] == "LayerNorm"
    assert main(["--json", "--target", "a100", "--presets", "bf16,fp8", *gpt(64, 4)]) == 0
    refused = json.loads(capsys.readouterr().out)["refused"]
    assert refused[FP8.name].startswith("precision=fp8 on a100: a100 has no fp8 rate")


@pytest.mark.slow
def test_estimate_target_models_a_cnns_convolutions_as_implicit_gemms(capsys):
    """The default CNN: every Conv2d and Linear gets a modeled time (a Conv2d no `shape`: that is for Linear
    layers), the step is at least their sum, and fp32 is slower than bf16 on an L4 (30.3 against 121 TFLOP/s)."""
    assert main(["--json", "--target", "l4", "--presets", "fp32,bf16", "model=cnn", "trainer.batch_size=32"]) == 0
    presets = json.loads(capsys.readouterr().out)["presets"]
    for row in presets.values():
        kinds = {("shape" in layer, layer["time_s"] > 0) for layer in row["layers"].values()}
        assert kinds == {(True, True), (False, True)}  # Linear and Conv2d layers, all timed
        assert row["step_time_s"] >= sum(layer["time_s"] for layer in row["layers"].values())
        assert {layer["shape"]["M"] for layer in row["layers"].values() if "shape" in layer} == {32}  # the batch
    assert presets[FP32.name]["step_time_s"] > presets[BF16.name]["step_time_s"]


def test_fp8_or_bf16_agrees_with_torchao_on_a_grid_wherever_clear():
    """Over M 1k-64k, K and N 64-16k, tensorwise and rowwise: the choice is torchao's wherever torchao's two times
    differ by more than 20%. Closer than that, NVIDIA's 3.35 TB/s (torchao: 2.4) can tip it (docs/precision.md)."""
    sizes, compared = (64, 256, 1024, 4096, 16384), 0
    for fmt in (FP8, FP8_ROW):
        for m in (1024, 8192, 65536):
            for k in sizes:
                for n in sizes:
                    bf16, fp8 = torchao_times(m, k, n, fmt.recipe)
                    if abs(bf16 - fp8) <= 0.2 * max(bf16, fp8):
                        continue
                    compared += 1
                    shape = roofline.Shape(m, k, n)
                    ours = roofline.seconds(shape, fmt, "h100") < roofline.seconds(shape, BF16, "h100")
                    assert ours == (fp8 < bf16), (fmt.recipe, m, k, n, bf16 / fp8)
    assert compared > 100


@pytest.mark.slow
@pytest.mark.parametrize("dim,heads", [(4096, 32), (64, 4)])
def test_estimate_target_models_autos_choice_per_linear(dim, heads, capsys):
    """precision=auto on h100 is modeled as auto would choose there, not as all-bf16: among its candidates
    (formats=null: bf16 and fp8, what an H100 runs) each Linear gets fp8 where the roofline times it clearly
    faster than bf16 (the planner's 0.95), else bf16; at M = 8192 the 4096-wide GPT's big Linears are fp8, the
    64-wide one keeps bf16 throughout. The times are the roofline's own for each Linear."""
    from mptrain.precision.planner import CLEARLY_FASTER

    assert main(["--json", "--target", "h100", "--presets", "auto", *gpt(dim, heads)]) == 0
    layers = json.loads(capsys.readouterr().out)["presets"]["auto"]["layers"]
    linears = {n: v for n, v in layers.items() if "shape" in v}
    assert len(linears) == 5
    for name, layer in linears.items():
        shape = roofline.Shape(*layer["shape"].values())
        bf16, fp8 = roofline.seconds(shape, BF16, "h100"), roofline.seconds(shape, FP8, "h100")
        assert layer["format"] == (FP8.name if fp8 < CLEARLY_FASTER * bf16 else BF16.name), name
        assert layer["time_s"] == pytest.approx(min(bf16, fp8) if layer["format"] == FP8.name else bf16)
    chosen = {n: v["format"] for n, v in linears.items()}
    if dim == 4096:  # qkv, proj and the MLP (K, N >= 4096); the head (N = 64) stays bf16
        assert chosen == {**dict.fromkeys(list(chosen)[:4], FP8.name), "head": BF16.name}
    else:
        assert set(chosen.values()) == {BF16.name}
