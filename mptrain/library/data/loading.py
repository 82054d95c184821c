"""Datasets and loaders.

A dataset builder is the `_target_` of a `dataset=` entry. It returns a :class:`Datasets` (or a
``(train, val)`` tuple, or a single training Dataset). Batches are ``(inputs, targets)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from mptrain.config import DigitsDatasetConfig as DIGITS
from mptrain.config import SyntheticDatasetConfig as SYN
from mptrain.library.data.permutation import FeistelPermutation


@dataclass
class Datasets:
    train: Dataset
    val: Dataset | None = None
    task: str = "classification"  # which task the batches serve: classification | language_modeling
    facts: dict = field(default_factory=dict)  # known only after reading the data, e.g. vocab_size
    # a text dataset's vocabulary (tokenize.Vocab.to_json()): the run directory keeps it to decode tokens
    vocab: dict | None = None


def as_datasets(obj: object) -> Datasets:
    """Accept what a user's dataset `_target_` may return and normalise it."""
    if isinstance(obj, Datasets):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        return Datasets(train=obj[0], val=obj[1])
    if isinstance(obj, Dataset):
        return Datasets(train=obj)
    raise TypeError(f"dataset _target_ returned {type(obj).__name__}; return mptrain.library.data.loading.Datasets, "
                    "a (train, val) tuple or a torch Dataset")


def digits(
    name: str = DIGITS.name,
    num_classes: int = DIGITS.num_classes,
    channels: int = DIGITS.channels,
    image_size: int = DIGITS.image_size,
    val_fraction: float = DIGITS.val_fraction,
) -> Datasets:
    """scikit-learn's 8x8 digits, standardised with the training split's mean and std.

    The train/val split is fixed (a permutation from seed 0), so every run and every seed
    validates on the same 20% of the images.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    x, y = x[order], y[order]
    n_val = int(round(len(x) * val_fraction))
    x_train, y_train, x_val, y_val = x[n_val:], y[n_val:], x[:n_val], y[:n_val]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    if image_size != 8:
        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x_train, x_val = up(x_train), up(x_val)
    if channels != 1:
        x_train, x_val = (
            x_train.expand(-1, channels, -1, -1).contiguous(),
            x_val.expand(-1, channels, -1, -1).contiguous(),
        )
    return Datasets(train=TensorDataset(x_train, y_train), val=TensorDataset(x_val, y_val))


class SyntheticImages(Dataset):
    """`size` random images cycling through a pool of `pool_size` distinct ones (cheap to index).

    Each image is Gaussian noise plus a per-class offset on channel 0, so a model can learn the labels.
    """

    in_memory = True  # indexing is a tensor lookup: loader worker processes would only add overhead

    def __init__(self, size: int, num_classes: int, channels: int, image_size: int, pool_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        pool = min(pool_size, size)
        self.labels = torch.randint(0, num_classes, (pool,), generator=g)
        self.images = torch.randn(pool, channels, image_size, image_size, generator=g)
        self.images[:, 0] += (2.0 * self.labels.float() / max(num_classes - 1, 1) - 1.0)[:, None, None]
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = index % len(self.labels)
        return self.images[i], self.labels[i]


def synthetic(
    name: str = SYN.name,
    num_classes: int = SYN.num_classes,
    channels: int = SYN.channels,
    image_size: int = SYN.image_size,
    train_size: int = SYN.train_size,
    val_size: int = SYN.val_size,
    pool_size: int = SYN.pool_size,
) -> Datasets:
    """Synthetic images; the data are fixed (seeded), whatever the run's seed."""
    return Datasets(
        train=SyntheticImages(train_size, num_classes, channels, image_size, pool_size, seed=1),
        val=SyntheticImages(val_size, num_classes, channels, image_size, pool_size, seed=2),
    )


class RepeatedSamples(Dataset):
    """The first `count` samples of `dataset`, cycled to `length` (debug=overfit)."""

    def __init__(self, dataset: Dataset, count: int, length: int):
        self.dataset, self.count, self.length = dataset, count, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % self.count]


def overfit(datasets: Datasets, samples: int) -> Datasets:
    """Train on the first `samples` training samples only, repeated to the training set's length (so an
    epoch keeps its number of steps), and validate on those same samples: a model that cannot drive their
    loss to ~0 has a bug (trainer.overfit_batches, debug=overfit)."""
    n = min(samples, len(datasets.train))
    train = RepeatedSamples(datasets.train, n, max(len(datasets.train), n))
    return Datasets(train=train, val=Subset(datasets.train, range(n)), task=datasets.task, facts=datasets.facts,
                    vocab=datasets.vocab)


def in_memory(dataset: Dataset) -> bool:
    """Whether indexing `dataset` is a cheap lookup in tensors already in memory (no decoding, no disk)."""
    while isinstance(dataset, Subset | RepeatedSamples):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset) or getattr(dataset, "in_memory", False)


def lazy_order(dataset: Dataset) -> bool:
    """Whether the dataset asks for a streamed order (see EpochSampler): its window count may be too large
    to hold a permutation list per epoch."""
    while isinstance(dataset, Subset | RepeatedSamples):
        dataset = dataset.dataset
    return getattr(dataset, "lazy_order", False)


def resolve_num_workers(num_workers: int | str, dataset: Dataset) -> int:
    """trainer.num_workers: an integer as given; `auto` = 0 for in-memory datasets (a worker would only
    copy tensors between processes), else min(8, this process's share of the CPUs - 1), so a GPU is
    not starved by one process decoding images."""
    if num_workers != "auto":
        return int(num_workers)
    if in_memory(dataset):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun: ranks share the CPUs
    return max(0, min(8, per_process - 1))


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation drawn from (seed, epoch) alone, never from global RNG.

    So the order of epoch e is the same in every run with this seed, which makes resuming in the
    middle of an epoch exact (skip the batches already seen with `start`). Under data parallel each
    rank takes every world_size-th index of the same permutation (padded to equal length).
    `lazy`: the permutation is a FeistelPermutation computed chunk by chunk (constant memory and start-up,
    for datasets of millions of windows) instead of torch.randperm's list (kept for the others: their
    orders, and so their runs' numbers, stay as they were).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1, pad: bool = True,
                 lazy: bool = False):
        self.size, self.seed, self.shuffle, self.pad, self.lazy = size, seed, shuffle, pad, lazy
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    @property
    def order(self) -> str:
        """The name of the training order, recorded in checkpoints: a resume in the middle of an epoch continues
        the same order only if it is the same kind (token files used randperm before issue 37)."""
        return "feistel" if self.lazy and self.shuffle else "randperm"

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first `start` indices of this rank (already trained on)."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad:  # every rank gets as many indices (equal step counts); validation does not pad
            per_rank = -(-self.size // self.world_size)
            order += order[: per_rank * self.world_size - self.size]
        return order[self.rank :: self.world_size]

    def _streamed(self) -> Iterator[int]:
        """What _indices()[start:] gives, one index at a time: position k of the padded order is perm[k % size]."""
        end = -(-self.size // self.world_size) * self.world_size if self.pad else self.size
        first = self.rank + self.start * self.world_size
        if self.shuffle:
            yield from FeistelPermutation(self.size, self.seed, self.epoch).stream(first, end, self.world_size)
        else:
            yield from (k % self.size for k in range(first, end, self.world_size))

    def __iter__(self) -> Iterator[int]:
        if self.lazy or not self.shuffle:  # an unshuffled order is the same either way: never build its list
            return self._streamed()
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        if self.pad:
            return -(-self.size // self.world_size) - self.start
        return len(range(self.rank, self.size, self.world_size)) - self.start


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    num_workers: int | str = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    pad: bool | None = None,
) -> DataLoader:
    """A DataLoader whose order depends only on the seed and the epoch (see EpochSampler).
    `pad` (default: train) gives every rank as many batches: FSDP's collectives need it in validation too.
    `num_workers` may be `auto` (see resolve_num_workers); workers persist across epochs."""
    num_workers = resolve_num_workers(num_workers, dataset)
    sampler = EpochSampler(len(dataset), seed, shuffle=train, rank=rank, world_size=world_size,
                           pad=train if pad is None else pad, lazy=lazy_order(dataset))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,  # equal batches keep the step count and the loss scale comparable
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # its own generator: starting an iterator must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(seed),
    )
