"""What a run writes as it trains: metrics.jsonl rows, TensorBoard scalars, summary.json (and the sinks, e.g.
MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

from mptrain.run.layout import METRICS, SUMMARY, TENSORBOARD, OutputError, json_safe, write_json_atomic


class RunWriter:
    """Appends metric rows to metrics.jsonl and TensorBoard; writes summary.json."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None, enabled: bool = True,
                 sinks: list | None = None):
        """Open only after the run directory is committed (RunDir.commit). `resume_step`: continuing from a
        checkpoint of that step, TensorBoard drops the steps after it (the resumed run writes them again).
        `enabled=False` (ranks other than 0): write nothing.
        `sinks`: more writers (e.g. tracking.MLflowLogger) given every row, the summary and close()."""
        self.run_dir, self.enabled, self.tb = Path(run_dir), enabled, None
        self.sinks = list(sinks or []) if enabled else []
        if not enabled:
            return
        self.metrics_path = self.run_dir / METRICS
        try:
            self._metrics = open(self.metrics_path, "a")
        except OSError as e:
            raise OutputError(f"could not open {self.metrics_path}: {e.strerror}") from None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1  # TensorBoard drops the replayed steps
            self.tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD), purge_step=purge)

    def log(self, row: dict) -> None:
        """One row: `step` plus metrics. Keys like `val/acc` go to TensorBoard as they are,
        bare keys (`loss`, `lr`) under `train/`."""
        if not self.enabled:
            return
        try:
            self._metrics.write(json.dumps(json_safe(row)) + "\n")
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
            for sink in self.sinks:
                if hasattr(sink, "write_json"):  # e.g. W&B keeps the precision plan in its config
                    sink.write_json(name, data)

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            write_json_atomic(self.run_dir / SUMMARY, summary)
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
