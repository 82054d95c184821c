"""Where one CPU training step of resnet18 spends its time, per aten op (torch.profiler).

The profile behind docs/benchmarks.md's bf16-vs-fp32 section: the same step as scripts/bench.py (resnet18,
64x64 inputs, batch 64, fused SGD with momentum), in fp32 or under bf16 autocast, with PyTorch's own
convolution weight gradients or mptrain's forward form (mptrain/conv_wgrad.py).

    python scripts/profile_step.py --dtype bf16 --conv-wgrad native --channels-last
    ONEDNN_VERBOSE=1 python scripts/profile_step.py ... | grep exec    # which oneDNN kernels run
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the mptrain command does, before torch allocates

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from mptrain.library.models import conv_wgrad  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--conv-wgrad", choices=conv_wgrad.MODES, default="native")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="profiled steps (after 3 warm-up steps)")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    conv_wgrad.apply(model, args.conv_wgrad)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.dtype}, conv_wgrad={args.conv_wgrad}{', channels_last' if args.channels_last else ''}: "
          f"{total / args.steps / 1e3:.1f} ms of op time per step\n")
    print("| op (self time) | ms per step | share |")
    print("|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(
            f"| `{e.key}` | {e.self_cpu_time_total / args.steps / 1e3:.1f} | "
            f"{100 * e.self_cpu_time_total / total:.1f}% |"
        )


if __name__ == "__main__":
    main()
