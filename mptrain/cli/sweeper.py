"""Hydra's Optuna sweeper (hydra-optuna-sweeper, the extra `mptrain[optuna]`), made resumable.

`mptrain -m hparams_search=optuna` keeps the study in SQLite inside the sweep directory; running the
same command again with `hydra.sweep.dir=<that directory>` adds trials to the same study. The
plugin numbers its jobs from 0 in every process, so a resumed sweep would write its trials into the
directories of the first ones; here a job's number is its Optuna trial number instead.

Hydra imports this module at every start (plugin discovery): Optuna is imported only when used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper

from mptrain.errors import TrainingFailed


def trials_so_far(storage: str | None, study_name: str | None) -> int:
    """How many trials the stored study holds (0 when there is no such study yet)."""
    if storage is None or study_name is None:
        return 0
    import optuna

    try:
        return len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:  # optuna's "no such study"
        return 0


class ResumableOptunaSweeper(Sweeper):
    """The plugin's OptunaSweeper, taking the same settings (hydra.sweeper.*)."""

    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as PluginSweeper

        self.plugin = PluginSweeper(**settings)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.plugin.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        impl = self.plugin.sweeper
        Path(impl.sweep_dir).mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
        impl.job_idx = trials_so_far(impl.storage, impl.study_name)  # job <n> is trial <n>
        if impl.job_idx and hasattr(impl.sampler, "reseed_rng"):
            impl.sampler.reseed_rng()  # else a seeded sampler would propose the first trials again
        try:
            return self.plugin.sweep(arguments)
        except ValueError:  # the plugin asks for study.best_trial, which Optuna cannot give without one
            import optuna

            study = optuna.load_study(study_name=impl.study_name, storage=impl.storage) if impl.storage else None
            if study is None or any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
                raise
            # one line, not Hydra's report of an exception from a sweeper
            print(f"mptrain: error: none of the study's {len(study.trials)} trials completed (each failed or "
                  "diverged: see the jobs' summary.json), so it has no best trial; narrow the search space (e.g. a "
                  "lower optimizer.lr range) and run the sweep again", file=sys.stderr)
            raise SystemExit(TrainingFailed.exit_code) from None
