"""Hydra callbacks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mptrain.run.directory import check_usable
from mptrain.run.lock import RunDirError


class CheckRunDir(Callback):
    """Before Hydra creates the run (or sweep) directory: refuse one that is a file or not writable,
    with one line (Hydra's own mkdir would end in a traceback)."""

    def _check(self, path: str) -> None:
        try:
            check_usable(Path(path))
        except RunDirError as e:
            print(f"mptrain: error: {e}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.sweep.dir))
