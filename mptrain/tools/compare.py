"""`mptrain-compare SWEEP_DIR | RUN_DIR...`: the paper's side-by-side table for a sweep.

Jobs are grouped by every override except the seed (`seed=` or `trainer.seed=`). Per group: the
monitored metric's mean ± std across seeds, its difference to the matching fp32 group, skipped-step %,
final loss scale, the fraction of gradients fp16 loses (zero or underflowing), samples/s and peak
memory relative to fp32. Writes comparison.md, comparison.csv and comparison.png beside the jobs.
An Optuna sweep (`hparams_search=optuna`, its study in SWEEP_DIR/optuna.db) adds each job's trial
number, state and objective, best trial first.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from mptrain.precision.formats import BF16, FP32
from mptrain.run.layout import (
    COMPARISON,
    COMPARISON_ARTIFACTS,
    METRICS,
    MULTIRUN,
    OPTUNA_DB,
    OVERRIDES,
    SUMMARY,
    read_jsonl,
)
from mptrain.run.tracking import log_to_recorded_run

SEED_KEYS = ("seed", "trainer.seed")
DEFAULT_METRICS = ("val/acc", "val/ppl", "val/loss")  # the first a group's summaries hold is its headline
log = logging.getLogger("mptrain")


@dataclass
class Job:
    path: Path
    overrides: list[str]
    summary: dict | None
    status: str
    trial: dict | None = None  # an Optuna sweep's trial: number, state, value, params
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl's rows, read before anything is written

    @property
    def kind(self) -> tuple:
        """What was trained: jobs are compared with a baseline of the same task, model and dataset only."""
        s = self.summary or {}
        return s.get("task"), s.get("model"), s.get("dataset")

    @property
    def seed(self) -> str:
        for o in self.overrides:
            k, _, v = o.partition("=")
            if k.lstrip("+~") in SEED_KEYS:
                return v
        return str((self.summary or {}).get("seed", "?"))


@dataclass
class Group:
    key: tuple[str, ...]
    jobs: list[Job] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join(self.key) or "(no overrides)"

    def values(self, name: str) -> list[float]:
        out = []
        for j in self.jobs:
            v = (j.summary or {}).get(name) if j.status == "completed" else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    def mean(self, name: str) -> float:
        v = self.values(name)
        return statistics.fmean(v) if v else math.nan

    def std(self, name: str) -> float:
        v = self.values(name)
        return statistics.stdev(v) if len(v) > 1 else 0.0 if v else math.nan


def find_jobs(paths: list[Path]) -> list[Job]:
    """Every job directory (one holding .hydra/overrides.yaml) under the given paths."""
    dirs: list[Path] = []
    for p in paths:
        if (p / OVERRIDES).is_file():
            dirs.append(p)
        elif p.is_dir():
            dirs += sorted((d.parent.parent for d in p.glob(f"**/{OVERRIDES}")),
                           key=lambda d: (len(d.parts), int(d.name) if d.name.isdigit() else 0, str(d)))
    for d in unrecorded_jobs(paths):  # never dropped silently
        log.warning("%s is a job of the sweep without records (no %s): it stopped before mptrain could record "
                    "it (killed, or an older mptrain); it is left out", d, OVERRIDES)
    if not dirs:
        raise SystemExit(f"mptrain-compare: error: no runs under {', '.join(map(str, paths))} "
                         "(a run holds .hydra/overrides.yaml); pass a multirun directory or run directories")
    jobs = []
    for d in dirs:
        overrides = yaml.safe_load((d / OVERRIDES).read_text()) or []
        summary, status = read_summary(d / SUMMARY)
        metrics = read_jsonl(d / METRICS, skip_damaged=True) if (d / METRICS).is_file() else []
        jobs.append(Job(d, [str(o) for o in overrides], summary, status, metrics=metrics))
    return jobs


def unrecorded_jobs(paths: list[Path]) -> list[Path]:
    """The numbered job folders of the given sweep directories (those with multirun.yaml) that hold no records."""
    found = []
    for p in paths:
        if p.is_dir() and (p / MULTIRUN).is_file():
            found += [
                d for d in sorted(p.iterdir()) if d.is_dir() and d.name.isdigit() and not (d / OVERRIDES).is_file()
            ]
    return found


def read_summary(path: Path) -> tuple[dict | None, str]:
    """(summary, status); a truncated or damaged summary.json is reported and the job listed as `unreadable`."""
    if not path.is_file():
        return None, "unfinished"
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s is not readable JSON (%s): the job is listed as unreadable", path, e)
        return None, "unreadable"
    if not isinstance(summary, dict):
        log.warning("%s is not a JSON object: the job is listed as unreadable", path)
        return None, "unreadable"
    return summary, summary.get("status", "unknown")


def optuna_trials(sweep_dir: Path) -> tuple[str, dict[int, dict]] | None:
    """(direction, {number: trial}) of the Optuna study kept in sweep_dir/optuna.db, if any."""
    db = sweep_dir / OPTUNA_DB
    if not db.is_file():
        return None
    try:
        import optuna
    except ImportError:
        print(f"mptrain-compare: {db} is an Optuna study; pip install mptrain[optuna] to read its trials")
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, direction, trials = f"sqlite:///{db.resolve()}", "maximize", {}
    for s in optuna.study.get_all_study_summaries(storage=storage):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        direction = study.direction.name.lower()
        for t in study.trials:
            trials[t.number] = {"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params}
    return direction, trials


def attach_trials(jobs: list[Job]) -> str | None:
    """Give each job of an Optuna sweep its trial (job <n> ran trial <n>; its overrides must hold the
    trial's parameters). Returns the study's direction, or None when no job belongs to a study."""
    direction = None
    for sweep_dir in sorted({j.path.parent for j in jobs}):
        found = optuna_trials(sweep_dir)
        if found is None:
            continue
        direction, trials = found
        for j in jobs:
            t = trials.get(int(j.path.name)) if j.path.parent == sweep_dir and j.path.name.isdigit() else None
            if t is not None and all(f"{k}={v}" in j.overrides for k, v in t["params"].items()):
                j.trial = t
    return direction


def group_jobs(jobs: list[Job]) -> list[Group]:
    """Group by every override except the seed; overrides shared by every job are left out of the key.
    Trials of an Optuna study are one row each, even when two drew the same parameters."""
    def relevant(j: Job) -> list[str]:
        return [o for o in j.overrides if o.partition("=")[0].lstrip("+~") not in SEED_KEYS
                and not o.startswith(("hydra.", "resume="))]

    common = set.intersection(*(set(relevant(j)) for j in jobs)) if len(jobs) > 1 else set()
    groups: dict[tuple[str, ...], Group] = {}
    for j in jobs:
        key = tuple(o for o in relevant(j) if o not in common)
        if j.trial is not None:
            key += (f"trial {j.trial['number']}",)
        groups.setdefault(key, Group(key)).jobs.append(j)
    return list(groups.values())


def precision_of(group: Group) -> str:
    for o in group.key:
        k, _, v = o.partition("=")
        if k == "precision":
            return v
    modes = {(j.summary or {}).get("precision") for j in group.jobs} - {None}
    return modes.pop() if len(modes) == 1 else "?"


def kind_of(group: Group) -> tuple | None:
    """The (task, model, dataset) every job of the group trained, or None when they differ or are unknown."""
    kinds = {j.kind for j in group.jobs if j.summary is not None}
    return kinds.pop() if len(kinds) == 1 else None


def baseline_for(group: Group, groups: list[Group], mode: str = FP32.name) -> Group | None:
    """The `mode` (fp32) group with the same overrides apart from the precision ones, training the same task,
    model and dataset (an MLP's throughput is no baseline for a GAN's)."""
    kind = kind_of(group)
    same = [g for g in groups if precision_of(g) == mode and kind is not None and kind_of(g) == kind]
    rest = tuple(o for o in group.key if not o.startswith("precision"))
    for g in same:
        if tuple(o for o in g.key if not o.startswith("precision")) == rest:
            return g
    return same[0] if len(same) == 1 else None


def plan_of(g: Group) -> str:
    """The formats the group's layers ran in, from summary.json's plan ("bf16 x2, nvfp4 x3 (3 emulated)");
    jobs that disagree are listed apart."""
    seen = []
    for j in g.jobs:
        s = j.summary or {}
        counts = s.get("plan_modules")
        if not counts:
            continue
        text = ", ".join(f"{f} x{n}" for f, n in counts.items())
        emulated = len(s.get("plan_emulated") or [])
        text += f" ({emulated} emulated)" if emulated else ""
        if text not in seen:
            seen.append(text)
    return " | ".join(seen) or "–"


def metric_of(group: Group) -> str | None:
    """The group's headline metric: val/acc, else val/ppl, else val/loss, whichever its summaries hold
    (None when no job reported one: a group that failed takes the others' metric)."""
    held = [j.summary or {} for j in group.jobs]
    return next((m for m in DEFAULT_METRICS if any(m in s for s in held)), None)


def headline_metrics(groups: list[Group], metric: str | None) -> tuple[dict[int, str], str]:
    """({id(group): its metric}, the table's column name): `metric` for all when given; else each group's own,
    and the column is named after it when all agree, "metric" when tasks differ (an LM's val/ppl beside
    a classifier's val/acc: each row says which)."""
    own = {id(g): metric or metric_of(g) for g in groups}
    named = set(own.values()) - {None}
    common = named.pop() if len(named) == 1 else ("val/loss" if not named else None)
    return {k: v or common or "val/loss" for k, v in own.items()}, common or "metric"


def lost_fraction(g: Group) -> float:
    zero, under = g.mean("diag/grad_zero"), g.mean("diag/grad_underflow")
    return zero + under if math.isfinite(zero) and math.isfinite(under) else math.nan


def rows(groups: list[Group], metric: str | None = None, trials: bool = False) -> list[dict]:
    """One row per group; `metric` None: each group's headline metric (see headline_metrics)."""
    per_group, column = headline_metrics(groups, metric)
    out = []
    for g in groups:
        metric = per_group[id(g)]
        trial = next((j.trial for j in g.jobs if j.trial is not None), None) if trials else None
        base = baseline_for(g, groups)
        steps = g.values("steps")
        skipped = g.values("skipped_steps")
        statuses = [j.status for j in g.jobs]
        row = {
            "group": g.label,
            "precision": precision_of(g),
            "seeds": ",".join(j.seed for j in g.jobs),
            "completed": f"{statuses.count('completed')}/{len(statuses)}",
            "status": ", ".join(sorted({f"{s} ({j.path.name})" for s, j in zip(statuses, g.jobs) if s != "completed"}))
            or "ok",
            "metric": metric,
            f"{column} mean": g.mean(metric),
            f"{column} std": g.std(metric),
            "diff vs fp32": g.mean(metric) - base.mean(metric) if base else math.nan,
            "skipped %": 100 * sum(skipped) / sum(steps) if steps and sum(steps) else math.nan,
            "final loss scale": g.mean("final_loss_scale"),
            "fp16-lost grads %": 100 * lost_fraction(g),
            "samples/s vs fp32": g.mean("samples_per_s") / base.mean("samples_per_s") if base else math.nan,
            "peak memory vs fp32": g.mean("peak_memory_mb") / base.mean("peak_memory_mb") if base else math.nan,
            "samples/s": g.mean("samples_per_s"),
            "loss scaling": " | ".join(
                dict.fromkeys(
                    str((j.summary or {}).get("loss_scaling")) for j in g.jobs if (j.summary or {}).get("loss_scaling")
                )
            )
            or "–",
            "plan": plan_of(g),
        }
        if any(x.values("fp8_layers") for x in groups):  # fp8 rows: how much ran in float8, what it lost
            row["fp8 layers"] = g.mean("fp8_layers")
            row["fp8-lost grads %"] = 100 * g.mean("diag/fp8_grad_underflow")
            bf16 = baseline_for(g, groups, BF16.name)
            row["diff vs bf16"] = g.mean(metric) - bf16.mean(metric) if bf16 else math.nan
        if trials:
            value = trial["value"] if trial and trial["value"] is not None else math.nan
            row.update({"trial": trial["number"] if trial else "", "trial state": trial["state"] if trial else "",
                        "objective": value})
        out.append(row)
    return out


def fmt(v: object, digits: int = 4) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def write_outputs(out_dir: Path, table_rows: list[dict], groups: list[Group], metric: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_name, csv_name, png_name = COMPARISON
    cols = list(table_rows[0].keys())
    with open(out_dir / csv_name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(table_rows)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table_rows:
        md.append("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    (out_dir / md_name).write_text("\n".join(md) + "\n")
    plot(out_dir / png_name, groups, table_rows, metric)
    return [out_dir / name for name in COMPARISON]


def bar_limits(means: list[float], stds: list[float]) -> tuple[float, float] | None:
    """The bar chart's x range: every bar's mean ± std inside it, with a 10% margin (not below 0 when no bar
    reaches below 0). None when no mean is finite."""
    ends = [(m - (s if math.isfinite(s) else 0.0), m + (s if math.isfinite(s) else 0.0))
            for m, s in zip(means, stds) if math.isfinite(m)]
    if not ends:
        return None
    lo, hi = min(e[0] for e in ends), max(e[1] for e in ends)
    margin = 0.1 * (hi - lo) or 0.05 * abs(hi) or 0.05
    return (lo - margin if lo < 0 else max(0.0, lo - margin)), hi + margin


def plot(path: Path, groups: list[Group], table_rows: list[dict], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    labels = [r["group"] for r in table_rows]
    means = [r[f"{metric} mean"] for r in table_rows]
    stds = [r[f"{metric} std"] for r in table_rows]
    ax1.barh(range(len(labels)), means, xerr=stds, color="tab:blue", alpha=0.7, capsize=3)
    ax1.set_yticks(range(len(labels)), labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel(f"{metric} (mean ± std over seeds)")
    limits = bar_limits(means, stds)
    if limits is not None:
        ax1.set_xlim(*limits)
    for i, g in enumerate(groups):
        color = plt.cm.tab10(i % 10)
        for k, j in enumerate(g.jobs):
            pts = [(r["step"], r["loss"]) for r in j.metrics if r.get("loss") is not None and "step" in r]
            if pts:
                ax2.plot(*zip(*pts), color=color, lw=1, alpha=0.8, label=g.label if k == 0 else None)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("train loss")
    if ax2.get_legend_handles_labels()[1]:
        ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mptrain-compare", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="a multirun directory, or run directories")
    ap.add_argument(
        "--metric", default=None, help="the metric to compare (default: val/acc, else val/ppl, else val/loss)"
    )
    ap.add_argument("--out", type=Path, default=None, help="where to write comparison.* (default: the sweep directory)")
    args = ap.parse_args(argv)
    jobs = find_jobs(args.paths)  # everything is read before anything is written
    direction = attach_trials(jobs)
    groups = group_jobs(jobs)
    table_rows = rows(groups, args.metric, trials=direction is not None)
    metric = next(k for k in table_rows[0] if k.endswith(" mean")).removesuffix(" mean")
    if direction is not None:  # best trial first, failed ones last
        sign = -1 if direction == "maximize" else 1
        table_rows.sort(
            key=lambda r: (math.isnan(r["objective"]), sign * r["objective"] if not math.isnan(r["objective"]) else 0)
        )
    out_dir = args.out or (args.paths[0] if len(args.paths) == 1 and args.paths[0].is_dir() else Path.cwd())
    table = Table(title=f"mptrain-compare: {metric} over seeds, {len(jobs)} jobs in {len(groups)} groups")
    shown = ["group", "completed", f"{metric} mean", f"{metric} std", "diff vs fp32", "skipped %", "final loss scale",
             "fp16-lost grads %", "samples/s vs fp32", "peak memory vs fp32", "status"]
    if "fp8 layers" in table_rows[0]:
        shown[5:5] = ["diff vs bf16", "fp8 layers", "fp8-lost grads %"]
    if metric == "metric":  # tasks differ: each row names its metric
        shown[2:2] = ["metric"]
    if direction is not None:
        shown[1:1] = ["trial", "trial state", "objective"]
    for c in shown:
        table.add_column(c, overflow="fold")
    for r in table_rows:
        table.add_row(*(fmt(r[c]) for c in shown))
    console = Console()
    if not console.is_terminal:  # piped or redirected: every column at its full width, no 80-column squeeze
        console = Console(
            width=max(console.width, console.measure(table, options=console.options.update_width(100_000)).maximum)
        )
    console.print(table)
    written = write_outputs(out_dir, table_rows, groups, metric)
    for p in written:
        console.print(f"wrote {p}")
    tracked = [j for j in jobs if log_to_recorded_run(j.path, written, COMPARISON_ARTIFACTS)]
    if tracked:  # logger=mlflow jobs get the comparison they are part of
        console.print(f"logged the comparison to {len(tracked)} MLflow runs")


if __name__ == "__main__":
    main()
