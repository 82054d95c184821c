"""`mptrain-report RUN_DIR`: plots of a run's precision diagnostics in RUN_DIR/report/.

(a) activation_gradients.png  activation-gradient exponent histogram with FP16's ranges shaded (paper Fig. 3)
(b) loss_scale.png            loss and loss scale over steps, skipped steps marked
(c) underflow_heatmap.png     per-layer fraction of gradients that FP16 flushes to zero, over time
(d) update_underflow.png      per-layer fraction of weight updates too small to change an FP16 weight
(e) fp8.png                   precision=fp8: per converted layer, amax and the fractions fp8 flushes to zero
(f) bf16_update.png           precision=bf16_pure: updates round-to-nearest would lose, what compensation carries
(g) precision_timeline.png    each layer's format over the steps, switches and demotions/promotions marked, where
                              the plan changed during the run (precision=auto, precision.schedule; tools/timeline.py)
and a table of the layers at most risk (and, for fp8, of the converted layers).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from mptrain.diagnostics.stats import EXPONENTS
from mptrain.precision.formats import E4M3, E5M2, FP8
from mptrain.run.layout import DIAGNOSTICS, METRICS, PRECISION_PLAN, REPORT, REPORT_ARTIFACTS, read_jsonl
from mptrain.run.tracking import log_to_recorded_run
from mptrain.tools.timeline import plot_timeline


class NotARun(Exception):
    pass


def load_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    metrics, diag = run_dir / METRICS, run_dir / DIAGNOSTICS
    if not run_dir.is_dir() or not metrics.is_file():
        raise NotARun(f"{run_dir} is not an mptrain run directory (no metrics.jsonl); pass outputs/<date>/<time>-<id>")
    if not diag.is_file():
        raise NotARun(
            f"{run_dir} has no diagnostics.jsonl: it ran with diagnostics=off; rerun with diagnostics=default"
        )
    return read_jsonl(metrics, skip_damaged=True), read_jsonl(diag, skip_damaged=True)


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
        hists = [
            np.array(s["activations"][layer]["hist"][: len(x)]) for s in samples if layer in s.get("activations", {})
        ]
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


def heat_range(values: np.ndarray) -> tuple[float, float, str | None]:
    """The colour scale of a heat map: from the data's minimum to its maximum (a healthy run's few-percent
    losses would all look alike on a 0..1 scale), and a note when there is nothing to show."""
    finite = values[np.isfinite(values)] if values.size else values
    if finite.size == 0:
        return 0.0, 1.0, "no finite values recorded"
    lo, hi = float(finite.min()), float(finite.max())
    if hi == 0.0:
        return 0.0, 1.0, "every value is 0: fp16 loses none of these gradients"
    if hi == lo:
        return lo * 0.9, hi * 1.1, f"every value is {hi:.3g}"
    return lo, hi, None


def plot_underflow_heatmap(samples: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    names, steps, m = _layer_matrix(samples, "grads", "underflow")
    _, _, zeros = _layer_matrix(samples, "grads", "zero")
    lost = m + zeros  # what fp16 loses: flushed to zero now, or zero already
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(names) + 1.5)))
    vmin, vmax, note = heat_range(lost)
    im = ax.imshow(lost.T, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).astype(int) if steps else []
    ax.set_xticks(ticks, [steps[i] for i in ticks])
    ax.set_xlabel("step (sampled)")
    ax.set_title("Fraction of each parameter's gradients that fp16 holds as zero (zero or < 2^-24 at the loss scale)"
                 + (f"\n{note}" if note else ""), fontsize=9)
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


def load_plan(run_dir: Path, meta: dict) -> dict[str, dict]:
    """precision_plan.json (module -> {format, emulated, ...}); runs from before the plan: the meta row's formats."""
    import json

    path = run_dir / PRECISION_PLAN
    if path.is_file():
        plan = json.loads(path.read_text())
        plan.pop("history", None)  # precision=auto's record of its plans
        return plan
    return {m: {"format": f} for m, f in (meta.get("plan") or {}).items()}


def module_of(param: str, plan: dict) -> str | None:
    """The plan entry a parameter belongs to (`body.3.weight` -> `body.3`)."""
    module = param.rpartition(".")[0]
    return module if module in plan else None


def plan_table(plan: dict[str, dict]) -> Table:
    table = Table(title="Precision plan (precision_plan.json)")
    for col in ("module", "params", "format", "gradients", "kernel", "why"):
        table.add_column(col)
    for name, e in plan.items():
        kernel = e.get("kernel", "")
        if e.get("emulated") and kernel != "emulated":
            kernel += " (emulated)"
        table.add_row(name, f"{e.get('params', '')}", e["format"], e.get("grad_format", ""), kernel, e.get("why", ""))
    return table


def risk_table(samples: list[dict], top: int = 10, plan: dict | None = None) -> Table:
    names, _, under = _layer_matrix(samples, "grads", "underflow")
    _, _, zero = _layer_matrix(samples, "grads", "zero")
    _, _, head = _layer_matrix(samples, "grads", "headroom")
    unames, _, upd = _layer_matrix(samples, "update_underflow", "")
    upd_mean = dict(zip(unames, np.nanmean(upd, axis=0))) if upd.size else {}
    lost = np.nanmean(under + zero, axis=0) if under.size else np.zeros(len(names))
    order = np.argsort(-lost)[:top]
    table = Table(title="Layers at most risk in fp16 (mean over sampled steps)")
    plan = plan or {}
    for col in (
        "parameter",
        "planned format",
        "zero or underflow",
        "overflow headroom (log2, min)",
        "update underflow",
    ):
        table.add_column(col)
    for i in order:
        h = np.nanmin(np.where(np.isfinite(head[:, i]), head[:, i], np.nan)) if head.size else np.nan
        module = module_of(names[i], plan)
        table.add_row(names[i], plan[module]["format"] if module else "–", f"{lost[i]:.1%}",
                      "n/a" if np.isnan(h) else f"{h:.1f}", f"{upd_mean.get(names[i], np.nan):.1%}")
    return table


FP8_ROLES = (("input", E4M3.name), ("weight", E4M3.name), ("grad", f"{E5M2.name} (rowwise: {E4M3.name})"))


def _fp8_series(samples: list[dict]) -> tuple[list[str], list[int], dict]:
    """Layer names, sampled steps, and (role, field) -> steps x layers matrix from the rows' "fp8" records."""
    rows = [s for s in samples if s.get(FP8.name)]
    names = list(dict.fromkeys(n for s in rows for n in s[FP8.name]))  # model order, as first recorded
    out = {}
    for role, _ in FP8_ROLES:
        for f in ("amax", "scale", "underflow", "underflow_unscaled", "overflow_unscaled"):
            out[role, f] = np.array(
                [[s[FP8.name].get(n, {}).get(role, {}).get(f, np.nan) for n in names] for s in rows], dtype=float
            )
    return names, [s["step"] for s in rows], out


def plot_fp8(samples: list[dict], path: Path) -> None:
    """Per role: log2 amax of each converted layer over steps (top) and the mean fraction of its non-zero
    values that fp8 flushes to zero with the dynamic scale vs without any scale (bottom)."""
    import matplotlib.pyplot as plt

    names, steps, m = _fp8_series(samples)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7), sharex="row")
    for k, (role, fmt_) in enumerate(FP8_ROLES):
        ax = axes[0, k]
        for i, n in enumerate(names):
            ax.plot(steps, np.log2(m[role, "amax"][:, i]), marker=".", lw=1, label=n)
        ax.set_title(f"{role} ({fmt_}): log2 amax")
        ax.set_xlabel("step (sampled)")
        ax = axes[1, k]
        y = np.arange(len(names))
        ax.barh(y - 0.2, np.nanmean(m[role, "underflow"], axis=0), height=0.4, color="tab:blue", label="with the scale")
        ax.barh(y + 0.2, np.nanmean(m[role, "underflow_unscaled"], axis=0), height=0.4, color="tab:red", alpha=0.6,
                label="unscaled cast")
        ax.set_yticks(y, names if k == 0 else [""] * len(names), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"{role}: fraction flushed to zero in fp8")
    axes[0, 0].legend(fontsize=6)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle(f"fp8 casts of {len(names)} converted layers over {len(steps)} sampled steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fp8_table(samples: list[dict]) -> Table:
    names, _, m = _fp8_series(samples)
    table = Table(title="fp8 layers (mean over sampled steps; amax: the largest)")
    for col in ("layer", "input amax", "weight amax", "grad amax", "grad scale", "grad underflow",
                "grad underflow unscaled", "input overflow unscaled"):
        table.add_column(col)
    for i, n in enumerate(names):
        table.add_row(n, *(f"{np.nanmax(m[r, 'amax'][:, i]):.3g}" for r in ("input", "weight", "grad")),
                      f"{np.nanmean(m['grad', 'scale'][:, i]):.3g}", f"{np.nanmean(m['grad', 'underflow'][:, i]):.2%}",
                      f"{np.nanmean(m['grad', 'underflow_unscaled'][:, i]):.2%}",
                      f"{np.nanmean(m['input', 'overflow_unscaled'][:, i]):.2%}")
    return table


def bf16_update_series(samples: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """(steps, fraction of updates round-to-nearest loses, compensation / update ratio) of bf16_pure's sampled
    steps (several optimizers' records: their mean)."""
    steps, lost, carried = [], [], []
    for s in samples:
        records = s.get("bf16_update")
        records = records if isinstance(records, list) else [records] if records else []
        if records:
            steps.append(s["step"])
            lost.append(float(np.mean([r["lost_nearest"] for r in records])))
            carried.append(float(np.mean([r.get("compensation_ratio", np.nan) for r in records])))
    return steps, lost, carried


def plot_bf16_update(samples: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    steps, lost, carried = bf16_update_series(samples)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(steps, lost, "o-", color="tab:red", label="updates round-to-nearest would lose (|dw| below bf16's 2^-8)")
    if not np.all(np.isnan(carried)):
        ax.plot(steps, carried, "s-", color="tab:blue", label="Kahan compensation / update (mean magnitudes)")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("bf16_pure: what rounding the weight update to bfloat16 does")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_report(run_dir: Path, console: Console | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    console = console or Console()
    # each layer's format over the steps: from precision_plan.json alone, so a run without diagnostics has it too
    timeline = plot_timeline(run_dir, run_dir / REPORT / "precision_timeline.png")
    try:
        metrics, diag = load_run(run_dir)
    except NotARun as e:
        if timeline is None or not (run_dir / METRICS).is_file():
            raise
        console.print(f"{e}: only the precision timeline, {timeline}")
        return [timeline]
    meta = next((r for r in diag if r.get("event") == "meta"), {})
    samples = [r for r in diag if r.get("event") == "sample"]
    if not samples:
        raise NotARun(f"{run_dir}/diagnostics.jsonl has no sampled steps yet; run longer or lower diagnostics.every")
    out = run_dir / REPORT
    out.mkdir(exist_ok=True)
    paths = [out / "activation_gradients.png", out / "loss_scale.png", out / "underflow_heatmap.png",
             out / "update_underflow.png"]
    plot_activation_gradients(samples, paths[0], meta)
    plot_loss_scale(metrics, paths[1])
    plot_underflow_heatmap(samples, paths[2])
    plot_update_underflow(samples, paths[3])
    plan = load_plan(run_dir, meta)
    if plan:
        console.print(plan_table(plan))
    console.print(risk_table(samples, plan=plan))
    if any(s.get(FP8.name) for s in samples):
        paths.append(out / "fp8.png")
        plot_fp8(samples, paths[-1])
        console.print(fp8_table(samples))
    if any(s.get("bf16_update") for s in samples):
        paths.append(out / "bf16_update.png")
        plot_bf16_update(samples, paths[-1])
    if timeline is not None:
        paths.append(timeline)
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
        paths = make_report(args.run_dir)
        if log_to_recorded_run(args.run_dir, paths, REPORT_ARTIFACTS):  # a logger=mlflow run gets the PNGs too
            print(f"logged {len(paths)} files to the run's MLflow run")
    except NotARun as e:
        print(f"mptrain-report: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
