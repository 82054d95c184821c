"""`mptrain-report RUN_DIR`: plots of a run's precision diagnostics in RUN_DIR/report/.

(a) activation_gradients.png  activation-gradient exponent histogram with FP16's ranges shaded (paper Fig. 3)
(b) loss_scale.png            loss and loss scale over steps, skipped steps marked
(c) underflow_heatmap.png     per-layer fraction of gradients that FP16 flushes to zero, over time
(d) update_underflow.png      per-layer fraction of weight updates too small to change an FP16 weight
and a table of the layers at most risk.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..jsonl import read_jsonl
from .stats import EXPONENTS


class NotARun(Exception):
    pass


def load_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    metrics, diag = run_dir / "metrics.jsonl", run_dir / "diagnostics.jsonl"
    if not run_dir.is_dir() or not metrics.is_file():
        raise NotARun(f"{run_dir} is not an mptrain run directory (no metrics.jsonl); pass outputs/<date>/<time>-<id>")
    if not diag.is_file():
        raise NotARun(f"{run_dir} has no diagnostics.jsonl: it ran with diagnostics=off; rerun with diagnostics=default")
    return read_jsonl(metrics), read_jsonl(diag)


def _shade_fp16(ax) -> None:
    """FP16's ranges on a log2 axis: underflow (< 2^-24), subnormal, normal, overflow (> 65504)."""
    ax.axvspan(EXPONENTS[0] - 1, -24, color="tab:red", alpha=0.12, label="underflows to 0 in fp16 (< 2^-24)")
    ax.axvspan(-24, -14, color="tab:orange", alpha=0.15, label="fp16 subnormal [2^-24, 2^-14)")
    ax.axvspan(-14, math.log2(65504), color="tab:green", alpha=0.08, label="fp16 normal")
    ax.axvspan(math.log2(65504), EXPONENTS[-1] + 2, color="tab:purple", alpha=0.12, label="overflows (> 65504)")


def plot_activation_gradients(samples: list[dict], path: Path, meta: dict) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    _shade_fp16(ax)
    x = np.array([EXPONENTS[0] - 1] + EXPONENTS + [EXPONENTS[-1] + 1]) + 0.5
    layers = meta.get("activation_layers", [])
    total = None
    zero_all, count_all = 0, 0
    for layer in layers:
        hists = [np.array(s["activations"][layer]["hist"][: len(x)]) for s in samples if layer in s.get("activations", {})]
        if not hists:
            continue
        h = np.sum(hists, axis=0)
        full = np.sum([s["activations"][layer]["hist"] for s in samples if layer in s.get("activations", {})], axis=0)
        zero_all += full[len(x)]
        count_all += full.sum()
        total = h if total is None else total + h
        ax.plot(x, h / max(full.sum(), 1), marker=".", lw=1, label=layer)
    if total is not None:
        ax.bar(x, total / max(count_all, 1), width=0.9, color="0.5", alpha=0.35, label="all chosen layers")
    ax.set_yscale("log")
    ax.set_xlabel("log2(|activation gradient|)  (values as they flow in backward, loss scale included)")
    ax.set_ylabel("fraction of values")
    zero_frac = zero_all / max(count_all, 1)
    ax.set_title(f"Activation gradients ({meta.get('fp16_view', '')} fp16 view); exact zeros: {zero_frac:.1%}")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_scale(metrics: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in metrics if "loss" in r]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(steps, [np.nan if r["loss"] is None else r["loss"] for r in rows], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.step(steps, [r["loss_scale"] for r in rows], where="post", color="tab:orange", label="loss scale")
    ax2.set_yscale("log", base=2)
    ax2.set_ylabel("loss scale", color="tab:orange")
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        ax2.scatter([r["step"] for r in skipped], [r["loss_scale"] for r in skipped], marker="x", color="tab:red",
                    zorder=5, label=f"window with skipped steps ({sum(r['skipped'] for r in skipped)} in all)")
    ax2.legend(loc="upper right", fontsize=8)
    ax.set_title("Loss and loss scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _layer_matrix(samples: list[dict], key: str, field: str) -> tuple[list[str], list[int], np.ndarray]:
    rows = [s for s in samples if key in s]
    names = list(rows[0][key]["params"]) if rows else []
    matrix = np.array([[s[key]["params"].get(n, {}).get(field, np.nan) if isinstance(s[key]["params"].get(n), dict)
                        else s[key]["params"].get(n, np.nan) for n in names] for s in rows], dtype=float)
    return names, [s["step"] for s in rows], matrix


def plot_underflow_heatmap(samples: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    names, steps, m = _layer_matrix(samples, "grads", "underflow")
    _, _, zeros = _layer_matrix(samples, "grads", "zero")
    lost = m + zeros  # what fp16 loses: flushed to zero now, or zero already
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(names) + 1.5)))
    im = ax.imshow(lost.T, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).astype(int) if steps else []
    ax.set_xticks(ticks, [steps[i] for i in ticks])
    ax.set_xlabel("step (sampled)")
    ax.set_title("Fraction of each parameter's gradients that fp16 holds as zero (zero or < 2^-24 at the loss scale)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_update_underflow(samples: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    names, steps, m = _layer_matrix(samples, "update_underflow", "")
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(names) + 1.5)))
    mean = np.nanmean(m, axis=0) if m.size else np.zeros(len(names))
    ax.barh(range(len(names)), mean, color="tab:red")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of weight updates with |dw| < |w| * 2^-11 (lost if the weights were fp16)")
    ax.set_title(f"Update underflow per parameter (mean over {len(steps)} sampled steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def risk_table(samples: list[dict], top: int = 10) -> Table:
    names, _, under = _layer_matrix(samples, "grads", "underflow")
    _, _, zero = _layer_matrix(samples, "grads", "zero")
    _, _, head = _layer_matrix(samples, "grads", "headroom")
    unames, _, upd = _layer_matrix(samples, "update_underflow", "")
    upd_mean = dict(zip(unames, np.nanmean(upd, axis=0))) if upd.size else {}
    lost = np.nanmean(under + zero, axis=0) if under.size else np.zeros(len(names))
    order = np.argsort(-lost)[:top]
    table = Table(title="Layers at most risk in fp16 (mean over sampled steps)")
    for col in ("parameter", "zero or underflow", "overflow headroom (log2, min)", "update underflow"):
        table.add_column(col)
    for i in order:
        h = np.nanmin(np.where(np.isfinite(head[:, i]), head[:, i], np.nan)) if head.size else np.nan
        table.add_row(names[i], f"{lost[i]:.1%}", "n/a" if np.isnan(h) else f"{h:.1f}", f"{upd_mean.get(names[i], np.nan):.1%}")
    return table


def make_report(run_dir: Path, console: Console | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    console = console or Console()
    metrics, diag = load_run(run_dir)
    meta = next((r for r in diag if r.get("event") == "meta"), {})
    samples = [r for r in diag if r.get("event") == "sample"]
    if not samples:
        raise NotARun(f"{run_dir}/diagnostics.jsonl has no sampled steps yet; run longer or lower diagnostics.every")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    paths = [out / "activation_gradients.png", out / "loss_scale.png", out / "underflow_heatmap.png",
             out / "update_underflow.png"]
    plot_activation_gradients(samples, paths[0], meta)
    plot_loss_scale(metrics, paths[1])
    plot_underflow_heatmap(samples, paths[2])
    plot_update_underflow(samples, paths[3])
    console.print(risk_table(samples))
    for trace in (r for r in diag if r.get("event") == "trace"):
        console.print(f"[bold red]overflow trace[/] at step {trace['step']} ({trace['reason']}): "
                      f"forward {trace['forward']}, backward {trace['backward']}")
    console.print(f"plots written to {out}/")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mptrain-report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory, e.g. outputs/2026-11-28/12-00-00-1234")
    args = parser.parse_args(argv)
    try:
        make_report(args.run_dir)
    except NotARun as e:
        print(f"mptrain-report: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
