"""precision=bf16_pure's optimizer step against PyTorch's fp32 AdamW/SGD, side by side in one process.

The optimizer step alone (gradients set once, no forward/backward), for a few model sizes split into a few
tensors of equal size: PyTorch's fp32 optimizer (foreach and fused) on fp32 copies of the weights, and
`PureBf16AdamW`/`PureBf16SGD` with update=nearest|stochastic|kahan on bf16 weights. Each repeat runs every arm
for a step in turn; a ratio is arm time / torch-foreach time within one repeat (neighbours in time, so a
shared machine's drift cancels), and the table shows the median over repeats and the ratio of the best times.

    python scripts/bench_bf16_pure.py --compile                    # CPU: 1M, 4M, 16M params in 10 and 50 tensors
    python scripts/bench_bf16_pure.py --device cuda --sizes 16M,64M,256M --tensors 50,500
    PYTHONPATH=/tmp/old python scripts/bench_bf16_pure.py          # another checkout's mptrain (before/after)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the mptrain command does, before torch allocates

import torch  # noqa: E402

import mptrain  # noqa: E402
from mptrain.precision.bf16_pure import UPDATES, PureBf16AdamW, PureBf16SGD  # noqa: E402


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def make_arms(name: str, n: int, k: int, device: torch.device, compile: bool) -> dict:
    """Optimizers over `k` tensors of n/k elements each, gradients attached. Every arm has its own weights."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(n // k, generator=gen) for _ in range(k)]
    grads = [torch.randn(n // k, generator=gen) * 1e-2 for _ in range(k)]

    def params(dtype):
        ps = [torch.nn.Parameter(b.to(device, dtype)) for b in base]
        for p, g in zip(ps, grads):
            p.grad = g.to(device, dtype)
        return ps

    kw = dict(lr=1e-3, weight_decay=0.01) if name == "adamw" else dict(lr=1e-2, momentum=0.9, nesterov=True)
    torch_cls = torch.optim.AdamW if name == "adamw" else torch.optim.SGD
    pure_cls = PureBf16AdamW if name == "adamw" else PureBf16SGD
    arms = {"torch fp32 foreach": torch_cls(params(torch.float32), foreach=True, **kw)}
    try:
        arms["torch fp32 fused"] = torch_cls(params(torch.float32), fused=True, **kw)
    except (RuntimeError, ValueError):  # no fused kernel for this device
        pass
    for update in UPDATES:
        arms[f"bf16_pure {update}"] = pure_cls(params(torch.bfloat16), update=update, seed=0, **kw)
    for update in UPDATES if compile else ():
        arms[f"bf16_pure {update} compiled"] = pure_cls(
            params(torch.bfloat16), update=update, seed=0, compile=True, **kw
        )
    return arms


def step_time(opt, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # the steps are queued: wait for them before reading the clock
    return (time.perf_counter() - start) / steps


def measure(arms: dict, repeats: int, steps: int, device: torch.device) -> dict:
    """Per arm: median and best seconds per step, median ratio to torch foreach and the ratio of the bests
    (on a contended machine the best is the closest to the uncontended speed)."""
    for opt in arms.values():  # warm-up: lazy state, allocator, kernels
        step_time(opt, 2, device)
    times = {name: [] for name in arms}
    for _ in range(repeats):
        for name, opt in arms.items():
            times[name].append(step_time(opt, steps, device))
    ref = times["torch fp32 foreach"]
    return {name: (statistics.median(t), min(t), statistics.median(a / b for a, b in zip(t, ref)), min(t) / min(ref))
            for name, t in times.items()}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--sizes", default="1M,4M,16M", help="parameters per model, comma-separated (K, M, G)")
    ap.add_argument("--tensors", default="10,50", help="tensors per model, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=1, help="steps per arm per repeat")
    ap.add_argument("--compile", action="store_true", help="also the compile=True optimizers (needs a C++ compiler)")
    args = ap.parse_args()
    device = torch.device(args.device)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {torch.get_num_threads()} threads"
    )
    print(f"# {args.optimizer} step alone, {where}, torch {torch.__version__}, mptrain from {mptrain.__file__}")
    print(f"# {args.repeats} repeats x {args.steps} steps per arm, arms in turn; ratio = time / torch fp32 foreach time"
          " (lower is faster): median of the ratios within a repeat, and best / best")
    print()
    print("| params | tensors | arm | ms/step median | ms/step best | steps/s (best) | ratio median | ratio best |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for k in (int(t) for t in args.tensors.split(",")):
            arms = make_arms(args.optimizer, parse_size(size), k, device, args.compile)
            for name, (med, best, ratio, ratio_best) in measure(arms, args.repeats, args.steps, device).items():
                print(f"| {size} | {k} | {name} | {med * 1e3:.1f} | {best * 1e3:.1f} | {1 / best:.1f} | {ratio:.2f} "
                      f"| {ratio_best:.2f} |", flush=True)
            del arms


if __name__ == "__main__":
    main()
