"""Tasks: what the loss of one micro-batch is, and which validation metrics to sum (docs/tasks.md).

A task is a config group entry (`task=classification|language_modeling|gan|<yours>`, each a `_target_`).
The contract is small:

    loss(model, batch) -> float32 scalar           required: the training loss of one micro-batch
    validation_sums(model, batch) -> {name: sum}    optional: per-batch sums (plus "count"), reduced over
                                                    the validation set and every rank
    validation_metrics(totals) -> {"val/...": x}    optional: metrics from the reduced sums

mptrain calls both under the precision's autocast, with the batch already on the device; everything
else (precision, accumulation, clipping, diagnostics, checkpoints, DDP/FSDP) is mptrain's, the same for
built-in and user tasks. A task that trains several networks with their own optimizers (a GAN) names
them in `parts` and takes `loss(model, batch, part)`; mptrain steps each part in that order, with one
loss scaler for all.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.errors import ConfigError, TaskError


class Task:
    """The base class. Subclass it and define `loss`; the rest has working defaults."""

    # dataset kinds (Datasets.task) whose batches this task trains on; None: any
    datasets: tuple[str, ...] | None = None
    # submodules of the model trained by optimizers of their own, stepped in this order; ("model",): one
    # optimizer over the whole model
    parts: tuple[str, ...] = ("model",)
    # the validation metrics the task reports, when known in advance (checkpoint.monitor is checked at start
    # against them; None: at the first validation)
    metrics: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        """How summary.json and the log name the task (built-in tasks set a plain string instead)."""
        return type(self).__name__

    def loss(self, model: nn.Module, batch, *part) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define loss(model, batch)")

    def validation_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        """Default: the training loss summed over the batch (its mean times the batch size)."""
        n = batch_size(batch)
        return {"loss": self.loss(model, batch).float() * n, "count": n}

    def validation_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Default: every sum divided by "count", named val/<name>."""
        count = max(totals.get("count", 0.0), 1.0)
        return {f"val/{k}": v / count for k, v in totals.items() if k != "count"}

    def after_validation(self, model: nn.Module, run_dir: Path | None, step: int) -> None:
        """Optional: write artefacts of a validation (the GAN writes sample images)."""


def checked_loss(loss: object, task: object) -> torch.Tensor:
    """The task's loss as a float32 scalar, or a TaskError naming what is wrong with it. Reads only
    tensor metadata (no device sync), so it runs on every micro-batch."""
    name = getattr(task, "name", type(task).__name__)
    if not isinstance(loss, torch.Tensor):
        raise TaskError(f"task {name}: loss() returned a {type(loss).__name__}, not a tensor; return a float32 scalar "
                        "tensor computed from the model's output (docs/tasks.md)")
    if loss.numel() != 1:
        raise TaskError(f"task {name}: loss() returned a tensor of shape {tuple(loss.shape)}, not a scalar; reduce it "
                        "(e.g. .mean()) to the mean loss of the micro-batch")
    if loss.device.type == "meta":
        raise TaskError(f"task {name}: loss() returned a tensor on the meta device (no data); compute it from the "
                        "model's output on the batch's device")
    if not loss.requires_grad:
        raise TaskError(f"task {name}: loss() returned a {str(loss.dtype).removeprefix('torch.')} tensor that does not "
                        "depend on the model's parameters (no gradient); compute it differentiably from model(...)")
    return loss.reshape(()).float()


def checked_sums(out: object, keys: list[str] | None, task: object, device: torch.device) -> torch.Tensor:
    """validation_sums' values (without "count") as one float64 vector in the order of `keys`, or a
    TaskError: each value a number or a one-element tensor, the same names for every batch."""
    name = getattr(task, "name", type(task).__name__)
    if not isinstance(out, dict) or (keys is not None and sorted(out) != sorted(keys)):
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise TaskError(f"task {name}: validation_sums() returned {got}, expected a dict with the same names for "
                        f"every batch{f' ({sorted(keys)})' if keys else ''}")
    values = []
    for k in keys if keys is not None else out:
        v = torch.as_tensor(out[k], device=device)
        if v.numel() != 1:
            raise TaskError(f"task {name}: validation_sums()[{k!r}] has shape {tuple(v.shape)}; each value must be "
                            "one number (a sum over the batch)")
        values.append(v.reshape(()).double())
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=device)


def batch_size(batch) -> int:
    """Samples in a batch: the length of its first tensor."""
    first = batch
    while isinstance(first, (tuple, list)):
        first = first[0]
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return int(first.shape[0])


def output_logits(out: object) -> object:
    """The logits of a model's output: a tensor as it is; a Hugging Face ModelOutput (or a dict) by its
    `logits`; a tuple by its first element (timm and torchvision models with auxiliary heads)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:  # transformers' ModelOutput is an OrderedDict
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


class Classification(Task):
    """(images, labels) -> cross-entropy; val/loss, val/acc."""

    name = "classification"
    datasets = ("classification",)
    metrics = ("val/loss", "val/acc")

    def logits(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = output_logits(model(x))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != y.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ConfigError(f"the model's output {shape} does not fit labels of shape {tuple(y.shape)}: a "
                              "classification model must return (batch, num_classes) logits; check model.num_classes "
                              "and the task (task=...)")
        if not getattr(self, "labels_checked", False):  # once per run: reading the labels is a host sync
            self.labels_checked = True
            top = int(y.max()) if y.numel() else -1
            if top >= logits.shape[1]:
                raise ConfigError(f"the model's output has {logits.shape[1]} classes but the data have label {top}: "
                                  "set model.num_classes to the dataset's number of classes (or leave it at "
                                  "${dataset.num_classes})")
        return logits.float()

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(model, x, y), y)

    def validation_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.logits(model, x, y)
        return {"loss": F.cross_entropy(logits, y, reduction="sum"), "acc": (logits.argmax(dim=1) == y).sum(),
                "count": y.numel()}


class LanguageModeling(Task):
    """(tokens, next tokens) -> cross-entropy per token; val/loss, val/ppl."""

    name = "language_modeling"
    datasets = ("language_modeling",)
    metrics = ("val/loss", "val/ppl")

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(model, x), y.flatten())

    @staticmethod
    def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(batch * seq, vocab) float32 logits."""
        logits = output_logits(model(x))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != x.shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ConfigError(f"the model's output {shape} does not fit tokens of shape {tuple(x.shape)}: a language "
                              "model must return (batch, seq, vocab) logits")
        return logits.float().flatten(0, 1)

    def validation_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = F.cross_entropy(self.logits(model, x), y.flatten(), reduction="sum")
        return {"loss": loss, "count": y.numel()}

    def validation_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        loss = totals["loss"] / max(totals["count"], 1.0)
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 700.0))}


# what a model that declares its task (`task = "gan"` on its class) trains with when no task= is given
BUILTIN = {"classification": "mptrain.library.tasks.Classification",
           "language_modeling": "mptrain.library.tasks.LanguageModeling",
           "gan": "mptrain.library.models.gan.Adversarial"}

DATASET_HINT = {"language_modeling": "a token dataset (dataset=text or dataset=synthetic_tokens)",
                "classification": "an image dataset (dataset=digits, mnist, cifar10, imagefolder, synthetic)"}


class Adapted(Task):
    """Any object with `loss(model, batch)` as a task: what it defines is used, the rest is Task's default
    (the README's contract: "a class with one method")."""

    def __init__(self, inner: object):
        self.inner = inner
        for attr in ("datasets", "parts", "metrics"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    @property
    def name(self) -> str:
        name = getattr(self.inner, "name", None)
        return name if isinstance(name, str) else type(self.inner).__name__

    def loss(self, model: nn.Module, batch, *part) -> torch.Tensor:
        return self.inner.loss(model, batch, *part)

    def validation_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        own = getattr(self.inner, "validation_sums", None)
        return own(model, batch) if callable(own) else super().validation_sums(model, batch)

    def validation_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        own = getattr(self.inner, "validation_metrics", None)
        return own(totals) if callable(own) else super().validation_metrics(totals)

    def after_validation(self, model: nn.Module, run_dir: Path | None, step: int) -> None:
        own = getattr(self.inner, "after_validation", None)
        if callable(own):
            own(model, run_dir, step)


def check_task(task: object, dataset_task: str) -> Task:
    """The task must have a loss(model, batch) and accept the data the dataset serves. An object that does not
    subclass Task gets Task's defaults for what it lacks."""
    if not callable(getattr(task, "loss", None)):
        raise ConfigError(f"task._target_ built a {type(task).__name__}, which has no loss(model, batch) method; "
                          "define one, or subclass mptrain.library.tasks.Task (docs/tasks.md)")
    if not isinstance(task, Task):
        task = Adapted(task)
    parts = task.parts
    if not (isinstance(parts, (tuple, list)) and parts and all(isinstance(n, str) for n in parts)):
        raise ConfigError(f"task {task.name}: parts={parts!r} must be a non-empty tuple of submodule names "
                          "(default ('model',): one optimizer over the whole model)")
    accepted = getattr(task, "datasets", None)
    if accepted is not None and dataset_task not in accepted:
        raise ConfigError(
            f"the model trains a {getattr(task, 'name', type(task).__name__)} task but the dataset serves "
            f"{dataset_task}; use {DATASET_HINT.get(accepted[0], 'a matching dataset')}"
        )
    return task
