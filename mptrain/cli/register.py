"""What Hydra must know before it composes conf/: the schemas, mptrain's resolvers and its sweeper.

Nothing registers on import. The CLI calls `register()` once at start; tests and scripts that compose
configs with Hydra's compose API call it first too. Calling it again is harmless (each store replaces).
"""

from __future__ import annotations

import os
import sysconfig
from datetime import datetime
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from mptrain import config as schema
from mptrain.cli.help import config_groups
from mptrain.config import config_dir
from mptrain.parallel.launch import env_info


def run_name() -> str:
    """The run directory's name: <time>-<pid>, which keeps two runs started in the same second apart.
    Under torchrun every rank must agree on one directory (and ranks may start in different seconds),
    so the launcher's run id names it there: torchrun-<run id> (slurm-<job>.<step> under srun without torchrun)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id:
        return f"torchrun-{run_id[:13]}"
    if env_info().enabled and "SLURM_JOB_ID" in os.environ:  # srun without torchrun: the job step
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    return f"{datetime.now():%H-%M-%S}-{os.getpid()}"


def python_stdlib(name: str) -> str:
    """A file of this Python's standard library (e.g. LICENSE.txt): real text present on every machine."""
    return str(Path(sysconfig.get_paths()["stdlib"]) / name)


def sweep_direction(metric: str | None) -> str:
    """Optuna's direction for a summary metric: losses and perplexities down, the rest (accuracy) up."""
    return "minimize" if metric and metric.rsplit("/", 1)[-1] in ("loss", "ppl", "train_loss") else "maximize"


# (group, name, schema): conf/ entries name their schema in their defaults list
SCHEMAS = (
    (None, "mptrain_schema", schema.Config),
    ("precision", "precision_schema", schema.PrecisionConfig),
    ("optimizer", "optimizer_schema", schema.OptimizerConfig),
    ("scheduler", "scheduler_schema", schema.SchedulerConfig),
    ("trainer", "trainer_schema", schema.TrainerConfig),
    ("checkpoint", "checkpoint_schema", schema.CheckpointConfig),
    ("diagnostics", "diagnostics_schema", schema.DiagnosticsConfig),
    ("logger", "logger_schema", schema.LoggerConfig),
    ("model", "cnn_schema", schema.CNNModelConfig),
    ("model", "torchvision_schema", schema.TorchvisionModelConfig),
    ("model", "mlp_schema", schema.MLPModelConfig),
    ("model", "recurrent_lm_schema", schema.RecurrentLMConfig),
    ("model", "gpt_schema", schema.GPTConfig),
    ("model", "dcgan_schema", schema.DCGANConfig),
    ("model", "timm_schema", schema.TimmModelConfig),
    ("model", "hf_causal_lm_schema", schema.HFCausalLMConfig),
    ("model", "hf_image_classification_schema", schema.HFImageClassificationConfig),
    ("dataset", "digits_schema", schema.DigitsDatasetConfig),
    ("dataset", "synthetic_schema", schema.SyntheticDatasetConfig),
    ("dataset", "torchvision_schema", schema.TorchvisionDatasetConfig),
    ("dataset", "imagefolder_schema", schema.ImageFolderConfig),
    ("dataset", "text_schema", schema.TextDatasetConfig),
    ("dataset", "synthetic_tokens_schema", schema.SyntheticTokensConfig),
    ("dataset", "tokens_schema", schema.TokensDatasetConfig),
    ("dataset", "hf_schema", schema.HFDatasetConfig),
)

OPEN_KEYS = {schema.PrecisionConfig: ("formats",)}  # mappings the user adds entries to without `+`


def open_keys(node):
    """The schema as a config whose OPEN_KEYS mappings take new keys under Hydra's struct mode:
    `precision.formats.NAME={...}` works as written (struct is a per-node flag that wins over the parent's)."""
    keys = OPEN_KEYS.get(node)
    if not keys:
        return node
    cfg = OmegaConf.structured(node)
    for key in keys:
        OmegaConf.set_struct(cfg[key], False)
    return cfg


RESOLVERS = {"mptrain_run_name": run_name, "python_stdlib": python_stdlib, "mptrain_direction": sweep_direction,
             "mptrain_help_groups": config_groups}


def register() -> str:
    """Register the schemas, the resolvers and the sweeper; return conf/'s path for Hydra."""
    cs = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        cs.store(group=group, name=name, node=open_keys(node))
    for name, fn in RESOLVERS.items():
        # the run name is drawn once per process (every interpolation of it agrees)
        OmegaConf.register_new_resolver(name, fn, replace=True, use_cache=name == "mptrain_run_name")
    register_sweeper()
    return config_dir()


def register_sweeper() -> None:
    """Name our sweeper to Hydra: it finds plugins by scanning hydra_plugins' folders, which misses an
    editable install's (a setuptools path hook, not a folder)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.mptrain_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)
