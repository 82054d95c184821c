"""Number formats: `quantize` bit-exact against PyTorch's casts (dense sweeps), against torchao's MX and NVFP4
casts where installed, and against blocks worked by hand from the OCP MX spec and NVIDIA's NVFP4 recipe."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch

from mptrain.errors import ConfigError
from mptrain.precision.formats import E2M1, E4M3, E8M0, FORMATS, get_format, quantize

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao not installed (pip install mptrain[fp8])")


def all_bf16() -> torch.Tensor:
    """Every bf16 bit pattern as float32 (NaNs included: they must stay NaN)."""
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    return bits.view(torch.bfloat16).float()


def dense_fp32() -> torch.Tensor:
    """Every bf16 pattern extended with low halves that land below, on and above the ties of every narrower
    format (0x8000 is bf16's tie, 0x1000 fp16's from a bf16-exact value, ...), plus random fp32 patterns."""
    high = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32) << 16
    lows = torch.tensor([0, 1, 0x0FFF, 0x1000, 0x1001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int32)
    grid = (high[:, None] | lows[None, :]).flatten()
    rand = torch.randint(-(2 ** 31), 2 ** 31 - 1, (200_000,), generator=torch.Generator().manual_seed(0),
                         dtype=torch.int64).to(torch.int32)
    return torch.cat([grid, rand]).view(torch.float32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal as values, +0/-0 told apart, NaN where NaN."""
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b)), "NaN in different places"
    a, b = a[~nan], b[~nan]
    bad = (a != b) | (torch.signbit(a) != torch.signbit(b))
    assert not bad.any(), f"{int(bad.sum())} differ, e.g. {a[bad][:5].tolist()} vs {b[bad][:5].tolist()}"


CASTS = [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp8_e4m3", torch.float8_e4m3fn),
         ("fp8_e5m2", torch.float8_e5m2)]


@pytest.mark.parametrize(("name", "dtype"), CASTS)
def test_quantize_matches_torch_cast_on_every_bf16_pattern(name, dtype):
    x = all_bf16()
    same_bits(quantize(x, name), x.to(dtype).float())


@pytest.mark.parametrize(("name", "dtype"), CASTS)
def test_quantize_matches_torch_cast_on_dense_fp32(name, dtype):
    x = dense_fp32()
    same_bits(quantize(x, name), x.to(dtype).float())


@pytest.mark.parametrize(("name", "dtype"), CASTS)
def test_edges_zero_subnormals_max_and_past_it(name, dtype):
    fmt, fi = get_format(name), torch.finfo(dtype)
    assert fmt.max == fi.max and fmt.min_normal == fi.tiny
    sub = fi.tiny * 2.0 ** -fmt.element.mbits  # the smallest subnormal, worked from the bit counts
    assert fmt.min_subnormal == sub
    ulp_at_max = fi.max * 2.0 ** -fmt.element.mbits / (2 - 2.0 ** -fmt.element.mbits)
    x = torch.tensor([0.0, -0.0, sub, -sub, sub / 2, sub * 0.51, sub * 1.5, fi.tiny, fi.tiny - sub,
                      fi.max, -fi.max, fi.max + ulp_at_max * 0.49, fi.max + ulp_at_max * 0.5, fi.max * 4,
                      math.inf, -math.inf, math.nan], dtype=torch.float32)
    got, want = quantize(x, name), x.to(dtype).float()
    same_bits(got, want)
    assert got[4] == 0 and got[5] == sub and got[6] == 2 * sub  # half the smallest ties to even (0); 1.5 to 2
    past = got[13]
    if fmt.element.overflow == "saturate":
        assert past == fi.max  # e4m3: no inf, saturates (OCP SAT mode, PyTorch's cast)
    else:
        assert past == math.inf and got[12] == math.inf  # the tie at max + ulp/2 rounds to even: past max


@pytest.mark.parametrize(("name", "dtype"), CASTS)
def test_the_float32_arithmetic_rounding_matches_torch_cast_too(name, dtype):
    """`quantize` takes PyTorch's cast where PyTorch has the encoding; the rounding every other element uses
    (`Element.rounded`) must agree with it on the same sweep, edges included."""
    fi = torch.finfo(dtype)
    edges = torch.tensor([fi.max * 4, math.inf, -math.inf, math.nan, fi.tiny / 3], dtype=torch.float32)
    x = torch.cat([dense_fp32(), edges])
    same_bits(get_format(name).element.rounded(x), x.to(dtype).float())


def test_fp32_is_identity():
    x = dense_fp32()
    same_bits(quantize(x, "fp32"), x)


# ---- block formats against hand-worked values -----------------------------------------------------

def test_mxfp4_block_largest_element_sets_the_e8m0_scale():
    # OCP MX v1.0 s6.3: X = 2^(floor(log2(amax)) - emax_elem); e2m1 emax = 2 (max 6 = 1.5 * 2^2).
    # amax 20: floor(log2 20) = 4 -> scale 2^(4-2) = 4. Elements x/4 round to e2m1's grid
    # {0, 0.5, 1, 1.5, 2, 3, 4, 6}: 20/4 = 5 -> tie between 4 and 6 -> even mantissa (4); 2.2/4 = 0.55 -> 0.5;
    # 7/4 = 1.75 -> tie 1.5|2 -> 2; -3/4 = -0.75 -> tie 0.5|1 -> 1 (even: 1.0); 0.9/4 = 0.225 -> 0 (below 0.25)
    # 23.9/4 = 5.975 -> 6. Read back: times 4.
    block = torch.zeros(32)
    block[:7] = torch.tensor([20.0, 2.2, 7.0, -3.0, 0.9, 23.9, 1.0])
    got = quantize(block, "mxfp4")
    assert got[:7].tolist() == [16.0, 2.0, 8.0, -4.0, 0.0, 24.0, 0.0]  # 1/4 = 0.25 -> tie 0|0.5 -> 0
    assert not got[7:].any()


def test_mxfp4_scale_from_a_block_that_saturates():
    # amax 31: floor(log2 31) = 4 -> scale 4; 31/4 = 7.75 > 6: saturates to 6 -> 24 (FLOOR scale, as the spec)
    block = torch.tensor([31.0] + [0.0] * 31)
    assert quantize(block, "mxfp4")[0] == 24.0


def test_mx_blocks_are_independent_and_padding_does_not_move_a_scale():
    # two blocks of 32 with very different magnitudes keep their own scales; a last dim of 40 pads to 64
    x = torch.zeros(40)
    x[0], x[1], x[32], x[33] = 1000.0, 1.0, 0.001, 0.0007
    got = quantize(x, "mxfp8")
    e4m3 = lambda v, s: E4M3.quantize(torch.tensor(v / s)).item() * s  # noqa: E731
    assert got[0] == e4m3(1000.0, 2.0 ** (9 - 8)) and got[1] == e4m3(1.0, 2.0)
    s2 = 2.0 ** (math.floor(math.log2(0.001)) - 8)
    assert got[32] == e4m3(0.001, s2) and got[33] == e4m3(0.0007, s2)
    assert got.shape == x.shape


def test_nvfp4_block_with_its_e4m3_scale():
    # NVFP4: tensor scale T = amax / (448 * 6); block scale s = e4m3((block amax / 6) / T); element
    # e2m1(x / (T * s)); value e2m1 * (T * s). A tensor of two blocks, amax 12 in block 0, 3 in block 1:
    # T = 12 / 2688 = 1/224. Block 0: (12/6) * 224 = 448 -> s = 448 (e4m3 max), T*s = 2 -> 12/2 = 6, 5/2 = 2.5 ->
    # tie 2|3 -> 2 (even) -> 4, -1.3/2 = -0.65 -> 0.5 -> -1. Block 1: (3/6) * 224 = 112 -> s = 112, T*s = 0.5 ->
    # 3/0.5 = 6 -> 3, 1.1/0.5 = 2.2 -> 2 -> 1.0, 0.2/0.5 = 0.4 -> 0.5 -> 0.25.
    x = torch.zeros(32)
    x[:3] = torch.tensor([12.0, 5.0, -1.3])
    x[16:19] = torch.tensor([3.0, 1.1, 0.2])
    got = quantize(x, "nvfp4")
    want = [12.0, 4.0, -1.0, 3.0, 1.0, 0.25]
    assert torch.allclose(got[[0, 1, 2, 16, 17, 18]], torch.tensor(want), rtol=0, atol=1e-6)


def test_nvfp4_block_scale_rounds_in_e4m3():
    # one block, amax 6 but tensor amax 6 * 448 * ... : block 1's scale (5/6)/T lands between e4m3 values
    # T = 100 / 2688; block 1: (5 / 6) / T = 22.4 -> e4m3 (step 2 in [16, 32)) -> 22; element 5 / (T * 22) = 6.109
    # -> saturates to 6 -> value 6 * T * 22 = 4.9107...
    x = torch.zeros(32)
    x[0], x[16] = 100.0, 5.0
    got = quantize(x, "nvfp4")
    t = torch.tensor(100.0) / (448 * 6)
    s = E4M3.quantize(torch.tensor(5.0 / 6) / t)
    assert s == 22.0
    assert got[16] == 6.0 * (t * s)
    assert got[0] == 100.0 * 1  # the largest block: s = 448, element 6, 6 * T * 448 = 100


def test_e2m1_and_e8m0_value_sets():
    grid = torch.linspace(-7, 7, 2801)
    assert sorted(set(E2M1.quantize(grid).abs().tolist())) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert E8M0.quantize(torch.tensor([1.0, 1.4, 1.5, 3.0, 0.0, 1e39])).tolist() == [1, 1, 2, 4, 2.0**-127, 2.0**127]


def test_formats_table_is_consistent():
    bits = {
        "fp32": 32,
        "bf16": 16,
        "fp16": 16,
        "fp8_e4m3": 8,
        "fp8_e5m2": 8,
        "mxfp8": 8,
        "mxfp8_e5m2": 8,
        "mxfp6_e2m3": 6,
        "mxfp6_e3m2": 6,
        "mxfp4": 4,
        "nvfp4": 4,
        "nvfp4_recipe": 4,
        "fp8": 8,
        "fp8_row": 8,
        "fp8_row_hp": 8,
    }
    assert {n: f.bits for n, f in FORMATS.items()} == bits
    for name, fmt in FORMATS.items():
        assert fmt.name == name
        if fmt.torch_dtype is not None:
            assert fmt.max == torch.finfo(fmt.torch_dtype).max
    assert get_format("nvfp4").bits_per_value == 4 + 8 / 16 and get_format("mxfp4").bits_per_value == 4 + 8 / 32
    with pytest.raises(ConfigError, match="unknown number format 'fp3'.*mxfp4"):
        get_format("fp3")



def accepts(check, name: str) -> bool:
    try:
        check(name)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("where", ["precision.layers", "diagnostics.shadow", "get_format"])
def test_the_unknown_format_error_names_exactly_the_accepted_names(where):
    """Every name the check takes is in its message (aliases such as mxfp6 included) and every name the message
    lists is taken: the candidates are the table's names, its aliases, the fp8 recipes and a typo."""
    from mptrain.diagnostics.shadow import check_formats
    from mptrain.precision.formats import ALIASES, BUILTINS

    check = {"precision.layers": lambda n: BUILTINS.canonical(n, "precision.layers.head"),
             "diagnostics.shadow": lambda n: check_formats([n]), "get_format": get_format}[where]
    candidates = [*FORMATS, *ALIASES, "fp8", "fp8_row", "fp8_row_hp", "fp3"]
    taken = {n for n in candidates if accepts(check, n)}
    assert {"mxfp6", "bfloat16", "fp8_e4m3"} <= taken and "fp3" not in taken
    with pytest.raises(ConfigError) as e:
        check("fp3")
    message = str(e.value)
    assert "\n" not in message
    listed = set(re.findall(r"[A-Za-z0-9_]+", message.split("fp3'", 1)[1])) - {"choose", "one", "of", "from",
                                                                              "known", "aliases"}
    assert listed == taken, (listed ^ taken)


# ---- against torchao's own MX and NVFP4 casts ------------------------------------------------------

def mixed_magnitudes(rows: int, cols: int) -> torch.Tensor:
    """Rows whose blocks span many binades (and an outlier per row), all block maxima normal in fp32."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-20, 20, (rows, 1), generator=g).float())
    x[:, 5] *= 300.0
    return x


@needs_torchao
@pytest.mark.parametrize("name", ["mxfp8", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4"])
def test_mx_matches_torchao(name):
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx

    elem = {"mxfp8": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2, "mxfp6_e2m3": DTYPE_FP6_E2M3,
            "mxfp6_e3m2": DTYPE_FP6_E3M2, "mxfp4": torch.float4_e2m1fn_x2}[name]
    for x in (mixed_magnitudes(64, 128), all_bf16()[torch.isfinite(all_bf16())].reshape(-1, 32)):
        keep = x.abs().amax(dim=-1) > 2.0 ** -100  # torchao clamps a 2^-127 scale to 2^-126 on the way in only
        x = x[keep].contiguous()
        scale, data = to_mx(x, elem, 32)
        same_bits(quantize(x, name), to_dtype(data, scale, elem, 32, torch.float32))


@needs_torchao
def test_nvfp4_matches_torchao():
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    for x in (mixed_magnitudes(32, 64), torch.randn(16, 48, generator=torch.Generator().manual_seed(2))):
        pts = per_tensor_amax_to_scale(x.abs().amax())
        ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts).dequantize(torch.float32)
        same_bits(quantize(x, "nvfp4"), ref)
