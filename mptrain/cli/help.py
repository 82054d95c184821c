"""`mptrain --help`: the config groups, what each is for, and their real choices.

Hydra's own group listing ($APP_CONFIG_GROUPS) shows every ConfigStore entry, so the schemas
(`cnn_schema`, ...) and internal groups (`arm`, the experiment arms) would appear beside the choices a
user picks from. The help template (conf/hydra/help/mptrain.yaml) calls :func:`config_groups` through
an OmegaConf resolver instead; it reads the same config loader, so a user's --config-dir entries show too.
"""

from __future__ import annotations

import textwrap

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType

from mptrain.config import PRECISION_ALIASES

# shown first, in this order; any other group (a user's own) follows without a description
PURPOSE = {
    "model": "the network (model.<key>=... changes one setting)",
    "task": "what the loss is: the model's own task unless set; your own via --config-dir (docs/tasks.md)",
    "dataset": "the data (dataset.root=<dir> for data on disk)",
    "precision": "how the model computes and how gradients are protected (docs/precision.md)",
    "optimizer": "the optimizer",
    "scheduler": "the learning-rate schedule",
    "trainer": "steps, batch size, device, speed knobs (trainer.max_steps=..., trainer.batch_size=...)",
    "checkpoint": "when checkpoints are written (docs/checkpoints.md)",
    "diagnostics": "precision diagnostics: gradient histograms, underflow and overflow (docs/diagnostics.md)",
    "logger": "experiment tracking beside TensorBoard: mlflow, wandb (pip install mptrain[mlflow] / mptrain[wandb])",
    "experiment": "paper-style sweeps, run with -m",
    "hparams_search": "hyperparameter search with -m: optuna (pip install mptrain[optuna])",
    "debug": "check a config: fast (2 steps), overfit (one batch), profile (torch.profiler), anomaly",
}
HIDDEN_GROUPS = {"hydra", "arm"}  # Hydra's own settings; the loss-scale ablation's arms
# listed apart from the everyday choices: the paper's ablations, which show what goes wrong without a technique
ABLATIONS = {"precision": ("noscale", "nomaster", "static")}
# other tools' names for a group's choices, listed as `alias = choice` (conf/precision/<alias>.yaml)
ALIASES = {"precision": PRECISION_ALIASES}


def is_internal(option: str) -> bool:
    """A structured-config schema registered in the group (the `<name>_schema` convention)."""
    return option.endswith("_schema")


def config_groups() -> str:
    """One block per group: its purpose, then its choices (the current one marked with *)."""
    loader = GlobalHydra.instance().config_loader()
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    groups = [g for g in loader.list_groups("") if g not in HIDDEN_GROUPS]
    groups.sort(key=lambda g: (list(PURPOSE).index(g) if g in PURPOSE else len(PURPOSE), g))
    lines = []
    for group in groups:
        options = [o for o in loader.get_group_options(group, ObjectType.CONFIG) if not is_internal(o)]
        if not options:
            continue
        chosen = choices.get(group)

        def mark(o: str, chosen: str | None = chosen) -> str:
            return f"{o}*" if o == chosen else o

        aliases, ablations = ALIASES.get(group, {}), ABLATIONS.get(group, ())
        everyday = [o for o in sorted(options) if o not in aliases and o not in ablations]
        lines.append(f"  {group:<12} {PURPOSE.get(group, '')}".rstrip())
        for label, names in (("", [mark(o) for o in everyday]),
                             ("other tools' names: ", [f"{mark(a)}\xa0=\xa0{aliases[a]}" for a in sorted(aliases)
                                                       if a in options]),
                             ("the paper's ablations: ", [mark(o) for o in ablations if o in options])):
            if names:  # wrapped between entries only (a no-break space inside `alias = choice`)
                lines += [w.replace("\xa0", " ") for w in textwrap.wrap(
                    label + ", ".join(names), width=100, initial_indent=" " * 15,
                    subsequent_indent=" " * 17 if label else " " * 15, break_on_hyphens=False)]
    return "\n".join(lines)
