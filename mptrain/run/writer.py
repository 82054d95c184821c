"""The run directory's files (DESIGN.md's contract): metrics.jsonl, summary.json, tensorboard/."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from mptrain.errors import MptrainError
from mptrain.run.directory import commit_run_dir, umask_mode


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (JSON has no inf/NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temp file in the same directory, then rename: readers never see half a file.
    A write that fails (disk full, no permission) raises OutputError naming the path and the cause."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "w") as f:
            json.dump({k: _plain(v) for k, v in data.items()}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"could not write {path}: {e.strerror or e}") from None
        raise


class OutputError(MptrainError):
    """A run file cannot be written (disk full, permission denied)."""


class RunWriter:
    """Appends metric rows to metrics.jsonl and TensorBoard; writes summary.json."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None, enabled: bool = True,
                 sinks: list | None = None):
        """Opening the writer commits the run directory (rundir.commit_run_dir): construct it only once
        every check has passed. `resume_step`: continuing from a checkpoint of that step, the rows logged
        after it are dropped (the resumed run writes them again); None: a fresh start sets earlier records aside.
        `enabled=False` (ranks other than 0): write nothing.
        `sinks`: more writers (e.g. tracking.MLflowLogger) given every row, the summary and close()."""
        self.run_dir, self.enabled, self.tb = Path(run_dir), enabled, None
        self.sinks = list(sinks or []) if enabled else []
        if not enabled:
            return
        commit_run_dir(self.run_dir, resume_step)  # every check has passed: the run directory may change now
        self.metrics_path = self.run_dir / "metrics.jsonl"
        try:
            self._metrics = open(self.metrics_path, "a")
        except OSError as e:
            raise OutputError(f"could not open {self.metrics_path}: {e.strerror}") from None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1  # TensorBoard drops the replayed steps
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)

    def log(self, row: dict) -> None:
        """One row: `step` plus metrics. Keys like `val/acc` go to TensorBoard as they are,
        bare keys (`loss`, `lr`) under `train/`."""
        if not self.enabled:
            return
        try:
            self._metrics.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
            self._metrics.flush()
        except OSError as e:
            raise OutputError(f"could not write {self.metrics_path}: {e.strerror}") from None
        if self.tb is not None:
            step = row["step"]
            for key, value in row.items():
                if key in ("step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                self.tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        for sink in self.sinks:
            sink.log(row)

    def write_json(self, name: str, data: dict) -> None:
        """A JSON file of the run directory (e.g. layout.PRECISION_PLAN), written atomically."""
        if self.enabled:
            write_json_atomic(self.run_dir / name, data)

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            write_json_atomic(self.run_dir / "summary.json", summary)
            for sink in self.sinks:
                sink.write_summary(summary)

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self.tb is not None:
            self.tb.close()
        for sink in self.sinks:
            sink.close()


def print_config_tree(cfg: DictConfig, choices: dict | None = None, overrides: list[str] | None = None,
                      console: Console | None = None) -> None:
    """The run's config in a few lines: each group's choice and the command-line overrides. The whole
    composed config is in <run>/.hydra/config.yaml (and `mptrain --cfg job` prints it)."""
    console = console or Console()
    tree = Tree("[bold]config[/bold] [dim](in full: <run>/.hydra/config.yaml; mptrain --cfg job)[/dim]", guide_style="dim")
    # Hydra lists the choices last group first: show them in the defaults list's order
    groups = {k: v for k, v in reversed(list((choices or {}).items()))
              if v is not None and "/" not in k and not k.startswith("hydra")}
    if groups:
        tree.add("  ".join(f"[bold]{k}[/bold]={v}" for k, v in groups.items()))
    if overrides:
        tree.add("overrides: " + " ".join(overrides))
    console.print(tree)


SUMMARY_ROWS = ("status", "precision", "compute_dtype", "steps", "epochs", "skipped_steps", "final_loss_scale",
                "train_loss", "val/loss", "val/acc", "samples_per_s", "peak_memory_mb", "wall_s")


def print_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="mptrain summary", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key in SUMMARY_ROWS:
        if key in summary:
            value = summary[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
