"""mptrain's Hydra sweeper. Hydra instantiates only plugins defined in the hydra_plugins package, so the
class is named here; its code is mptrain/sweeper.py (which imports Optuna only when the sweeper is used)."""

from mptrain.cli.sweeper import ResumableOptunaSweeper


class OptunaSweeper(ResumableOptunaSweeper):
    """`hydra.sweeper._target_: hydra_plugins.mptrain_sweeper.OptunaSweeper` (conf/hparams_search/optuna.yaml)."""
