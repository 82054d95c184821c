"""Ready objects from Python (`mptrain.train(model=..., datasets=..., task=..., callbacks=...)`) used in place of
what the config would build, what the run's config then says of them, and user callbacks from config
(`callbacks=[{_target_: ...}]`).

A passed object's config group becomes `{"name": <class>, "passed": <module.Class>}`: the composed default
(`model=cnn`) is not what trained, and the record must not say it is. The tools (mptrain.evaluate, .sample) need
the same objects again for such a run, and say so in one line when they are not given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from mptrain.errors import ConfigError
from mptrain.train.callbacks.base import Callback

HOOKS = ("on_step_end", "on_validation_end", "close")  # Callback's documented hooks (train/callbacks/base.py)
# config group -> the keyword that passes its object to mptrain.train / evaluate / sample
GROUPS = {"model": "model", "dataset": "datasets", "task": "task"}


@dataclass
class Given:
    model: nn.Module | None = None
    datasets: object = None  # mptrain Datasets, a (train, val) pair of torch Datasets, or one Dataset
    task: object = None  # a Task, or any object with loss(model, batch) (docs/tasks.md)
    callbacks: list = field(default_factory=list)  # Callback objects (or any with some of its hooks)

    def of(self, group: str) -> object:
        return getattr(self, GROUPS[group])


def qualified(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def describe(obj: object) -> dict:
    if isinstance(obj, (tuple, list)) and obj:  # a (train, val) pair: name the training set's class
        obj = obj[0]
    name = getattr(obj, "name", None) if not isinstance(obj, nn.Module) else None
    return {"name": name if isinstance(name, str) else type(obj).__name__, "passed": qualified(obj)}


def record(cfg: DictConfig, given: Given) -> None:
    """Say in the config what was passed. The config is resolved first: a key that interpolated a replaced
    group (model.num_classes: ${dataset.num_classes}) keeps the value it had."""
    passed = {group: given.of(group) for group in GROUPS if given.of(group) is not None}
    if not passed:
        return
    OmegaConf.resolve(cfg)
    with open_dict(cfg):
        for group, obj in passed.items():
            cfg[group] = describe(obj)


def check_passed(cfg: DictConfig, given: Given | None, groups: tuple[str, ...] = tuple(GROUPS)) -> None:
    """A run trained on passed objects is rebuilt only with them (mptrain.evaluate(run_dir, model=...))."""
    for group, keyword in ((g, GROUPS[g]) for g in groups):
        node = cfg.get(group)
        if isinstance(node, DictConfig) and node.get("passed") and (given is None or given.of(group) is None):
            raise ConfigError(f"this run's {group} was an object passed to mptrain.train ({node.passed}), which its "
                              f"config cannot rebuild; pass it again ({keyword}=...) to mptrain.evaluate / "
                              "mptrain.sample")


class HookAdapter(Callback):
    """An object with some of Callback's hooks, given Callback's no-op defaults for the rest."""

    def __init__(self, inner: object):
        self.inner = inner
        for hook in HOOKS:
            if callable(getattr(inner, hook, None)):
                setattr(self, hook, getattr(inner, hook))


def as_callback(obj: object, where: str) -> Callback:
    if isinstance(obj, Callback):
        return obj
    if not any(callable(getattr(obj, hook, None)) for hook in HOOKS):
        raise ConfigError(f"{where} is a {type(obj).__name__}, which has none of the callback hooks "
                          f"({', '.join(HOOKS)}); subclass mptrain.Callback (docs/python.md)")
    return HookAdapter(obj)
