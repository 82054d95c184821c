"""Named hardware targets for the time model (precision/roofline.py): per rate class (a format's `rate`, plus
tf32 for fp32 GEMMs with trainer.allow_tf32) the dense peak throughput, and the memory bandwidth.

Every figure is the vendor's datasheet figure for one GPU, **dense, no sparsity**: where a datasheet gives tensor
core figures "with sparsity" (marked * there) they are halved here. fp32 is the non-tensor-core (CUDA core) rate.
A rate class a chip lacks is absent: a format of that class has no time on that target (e.g. fp8 on an A100).
The same table, with its sources, is in docs/precision.md ("Targets").
"""

from __future__ import annotations

from dataclasses import dataclass, field

TF32 = "tf32"  # fp32 GEMMs on tensor cores (trainer.allow_tf32): a rate class no format names


@dataclass(frozen=True)
class Target:
    """One GPU: `peak` FLOP/s per rate class (dense), `bandwidth` bytes/s of its memory, `source` the datasheet."""

    name: str
    part: str
    peak: dict[str, float] = field(hash=False)
    bandwidth: float
    source: str


T = 1e12
# https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM; tensor figures there are with sparsity: halved)
H100 = Target("h100", "NVIDIA H100 SXM5 80GB", {"fp32": 67 * T, TF32: 989 * T / 2, "bf16": 1979 * T / 2,
                                                "fp16": 1979 * T / 2, "fp8": 3958 * T / 2}, 3.35e12,
              "https://www.nvidia.com/en-us/data-center/h100/")
# https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM: H100's compute, HBM3e at 4.8 TB/s; sparse figures halved)
H200 = Target("h200", "NVIDIA H200 SXM 141GB", {"fp32": 67 * T, TF32: 989 * T / 2, "bf16": 1979 * T / 2,
                                                "fp16": 1979 * T / 2, "fp8": 3958 * T / 2}, 4.8e12,
              "https://www.nvidia.com/en-us/data-center/h200/")
# https://resources.nvidia.com/en-us-blackwell-architecture (NVIDIA Blackwell Architecture Technical Brief, HGX B200
# per GPU, pp. 19-20: dense tensor figures; fp6 runs at the fp8 rate; memory 8 TB/s)
B200 = Target("b200", "NVIDIA B200 (HGX, 1000 W)", {"fp32": 80 * T, TF32: 1100 * T, "bf16": 2250 * T, "fp16": 2250 * T,
                                                    "fp8": 4500 * T, "fp6": 4500 * T, "fp4": 9000 * T}, 8.0e12,
              "https://resources.nvidia.com/en-us-blackwell-architecture")
# the A100 datasheet (the URL below; A100 80GB SXM: the dense figures are the ones without *; no fp8 tensor cores)
A100 = Target("a100", "NVIDIA A100 SXM 80GB", {"fp32": 19.5 * T, TF32: 156 * T, "bf16": 312 * T, "fp16": 312 * T},
              2.039e12,
              "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
              "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
# https://www.nvidia.com/en-us/data-center/l4/ (L4 24GB; tensor figures there are with sparsity: halved)
L4 = Target("l4", "NVIDIA L4 24GB", {"fp32": 30.3 * T, TF32: 120 * T / 2, "bf16": 242 * T / 2, "fp16": 242 * T / 2,
                                     "fp8": 485 * T / 2}, 0.3e12,
            "https://www.nvidia.com/en-us/data-center/l4/")

TARGETS: dict[str, Target] = {t.name: t for t in (H100, H200, B200, A100, L4)}
