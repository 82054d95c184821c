"""Tasks: what one training step and one evaluation mean, so that the loop stays one loop.

classification       (images, labels)  -> cross-entropy; val/loss, val/acc
language_modeling    (tokens, next tokens) -> cross-entropy per token; val/loss, val/ppl
gan                  (images, _)        -> discriminator and generator steps; val/loss_d, val/loss_g, a PNG grid

The model says which task it is for (`model.task`, default classification); the dataset says which
task its batches serve (`Datasets.task`). Losses are always computed in float32.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .precision import LossScalingError

if TYPE_CHECKING:
    from .loop import Loop


@dataclass
class StepOutput:
    applied: bool
    loss: torch.Tensor  # the step's mean training loss, on the device (not read here)
    samples: int


class Task:
    name = "classification"
    datasets = ("classification",)  # dataset tasks whose batches this task can train on

    def loss(self, loop: Loop, batch: tuple) -> torch.Tensor:
        x, y = batch
        with loop.precision.autocast():
            logits = loop.model(x)
        return F.cross_entropy(logits.float(), y)

    def train_step(self, loop: Loop, batches, step_no: int) -> StepOutput:
        """Forward and scaled backward for each micro-batch, then one precision step."""
        p, diag = loop.precision, loop.diagnostics
        if diag is not None and diag.sampled(step_no):
            diag.begin_step()  # hooks only on sampled steps
        weight = loop.loss_weight / loop.accumulate
        total = None
        samples = 0
        for i in range(loop.accumulate):
            batch = loop.to_device(next(batches))
            # DDP: all-reduce gradients only on the last micro-batch
            sync = i == loop.accumulate - 1 or not hasattr(loop.model, "no_sync")
            with contextlib.nullcontext() if sync else loop.model.no_sync():
                loss = self.loss(loop, batch)
                p.backward(loss * weight if weight != 1.0 else loss)  # no extra op (and autograd node) when 1
            total = loss.detach() if total is None else total + loss.detach()
            samples += batch[-1].shape[0]
        try:
            result = p.step(loop.optimizer, loop.clip_grad_norm, diag.hooks_for(step_no) if diag else None)
        except LossScalingError:
            if diag is not None:
                self.trace(loop, batch, step_no, "loss scale reached its minimum")
            raise
        if diag is not None:
            diag.end_step(step_no, result.applied, p.optimizer_params())
            if diag.should_trace():
                self.trace(loop, batch, step_no, f"{diag.consecutive_skips} consecutive skipped steps")
        return StepOutput(result.applied, total / loop.accumulate if loop.accumulate > 1 else total, samples)

    def trace(self, loop: Loop, batch: tuple, step: int, reason: str) -> None:
        """Re-run the last micro-batch with hooks to name the module where the overflow starts."""
        loop.diagnostics.run_trace(step, lambda: self.loss(loop, batch) * loop.loss_weight,
                                   loop.precision.backward, reason)
        loop.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self, loop: Loop) -> dict:
        """Mean loss and accuracy over the validation loader (summed on the device, read once)."""
        loss_sum = torch.zeros((), device=loop.device)
        correct = torch.zeros((), device=loop.device, dtype=torch.long)
        count = 0
        for batch in loop.val_loader:
            x, y = loop.to_device(batch)
            with loop.precision.autocast():
                logits = loop.model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
            count += y.numel()
        loss, acc = loop.reduce_sums(loss_sum, correct.float(), count)
        return {"val/loss": loss, "val/acc": acc}


class LanguageModeling(Task):
    name = "language_modeling"
    datasets = ("language_modeling",)

    def loss(self, loop: Loop, batch: tuple) -> torch.Tensor:
        x, y = batch
        with loop.precision.autocast():
            logits = loop.model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, loop: Loop) -> dict:
        loss_sum = torch.zeros((), device=loop.device)
        count = 0
        for batch in loop.val_loader:
            x, y = loop.to_device(batch)
            with loop.precision.autocast():
                logits = loop.model(x)
            loss_sum += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            count += y.numel()
        loss, _ = loop.reduce_sums(loss_sum, None, count)
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 700.0))}


class Adversarial(Task):
    """DCGAN training: a discriminator step, then a generator step, one loss scaler for both
    (PyTorch's recipe for several models, losses and optimizers: scale each loss, step each optimizer,
    update the scale once per iteration)."""

    name = "gan"
    datasets = ("classification",)  # any image dataset; the labels are ignored

    def _losses_d(self, loop: Loop, real: torch.Tensor) -> torch.Tensor:
        gan = loop.model
        z = torch.randn(real.shape[0], gan.latent_dim, device=loop.device)
        with loop.precision.autocast():
            fake = gan.generator(loop.precision.cast_inputs(z)).detach()
            d_real, d_fake = gan.discriminator(real), gan.discriminator(fake)
        ones, zeros = torch.ones_like(d_real, dtype=torch.float32), torch.zeros_like(d_fake, dtype=torch.float32)
        return F.binary_cross_entropy_with_logits(d_real.float(), ones) + F.binary_cross_entropy_with_logits(d_fake.float(), zeros)

    def _loss_g(self, loop: Loop, n: int) -> torch.Tensor:
        gan = loop.model
        z = torch.randn(n, gan.latent_dim, device=loop.device)
        with loop.precision.autocast():
            d_fake = gan.discriminator(gan.generator(loop.precision.cast_inputs(z)))
        return F.binary_cross_entropy_with_logits(d_fake.float(), torch.ones_like(d_fake, dtype=torch.float32))

    def loss(self, loop: Loop, batch: tuple) -> torch.Tensor:
        return self._losses_d(loop, batch[0])

    def train_step(self, loop: Loop, batches, step_no: int) -> StepOutput:
        if loop.world_size > 1:
            raise ConfigError("model=dcgan under torchrun is not supported yet: its two networks step separately "
                              "and would bypass DDP's gradient all-reduce; train it in one process")
        p, opts = loop.precision, loop.optimizer.optimizers
        real = loop.to_device(next(batches))[0]
        loss_d = self._losses_d(loop, real)
        p.backward(loss_d * loop.loss_weight)
        r_d = p.step(opts["discriminator"], loop.clip_grad_norm, params=loop.optimizer.params["discriminator"], update=False)
        loss_g = self._loss_g(loop, real.shape[0])
        p.backward(loss_g * loop.loss_weight)
        r_g = p.step(opts["generator"], loop.clip_grad_norm, params=loop.optimizer.params["generator"], update=False)
        p.update_scale(not (r_d.applied and r_g.applied))  # once per iteration
        return StepOutput(r_d.applied and r_g.applied, (loss_d.detach() + loss_g.detach()) / 2, real.shape[0])

    @torch.no_grad()
    def evaluate(self, loop: Loop) -> dict:
        sum_d = torch.zeros((), device=loop.device)
        sum_g = torch.zeros((), device=loop.device)
        batches = 0
        gen = torch.Generator(device="cpu").manual_seed(1234)  # the same noise every time, and no global RNG
        rng_state = torch.get_rng_state()
        for batch in loop.val_loader:
            real = loop.to_device(batch)[0]
            sum_d += self._losses_d(loop, real)
            sum_g += self._loss_g(loop, real.shape[0])
            batches += 1
        torch.set_rng_state(rng_state)
        loss_d, loss_g = loop.reduce_sums(sum_d, sum_g, batches)
        self.save_samples(loop, torch.randn(64, loop.model.latent_dim, generator=gen).to(loop.device))
        return {"val/loss_d": loss_d, "val/loss_g": loss_g, "val/loss": loss_d + loss_g}

    def save_samples(self, loop: Loop, z: torch.Tensor) -> None:
        if loop.writer is None or not loop.is_main:
            return
        import torchvision

        with loop.precision.autocast():
            images = loop.model.generator(loop.precision.cast_inputs(z)).float().cpu()
        out = Path(loop.writer.run_dir) / "samples"
        out.mkdir(exist_ok=True)
        torchvision.utils.save_image(images, out / f"step_{loop.state.step}.png", nrow=8, normalize=True)


TASKS = {t.name: t for t in (Task, LanguageModeling, Adversarial)}


def task_for(model_target: object, dataset_task: str) -> Task:
    """The model (its class or builder, `task` attribute) decides the task; the dataset must serve it."""
    name = getattr(model_target, "task", "classification")
    if name not in TASKS:
        raise ConfigError(f"model declares task {name!r}; mptrain knows {', '.join(TASKS)}")
    task = TASKS[name]()
    if dataset_task not in task.datasets:
        hint = {"language_modeling": "a token dataset (dataset=text or dataset=synthetic_tokens)",
                "classification": "an image dataset (dataset=digits, mnist, cifar10, imagefolder, synthetic)"}
        raise ConfigError(f"the model trains a {name} task but the dataset serves {dataset_task}; "
                          f"use {hint[task.datasets[0]]}")
    return task
