"""precision.auto.memory_gb: a plan's predicted memory, and the way into a budget that costs the least time.

A plan's memory, counted as mptrain-estimate counts a run's: the state (weights, gradients, optimizer state,
masters: `memory_per_param` of the tensors after a step, which the run passes in) plus the activations autograd
keeps for backward in one step (each storage once, parameters excluded), as measured on the probe's first step in
the safe preset's format, with each planned layer's own share counted again in its planned format: its input, and
for a format other than fp32 the cast copy of its weight, each at the format's bits per value (what autocast and
the converters save for the backward of a Linear or a convolution).
"""

from __future__ import annotations

import torch
from torch import nn

from mptrain.errors import ConfigError
from mptrain.precision.formats import FP32, Registry

GB = 2**30  # precision.auto.memory_gb's unit


class SavedBytes:
    """The bytes autograd keeps for backward between `begin` and `end` (each storage once, `model`'s parameters
    excluded): one step's activations."""

    def __init__(self, model: nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        self._seen[s.data_ptr()] = s.nbytes()
        return t

    def begin(self) -> None:
        self._hooks.__enter__()

    def end(self) -> int:
        self._hooks.__exit__(None, None, None)
        return sum(n for ptr, n in self._seen.items() if ptr not in self._params)


def layer_bytes(registry: Registry, fmt: str, input_numel: int, weight_numel: int) -> float:
    """What a planned layer keeps for backward in `fmt`: its input and (not fp32: a cast copy) its weight."""
    per = registry.get(fmt).bits_per_value / 8
    return per * (input_numel + (0 if fmt == FP32.name else weight_numel))


def fit(plan: dict[str, str], options: dict[str, dict[str, float]], sizes: dict[str, dict[str, float]],
        fixed: float, budget: float) -> tuple[dict[str, str], float]:
    """The plan moved into `budget` bytes: (module -> format, its predicted bytes). `plan`: the fastest plan that
    holds; `options`: module -> {format that holds: its time}; `sizes`: module -> {format: layer_bytes};
    `fixed`: the bytes no format changes. While over, one layer moves to a smaller format that holds, the move
    that saves the most bytes per second lost first (one that loses no time first of all). ConfigError (one line)
    where even every layer in its smallest holding format does not fit."""
    total = lambda p: fixed + sum(sizes[n][f] for n, f in p.items())  # noqa: E731
    smallest = {n: min(options.get(n) or {f: 0}, key=lambda f: sizes[n][f]) for n, f in plan.items()}
    if total(smallest) > budget:
        raise ConfigError(f"precision.auto.memory_gb={budget / GB:g}: the smallest plan that holds is predicted at "
                          f"{total(smallest) / GB:.3g} GB (weights, gradients, optimizer state, activations); raise "
                          "precision.auto.memory_gb to at least that, or lower trainer.batch_size")
    plan = dict(plan)
    while total(plan) > budget:
        moves = [(n, f) for n, cur in plan.items() for f in options.get(n, {}) if sizes[n][f] < sizes[n][cur]]

        def worth(move):
            n, f = move
            saved, lost = sizes[n][plan[n]] - sizes[n][f], options[n][f] - options[n][plan[n]]
            return saved / lost if lost > 0 else float("inf")

        n, f = max(moves, key=worth)
        plan[n] = f
    return plan, total(plan)
