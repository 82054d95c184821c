"""A trained run, rebuilt for use (mptrain-eval, mptrain-sample, mptrain-export).

The config is the run's own `.hydra/config.yaml`, changed only by the overrides given (a group choice such as
`precision=bf16` takes that group's entry from conf/; a dotted key such as `dataset.root=...` sets one value).
The model is built by the recipe's own builders (`recipe.build`, or `recipe.build_model` where no data are
needed) and takes a checkpoint's weights, FP32 master copies where the run kept them, or with `--ema` the
checkpoint's averaged weights (trainer.ema), cast into the model's own dtypes as training's EMA validation does.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from mptrain.checkpoint.files import check_finite, load_file
from mptrain.cli.register import config_dir, register
from mptrain.config import (
    CheckpointConfig,
    DiagnosticsConfig,
    OptimizerConfig,
    PrecisionConfig,
    SchedulerConfig,
    TrainerConfig,
)
from mptrain.errors import ConfigError, MptrainError
from mptrain.run.layout import BEST, CHECKPOINTS, CONFIG, LAST

log = logging.getLogger("mptrain")

_MISSING = object()


def run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The run's composed config (.hydra/config.yaml) with `overrides` applied; one-line errors for a
    directory that is not a run or an override that names nothing."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; pass a run directory, e.g. outputs/<date>/<time>-<id>")
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not an mptrain run directory (no .hydra/config.yaml)")
    register()  # the schemas, and the resolvers a saved config may use (${python_stdlib:...})
    cfg = load_saved_config(path)
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:  # Hydra's OverrideParseException: its first line says what is wrong
        raise ConfigError(f"cannot parse the overrides: {str(e).splitlines()[0]}") from None
    groups = Path(config_dir())
    for o in parsed:
        key, value = o.key_or_group, o.value()
        if o.is_delete():
            raise ConfigError(f"~{key}: removing keys is not supported here; set a value instead")
        if "." not in key and (groups / key).is_dir() and isinstance(value, str) and key in cfg:
            cfg[key] = _group_entry(key, value)
            continue
        if not o.is_add() and OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ConfigError(unknown_key_message(key, cfg))
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=o.is_add())
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}={value}: {str(e).splitlines()[0]}") from None
    check_types(cfg, path, {o.key_or_group for o in parsed})
    return cfg


DAMAGED = (
    "the run's config is damaged or was edited: restore it (a resumed run keeps earlier copies in .hydra/attempt_<k>/)"
)
# the sections every run's config has, and the schemas of those whose keys are fixed
SECTIONS = ("model", "dataset", "precision", "optimizer", "scheduler", "trainer", "checkpoint", "diagnostics")
TYPED = {"precision": PrecisionConfig, "optimizer": OptimizerConfig, "scheduler": SchedulerConfig,
         "trainer": TrainerConfig, "checkpoint": CheckpointConfig, "diagnostics": DiagnosticsConfig}


def load_saved_config(path: Path) -> DictConfig:
    """.hydra/config.yaml, checked: readable YAML, a mapping with every section, each typed section's values of
    its schema's types. A key missing from a typed section (a config written by an older mptrain, or edited)
    takes this mptrain's default, with a warning naming it; a required one is refused."""
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not readable YAML ({getattr(e, 'problem', None) or type(e).__name__}{where}); "
                          f"{DAMAGED}") from None
    except (OSError, ValueError, OmegaConfBaseException) as e:  # e.g. a file holding one number
        raise ConfigError(f"{path} is not a run's config ({str(e).splitlines()[0]}); {DAMAGED}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} is not a run's config (a list, not a mapping); {DAMAGED}")
    absent = [k for k in SECTIONS if not isinstance(cfg.get(k), DictConfig)]
    if absent:
        raise ConfigError(f"{path} is incomplete: no {', '.join(absent)} section{'s' * (len(absent) > 1)}; {DAMAGED}")
    defaulted = []
    for section, schema in TYPED.items():
        default = OmegaConf.structured(schema)
        for key in default:
            if key in cfg[section]:
                continue
            if OmegaConf.is_missing(default, key):
                raise ConfigError(f"{path} is incomplete: no {section}.{key}; {DAMAGED}")
            cfg[section][key] = default[key]
            defaulted.append(f"{section}.{key}")
    if defaulted:
        log.warning("%s lacks %s: this mptrain's defaults are used (the config is older, damaged or edited)",
                    path, ", ".join(defaulted))
    return cfg


def check_types(cfg: DictConfig, path: Path, given: set[str]) -> None:
    """Each typed section's values have its schema's types, and every interpolation resolves: what the builders
    read fails here in one line, not in a traceback. `given`: the keys (and groups) the overrides set."""
    for section, schema in TYPED.items():
        default = OmegaConf.structured(schema)
        OmegaConf.set_struct(default, False)  # keys an older mptrain wrote are kept
        try:
            OmegaConf.merge(default, cfg[section])
        except OmegaConfBaseException as e:
            key = f"{section}.{e.full_key}" if getattr(e, "full_key", None) else section
            if key in given or section in given:
                raise ConfigError(f"{key}: {str(e).splitlines()[0]}; fix the override") from None
            raise ConfigError(f"{path}: {key}: {str(e).splitlines()[0]}; {DAMAGED}") from None
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path} cannot be resolved ({str(e).splitlines()[0]}); {DAMAGED}") from None


def _group_entry(group: str, name: str) -> DictConfig:
    """conf/<group>/<name>.yaml as the main config composes it (with its schema's defaults)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="config", overrides=[f"{group}={name}"])[group]
    except MptrainError:
        raise
    except Exception as e:
        raise ConfigError(f"{group}={name}: {str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()


def _keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a plain container."""
    if not isinstance(node, dict):
        return [prefix[:-1]]
    return [k for name, v in node.items() for k in _keys(v, f"{prefix}{name}.")]


def unknown_key_message(key: str, cfg: DictConfig) -> str:
    close = difflib.get_close_matches(key, _keys(OmegaConf.to_container(cfg)), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "check the name (the run's keys are in .hydra/config.yaml)"
    return f"{key} is not a key of this run's config; {hint}"


def checkpoint_path(run_dir: Path, name: str | None) -> Path:
    """checkpoints/<name> (a bare name gets .pt); by default best.pt, else last.pt."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    if name is not None:
        path = ckpt_dir / (name if name.endswith(".pt") else f"{name}.pt")
        if not path.is_file():
            have = sorted(p.name for p in ckpt_dir.glob("*.pt")) if ckpt_dir.is_dir() else []
            raise ConfigError(f"{path} does not exist; this run has {', '.join(have) or 'no checkpoint files'}")
        return path
    for default in (BEST, LAST):
        if (ckpt_dir / default).is_file():
            return ckpt_dir / default
    raise ConfigError(f"{run_dir} has no checkpoint (checkpoints/best.pt or last.pt): it was trained with "
                      "checkpoint.enabled=false, or is still before its first save")


def load_checkpoint(path: Path) -> dict:
    """A checked, finite mptrain checkpoint with weights."""
    ckpt = load_file(path)
    if "model" not in ckpt:
        raise ConfigError(f"{path} holds no weights (a sharded FSDP checkpoint keeps them in checkpoints/sharded/)")
    check_finite(ckpt, f"checkpoint {path}")
    return ckpt


def weights(ckpt: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's model state, with each low-precision parameter replaced by its FP32 master copy
    where the run kept one (precision=master): in the order MasterWeights made them, the model's
    parameters that the checkpoint holds in a 16-bit type."""
    state = dict(ckpt["model"])
    masters = ((ckpt.get("precision") or {}).get("master") or {}).get("masters")
    if not masters:
        return state
    names: dict[int, list[str]] = {}  # every state_dict name of each parameter (tied weights have several)
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    low = [p for _, p in model.named_parameters() if p.requires_grad
           and state[names[id(p)][0]].dtype in (torch.float16, torch.bfloat16)]
    if len(low) != len(masters):
        log.warning("the checkpoint's %d master weights do not match the model's %d 16-bit parameters: using the "
                    "16-bit weights", len(masters), len(low))
        return state
    for p, master in zip(low, masters):
        for name in names[id(p)]:
            state[name] = master
    return state


def require_ema(ckpt: dict, path: Path) -> None:
    """--ema: the checkpoint must hold the average (checked before anything is built or written)."""
    if not ckpt.get("ema"):
        raise ConfigError(f"{path} holds no EMA weights: the run trained without trainer.ema.enabled=true; "
                          "drop --ema to use its live weights")


def ema_weights(ckpt: dict, model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 average (ema.shadow), one entry per state_dict name of the model."""
    shadow = ckpt["ema"]["shadow"]
    own = model.state_dict().keys()
    if shadow.keys() != own:
        odd = sorted(own ^ shadow.keys())[:3]
        raise ConfigError(f"{path}: its EMA weights do not match the model's state ({', '.join(odd)}); "
                          "the checkpoint was edited or written for another model")
    return dict(shadow)


def restore_plan(precision, ckpt: dict, own: bool = True) -> None:
    """The run's precision as it stood when the checkpoint was saved, where the preset is the run's own:
    precision=auto's measured plan (not the unmeasured start), the switches of precision.schedule made by then, a
    switch to bf16 (loss_scale.on_min=bf16), and
    (`own`: no precision override given now) the per-module plan it trained under, which a later resume with
    other precision.layers changed. Call after the model is built (the precision converts it) and before its
    weights are loaded."""
    state = ckpt.get("precision") or {}
    if own:  # precision.schedule and on_min=bf16: the precision the run had switched to by that step
        precision.catch_up(int((ckpt.get("train_state") or {}).get("step", 0)), state=state)
    if state.get("mode") != precision.mode:
        return  # another preset evaluates the weights as that preset computes
    kept = {k: state[k] for k in ("auto", "bf16_switch") if state.get(k)}
    if kept and (precision.measured_plan or "auto" not in kept):
        precision.load_state_dict(kept)
    saved = state.get("plan")
    if own and saved and precision.plan is not None and not precision.measured_plan \
            and saved != precision.plan.formats() and set(saved) == set(precision.plan):
        precision.restore_formats(saved, "the checkpoint's plan")


def sets_precision(overrides: list[str]) -> bool:
    """Some override changes the precision (the tool then computes as told, not as the checkpoint did)."""
    return any(o.lstrip("+~").split("=", 1)[0].split(".")[0] == "precision" for o in overrides)


# eval, sample and export rebuild the run's own model: a checkpoint that does not fit it means the overrides changed it
TOOL_FIX = ("Drop the overrides that change the model (model.*, or the dataset's classes or vocabulary): the run's "
            f"own model settings ({CONFIG}) are what it was written with")


def load_weights(model: nn.Module, ckpt: dict, path: Path, ema: bool = False) -> None:
    """The checkpoint's weights (or its EMA average) copied into the model's own dtypes: load_state_dict's
    copy_ casts each entry as the run's precision did, and as EMA.swap does for val_ema/..."""
    from mptrain.checkpoint.resume import check_model_fits

    check_model_fits(ckpt["model"], model, path, fix=TOOL_FIX)
    model.load_state_dict(ema_weights(ckpt, model, path) if ema else weights(ckpt, model))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """mptrain's info lines held back (warnings and errors still show): for a second build of the same model
    (export's check), or a tool whose output is the product (sample's text), not the set-up."""
    logger = logging.getLogger("mptrain")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def tool_main(prog: str, body: Callable[[], None]) -> None:
    """Run a tool: info lines on stderr, an MptrainError as one line `prog: error: ...` and its exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        body()
    except MptrainError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
