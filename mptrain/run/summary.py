"""summary.json as a typed record: what a run was and did, whatever its end.

Assembled in one place (train/recipe.summarize) from the run's own objects. The fields every run has are typed
here; the sections owned by another part (the loss scaler's statistics, the precision's plan, the last validation,
the memory split, the diagnostics) stay that part's dict, each merged in a fixed order, so a key is written once.
`as_dict` is the file's content: the key order is the order below, and an optional field left None is absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Progress:
    """What the run did (known once the components were built)."""

    compute_dtype: str
    device: str
    steps: int
    epochs: float
    skipped_steps: int
    final_loss_scale: float | None
    train_loss: float | None
    samples: int  # over every rank
    samples_per_s: float | None  # the whole run's, across attempts; None before any timed step
    world_size: int
    peak_memory_mb: float
    peak_memory_kind: str
    memory_per_param: dict | None = None  # once a step has run (the optimizer state exists)
    events: list | None = None
    stop_reason: str | None = None
    # the owners' sections (each part's own summary)
    scaler: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)


@dataclass
class Summary:
    status: str  # completed | interrupted | failed (train/recipe.py decides)
    precision: str
    task: str | None
    model: str | None
    dataset: str | None
    seed: int
    wall_s: float  # every attempt's, to the checkpoint the next one continued from
    mptrain_version: str
    torch_version: str
    precision_alias: str | None = None  # precision=16-mixed and the like: the name the user gave
    progress: Progress | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        head = {"status": self.status, "precision": self.precision}
        if self.precision_alias:
            head["precision_alias"] = self.precision_alias
        head.update(task=self.task, model=self.model, dataset=self.dataset, seed=self.seed, wall_s=self.wall_s,
                    mptrain_version=self.mptrain_version, torch_version=self.torch_version)
        if self.progress is not None:
            head.update(_progress(self.progress))
        if self.error is not None:
            head["error"] = self.error
        return head


def _progress(p: Progress) -> dict:
    out = {"compute_dtype": p.compute_dtype, "device": p.device, "steps": p.steps, "epochs": p.epochs,
           "skipped_steps": p.skipped_steps, **p.scaler, "final_loss_scale": p.final_loss_scale,
           "train_loss": p.train_loss, **p.validation, "samples": p.samples, "samples_per_s": p.samples_per_s,
           "world_size": p.world_size, "peak_memory_mb": p.peak_memory_mb, "peak_memory_kind": p.peak_memory_kind,
           **p.memory, **p.precision}
    for name in ("memory_per_param", "events", "stop_reason"):
        if getattr(p, name) is not None:
            out[name] = getattr(p, name)
    out.update(p.diagnostics)
    return out

