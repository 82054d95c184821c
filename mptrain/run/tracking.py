"""MLflow experiment tracking (`logger=mlflow`, the optional extra `mptrain[mlflow]`), and the choice of tracker
(`trackers`; W&B, `logger=wandb`, is in wandb_logger.py).

The run directory stays the record; MLflow gets a copy: the flattened config as parameters, every
metrics.jsonl row as metrics (same names, same steps), the summary, and artifacts (the report and
comparison PNGs). The run's MLflow id is kept in RUN_DIR/mlflow.json, so `mptrain-report` and
`mptrain-compare` can attach their files later and `resume=auto` continues the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from mptrain.errors import ConfigError
from mptrain.run.layout import MLFLOW, SUMMARY, write_json_atomic

log = logging.getLogger("mptrain")

MISSING_MESSAGE = "logger=mlflow needs mlflow: pip install mptrain[mlflow]"
RUN_FILE = MLFLOW
# mptrain's summary status -> MLflow's run status
RUN_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call


def check_available() -> None:
    """Fail at start, before anything is written, when the extra is not installed."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING_MESSAGE) from None


def check_trackers(cfg) -> None:
    """Refuse, before the run directory changes, a tracker (logger=) whose package is missing."""
    if cfg is not None and cfg.get("name") == "mlflow":
        check_available()
        check_tracking_uri(resolve_tracking_uri(cfg.get("tracking_uri")))
    elif cfg is not None and cfg.get("name") == "wandb":
        from mptrain.run import wandb_logger

        wandb_logger.check_available()
        wandb_logger.resolve_mode(cfg.get("mode"))


def default_store() -> Path:
    """./mlruns in the directory mptrain was started from (Hydra does not chdir)."""
    return Path.cwd() / "mlruns"


def resolve_tracking_uri(uri: str | None) -> str:
    """The setting, else $MLFLOW_TRACKING_URI, else a local SQLite store (MLflow 3 refuses a plain
    file store unless MLFLOW_ALLOW_FILE_STORE=true). Local stores become absolute: mlflow.json is read
    later from other directories (mptrain-report), where a relative path would open another store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default_store() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).absolute()}"
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:")).absolute().as_uri()
    if "://" not in uri:  # a plain path is a file store
        return Path(uri).absolute().as_uri()
    return uri


# MLflow's own defaults (7 retries with backoff, 120 s per request) wait minutes for a lost server
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
PROBE_TIMEOUT_S = 5.0  # an unreachable tracking server is named after this, not after MLflow's retries (minutes)


def check_tracking_uri(uri: str) -> None:
    """Refuse, with one line, a tracking URI this run could not use, before the run directory changes."""
    key = "logger.tracking_uri"
    if uri.startswith("file:") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise ConfigError(f"{key}={uri} is a file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true; "
                          "use sqlite:///<path>/mlflow.db (or set that variable)")
    if uri.startswith(("sqlite:///", "file:")):
        path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:") else Path(uri.removeprefix("file://"))
        folder = path.parent if uri.startswith("sqlite:") else path
        existing = folder
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={uri} cannot be written: {existing} is "
                              f"{'not a directory' if not existing.is_dir() else 'not writable'}; choose another store")
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # it answered: a server is there (an MLflow server without /health still works)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"{key}={uri}: no tracking server answered within {PROBE_TIMEOUT_S:g} s ({reason}); "
                              "start it (mlflow server), fix the URI, or use logger=none") from None


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": "0.1"}: MLflow parameters are flat strings."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(tree)}


def _number(value: Any) -> float | None:
    """A metric value MLflow can take: finite numbers (bools as 0/1); None otherwise (metrics.jsonl
    writes non-finite values as null, so the two records agree)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def read_run_file(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class MLflowLogger:
    """One MLflow run per mptrain run. Also a RunWriter sink: `log(row)`, `write_summary(summary)`, `close()`."""

    def __init__(self, cfg, run_dir: Path, config: dict, resume: bool = False):
        """`cfg`: the `logger` config node; `config`: the resolved config as plain containers.
        `resume`: continue the MLflow run recorded in run_dir (same tracking URI), if any.
        Only connects (a store that cannot be used is a ConfigError): `start()` creates the MLflow run
        and writes mlflow.json, once the run directory is committed."""
        check_available()
        from mlflow.tracking import MlflowClient

        self.cfg, self.run_dir, self.config, self.status = cfg, Path(run_dir), config, None
        self.resume = resume
        self.tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
        check_tracking_uri(self.tracking_uri)
        if self.tracking_uri.startswith(("http://", "https://")):  # a server lost mid-run: seconds, not minutes
            for name, value in HTTP_LIMITS.items():
                os.environ.setdefault(name, value)
        if self.tracking_uri.startswith("sqlite:///"):  # SQLite creates the file, not its folder
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        try:
            self.client.search_experiments(max_results=1)  # opens the store (a SQLite file is created here)
        except Exception as e:  # MLflow raises many kinds; any of them means this store cannot be used
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"logger.tracking_uri={self.tracking_uri} cannot be used ({type(e).__name__}: "
                              f"{first[:300]}); fix the URI or use logger=none") from None

    def start(self) -> None:
        cfg = self.cfg
        previous = read_run_file(self.run_dir) if self.resume else None
        self.resumed = previous is not None and previous.get("tracking_uri") == self.tracking_uri
        if self.resumed:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment_id = self._experiment_id(cfg)
            run = self.client.create_run(experiment_id, run_name=cfg.run_name or self.run_dir.name,
                                         tags={"mptrain.run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
        write_json_atomic(self.run_dir / RUN_FILE, {"tracking_uri": self.tracking_uri, "run_id": self.run_id})
        log.info("MLflow run %s in %s", self.run_id, self.tracking_uri)
        if not self.resumed:  # a resumed run has its parameters already (MLflow forbids changing them)
            self.log_params()

    def _experiment_id(self, cfg) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(cfg.experiment)
        if found is not None:
            return found.experiment_id
        location = cfg.artifact_location
        if location is None and self.tracking_uri.startswith(f"sqlite:///{default_store()}"):
            location = (default_store() / "artifacts").as_uri()
        try:
            return self.client.create_experiment(cfg.experiment, artifact_location=location)
        except MlflowException:  # another job created it meanwhile
            return self.client.get_experiment_by_name(cfg.experiment).experiment_id

    def log_params(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(self.config).items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + PARAMS_PER_BATCH])

    def log_metrics(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in ((k, _number(v)) for k, v in row.items() if k != "step")
                   if v is not None]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_summary(self, summary: dict) -> None:
        """Numbers as `summary/<key>` metrics, the rest as `summary.<key>` tags, the whole as summary.json."""
        self.status = summary.get("status", self.status)
        numbers = {f"summary/{k}": v for k, v in summary.items() if _number(v) is not None}
        self.log_metrics(numbers, int(summary.get("steps") or 0))
        for key, value in summary.items():
            if isinstance(value, str):
                self.client.set_tag(self.run_id, f"summary.{key}", value[:5000])
        self.client.log_dict(self.run_id, summary, SUMMARY)

    def close(self, status: str | None = None) -> None:
        """End the MLflow run with the summary's status (completed/failed/interrupted)."""
        status = status or self.status or "failed"
        self.client.set_terminated(self.run_id, RUN_STATUS.get(status, "FAILED"))

    # RunWriter sink interface
    def log(self, row: dict) -> None:
        self.log_metrics(row, int(row["step"]))

    def write_summary(self, summary: dict) -> None:
        self.log_summary(summary)


def trackers(cfg, run_dir: Path, config: dict, resume: bool = False, enabled: bool = True) -> list:
    """The sinks RunWriter forwards rows and the summary to: [] unless `logger=mlflow|wandb` (rank 0 only).
    Built before the run directory changes (they refuse a store that cannot be used); `start()` them after."""
    if not enabled or cfg is None or cfg.name == "none":
        return []
    if cfg.name == "wandb":
        from mptrain.run.wandb_logger import WandbLogger

        return [WandbLogger(cfg, run_dir, config, resume=resume)]
    return [MLflowLogger(cfg, run_dir, config, resume=resume)]


def log_to_recorded_run(run_dir: Path, paths: list[Path], artifact_path: str) -> str | None:
    """Attach files to the MLflow run recorded in run_dir/mlflow.json (mptrain-report, mptrain-compare).
    Returns the run id, or None when the run was not tracked or mlflow is not installed here."""
    recorded = read_run_file(run_dir)
    if recorded is None:
        return None
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        log.warning("%s records an MLflow run, but mlflow is not installed here: %s", run_dir, MISSING_MESSAGE)
        return None
    client = MlflowClient(tracking_uri=recorded["tracking_uri"])
    for path in paths:
        client.log_artifact(recorded["run_id"], str(path), artifact_path)
    return recorded["run_id"]
