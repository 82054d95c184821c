"""Weights & Biases tracking (`logger=wandb`, the optional extra `mptrain[wandb]`).

The run directory stays the record; W&B gets a copy: the resolved config, every metrics.jsonl row (same
names, same steps), the summary, and the precision plan (under the config key `precision_plan`). W&B's own
files go to RUN_DIR/wandb/.

Nothing is uploaded unasked: the run is offline (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later)
unless the user has logged in (`wandb login`, or WANDB_API_KEY), and `logger.mode` or WANDB_MODE
(online | offline | disabled) decide over both. No code is saved and wandb does not capture the console
(train.log holds it). The W&B run id is kept in RUN_DIR/wandb.json, so `resume=auto` continues the same run.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from mptrain.config import WANDB_MODES as MODES
from mptrain.errors import ConfigError
from mptrain.run.layout import PRECISION_PLAN, WANDB, write_json_atomic

log = logging.getLogger("mptrain")

MISSING_MESSAGE = "logger=wandb needs wandb: pip install mptrain[wandb]"
DEFAULT_HOST = "https://api.wandb.ai"
# mptrain's summary status -> the exit code W&B marks the run with (0: finished, else failed/crashed)
EXIT_CODE = {"completed": 0, "interrupted": 255}


def check_available() -> None:
    """Fail at start, before anything is written, when the extra is not installed."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING_MESSAGE) from None


def logged_in() -> bool:
    """Whether W&B would find credentials: WANDB_API_KEY (or an identity token file), or a .netrc entry for
    the W&B host (what `wandb login` writes). Read here, not through wandb, whose login helpers may prompt."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).hostname
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None) -> str:
    """logger.mode, else $WANDB_MODE, else online when logged in and offline otherwise."""
    chosen = mode or os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")
    if chosen == "dryrun":  # W&B's old name for offline, still accepted by wandb itself
        chosen = "offline"
    if chosen not in MODES:
        key = "logger.mode" if mode else "WANDB_MODE"
        raise ConfigError(f"{key}={chosen} is not a W&B mode; choose {', '.join(MODES)}")
    return chosen


def read_run_file(run_dir: Path) -> dict | None:
    path = Path(run_dir) / WANDB
    return json.loads(path.read_text()) if path.is_file() else None


def _value(value):
    """What W&B takes of a metrics row: numbers (non-finite ones too: W&B stores NaN/inf), bools as 0/1."""
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, (int, float)) else None


class WandbLogger:
    """One W&B run per mptrain run. Also a RunWriter sink: `log(row)`, `write_json(name, data)`,
    `write_summary(summary)`, `close()`."""

    def __init__(self, cfg, run_dir: Path, config: dict, resume: bool = False):
        """`cfg`: the `logger` config node; `config`: the resolved config as plain containers. Checks only
        (a mode that does not exist is a ConfigError); `start()` opens the W&B run once the directory is
        committed."""
        check_available()
        self.cfg, self.run_dir, self.config, self.resume = cfg, Path(run_dir), config, resume
        self.mode = resolve_mode(cfg.get("mode"))
        self.run, self.status = None, None

    def start(self) -> None:
        import wandb

        previous = read_run_file(self.run_dir) if self.resume else None
        settings = wandb.Settings(save_code=False, console="off", silent=True)
        self.run = wandb.init(project=self.cfg.experiment, entity=self.cfg.get("entity"),
                              name=self.cfg.run_name or self.run_dir.name, dir=str(self.run_dir),
                              id=previous["id"] if previous else None, resume="allow" if previous else None,
                              mode=self.mode, config=self.config, settings=settings, reinit="create_new")
        write_json_atomic(self.run_dir / WANDB, {"id": self.run.id, "mode": self.mode})
        if self.mode == "offline":
            folder = Path(self.run.dir).parent  # wandb/offline-run-<time>-<id>/files -> its run folder
            log.info("W&B run %s, offline in %s (upload it: wandb sync %s)", self.run.id, folder, folder)
        elif self.mode == "online":
            log.info("W&B run %s: %s", self.run.id, self.run.url)

    # RunWriter sink interface
    def log(self, row: dict) -> None:
        values = {k: v for k, v in ((k, _value(v)) for k, v in row.items() if k != "step") if v is not None}
        if values:
            self.run.log(values, step=int(row["step"]))

    def write_json(self, name: str, data: dict) -> None:
        if name == PRECISION_PLAN:  # rewritten when precision=auto changes the plan: the config holds the newest
            self.run.config.update({"precision_plan": data}, allow_val_change=True)

    def write_summary(self, summary: dict) -> None:
        self.status = summary.get("status", self.status)
        self.run.summary.update(summary)

    def close(self, status: str | None = None) -> None:
        status = status or self.status or "failed"
        self.run.finish(exit_code=EXIT_CODE.get(status, 1))
