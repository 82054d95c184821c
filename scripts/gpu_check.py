"""ResNet-50 on synthetic 224x224 images, batch 256, on one GPU: every precision recipe side by side.

Prints images/s (steady state, warm-up excluded), peak memory and skipped steps per recipe, and the
ratios to fp32. Then (--fp8, on by default where torchao is installed) a GPT in bf16 against fp8: ResNet-50
has a single Linear layer, the head, which fp8 keeps in bf16, so fp8 is measured on transformer blocks.
Run through scripts/gpu_check.sh (under 10 minutes on an H200).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mptrain.cli.register import register
from mptrain.config import validate
from mptrain.run.writer import RunWriter
from mptrain.train.callbacks.metrics import MetricsLogger
from mptrain.train.loop import Callback, fit
from mptrain.train.recipe import backend_settings, build
from mptrain.train.state import TrainState

RECIPES = [
    ("fp32 (TF32 off)", ["precision=fp32", "trainer.allow_tf32=false"]),
    ("fp32 (TF32 on)", ["precision=fp32", "trainer.allow_tf32=true"]),
    ("amp (fp16)", ["precision=amp", "precision.dtype=float16"]),
    ("bf16", ["precision=bf16"]),
    ("master (fp16)", ["precision=master"]),
]


# A GPT whose Linear layers are large enough for fp8 GEMMs to pay (dim 2048: 2048x6144 qkv, 2048x8192 MLP),
# compiled in both rows (torchao's fp8 casts are meant to be fused by torch.compile).
FP8_RECIPES = [
    ("bf16 (compiled)", ["precision=bf16"]),
    ("fp8 tensorwise (compiled)", ["precision=fp8"]),
    ("fp8 rowwise (compiled)", ["precision=fp8", "precision.fp8.recipe=rowwise"]),
]


def measure(overrides: list[str], steps: int, warmup: int, tmp: Path) -> dict:
    cfg = compose("config", overrides=[*overrides, f"trainer.max_steps={steps + warmup}"])
    validate(cfg)
    c = build(cfg)
    times: list[float] = []

    class Timer(Callback):
        def on_step_end(self, c, state, out) -> None:
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    torch.cuda.reset_peak_memory_stats()
    writer = RunWriter(tmp, tensorboard=False)
    with c.precision.backend_flags(), backend_settings(cfg.trainer):
        fit(c, TrainState().to(c.device), [MetricsLogger(writer, cfg.trainer.log_every), Timer()],
            log_every=cfg.trainer.log_every)
    writer.close()
    t = times[warmup:]
    return {"images_per_s": (len(t) - 1) * cfg.trainer.batch_size / (t[-1] - t[0]),
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
            "skipped": c.precision.scaler.skipped if c.precision.scaler else 0,
            "scale": c.precision.loss_scale}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--channels-last", action="store_true", default=True)
    ap.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True, help="also the GPT bf16/fp8 table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible")
    base = ["model=resnet50", "dataset=synthetic", "dataset.image_size=224", "dataset.num_classes=1000",
            f"dataset.train_size={args.batch_size * (args.steps + args.warmup + 1)}", "dataset.val_size=1",
            "dataset.pool_size=512", f"trainer.batch_size={args.batch_size}", "trainer.device=cuda",
            f"trainer.channels_last={args.channels_last}", "trainer.progress_bar=false", "trainer.tensorboard=false",
            "trainer.log_every=1000000", "trainer.eval_every=1000000", "checkpoint.enabled=false", "diagnostics=off",
            "scheduler=none", "trainer.num_workers=0"]
    rows = []
    with initialize_config_dir(config_dir=register(), version_base="1.3"), tempfile.TemporaryDirectory() as tmp:
        for name, ov in RECIPES:
            r = measure(base + ov, args.steps, args.warmup, Path(tmp) / name.replace(" ", "_"))
            rows.append((name, r))
            print(f"{name}: {r}", file=sys.stderr, flush=True)
    ref = rows[0][1]
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; ResNet-50, synthetic 224x224, "
          f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, channels_last={args.channels_last}\n")
    print("| recipe | images/s | vs fp32 (TF32 off) | peak memory GiB | vs fp32 | skipped steps | final loss scale |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['images_per_s']:.0f} | {r['images_per_s'] / ref['images_per_s']:.2f}x | {r['peak_gb']:.1f} | "
              f"{r['peak_gb'] / ref['peak_gb']:.2f} | {r['skipped']} | {r['scale']:g} |")
    if args.fp8:
        fp8_table(args)


def fp8_table(args) -> None:
    """bf16 vs fp8 on a GPT (torchao's real fp8 kernels need CUDA capability 8.9+: H100/H200)."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        print("\nfp8: torchao is not installed (pip install mptrain[fp8]); no fp8 table", flush=True)
        return
    batch, seq = 8, 1024
    steps = 30
    base = ["model=gpt", "model.dim=2048", "model.layers=8", "model.heads=16", "model.dropout=0.0",
            "dataset=synthetic_tokens", "dataset.vocab_size=32768", f"dataset.seq_len={seq}",
            f"dataset.train_tokens={batch * seq * (steps + args.warmup + 2)}", f"dataset.val_tokens={seq + 1}",
            f"trainer.batch_size={batch}", "trainer.device=cuda", "trainer.compile=true", "trainer.progress_bar=false",
            "trainer.tensorboard=false", "trainer.log_every=1000000", "trainer.eval_every=1000000",
            "checkpoint.enabled=false", "diagnostics=off", "scheduler=none", "optimizer=adamw", "optimizer.lr=1e-4"]
    rows = []
    with initialize_config_dir(config_dir=register(), version_base="1.3"), tempfile.TemporaryDirectory() as tmp:
        for name, ov in FP8_RECIPES:
            r = measure(base + ov, steps, args.warmup, Path(tmp) / name.split()[0])
            r["tokens_per_s"] = r.pop("images_per_s") * seq
            rows.append((name, r))
            print(f"{name}: {r}", file=sys.stderr, flush=True)
            torch._dynamo.reset()
    ref = rows[0][1]
    print(f"\nGPT dim 2048, 8 layers, seq {seq}, batch {batch}, vocab 32768, AdamW; {args.warmup} warm-up + {steps} "
          "timed steps\n")
    print("| recipe | tokens/s | vs bf16 | peak memory GiB | vs bf16 |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {r['peak_gb']:.1f} | "
              f"{r['peak_gb'] / ref['peak_gb']:.2f} |")


if __name__ == "__main__":
    main()
