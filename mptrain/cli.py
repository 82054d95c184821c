"""The `mptrain` command (and `python -m mptrain`): Hydra composes conf/, then the recipe runs."""

from __future__ import annotations

import logging
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


register_configs()
OmegaConf.register_new_resolver("mptrain_run_name", run_name, replace=True, use_cache=True)
OmegaConf.register_new_resolver("mptrain_output_subdir", output_subdir, replace=True)
OmegaConf.register_new_resolver("python_stdlib", python_stdlib, replace=True)
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
    except MptrainError as e:
        print(f"mptrain: error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # let the sweep run its other jobs; Hydra reports the failure at the end
        sys.exit(e.exit_code)
    if main_rank:
        print_summary(summary)
    return summary.get("val/acc", summary.get("val/loss"))


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
