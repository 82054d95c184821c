"""mptrain's loop against a handwritten PyTorch loop, side by side in one process.

For each precision recipe: the same model initialisation, data and batch, runs alternating between
(a) a plain loop written the way the PyTorch docs write it and (b) mptrain's own loop (the real
`mptrain.train.loop.fit`, built from the config) running the same kernels (trainer.conv_wgrad=native), then
(c) mptrain as it runs by default (on CPU: trainer.conv_wgrad=auto) and (d) Lightning where installed.
Steady-state speed = 1 / median step time after warm-up; mptrain / plain is the median over repeats of
the ratio within each repeat (the two runs sit next to each other, so slow drift of a shared machine
cancels). Also: diagnostics at the default interval, bf16 vs fp32, and activation memory (bytes autograd
saves for backward, per training step; max_memory_allocated on CUDA).

    python scripts/bench.py                     # CPU defaults: resnet18, 64x64 synthetic images, batch 64
    python scripts/bench.py --device cuda --image-size 224 --batch-size 256 --model resnet50 --fp16
    python scripts/bench.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# what the mptrain command does at start, done before torch allocates anything so both loops run with it
# (mptrain/cli/main.py); THP_MEM_ALLOC_ENABLE=0 python scripts/bench.py measures without
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from mptrain.cli.register import register  # noqa: E402
from mptrain.config import validate  # noqa: E402
from mptrain.precision import cast_model  # noqa: E402
from mptrain.run.writer import RunWriter  # noqa: E402
from mptrain.train.callbacks.metrics import MetricsLogger  # noqa: E402
from mptrain.train.loop import Callback, fit  # noqa: E402
from mptrain.train.recipe import backend_settings, build, seed_everything  # noqa: E402
from mptrain.train.state import TrainState  # noqa: E402
from mptrain.train.step import train_step  # noqa: E402

# ---- (a) the handwritten loops ---------------------------------------------------------------------

def plain_stepper(model, loader, device, recipe: str, dtype: torch.dtype, lr: float, n: int,
                  channels_last: bool = False):
    """The textbook loop for each recipe (PyTorch AMP docs; apex O2 for master weights), one step per next()."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if recipe == "master":
        cast_model(model, dtype)
        masters = [
            p.detach().clone().float().requires_grad_() if p.dtype != torch.float32 else p for p in model.parameters()
        ]
        pairs = [(p, m) for p, m in zip(model.parameters(), masters) if p is not m]
        opt = torch.optim.SGD(masters, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16 and recipe == "amp"))
    autocast = recipe == "amp" and dtype != torch.float32
    it = iter(loader)
    for _ in range(n):
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if recipe == "master":
            x = x.to(dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        if recipe == "master":
            (loss * 1024.0).backward()  # a static scale: the cheapest correct master recipe
            for p, m in pairs:
                m.grad = p.grad.float().mul_(1 / 1024.0)
                p.grad = None
            if all(torch.isfinite(m.grad).all() for m in masters if m.grad is not None):
                opt.step()
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
            opt.zero_grad(set_to_none=True)
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        yield


# ---- (b) mptrain's loop ----------------------------------------------------------------------------

def mptrain_components(overrides: list[str], n: int):
    cfg = compose("config", overrides=[*overrides, f"trainer.max_steps={n}"])
    validate(cfg)
    c = build(cfg)
    return cfg, c


def now() -> float:
    """A timestamp after the device's queued work has finished."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepTimer:
    def __init__(self):
        self.times: list[float] = []

    def __call__(self, *_):
        self.times.append(now())

    def rate(self, warmup: int) -> float:
        """Steps/s from the median step time after warm-up: one step slowed by a neighbour on a shared
        machine does not move it."""
        steps = [b - a for a, b in zip(self.times, self.times[1:])][warmup:]
        return 1 / statistics.median(steps)


class Hook(Callback):
    """Calls `fn(components)` after every step of fit()."""

    def __init__(self, fn):
        self.fn = fn

    def on_step_end(self, c, state, out) -> None:
        self.fn(c)


def fit_in(cfg, c, run_dir: Path, hook, diagnostics=None) -> None:
    """mptrain's real fit() writing its metric rows into run_dir, under the same backend settings a run
    applies (recipe.backend_settings), with `hook` after every step."""
    writer = RunWriter(run_dir, tensorboard=False)
    state = TrainState().to(c.device)
    t = cfg.trainer
    with c.precision.backend_flags(), backend_settings(t):
        fit(c, state, [MetricsLogger(writer, t.log_every), Hook(hook)], diagnostics, log_every=t.log_every,
            eval_every=t.eval_every)
    writer.close()


def run_mptrain(overrides, n, warmup, diagnostics: bool, tmp: Path) -> float:
    from mptrain.diagnostics import Diagnostics

    cfg, c = mptrain_components(overrides + ([] if diagnostics else ["diagnostics=off"]), n)
    diag = None
    if diagnostics:
        tmp.mkdir(parents=True, exist_ok=True)
        diag = Diagnostics(cfg.diagnostics, c.base_model, c.precision, tmp)
    timer = StepTimer()
    fit_in(cfg, c, tmp, timer, diag)
    return timer.rate(warmup)


def plain_loop(overrides, n, recipe, dtype):
    """The handwritten loop as a stepper, on a model and loader built like mptrain's (same init, same data)."""
    cfg, c = mptrain_components(overrides + ["diagnostics=off"], n)
    model = c.model
    if recipe == "master":  # build() cast it already; start again from an fp32 copy with the same init
        seed_everything(cfg.trainer.seed)
        from hydra.utils import instantiate

        model = instantiate(cfg.model).to(c.device)
    model.train()
    c.train_loader.sampler.set_epoch(0)
    return plain_stepper(model, c.train_loader, c.device, recipe, dtype, cfg.optimizer.lr, n,
                         channels_last=cfg.trainer.channels_last)


def run_plain(overrides, n, warmup, recipe, dtype) -> float:
    timer = StepTimer()
    for _ in plain_loop(overrides, n, recipe, dtype):
        timer()
    return timer.rate(warmup)


# ---- in lockstep: another loop's step inside each of mptrain's steps -----------------------------------

def take_turns(cfg, c, stepper, warmup: int) -> tuple[float, float]:
    """(mptrain's, the stepper's) median step seconds, the two taking turns step by step.

    mptrain's real fit() runs; its after_step hook runs one step of `stepper` (its own model and
    loader). The time between hooks is mptrain's step, the time inside is the other's: a neighbour on
    a shared machine slows both alike, and medians ignore single slow steps."""
    ours, theirs, last = [], [], [now()]

    def turn(_c):
        start = now()
        ours.append(start - last[0])
        next(stepper)
        last[0] = now()
        theirs.append(last[0] - start)

    with tempfile.TemporaryDirectory() as tmp:
        fit_in(cfg, c, Path(tmp), turn)
    return statistics.median(ours[warmup:]), statistics.median(theirs[warmup:])


def run_lockstep(overrides, n, warmup, recipe, dtype) -> tuple[float, float]:
    """(plain steps/s, mptrain steps/s), the handwritten loop and mptrain's taking turns."""
    stepper = plain_loop(overrides, n, recipe, dtype)
    cfg, c = mptrain_components(overrides + ["diagnostics=off"], n)
    ours, plain = take_turns(cfg, c, stepper, warmup)
    return 1 / plain, 1 / ours


def mptrain_stepper(c):
    """mptrain's step (the one train_step every caller uses, and the scheduler), one step per next():
    to pace another fit()."""
    c.model.train()
    c.train_loader.sampler.set_epoch(0)
    batches = iter(c.train_loader)
    for step in range(1, c.total_steps + 1):
        if train_step(c, batches, step).applied:
            c.scheduler.step()
        yield


def run_lockstep_precisions(overrides, low: list[str], n, warmup) -> float:
    """mptrain in precision `low` against mptrain in fp32, taking turns step by step: low / fp32 speed."""
    _, fp32_c = mptrain_components(overrides + ["precision=fp32", "diagnostics=off"], n)
    cfg, c = mptrain_components(overrides + low + ["diagnostics=off"], n)
    low_s, fp32_s = take_turns(cfg, c, mptrain_stepper(fp32_c), warmup)
    return fp32_s / low_s


# ---- (c) a peer: PyTorch Lightning's Trainer on the same work, where it is installed -----------------

def run_lightning(overrides, n, warmup, recipe, dtype) -> float | None:
    """Lightning's Trainer with the same model init, data, optimizer and precision (None if not installed
    or no Lightning equivalent: Lightning 2 has no fp32-master-weights mode like apex O2)."""
    try:
        import pytorch_lightning as pl
    except ImportError:
        return None
    if recipe == "master":
        return None
    cfg, c = mptrain_components(overrides + ["diagnostics=off"], n)
    channels_last, lr = cfg.trainer.channels_last, cfg.optimizer.lr
    net = c.model
    timer = StepTimer()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            x, y = batch
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return F.cross_entropy(self.net(x).float(), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)

        def on_train_batch_end(self, *args):
            timer()

    precision = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[dtype]
    trainer = pl.Trainer(max_steps=n, accelerator="gpu" if c.device.type == "cuda" else "cpu", devices=1,
                         precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    c.train_loader.sampler.set_epoch(0)
    trainer.fit(Module(), train_dataloaders=c.train_loader)
    return timer.rate(warmup)


# ---- the loop's own cost per step, on a model that costs almost nothing ------------------------------

def loop_overhead(args, recipes, tmp: Path) -> dict[str, tuple[float, float, float, float]]:
    """(plain us/step, mptrain us/step, median and largest difference) on a 48->16->10 MLP, batch 8.

    A step there is ~1 ms of framework work, so what mptrain adds per step (Python bookkeeping, the loss
    weighting, the step counters) is not lost in convolution time, and a fixed cost measured here bounds
    its share of any bigger step. Many short alternating runs; the median of per-run medians."""
    steps, warmup = 300, 20
    base = ["model=mlp", "model.width=16", "model.depth=1", "dataset=synthetic", "dataset.image_size=4",
            "trainer.batch_size=8", f"trainer.device={args.device}", "trainer.progress_bar=false",
            "trainer.tensorboard=false", "checkpoint.enabled=false", "scheduler=none", "trainer.log_every=1000000",
            f"dataset.train_size={8 * (steps + warmup + 2)}", "dataset.val_size=1", "trainer.eval_every=1000000",
            "diagnostics=off"]
    out = {}
    for label, ov, recipe, dtype in recipes:
        plain, ours = [], []
        for r in range(args.overhead_repeats):
            plain.append(1e6 / run_plain(base + ov, steps + warmup, warmup, recipe, dtype))
            ours.append(1e6 / run_mptrain(base + ov, steps + warmup, warmup, False, tmp / f"o{label}{r}"))
        diffs = [m - p for m, p in zip(ours, plain)]
        out[label] = (statistics.median(plain), statistics.median(ours), statistics.median(diffs), max(diffs))
        print("overhead", label, [round(v, 1) for v in out[label]], file=sys.stderr)
    return out


# ---- activation memory -----------------------------------------------------------------------------

def activation_bytes(overrides: list[str]) -> int:
    """Bytes autograd keeps for backward in one training forward (each storage counted once)."""
    cfg, c = mptrain_components(overrides + ["diagnostics=off"], 1)
    x, y = next(iter(c.train_loader))
    x = c.precision.cast_inputs(x.to(c.device))
    if c.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seen: dict[int, int] = {}

    def pack(t):
        # autocast's low-precision copies of the weights are weights, not activations
        fn = t.grad_fn if isinstance(t, torch.Tensor) else None
        is_weight_cast = fn is not None and type(fn).__name__ == "ToCopyBackward0" and any(
            nxt is not None and type(nxt).__name__ == "AccumulateGrad" for nxt, _ in fn.next_functions)
        if isinstance(t, torch.Tensor) and not is_weight_cast:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), c.precision.autocast():
        loss = F.cross_entropy(c.model(x).float(), y.to(c.device))
    params = {p.untyped_storage().data_ptr() for p in c.model.parameters()}
    if c.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        loss.backward()
        return peak
    loss.backward()
    return sum(v for k, v in seen.items() if k not in params)


# ---- the report ------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    thp = "on" if os.environ.get("THP_MEM_ALLOC_ENABLE") not in (None, "0") else "off"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}; torch {torch.__version__}; "
            f"huge pages for CPU tensors (THP_MEM_ALLOC_ENABLE) {thp}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run, after warm-up")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fp16", action="store_true", help="fp16 recipes (amp=fp16, master=fp16): for CUDA")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format (both loops)")
    ap.add_argument("--overhead-repeats", type=int, default=7, help="alternating runs of the tiny-model loop-cost test")
    ap.add_argument("--lockstep-repeats", type=int, default=3, help="runs of the two loops taking turns step by step")
    ap.add_argument("--only", choices=("lockstep", "overhead", "speedup"), help="run only this part")
    ap.add_argument("--write", type=Path, help="append the markdown tables to this file")
    args = ap.parse_args()

    low = "float16" if args.fp16 else "bfloat16"
    base = [f"model={args.model}", "dataset=synthetic", f"dataset.image_size={args.image_size}",
            f"trainer.batch_size={args.batch_size}", f"trainer.device={args.device}", "trainer.progress_bar=false",
            "trainer.tensorboard=false", "checkpoint.enabled=false", "scheduler=none", "trainer.log_every=1000000",
            f"dataset.train_size={args.batch_size * (args.steps + args.warmup + 2)}", "dataset.val_size=1",
            "trainer.eval_every=1000000", f"trainer.channels_last={args.channels_last}"]
    n = args.steps + args.warmup
    # (label, mptrain overrides, plain recipe, plain dtype)
    recipes = [
        ("fp32", ["precision=fp32"], "amp", torch.float32),
        ("bf16", ["precision=bf16"], "amp", torch.bfloat16),
        ("amp", ["precision=amp", f"precision.dtype={low}"], "amp", getattr(torch, low)),
        ("master", ["precision=master", f"precision.dtype={low}", "precision.loss_scale.kind=static",
                    "precision.loss_scale.init=1024"], "master", getattr(torch, low)),
    ]
    same = ["trainer.conv_wgrad=native"]  # the plain loop and Lightning run PyTorch's own kernels
    # low precision against fp32, both mptrain, taking turns step by step: (label, [precision, other overrides])
    speedup_arms = [("bf16 (mptrain default)", ["precision=bf16"]),
                    ("bf16 (conv_wgrad=native)", ["precision=bf16", "trainer.conv_wgrad=native"])]
    default_differs = args.device == "cpu"  # conv_wgrad only acts on CPU
    results = {}
    if args.only == "overhead":
        with initialize_config_dir(config_dir=register(), version_base="1.3"), tempfile.TemporaryDirectory() as tmp:
            for label, (p_us, m_us, diff, worst) in loop_overhead(args, recipes, Path(tmp)).items():
                print(f"{label}: plain {p_us:.0f} us/step, mptrain {m_us:.0f} us/step, difference {diff:+.0f} "
                      f"(largest {worst:+.0f})")
        return
    if args.only == "speedup":
        with initialize_config_dir(config_dir=register(), version_base="1.3"):
            for label, ov in speedup_arms:
                r = [
                    run_lockstep_precisions(base + ov[1:], ov[:1], n, args.warmup) for _ in range(args.lockstep_repeats)
                ]
                print(f"{label} vs fp32, lockstep: {statistics.median(r):.2f}x [{min(r):.2f}, {max(r):.2f}]")
        return
    if args.only == "lockstep":
        with initialize_config_dir(config_dir=register(), version_base="1.3"):
            for label, ov, recipe, dtype in recipes:
                pairs = [
                    run_lockstep(base + ov + same, n, args.warmup, recipe, dtype) for _ in range(args.lockstep_repeats)
                ]
                ratios = [m / p for p, m in pairs]
                print(f"{label}: plain {statistics.median(p for p, _ in pairs):.3f} steps/s, mptrain "
                      f"{statistics.median(m for _, m in pairs):.3f}, mptrain / plain {statistics.median(ratios):.3f} "
                      f"[{min(ratios):.3f}, {max(ratios):.3f}]")
        return
    with initialize_config_dir(config_dir=register(), version_base="1.3"), tempfile.TemporaryDirectory() as tmp:
        for label, ov, recipe, dtype in recipes:
            runs: dict[str, list[float]] = {"plain": [], "mptrain": [], "default": [], "lightning": [], "diag": []}
            for r in range(args.repeats):  # alternate, so drift hits all alike
                runs["plain"].append(run_plain(base + ov + same, n, args.warmup, recipe, dtype))
                runs["mptrain"].append(run_mptrain(base + ov + same, n, args.warmup, False, Path(tmp) / f"{label}{r}"))
                if default_differs:
                    runs["default"].append(run_mptrain(base + ov, n, args.warmup, False, Path(tmp) / f"a{label}{r}"))
                lightning = run_lightning(base + ov + same, n, args.warmup, recipe, dtype)
                if lightning is not None:
                    runs["lightning"].append(lightning)
                if label == "amp":
                    # sample every step here and scale the cost to the default interval (1 in 100) below
                    runs["diag"].append(
                        run_mptrain(
                            base + ov + same + ["diagnostics.every=1", "diagnostics.first_steps=0"],
                            n,
                            args.warmup,
                            True,
                            Path(tmp) / f"d{label}{r}",
                        )
                    )
            if not default_differs:
                runs["default"] = runs["mptrain"]
            lockstep = [
                run_lockstep(base + ov + same, n, args.warmup, recipe, dtype) for _ in range(args.lockstep_repeats)
            ]
            lock_ratios = [m / p for p, m in lockstep]
            paired = [m / p for m, p in zip(runs["mptrain"], runs["plain"])]
            res = {k: statistics.median(v) if v else math.nan for k, v in runs.items()}
            res.update(ratio=statistics.median(paired), ratio_lo=min(paired), ratio_hi=max(paired),
                       lock=statistics.median(lock_ratios), lock_lo=min(lock_ratios), lock_hi=max(lock_ratios))
            if runs["lightning"]:
                res["vs_lightning"] = statistics.median([m / p for m, p in zip(runs["mptrain"], runs["lightning"])])
            results[label] = res
            print(label, {k: round(v, 3) for k, v in res.items()}, file=sys.stderr)
        mem = {label: activation_bytes(base + ov) for label, ov, _, _ in recipes}
        overhead = loop_overhead(args, recipes, Path(tmp))
        speedups = {}
        for label, ov in speedup_arms:
            r = [run_lockstep_precisions(base + ov[1:], ov[:1], n, args.warmup) for _ in range(args.lockstep_repeats)]
            speedups[label] = (statistics.median(r), min(r), max(r))
            print("speedup", label, speedups[label], file=sys.stderr)

    fp32 = results["fp32"]
    lines = [
        f"Machine: {machine()}.",
        f"Workload: {args.model}, synthetic {args.image_size}x{args.image_size} images, batch {args.batch_size}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.repeats} alternating repeats"
        f"{', channels_last' if args.channels_last else ''}. Steps/s = 1 / median step time, median over repeats; "
        "mptrain / plain = median of the per-repeat ratios [lowest, highest]; lockstep = the two loops taking "
        f"turns step by step inside one run, median of {args.lockstep_repeats} runs [lowest, highest].",
        "",
        "| recipe | plain loop steps/s | mptrain, same kernels | mptrain / plain | mptrain / plain, lockstep "
        "| Lightning steps/s | mptrain / Lightning | mptrain default steps/s | vs fp32: plain | vs fp32: mptrain "
        "default "
        "| activation MB | vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        peer_cells = ("n/a | n/a" if math.isnan(r["lightning"]) else f"{r['lightning']:.3f} | {r['vs_lightning']:.3f}")
        lines.append(
            f"| `{label}` | {r['plain']:.3f} | {r['mptrain']:.3f} | {r['ratio']:.3f} [{r['ratio_lo']:.3f}, "
            f"{r['ratio_hi']:.3f}] | **{r['lock']:.3f}** [{r['lock_lo']:.3f}, {r['lock_hi']:.3f}] | {peer_cells} | "
            f"{r['default']:.3f} | {r['plain'] / fp32['plain']:.2f}x | "
            f"{r['default'] / fp32['default']:.2f}x | {mem[label] / 2**20:.1f} | {mem[label] / mem['fp32']:.2f} |"
        )
    lines += [
        "",
        "The loop's own cost per step, on a 48->16->10 MLP at batch 8 (a step is framework overhead and "
        f"little else; {args.overhead_repeats} alternating runs of 300 steps each; the median and the largest of the "
        "per-run differences; the largest as a share of this page's mptrain step above):",
        "",
        "| recipe | plain loop us/step | mptrain us/step | mptrain - plain, median | largest | largest / big step |",
        "|---|---|---|---|---|---|",
    ]
    for label, (p_us, m_us, diff, worst) in overhead.items():
        big_step_us = 1e6 / results[label]["mptrain"]
        lines.append(f"| `{label}` | {p_us:.0f} | {m_us:.0f} | {diff:+.0f} us | {worst:+.0f} us | "
                     f"{100 * worst / big_step_us:+.3f}% |")
    lines += [
        "",
        "Low precision against fp32, both mptrain, taking turns step by step (lockstep; the fp32 arm uses the "
        "same conv_wgrad setting): median of "
        f"{args.lockstep_repeats} runs [lowest, highest].",
        "",
        "| recipe | speed vs fp32 |",
        "|---|---|",
    ]
    for label, (mid, lo, hi) in speedups.items():
        lines.append(f"| `{label}` | **{mid:.2f}x** [{lo:.2f}, {hi:.2f}] |")
    every, amp = results["amp"]["diag"], results["amp"]["mptrain"]
    step_cost = 1 / every - 1 / amp  # extra seconds of one sampled step
    default_overhead = step_cost / 100 / (1 / amp)
    lines += ["", f"Diagnostics on `amp`: sampling every step runs at {every:.3f} steps/s ({every / amp:.2f}x); one "
              f"sampled step costs {1000 * step_cost:.0f} ms extra, so the default interval (1 step in 100) costs "
              f"{100 * default_overhead:.2f}% of steps/s.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
