"""mptrain-estimate [OVERRIDES...]: the memory a run will need, per precision preset, before training it.

For each preset the run's components are built exactly as `mptrain OVERRIDES precision=<preset>` builds them
and one training step is measured: weights, gradients, optimizer state and fp32 master copies from the
tensors themselves (memory_per_param, after the step has created the optimizer state), and activations as
the bytes autograd keeps for backward in that step (each storage once, weights excluded; on CUDA also the
step's peak allocation). Nothing is written: no run directory, no checkpoint.

A preset the run refuses (`precision.layers` under master, nomaster or bf16_pure; fp8 without torchao ...) gets
a line under the table with training's own one-line reason; the others are estimated. Exit status 0 when at
least one preset was estimated; otherwise one error line (the reason, once, when every preset gave the same).

    mptrain-estimate model=gpt dataset=synthetic_tokens optimizer=adamw trainer.batch_size=64
    mptrain-estimate --presets fp32,bf16,bf16_pure model=hf_causal_lm dataset=tokens dataset.path=DIR
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException

from mptrain.cli.keys import check_override_keys
from mptrain.cli.register import CONFIG_NAME, register
from mptrain.config import validate
from mptrain.errors import ConfigError, MptrainError
from mptrain.precision.bf16_pure import memory_per_param
from mptrain.train.recipe import build
from mptrain.train.step import train_step

PRESETS = ("fp32", "amp", "bf16", "dynamic", "master", "bf16_pure")
MB = 2**20


def measure(overrides: list[str]) -> dict:
    """One preset: MB of weights, grads, optimizer state, masters, activations, and their total."""
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
    c = build(cfg)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    if c.device.type == "cuda":
        torch.cuda.synchronize(c.device)
        torch.cuda.reset_peak_memory_stats(c.device)
        before = torch.cuda.memory_allocated(c.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), c.precision.backend_flags():
        train_step(c, iter(c.train_loader), 1)
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
    return row


def estimate(presets: list[str], overrides: list[str]) -> tuple[dict[str, dict], dict[str, MptrainError]]:
    """(rows of the presets that can run, {preset: its refusal} for the others), in the order given."""
    rows, refused = {}, {}
    for preset in presets:
        try:
            rows[preset] = measure([*overrides, f"precision={preset}"])
        except MptrainError as e:  # this preset refuses the run as training would: the others still count
            refused[preset] = e
    return rows, refused


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mptrain-estimate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated (default {','.join(PRESETS)})")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for mptrain")
    args = ap.parse_intermixed_args(argv)  # options anywhere, as mptrain takes overrides: `model=gpt --presets fp32 k=v`
    log = logging.getLogger("mptrain")
    level = log.level
    log.setLevel(logging.WARNING)  # the builders' INFO lines, once per preset, say nothing here
    try:
        check_override_keys(args.overrides)  # a mistyped key or an unparsable rule: mptrain's own line
        rows, refused = estimate(args.presets.split(","), args.overrides)
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
    n = next(iter(rows.values()))["params"]
    cuda = any("cuda_step_peak" in r for r in rows.values())
    print(f"{n / 1e6:.2f}M parameters; MB per component (one measured step{', CUDA peak of the step' if cuda else ''})\n")
    cols = ["weights", "grads", "optimizer_state", "master", "compensation",
            *(["ema"] if any("ema" in r for r in rows.values()) else []), "activations", "total"]
    cols += ["cuda_step_peak"] if cuda else []
    print("| preset | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for preset, r in rows.items():
        print(f"| `{preset}` | " + " | ".join(f"{r.get(k, float('nan')):.1f}" for k in cols) + " |")
    if refused:
        print()
    for preset, e in refused.items():
        print(f"`{preset}` refused: {e}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
