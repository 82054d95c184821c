"""The precision timeline (mptrain-report's precision_timeline.png): each planned layer's format over the steps.

Read from precision_plan.json alone: its entries are the formats at the end, and its history (precision=auto's
plan, demotions and promotions; precision.schedule's switches) says what changed at which step. Walking the
history backwards from the end gives the formats at the start; walking it forwards gives each layer's segments.
A change recorded at step N takes effect from step N+1 (a plan or re-check is made after its step's update; a
switch falls between N and N+1).
"""

from __future__ import annotations

import json
from pathlib import Path

from mptrain.run.layout import METRICS, PRECISION_PLAN, read_jsonl

MOVES = ("demote", "promote")


def formats_over_steps(plan: dict, last_step: int) -> dict[str, list[tuple[int, int, str]]]:
    """layer -> [(first step, last step, format)] from a precision_plan.json (`history` included)."""
    history = sorted(plan.get("history") or [], key=lambda h: h["step"])
    final = {n: e["format"] for n, e in plan.items() if n != "history"}
    at = dict(final)
    for h in reversed(history):  # back to the start
        if h["event"] in MOVES:
            for c in h["changes"]:
                at[c["layer"]] = c["old"]
        elif h["event"] == "switch":
            at.update(h.get("before") or {})
        elif h["event"] == "plan":
            at.update(dict.fromkeys(h["formats"], h.get("probe", "probe")))
    start = dict(at)
    changes: list[tuple[int, dict]] = []
    for h in history:
        if h["event"] in MOVES:
            changes.append((h["step"], {c["layer"]: c["new"] for c in h["changes"]}))
        elif h["event"] in ("switch", "plan"):
            changes.append((h["step"], dict(h["formats"])))
    out: dict[str, list[tuple[int, int, str]]] = {n: [] for n in final}
    begin = dict.fromkeys(final, 1)
    for step, moved in changes:
        for layer, fmt in moved.items():
            if layer in start and fmt != start[layer]:
                if step >= begin[layer]:
                    out[layer].append((begin[layer], step, start[layer]))
                start[layer], begin[layer] = fmt, step + 1
    for layer, fmt in start.items():
        out[layer].append((begin[layer], max(last_step, begin[layer]), fmt))
    return out


def plot_timeline(run_dir: Path, path: Path) -> Path | None:
    """precision_timeline.png: one row per layer coloured by format, switches as vertical lines, demotions and
    promotions as markers. None where the run's plan never changed (no history beyond its start)."""
    plan_file = run_dir / PRECISION_PLAN
    if not plan_file.is_file():
        return None
    plan = json.loads(plan_file.read_text())
    history = plan.get("history") or []
    if not any(h["event"] in (*MOVES, "switch") for h in history):
        return None
    import matplotlib.pyplot as plt

    rows = read_jsonl(run_dir / METRICS, skip_damaged=True) if (run_dir / METRICS).is_file() else []
    last = max([r.get("step", 0) for r in rows] + [h["step"] + 1 for h in history])
    segments = formats_over_steps(plan, last)
    layers = list(segments)
    names = list(dict.fromkeys(f for segs in segments.values() for _, _, f in segs))
    colour = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(names)}
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.35 * len(layers) + 1.6)))
    for y, layer in enumerate(layers):
        for first, end, fmt in segments[layer]:
            ax.barh(y, end - first + 1, left=first - 0.5, height=0.8, color=colour[fmt])
    for h in history:
        if h["event"] == "switch":
            ax.axvline(h["step"] + 0.5, color="black", lw=1.5)
            ax.text(h["step"] + 0.5, -0.6, f"{h['from']} -> {h['to']}", fontsize=7, ha="center", va="bottom")
        for c in h.get("changes", []) if h["event"] in MOVES else []:
            marker, tint = ("^", "tab:red") if h["event"] == "demote" else ("v", "tab:green")
            ax.scatter(h["step"] + 0.5, layers.index(c["layer"]), marker=marker, color=tint, s=60, zorder=5,
                       edgecolors="black")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[f]) for f in names]
    handles += [plt.Line2D([], [], marker="^", ls="", color="tab:red"),
                plt.Line2D([], [], marker="v", ls="", color="tab:green"), plt.Line2D([], [], color="black")]
    ax.legend(handles, [*names, "demoted", "promoted", "switch"], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0.5, last + 0.5)
    ax.set_xlabel("step")
    ax.set_title("Each layer's format over the run (precision_plan.json's history)", pad=14)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
