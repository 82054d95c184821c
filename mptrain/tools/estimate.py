"""mptrain-estimate [OVERRIDES...]: the memory and the step time a run will need, per precision preset, before
training it.

For each preset the run's components are built exactly as `mptrain OVERRIDES precision=<preset>` builds them
and one training step is measured: weights, gradients, optimizer state and fp32 master copies from the
tensors themselves (memory_per_param, after the step has created the optimizer state), and activations as
the bytes autograd keeps for backward in that step (each storage once, weights excluded; on CUDA also the
step's peak allocation). Then `--steps` more steps are timed on this device (the median: the step time). With
`--json`, each planned layer is also timed alone in its format (forward+backward on the input shape it saw).
Nothing is written: no run directory, no checkpoint.

A preset the run refuses (`precision.layers` under master, nomaster or bf16_pure; fp8 without torchao ...) gets
a line under the table with training's own one-line reason; the others are estimated. Exit status 0 when at
least one preset was estimated; otherwise one error line (the reason, once, when every preset gave the same).

With `--target NAME` (h100, h200, b200, a100, l4) nothing runs on this device: each preset's memory and step time
are modeled for that GPU from the network built on the meta device (tools/modeled.py, precision/roofline.py).

    mptrain-estimate model=gpt dataset=synthetic_tokens optimizer=adamw trainer.batch_size=64
    mptrain-estimate --target h100 --presets bf16,fp8 model=gpt model.dim=4096 dataset.seq_len=2048
    mptrain-estimate --presets fp32,bf16,bf16_pure model=hf_causal_lm dataset=tokens dataset.path=DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException

from mptrain.cli.keys import check_override_keys
from mptrain.cli.register import register
from mptrain.config import CONFIG_NAME, validate
from mptrain.errors import ConfigError, MptrainError
from mptrain.precision import timing
from mptrain.precision.bf16_pure import memory_per_param
from mptrain.precision.families import ESTIMATED
from mptrain.precision.roofline import target as known_target
from mptrain.precision.roofline import targets
from mptrain.tools.modeled import MB, model_preset
from mptrain.train.recipe import build
from mptrain.train.step import train_step


def composed(overrides: list[str]):
    """The run's config as `mptrain OVERRIDES` composes and checks it, with nothing written (no diagnostics,
    checkpoints, progress bar or TensorBoard)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=register(), version_base="1.3"):
            cfg = compose(CONFIG_NAME, overrides=[*overrides, "diagnostics.enabled=false", "checkpoint.enabled=false",
                                                  "trainer.progress_bar=false", "trainer.tensorboard=false"])
    except HydraException as e:  # a bad value or group choice: Hydra's own first line, not its traceback
        raise ConfigError(str(e).splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


def endless(loader):
    """The loader's batches, epoch after epoch (a timing loop may outrun one epoch of a small dataset)."""
    while True:
        yield from loader


def measure(overrides: list[str], steps: int = 3, layers: bool = False) -> dict:
    """One preset: MB of weights, grads, optimizer state, masters, activations, and their total; the median
    seconds of `steps` timed steps; with `layers`, each planned layer's format, time alone and (Linear) shape."""
    c = build(composed(overrides))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    if c.device.type == "cuda":
        torch.cuda.synchronize(c.device)
        torch.cuda.reset_peak_memory_stats(c.device)
        before = torch.cuda.memory_allocated(c.device)
    inputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def pre_hook(module, args):
            if name not in inputs and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                inputs[name] = args[0].detach().float().clone()
        return pre_hook

    plan = c.precision.plan or {}
    hooks = [c.base_model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in plan] if layers else []
    batches = iter(c.train_loader)
    # one micro-batch: what backward keeps is freed after each micro-batch's backward, so the peak holds one
    # micro-batch's activations whatever trainer.accumulate_grad_batches is (counting all k added them up); and
    # within one micro-batch every saved tensor is alive at once, so no two share an address
    micro, c.accumulate = c.accumulate, 1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), c.precision.backend_flags():
        train_step(c, batches, 1)
    c.accumulate = micro
    for h in hooks:
        h.remove()
    params = list(c.base_model.parameters())
    held = {p.untyped_storage().data_ptr() for p in params}
    held |= {m.untyped_storage().data_ptr() for m in getattr(getattr(c.precision, "master", None), "masters", [])}
    n = sum(p.numel() for p in params)
    per = memory_per_param(params, c.optimizer, c.precision, c.ema.shadow if c.ema is not None else None)
    row = {k: per[k] * n / MB for k in ("weights", "grads", "optimizer_state", "master", "compensation", "ema")
           if k in per}
    row["activations"] = sum(v for k, v in seen.items() if k not in held) / MB
    row["total"] = sum(row.values())
    if c.device.type == "cuda":
        row["cuda_step_peak"] = (torch.cuda.max_memory_allocated(c.device) - before) / MB
    row["params"] = n
    row["device"] = str(c.device)
    with c.precision.backend_flags():  # the step time: the median of `steps` more steps (the first warmed up)
        row["step_time_s"] = timing.median_seconds(lambda: train_step(c, batches, 2), c.device, steps)
    if layers:
        row["layers"] = {}
        for name, e in plan.items():
            module = c.base_model.get_submodule(name)
            x = inputs.get(name)
            took = c.precision.time_formats(module, [e.format], x, steps) if x is not None else {}
            layer = {"format": e.format, "time_s": took.get(e.format)}
            if isinstance(module, torch.nn.Linear) and x is not None:
                layer["shape"] = {"M": x.numel() // x.shape[-1], "K": module.in_features, "N": module.out_features}
            row["layers"][name] = layer
    return row


def estimate(presets: list[str], overrides: list[str], steps: int = 3, layers: bool = False,
             target: str | None = None) -> tuple[dict[str, dict], dict[str, MptrainError]]:
    """(rows of the presets that can run, {preset: its refusal} for the others), in the order given; measured on
    this device, or with `target` modeled for that GPU (tools/modeled.py)."""
    rows, refused = {}, {}
    for preset in presets:
        try:
            if target is not None:
                rows[preset] = model_preset(composed([*overrides, f"precision={preset}"]), target)
                continue
            rows[preset] = measure([*overrides, f"precision={preset}"], steps, layers)
        except MptrainError as e:  # this preset refuses the run as training would: the others still count
            refused[preset] = e
    return rows, refused


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mptrain-estimate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(ESTIMATED), help=f"comma-separated (default {','.join(ESTIMATED)})")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per preset after the measured one (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object: step time, memory and each layer's "
                    "format, time and (Linear) shape, per preset")
    ap.add_argument("--target", help=f"model the step for this GPU instead of measuring here: {', '.join(targets())} "
                    "(the network built on the meta device; docs/precision.md \"Targets\")")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for mptrain")
    args = ap.parse_intermixed_args(
        argv
    )  # options anywhere, as mptrain takes overrides: `model=gpt --presets fp32 k=v`
    log = logging.getLogger("mptrain")
    level = log.level
    log.setLevel(logging.WARNING)  # the builders' INFO lines, once per preset, say nothing here
    try:
        check_override_keys(args.overrides)  # a mistyped key or an unparsable rule: mptrain's own line
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps}: give at least 1")
        if args.target is not None:
            known_target(args.target)  # an unknown name: one line naming the known ones
        rows, refused = estimate(args.presets.split(","), args.overrides, args.steps, args.json, args.target)
    except MptrainError as e:
        print(f"mptrain-estimate: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        log.setLevel(level)  # no state left behind in a process that goes on (tests, a notebook)
    if not rows:
        reasons = list(dict.fromkeys(str(e) for e in refused.values()))
        why = reasons[0] if len(reasons) == 1 else "every preset refused this run: " + "; ".join(
            f"precision={p}: {e}" for p, e in refused.items())
        print(f"mptrain-estimate: error: {why}", file=sys.stderr)
        return next(iter(refused.values())).exit_code
    if args.json:
        print(json.dumps({"target": args.target, "presets": {p: {
            "step_time_s": r["step_time_s"], "memory_mb": r["total"], "layers": r["layers"],
            **({"not_modeled": r["not_modeled"]} if "not_modeled" in r else {})} for p, r in rows.items()},
            "refused": {p: str(e) for p, e in refused.items()}}))
        return 0
    n = next(iter(rows.values()))["params"]
    cuda = any("cuda_step_peak" in r for r in rows.values())
    if args.target is None:
        peak = ", CUDA peak of the step" if cuda else ""
        print(f"{n / 1e6:.2f}M parameters; MB per component (one measured step{peak}), and the step time in "
              f"seconds on {next(iter(rows.values()))['device']} (the median of {args.steps})\n")
    else:
        print(f"{n / 1e6:.2f}M parameters; MB per component and the step time in seconds, modeled for "
              f"{next(iter(rows.values()))['device']} (the GEMMs of Linear and Conv2d layers and the optimizer pass; "
              "--json lists what is not modeled)\n")
    cols = ["weights", "grads", "optimizer_state", "master", "compensation",
            *(["ema"] if any("ema" in r for r in rows.values()) else []), "activations", "total"]
    cols += (["cuda_step_peak"] if cuda else []) + ["step_time_s"]
    print("| preset | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for preset, r in rows.items():
        time = ".4g" if args.target else ".4f"  # a target's steps take microseconds to seconds
        print(f"| `{preset}` | " + " | ".join(f"{r.get(k, float('nan')):{time if k == 'step_time_s' else '.1f'}}"
                                             for k in cols) + " |")
    for preset, r in rows.items():  # a target's model: the formats this machine itself would only emulate
        emulated = sorted({v["format"] for v in r.get("layers", {}).values() if v.get("emulated_here")})
        if args.target and emulated:
            print(f"`{preset}`: {', '.join(emulated)} modeled at {args.target}'s native rate; a run of it here "
                  f"executes emulated")
    if refused:
        print()
    for preset, e in refused.items():
        print(f"`{preset}` refused: {e}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
