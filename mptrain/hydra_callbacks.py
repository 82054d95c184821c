"""Hydra callbacks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class KeepHydraHistory(Callback):
    """Before Hydra writes .hydra/ for a run, move an earlier attempt's records to .hydra/attempt_<k>/.

    Hydra overwrites .hydra/config.yaml when a run restarts in the same directory (resume=auto into
    hydra.run.dir=<run>); this keeps what every earlier attempt ran with.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        records = Path(str(config.hydra.run.dir)) / str(config.hydra.output_subdir)
        if not (records / "config.yaml").is_file():
            return
        k = 1
        while (records / f"attempt_{k}").exists():
            k += 1
        (records / f"attempt_{k}").mkdir()
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            if (records / name).is_file():
                shutil.move(str(records / name), str(records / f"attempt_{k}" / name))
