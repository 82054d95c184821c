"""A mistyped config key on the command line: "did you mean trainer.max_steps?", before Hydra composes
(Hydra's own message suggests `+trainer.max_step=...`, which would add the typo as a new key).

Checked: the top-level keys and the groups whose schema fixes their keys (trainer, checkpoint, diagnostics,
precision, optimizer, scheduler, logger). Model, dataset and task entries take keys of their own `_target_`,
so Hydra checks those; `+key=`, `++key=`, `~key` and `hydra.*` are left to Hydra as well.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

from mptrain.config import (
    CheckpointConfig,
    Config,
    DiagnosticsConfig,
    LoggerConfig,
    OptimizerConfig,
    PrecisionConfig,
    SchedulerConfig,
    TrainerConfig,
)
from mptrain.errors import ConfigError

FIXED = {"trainer": TrainerConfig, "checkpoint": CheckpointConfig, "diagnostics": DiagnosticsConfig,
         "precision": PrecisionConfig, "optimizer": OptimizerConfig, "scheduler": SchedulerConfig,
         "logger": LoggerConfig}
OPEN = ("model", "dataset", "task", "experiment", "hydra", "hparams_search", "debug")  # keys of their own
OPEN_MAPPINGS = ("precision.formats",)  # mappings whose entries are the user's names (register.OPEN_KEYS)


def _fields(schema: Any, prefix: str) -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += _fields(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def known_keys() -> tuple[set[str], set[str]]:
    """(every fixed dotted key, the prefixes that are groups of keys)."""
    keys = {f.name for f in dataclasses.fields(Config) if f.name not in FIXED}
    groups = set(FIXED)
    for name, schema in FIXED.items():
        for key in _fields(schema, f"{name}."):
            keys.add(key)
            parts = key.split(".")
            groups.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return keys, groups


# a dict key written in quotes ({"blocks.*": fp32}), or one holding a bare [ or ] (an fnmatch class)
QUOTED_KEY = re.compile(r"""([{,]\s*)(["'])([^"']*)\2(\s*:)""")
BRACKET_KEY = re.compile(r"""([{,]\s*)([^{},:'"]*(?<!\\)[\[\]][^{},:'"]*)(\s*:)""")
BARE_BRACKET = re.compile(r"(?<!\\)([\[\]])")


def _escaped(key: str) -> str:
    return BARE_BRACKET.sub(r"\\\1", key)


def check_dict_keys(arg: str) -> None:
    """Hydra's override grammar takes dict keys unquoted, with [ and ] escaped: 'precision.layers={"blocks.*": fp32}'
    ends in "no viable alternative at input". Raise one line naming the form that parses (when one does)."""
    key, sep, value = arg.partition("=")
    if not sep or "{" not in value or not (QUOTED_KEY.search(value) or BRACKET_KEY.search(value)):
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        parser.parse_override(arg)
        return  # Hydra takes it as written
    except HydraException:
        pass
    value = QUOTED_KEY.sub(lambda m: m[1] + _escaped(m[3]) + m[4], value)
    fixed = f"{key}={BRACKET_KEY.sub(lambda m: m[1] + _escaped(m[2]) + m[3], value)}"
    try:
        parser.parse_override(fixed)
    except HydraException:
        return  # something else is wrong too: Hydra's own message
    raise ConfigError(f"{key.lstrip('+~')}: Hydra's override grammar takes dict keys unquoted, with [ and ] escaped; "
                      f"write '{fixed}'")


def check_override_keys(args: list[str]) -> None:
    """Raise ConfigError for a `key=value` argument whose key no schema has, naming the closest key (and for a
    dict whose keys Hydra cannot parse, naming the form it can)."""
    keys, groups = known_keys()
    for arg in args:
        check_dict_keys(arg)
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if "/" in key or "@" in key or key in groups or key in OPEN or key.split(".")[0] in OPEN \
                or key.startswith(tuple(f"{m}." for m in OPEN_MAPPINGS)):
            continue  # a group choice (precision=bf16, hydra/launcher=...) or a key Hydra checks itself
        if key in keys:
            continue
        head, _, rest = key.partition(".")
        if rest and head not in FIXED:
            typo = difflib.get_close_matches(head, sorted(FIXED) + list(OPEN), n=1, cutoff=0.75)
            if not typo:
                continue  # a group of the user's own (--config-dir): Hydra checks it
            key_fixed = f"{typo[0]}.{rest}"
            close = [key_fixed] if typo[0] in OPEN or key_fixed in keys else \
                difflib.get_close_matches(key_fixed, sorted(keys), n=1, cutoff=0.8)
        else:
            close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}?" if close else "`mptrain --cfg job` lists every key"
        raise ConfigError(f"{key} is not a config key; {hint}")
