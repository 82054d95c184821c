"""The way in from Python: `mptrain.train`, `mptrain.evaluate`, `mptrain.sample` (docs/python.md).

`train` composes the config exactly as the `mptrain` command does (conf/, the same overrides, the same checks,
the same run directory: `hydra.run.dir=...` or outputs/<date>/<time>-<pid>), takes ready objects where given,
and returns the summary with `run_dir`. Errors are raised as the `mptrain.errors` exceptions the command prints
as one line. Sweeps (-m) stay with the command.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from mptrain.errors import ConfigError, MptrainError

log = logging.getLogger("mptrain")

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's, as the command's train.log


def compose(overrides: Sequence[str] = ()):
    """(config, Hydra's config, run directory) for `overrides`, as `mptrain <overrides>` composes them."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from mptrain.cli.keys import check_override_keys
    from mptrain.cli.main import continue_the_run
    from mptrain.cli.register import register
    from mptrain.config import CONFIG_NAME

    overrides = [str(o) for o in overrides]
    if any(o in ("-m", "--multirun") or o.startswith("-") for o in overrides):
        raise ConfigError(f"{next(o for o in overrides if o.startswith('-'))}: mptrain.train takes overrides "
                          "(key=value) only; run sweeps and Hydra flags with the mptrain command")
    conf = register()
    check_override_keys(overrides)
    overrides = continue_the_run(overrides)  # resume=auto continues the run with its own overrides, as the CLI
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            full = hydra_compose(config_name=CONFIG_NAME, overrides=overrides, return_hydra_config=True)
    except MptrainError:
        raise
    except Exception as e:  # Hydra's own message for a group or value it cannot compose: its first line
        raise ConfigError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    finally:
        GlobalHydra.instance().clear()
    run_dir = Path(OmegaConf.select(full, "hydra.run.dir"))
    hydra_cfg = OmegaConf.create({"hydra": OmegaConf.to_container(full.hydra)})
    with open_dict(full):
        del full["hydra"]
    return full, hydra_cfg, run_dir


@contextlib.contextmanager
def run_logging(run_dir: Path) -> Iterator[None]:
    """For this call only: mptrain's INFO lines to train.log (opened when the run directory is committed, as the
    command's) and, where the program has set up no logging of its own, to stderr."""
    from mptrain.run.directory import DeferredFileHandler
    from mptrain.run.layout import TRAIN_LOG

    root, ours = logging.getLogger(), logging.getLogger("mptrain")
    handlers = [DeferredFileHandler(str(run_dir / TRAIN_LOG))]
    if not root.handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        ours.setLevel(level)


def train(overrides: Sequence[str] | None = None, *, model=None, datasets=None, task=None, callbacks=None) -> dict:
    """Train as `mptrain <overrides>` would, with ready objects in place of what the config would build:
    `model` (an nn.Module, converted in place), `datasets` (a (train, val) pair of torch Datasets, or mptrain's
    Datasets), `task` (an object with loss(model, batch): docs/tasks.md), `callbacks` (Callback objects, or
    {"_target_": ...} dicts as in config). Returns the summary (summary.json) plus "run_dir"."""
    from omegaconf import OmegaConf

    from mptrain.cli.main import remove_if_empty
    from mptrain.config import validate
    from mptrain.run.directory import RunDir, check_usable
    from mptrain.train.given import Given, record
    from mptrain.train.recipe import run

    cfg, hydra_cfg, run_dir = compose(overrides or [])
    objects = [c for c in callbacks or [] if not isinstance(c, dict)]
    configured = [c for c in callbacks or [] if isinstance(c, dict)]  # recorded in the config, as from the CLI
    if configured:
        cfg.callbacks = [*OmegaConf.to_container(cfg.callbacks), *configured]
    given = Given(model, datasets, task, objects)
    record(cfg, given)
    validate(cfg)
    check_usable(run_dir)  # a file, or not writable: one line, before anything is made (as the command's check)
    made = [d for d in (run_dir.absolute(), *run_dir.absolute().parents) if not d.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)  # as Hydra makes it for the command (the lock lives in it)
    job = RunDir(run_dir, cfg, hydra_cfg)
    try:
        with run_logging(run_dir), job:
            log.info("run directory: %s", run_dir)
            summary = run(cfg, job, given)
    except BaseException:
        if not job.committed:  # refused: the directories made for it go again, as the command's
            for d in made:
                remove_if_empty(d)
        raise
    return {**summary, "run_dir": str(run_dir)}


def evaluate(run_dir, overrides: Sequence[str] | None = None, *, checkpoint: str | None = None, ema: bool = False,
             name: str | None = None, model=None, datasets=None, task=None) -> dict:
    """`mptrain-eval run_dir [overrides] [--checkpoint] [--ema] [--name]`: the checkpoint's validation metrics,
    written to run_dir/eval_<name>.json; returns that record plus "path". A run trained on passed objects needs
    them again (`model=`, `datasets=`, `task=`)."""
    from mptrain.tools.eval import evaluate as evaluate_run
    from mptrain.train.given import Given

    record, path = evaluate_run(Path(run_dir), checkpoint, list(overrides or []), name, ema,
                                Given(model, datasets, task))
    return {**record, "path": str(path)}


def sample(run_dir, prompt: str = "", *, tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
           seed: int = 0, checkpoint: str | None = None, overrides: Sequence[str] | None = None, ema: bool = False,
           count: int = 64, model=None, task=None) -> str | Path:
    """`mptrain-sample`: a language-model run's continuation of `prompt`, decoded with the run's tokenizer (the
    text after the prompt, as a str); a GAN run's grid of `count` images (the PNG's path)."""
    from mptrain.tools.sample import run_config, sample_images, sample_text
    from mptrain.train.given import Given, check_passed
    from mptrain.train.recipe import build_task, model_target

    given = Given(model, None, task)
    overrides = list(overrides or [])
    cfg = run_config(Path(run_dir), overrides)
    check_passed(cfg, given, ("model", "task"))
    kind = task if task is not None else build_task(cfg, model_target(cfg, model), None)
    if getattr(kind, "name", None) == "gan":
        return sample_images(Path(run_dir), seed, count, checkpoint, overrides, ema, given)
    return sample_text(Path(run_dir), prompt, tokens, temperature, top_k, seed, checkpoint, overrides, ema, given)
