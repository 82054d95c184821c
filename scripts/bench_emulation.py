"""What emulating a format costs: one Linear's forward + backward, plain (fp32, and bf16 autocast) against the
same layer emulated in each block format (mptrain/precision/convert.py), interleaved in one process.

Each repeat times every variant once, in turn, so a shared machine's drift cancels in the ratios; the figure is
the median over repeats of (emulated step time / fp32 step time). Emulation is for studying numerics, not speed:
the quantizers are plain PyTorch ops.

    python scripts/bench_emulation.py                       # 256 x 1024 @ 1024, CPU
    python scripts/bench_emulation.py --rows 4096 --features 4096 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from mptrain.precision.convert import _emulated
from mptrain.precision.formats import BUILTINS


def step(layer: nn.Module, x: torch.Tensor, autocast: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().sum().backward()
    layer.weight.grad = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    base = nn.Linear(args.features, args.features).to(dev)
    x = torch.randn(args.rows, args.features, device=dev, requires_grad=True)
    variants = {"fp32": (base, False), "bf16 autocast": (base, True)}
    for name in ("fp8", "mxfp8", "mxfp6_e2m3", "mxfp4", "nvfp4"):
        variants[f"{name} emulated"] = (_emulated(base, BUILTINS.get(name), BUILTINS.get(name).grad_format), False)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for layer, ac in variants.values():
        step(layer, x, ac)  # warm-up
    for _ in range(args.repeats):
        for name, (layer, ac) in variants.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(layer, x, ac)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    print(f"Linear {args.features}x{args.features}, batch {args.rows}, {dev}, {args.repeats} repeats")
    print("| variant | step ms (median) | vs fp32 |\n|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(t / f for t, f in zip(ts, times["fp32"]))
        print(f"| {name} | {1000 * statistics.median(ts):.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
