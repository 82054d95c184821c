"""The `mptrain` command (and `python -m mptrain`): Hydra composes conf/, then the recipe runs."""

from __future__ import annotations

import logging
import math
import os
import sys
import sysconfig
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import register_configs, validate
from .errors import MptrainError
from .help import config_groups

log = logging.getLogger("mptrain")


def config_dir() -> str:
    """conf/ inside the installed package (wheel), else the repository's top-level conf/ (source tree)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"mptrain's conf/ was not found next to {here}; reinstall mptrain")


def run_name() -> str:
    """The run directory's name: <time>-<pid>, which keeps two runs started in the same second apart.
    Under torchrun every rank must agree on one directory (and ranks may start in different seconds),
    so the launcher's run id names it there: torchrun-<run id>."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id:
        return f"torchrun-{run_id[:13]}"
    return f"{datetime.now():%H-%M-%S}-{os.getpid()}"


def output_subdir() -> str | None:
    """Hydra's .hydra records: written by rank 0 only under torchrun (None tells Hydra to skip them)."""
    return ".hydra" if os.environ.get("RANK", "0") == "0" else None


def python_stdlib(name: str) -> str:
    """A file of this Python's standard library (e.g. LICENSE.txt): real text present on every machine."""
    return str(Path(sysconfig.get_paths()["stdlib"]) / name)


def sweep_direction(metric: str | None) -> str:
    """Optuna's direction for a summary metric: losses and perplexities down, the rest (accuracy) up."""
    return "minimize" if metric and metric.rsplit("/", 1)[-1] in ("loss", "ppl", "train_loss") else "maximize"


def objective(cfg: DictConfig, summary: dict) -> float | None:
    """The task's return value, which a sweeper (Optuna) optimizes: summary[optimized_metric], else
    val/acc, else val/loss. A missing or non-finite objective raises, so the trial is marked failed."""
    metric = cfg.get("optimized_metric")
    if metric is None:
        return summary.get("val/acc", summary.get("val/loss"))
    value = summary.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MptrainError(f"optimized_metric={metric} is {value!r} in this run's summary, not a finite number "
                           f"(summary keys: {', '.join(sorted(summary))})")
    return float(value)


def check_sweeper_installed(argv: list[str]) -> None:
    """`hparams_search=optuna` without the extra: one line instead of Hydra's missing-config message."""
    if any(a.startswith("hparams_search=") and a != "hparams_search=null" for a in argv):
        try:
            import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
        except ImportError:
            print("mptrain: error: hparams_search=optuna needs hydra-optuna-sweeper: pip install mptrain[optuna]",
                  file=sys.stderr)
            sys.exit(2)


def register_sweeper() -> None:
    """Name our sweeper to Hydra: it finds plugins by scanning hydra_plugins' folders, which misses an
    editable install's (a setuptools path hook, not a folder)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.mptrain_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)


register_configs()
OmegaConf.register_new_resolver("mptrain_run_name", run_name, replace=True, use_cache=True)
OmegaConf.register_new_resolver("mptrain_output_subdir", output_subdir, replace=True)
OmegaConf.register_new_resolver("python_stdlib", python_stdlib, replace=True)
OmegaConf.register_new_resolver("mptrain_direction", sweep_direction, replace=True)
OmegaConf.register_new_resolver("mptrain_help_groups", config_groups, replace=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from .outputs import print_config_tree, print_summary
    from .recipe import run

    main_rank = os.environ.get("RANK", "0") == "0"
    if not main_rank:  # only rank 0 writes train.log and the console
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)
        logging.getLogger().addHandler(logging.NullHandler())
    try:
        validate(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if main_rank:
            print_config_tree(cfg)
        log.info("run directory: %s", run_dir)
        summary = run(cfg, run_dir)
        if main_rank:
            print_summary(summary)
        return objective(cfg, summary)
    except MptrainError as e:
        print(f"mptrain: error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # let the sweep run its other jobs (Optuna marks the trial failed); Hydra reports it at the end
        sys.exit(e.exit_code)


def main() -> None:
    check_sweeper_installed(sys.argv[1:])
    register_sweeper()
    _app()


if __name__ == "__main__":
    main()
