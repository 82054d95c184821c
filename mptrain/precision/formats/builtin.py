"""The built-in formats: the one place their names and facts are written.

Adding a format is one entry here (or one config line, `precision.formats.NAME={...}`: registry.py); nothing
else in mptrain spells a format's name. The named constants below (FP32, BF16, FP16, FP8) are what code that
needs a particular format refers to.
"""

from __future__ import annotations

import torch

from mptrain.precision.formats.element import BF16 as BF16_ELEMENT
from mptrain.precision.formats.element import E2M1, E2M3, E3M2, E4M3, E5M2, E8M0
from mptrain.precision.formats.element import FP16 as FP16_ELEMENT
from mptrain.precision.formats.element import FP32 as FP32_ELEMENT
from mptrain.precision.formats.format import Format

FP32 = Format("fp32", FP32_ELEMENT, torch_dtype=torch.float32, executor="native", rate="fp32", doc="IEEE single")
BF16 = Format("bf16", BF16_ELEMENT, torch_dtype=torch.bfloat16, executor="native", rate="bf16",
              doc="bfloat16: fp32's range, 8 significant bits")
FP16 = Format("fp16", FP16_ELEMENT, torch_dtype=torch.float16, executor="native", rate="fp16",
              doc="IEEE half: max 65504, needs loss scaling")
FP8_E4M3 = Format("fp8_e4m3", E4M3, torch_dtype=torch.float8_e4m3fn, rate="fp8", doc="OCP fp8 e4m3fn, unscaled")
FP8_E5M2 = Format("fp8_e5m2", E5M2, torch_dtype=torch.float8_e5m2, rate="fp8", doc="OCP fp8 e5m2, unscaled")

# torchao's float8 training recipes (Float8LinearConfig.from_recipe_name): dynamic scales, recomputed for every
# tensor on every step; Linear layers through torchao's Float8Linear, Conv2d emulated with the same casts
# (their gradient formats are named by element: the plan records say "fp8_e5m2" / "fp8_e4m3" for them)
_E5M2_TENSOR = Format("fp8_e5m2", E5M2, "tensor", rate="fp8", doc="e5m2, one dynamic scale per tensor")
_E4M3_ROW = Format("fp8_e4m3", E4M3, "row", rate="fp8", doc="e4m3, one dynamic scale per row")
FP8 = Format("fp8", E4M3, "tensor", grad=_E5M2_TENSOR, executor="torchao", recipe="tensorwise", rate="fp8",
             doc="torchao tensorwise: e4m3 forward, e5m2 gradients, a scale per tensor")
FP8_ROW = Format("fp8_row", E4M3, "row", grad=_E4M3_ROW, executor="torchao", recipe="rowwise", rate="fp8",
                 doc="torchao rowwise: e4m3 throughout, a scale per row")
# Conv2d layers (emulated) quantize the output gradient for both backward GEMMs; torchao's Linear keeps the
# weight-gradient GEMM in bf16
FP8_ROW_HP = Format("fp8_row_hp", E4M3, "row", grad=_E4M3_ROW, executor="torchao", recipe="rowwise_with_gw_hp",
                    rate="fp8", doc="torchao rowwise, the weight-gradient GEMM in high precision")

BUILTIN: tuple[Format, ...] = (
    FP32, BF16, FP16, FP8_E4M3, FP8_E5M2,
    Format("mxfp8", E4M3, "block", 32, E8M0, rate="fp8", doc="OCP MX: e4m3, e8m0 scale per 32"),
    Format("mxfp8_e5m2", E5M2, "block", 32, E8M0, rate="fp8", doc="OCP MX: e5m2, e8m0 scale per 32"),
    Format("mxfp6_e2m3", E2M3, "block", 32, E8M0, rate="fp6", doc="OCP MX: e2m3, e8m0 scale per 32"),
    Format("mxfp6_e3m2", E3M2, "block", 32, E8M0, rate="fp6", doc="OCP MX: e3m2, e8m0 scale per 32"),
    Format("mxfp4", E2M1, "block", 32, E8M0, rate="fp4", doc="OCP MX: e2m1, e8m0 scale per 32"),
    Format("nvfp4", E2M1, "block", 16, E4M3, tensor_scale=True, rate="fp4",
           doc="NVIDIA: e2m1, e4m3 scale per 16, fp32 scale per tensor"),
    # NVIDIA's NVFP4 pretraining recipe (arXiv 2509.25149, section 4): 16x16 weight scales, a 16-point random
    # Hadamard transform on the weight-gradient GEMM's inputs, stochastic rounding of gradients
    Format("nvfp4_recipe", E2M1, "block", 16, E4M3, tensor_scale=True, rate="fp4", weight_scaling="2d",
           wgrad_hadamard=16, grad_rounding="stochastic",
           doc="nvfp4 with NVIDIA's training recipe: 2D weight scales, RHT-16 on wgrad, stochastic gradients"),
    FP8, FP8_ROW, FP8_ROW_HP,
)
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2",
           "mxfp6": "mxfp6_e2m3"}
# precision.fp8.recipe -> the entry the fp8 preset plans (and that the name `fp8` stands for in such a run)
FP8_RECIPES = {f.recipe: f for f in (FP8, FP8_ROW, FP8_ROW_HP)}
# torch dtypes -> their format (compute dtypes, the weights of master / nomaster / bf16_pure)
BY_DTYPE = {f.torch_dtype: f for f in (FP32, BF16, FP16)}
