"""Where does the forward-form weight gradient beat oneDNN's own on this CPU? (mptrain/conv_wgrad.py)

Times, for the 3x3 convolutions of ResNet shapes (stride 1, and the stride-2 ones that halve the map), the
native weight gradient
(aten::convolution_backward for the weight only) against the forward form, in fp32 and bf16, and prints
the largest map size up to which the forward form wins at every width: compare with
mptrain.library.models.conv_wgrad.AUTO_MAX_PIXELS.

    python scripts/conv_wgrad.py [--batch-size 64] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def time_both(x, w, dy, stride: int, repeats: int) -> tuple[float, float]:
    """(native, forward form) weight-gradient milliseconds for a 3x3, padding 1 convolution."""
    native = median_ms(lambda: torch.ops.aten.convolution_backward(
        dy, x, w, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]), repeats)
    forward = median_ms(lambda: F.conv2d(x.transpose(0, 1), dy.transpose(0, 1), None, 1, 1, stride)[:, :, :3, :3],
                        repeats)
    return native, forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    n = args.batch_size
    # (input channels, output channels, output map side, stride)
    shapes = [(512, 512, 2, 1), (256, 256, 2, 1), (256, 512, 2, 2), (512, 512, 4, 1), (256, 256, 4, 1),
              (128, 128, 4, 1), (128, 256, 4, 2), (256, 256, 8, 1), (128, 128, 8, 1), (64, 64, 8, 1),
              (64, 128, 8, 2), (128, 128, 16, 1), (64, 64, 16, 1)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {n}, 3x3 padding 1, channels_last\n")
    print("| dtype | channels in -> out | stride | output map | native wgrad ms | forward form ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    wins: dict[torch.dtype, dict[int, bool]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        for c_in, c_out, h, stride in shapes:
            cl = torch.channels_last
            x = torch.randn(n, c_in, h * stride, h * stride).to(dtype).contiguous(memory_format=cl)
            w = torch.randn(c_out, c_in, 3, 3).to(dtype).contiguous(memory_format=cl)
            dy = torch.randn(n, c_out, h, h).to(dtype).contiguous(memory_format=cl)
            native, forward = time_both(x, w, dy, stride, args.repeats)
            won = wins.setdefault(dtype, {})
            won[h * h] = won.get(h * h, True) and forward < native
            print(f"| {str(dtype).removeprefix('torch.')} | {c_in} -> {c_out} | {stride} | {h}x{h} | {native:.2f} | "
                  f"{forward:.2f} | {native / forward:.2f}x |")
    print()
    for dtype, won in wins.items():
        limit = 0
        for pixels in sorted(won):
            if not won[pixels]:
                break
            limit = pixels
        print(f"{str(dtype).removeprefix('torch.')}: the forward form wins at every width and stride up to {limit} "
              "output pixels")


if __name__ == "__main__":
    main()
