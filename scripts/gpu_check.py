"""The GPU check (scripts/gpu_check.sh runs it, offline, in under 8 minutes on one H200).

1. A smoke run of every precision preset through the real recipe (a small GPT, diagnostics on, checkpoints,
   validation), with torch.cuda.set_sync_debug_mode("warn"): each row counts the host synchronisations the run
   made, so a sync that slipped into the step shows.
2. ResNet-50 on synthetic 224x224 images at a batch that fills the GPU, every recipe side by side.
3. A GPT (dim 2048) compiled in bf16 and fp8 (tensorwise, rowwise; needs torchao).

Timing: each step's end is marked with a CUDA event (no per-step synchronisation); the warm-up steps
(compile, cuDNN autotuning) and any step whose interval holds a validation are left out; the median step
time is reported. Data come through the run's own DataLoader (workers, pinned memory), as in a real run.
The tables are the last output (markdown for docs/benchmarks.md's GPU section); --json writes every figure.
`--cpu` rehearses the whole script on CPU at toy sizes (no figure from it means anything).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python3 scripts/gpu_check.py` puts scripts/ first, not the repository
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from mptrain.cli.register import register  # noqa: E402
from mptrain.config import validate  # noqa: E402
from mptrain.train.loop import Callback, fit  # noqa: E402
from mptrain.train.recipe import backend_settings, build, run  # noqa: E402
from mptrain.train.state import TrainState  # noqa: E402

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "precision").glob("*.yaml"))
RESNET_RECIPES = [
    ("fp32 (TF32 off)", ["precision=fp32", "trainer.allow_tf32=false"]),
    ("fp32 (TF32 on)", ["precision=fp32", "trainer.allow_tf32=true"]),
    ("amp (fp16)", ["precision=amp", "precision.dtype=float16"]),
    ("bf16", ["precision=bf16"]),
    ("master (fp16)", ["precision=master"]),
    ("bf16_pure", ["precision=bf16_pure"]),
]
GPT_RECIPES = [
    ("bf16 (compiled)", ["precision=bf16"]),
    ("fp8 tensorwise (compiled)", ["precision=fp8"]),
    ("fp8 rowwise (compiled)", ["precision=fp8", "precision.fp8.recipe=rowwise"]),
]
SMOKE = ["model.dim=256", "model.layers=4", "model.heads=4", "dataset.seq_len=256"]
SMOKE_CPU = ["model.dim=32", "model.layers=2", "model.heads=2", "dataset.seq_len=16"]
QUIET = ["trainer.progress_bar=false", "trainer.tensorboard=false", "scheduler=none"]


class StepTimer(Callback):
    """Marks each step's end (a CUDA event, or the host clock on CPU); intervals holding a validation are
    marked so they can be left out."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.with_validation: set[int] = set()

    def on_validation_end(self, c, state, metrics) -> None:
        self.with_validation.add(len(self.marks))  # the interval ending at the next mark

    def on_step_end(self, c, state, out) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        """Seconds per step after `warmup` steps, validations left out (synchronises once)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for i in range(max(warmup, 1), len(self.marks)):
            if i in self.with_validation:
                continue
            a, b = self.marks[i - 1], self.marks[i]
            out.append(a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return out


def measure(overrides: list[str], steps: int, warmup: int) -> dict:
    cfg = compose("config", overrides=[*overrides, f"trainer.max_steps={steps + warmup}"])
    validate(cfg)
    c = build(cfg)
    timer = StepTimer(c.device)
    if c.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with c.precision.backend_flags(), backend_settings(cfg.trainer):
        fit(c, TrainState().to(c.device), [timer], log_every=cfg.trainer.log_every)
    times = timer.step_times(warmup)
    step = statistics.median(times)
    r = {"step_s": step, "samples_per_s": cfg.trainer.batch_size / step, "timed_steps": len(times),
         "spread": (max(times) - min(times)) / step if times else None,
         "skipped": c.precision.skipped_steps, "scale": c.precision.loss_scale}
    if c.device.type == "cuda":
        r["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        r["reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    del c
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return r


def guarded(name: str, fn, deadline: float) -> dict:
    """One row: its figures, or why it has none (out of memory, an error, no time left)."""
    if time.monotonic() > deadline:
        return {"error": "left out: the time budget was spent"}
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    except Exception as e:  # a row that fails must not take the others with it
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"}
    finally:
        print(f"gpu_check: {name} done", file=sys.stderr, flush=True)


def smoke(preset: str, args, tmp: Path) -> dict:
    """The whole recipe (summary.json included) on a small GPT; host syncs counted by PyTorch's sync debug mode."""
    size = SMOKE_CPU if args.cpu else SMOKE
    cfg = compose("config", overrides=[
        "model=gpt", "dataset=synthetic_tokens", *size, "dataset.vocab_size=512", "dataset.train_tokens=200000",
        "dataset.val_tokens=20000", f"precision={preset}", f"trainer.device={args.device}", "trainer.batch_size=16",
        f"trainer.max_steps={args.smoke_steps}", "trainer.log_every=10", "trainer.eval_every=20",
        "checkpoint.every_steps=20", *QUIET, "optimizer=adamw", "optimizer.lr=1e-3"])
    validate(cfg)
    cuda = args.device == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            summary = run(cfg, tmp / f"smoke_{preset}")
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    torch._dynamo.reset()
    return {"status": summary["status"], "steps": summary["steps"], "skipped": summary["skipped_steps"],
            "val_loss": summary.get("val/loss"), "samples_per_s": summary.get("samples_per_s"),
            "peak_mb": summary.get("peak_memory_mb"), "syncs": syncs if cuda else None,
            "syncs_per_step": syncs / summary["steps"] if cuda and summary["steps"] else None}


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"\n{title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(r: dict, key: str, spec: str, ref: dict | None = None) -> str:
    if "error" in r:
        return "-"
    v = r.get(key)
    if v is None:
        return "-"
    return f"{v / ref[key]:{spec}}x" if ref is not None and ref.get(key) else f"{v:{spec}}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="rehearse on CPU at toy sizes")
    ap.add_argument("--budget-s", type=float, default=440, help="rows that would start later are left out")
    ap.add_argument("--smoke-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=25, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=512, help="ResNet-50 batch (512: about half an H200 in fp32)")
    ap.add_argument("--gpt-batch", type=int, default=16)
    ap.add_argument("--only", default="smoke,resnet,gpt")
    ap.add_argument("--presets", default=",".join(PRESETS), help="the smoke run's presets (default: every one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible (--cpu rehearses on CPU)")
    deadline = time.monotonic() + args.budget_s
    only = set(args.only.split(","))
    results: dict = {"device": torch.cuda.get_device_name() if not args.cpu else "cpu (rehearsal)",
                     "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    out: list[str] = []
    with initialize_config_dir(config_dir=register(), version_base="1.3"), tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "smoke" in only:
            rows = {
                p: guarded(f"smoke {p}", lambda p=p: smoke(p, args, tmp), deadline) for p in args.presets.split(",")
            }
            results["smoke"] = rows
            out.append(table(f"Smoke run of every preset: GPT {' '.join(SMOKE_CPU if args.cpu else SMOKE)}, "
                             f"{args.smoke_steps} steps, diagnostics on, sync debug mode 'warn'",
                             ["preset", "status", "skipped", "val loss", "samples/s", "peak MB", "host syncs",
                              "syncs/step"],
                             [[p, r.get("status", r.get("error")), fmt(r, "skipped", "d"), fmt(r, "val_loss", ".3f"),
                               fmt(r, "samples_per_s", ".0f"), fmt(r, "peak_mb", ".0f"), fmt(r, "syncs", "d"),
                               fmt(r, "syncs_per_step", ".2f")] for p, r in rows.items()]))
        if "resnet" in only:
            bs = 8 if args.cpu else args.batch_size
            size = 32 if args.cpu else 224
            model = "resnet18" if args.cpu else "resnet50"
            base = [f"model={model}", *(["model.small_input=true"] if args.cpu else []), "dataset=synthetic",
                    f"dataset.image_size={size}", "dataset.num_classes=1000",
                    f"dataset.train_size={bs * (args.steps + args.warmup + 1)}", "dataset.val_size=1",
                    "dataset.pool_size=512", f"trainer.batch_size={bs}", f"trainer.device={args.device}",
                    f"trainer.channels_last={not args.cpu}", "trainer.log_every=1000000",
                    "trainer.eval_every=1000000", "checkpoint.enabled=false", "diagnostics=off", *QUIET,
                    f"trainer.num_workers={0 if args.cpu else 6}"]
            rows = {n: guarded(f"resnet {n}", lambda ov=ov: measure(base + ov, args.steps, args.warmup), deadline)
                    for n, ov in RESNET_RECIPES}
            results["resnet"] = rows
            ref = rows[RESNET_RECIPES[0][0]]
            ref = ref if "error" not in ref else None
            out.append(table(f"{model}, synthetic {size}x{size}, batch {bs}, median of {args.steps} steps after "
                             f"{args.warmup} warm-up ({'host clock' if args.cpu else 'CUDA events'})",
                             ["recipe", "images/s", "vs fp32 (TF32 off)", "peak GiB", "reserved GiB", "vs fp32",
                              "skipped", "final scale"],
                             [[n, r.get("error") or fmt(r, "samples_per_s", ".0f"), fmt(r, "samples_per_s", ".2f", ref),
                               fmt(r, "peak_gb", ".1f"), fmt(r, "reserved_gb", ".1f"), fmt(r, "peak_gb", ".2f", ref),
                               fmt(r, "skipped", "d"), fmt(r, "scale", "g")] for n, r in rows.items()]))
        if "gpt" in only:
            import importlib.util

            recipes = GPT_RECIPES if importlib.util.find_spec("torchao") else GPT_RECIPES[:1]
            dim, layers, heads, seq, batch = (64, 2, 2, 32, 4) if args.cpu else (2048, 8, 16, 1024, args.gpt_batch)
            base = ["model=gpt", f"model.dim={dim}", f"model.layers={layers}", f"model.heads={heads}",
                    "model.dropout=0.0", "dataset=synthetic_tokens", "dataset.vocab_size=32768",
                    f"dataset.seq_len={seq}", f"dataset.train_tokens={batch * seq * (args.steps + args.warmup + 2)}",
                    f"dataset.val_tokens={seq + 1}", f"trainer.batch_size={batch}", f"trainer.device={args.device}",
                    "trainer.compile=true", "trainer.log_every=1000000", "trainer.eval_every=1000000",
                    "checkpoint.enabled=false", "diagnostics=off", *QUIET, "optimizer=adamw", "optimizer.lr=1e-4"]
            rows = {n: guarded(f"gpt {n}", lambda ov=ov: measure(base + ov, args.steps, args.warmup), deadline)
                    for n, ov in recipes}
            for r in rows.values():
                if "samples_per_s" in r:
                    r["tokens_per_s"] = r["samples_per_s"] * seq
            results["gpt"] = rows
            ref = rows[recipes[0][0]]
            ref = ref if "error" not in ref else None
            out.append(table(f"GPT dim {dim}, {layers} layers, seq {seq}, batch {batch}, vocab 32768, AdamW, compiled; "
                             f"median of {args.steps} steps after {args.warmup} warm-up",
                             ["recipe", "tokens/s", "vs bf16", "peak GiB", "reserved GiB", "vs bf16"],
                             [[n, r.get("error") or fmt(r, "tokens_per_s", ".0f"), fmt(r, "tokens_per_s", ".2f", ref),
                               fmt(r, "peak_gb", ".1f"), fmt(r, "reserved_gb", ".1f"), fmt(r, "peak_gb", ".2f", ref)]
                              for n, r in rows.items()]))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{results['device']}, torch {torch.__version__}")
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()
