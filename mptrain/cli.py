"""The `mptrain` command (and `python -m mptrain`): Hydra composes conf/, then the recipe runs."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import register_configs, validate
from .errors import MptrainError

log = logging.getLogger("mptrain")


def config_dir() -> str:
    """conf/ inside the installed package (wheel), else the repository's top-level conf/ (source tree)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"mptrain's conf/ was not found next to {here}; reinstall mptrain")


def run_suffix() -> str:
    """Keeps two runs started in the same second apart. Under torchrun every rank must agree on one
    directory, so the launcher's run id wins over the process id there."""
    return os.environ.get("TORCHELASTIC_RUN_ID") if "TORCHELASTIC_RUN_ID" in os.environ else str(os.getpid())


register_configs()
OmegaConf.register_new_resolver("mptrain_run_suffix", run_suffix, replace=True, use_cache=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from .outputs import print_config_tree, print_summary
    from .recipe import run

    try:
        validate(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        print_config_tree(cfg)
        log.info("run directory: %s", run_dir)
        summary = run(cfg, run_dir)
    except MptrainError as e:
        print(f"mptrain: error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # let the sweep run its other jobs; Hydra reports the failure at the end
        sys.exit(e.exit_code)
    print_summary(summary)
    return summary.get("val/acc")


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
