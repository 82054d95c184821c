"""Hydra callbacks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mptrain.run.directory import check_usable
from mptrain.run.layout import MULTIRUN
from mptrain.run.lock import RunDirError


class CheckRunDir(Callback):
    """Before Hydra creates the run (or sweep) directory: refuse one that is a file or not writable,
    with one line (Hydra's own mkdir would end in a traceback). Notes the directories Hydra is about to make
    for a run (`made`), so that a refused run removes them again: outputs/, outputs/<date>/ too when new."""

    made: dict[str, list[Path]] = {}  # run dir -> it and its missing parents, innermost first (one per process)

    def _check(self, path: str) -> None:
        try:
            check_usable(Path(path))
        except RunDirError as e:
            print(f"mptrain: error: {e}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.run.dir))
        run_dir = Path(config.hydra.run.dir).absolute()  # as the job sees it (hydra.runtime.output_dir)
        CheckRunDir.made[str(run_dir)] = [d for d in (run_dir, *run_dir.parents) if not d.exists()]

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.sweep.dir))
        earlier = Path(config.hydra.sweep.dir) / MULTIRUN
        if earlier.is_file():
            self._same_sweep(earlier, list(config.hydra.overrides.task))

    @staticmethod
    def _same_sweep(earlier: Path, overrides: list[str]) -> None:
        """A second, different sweep into one directory would overwrite multirun.yaml while job folders still
        hold the first sweep's runs. Running the same sweep again (resume=auto, or more Optuna trials) is fine."""
        def key(items) -> list[str]:
            return sorted(str(o) for o in items if not str(o).startswith("resume="))

        try:
            before = OmegaConf.load(earlier).hydra.overrides.task
        except Exception:  # unreadable: name it rather than guess
            before = None
        if before is None or key(before) != key(overrides):
            print(f"mptrain: error: {earlier.parent} holds another sweep (its multirun.yaml has other overrides: "
                  f"{' '.join(key(before or [])) or 'none'}); choose a new hydra.sweep.dir, or repeat that sweep's "
                  "overrides to continue it", file=sys.stderr)
            raise SystemExit(2)
