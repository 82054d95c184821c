"""The loss scaler: one implementation for static and dynamic loss scaling.

Multiply the loss by S before backward so that small gradients survive in float16; divide the
gradients by S (once per optimizer step) before anything reads them. A step whose gradients hold
inf or NaN is skipped, never applied.

The scale lives on the host as a Python float: scaling the loss then costs no device round trip,
and the one host synchronisation per step is reading the overflow flag, which the skip decision
needs anyway.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from mptrain.errors import TrainingFailed
from mptrain.precision.formats import BF16


class LossScalingError(TrainingFailed):
    """Raised when the scale cannot back off any further and `on_min` is `raise`."""


class SwitchToBF16(LossScalingError):
    """Raised by :meth:`LossScaler.update` instead of :class:`LossScalingError` when `on_min` is `bf16`.

    :class:`~mptrain.precision.Precision` catches it and switches the run to bfloat16; `facts` says why
    (the scale, the overflows in a row, the skipped steps). A subclass of LossScalingError so that a
    caller driving a bare LossScaler, who does not handle it, still stops with the diagnosis.
    """

    def __init__(self, message: str, facts: dict):
        super().__init__(message)
        self.facts = facts


class LossScaler:
    """Static or dynamic loss scaling with hysteresis, bounds and a stop rule.

    Dynamic rule (with defaults identical to ``torch.amp.GradScaler``'s scale trajectory):

    * an overflowing step is skipped; the growth count restarts;
    * hysteresis H: an overflow spends one of H tolerances; the overflow that finds none left backs
      off (``S *= backoff_factor``, not below ``min``), and so does every further overflow until
      the count is refilled. H=1 backs off on every overflow (= GradScaler).
    * the count is refilled (``consecutive_hysteresis=False``, the default, = Megatron-LM's
      DynamicGradScaler and DeepSpeed's default) only when the scale grows, i.e. after a full
      window of ``growth_interval`` clean steps; with ``consecutive_hysteresis=True`` (DeepSpeed's
      option) by every clean step, so only H overflows *in a row* back off;
    * after ``growth_interval`` clean steps in a row, ``S *= growth_factor`` (not above ``max``);
    * a back-off due while S is already at ``min``: ``on_min=raise`` stops the run with a
      :class:`LossScalingError`; ``on_min=clamp`` stays at ``min`` and keeps skipping;
      ``on_min=bf16`` raises :class:`SwitchToBF16` (the precision engine switches to bfloat16).

    Static rule: S stays at ``init``; overflowing steps are skipped.
    """

    def __init__(
        self,
        kind: str = "dynamic",
        init: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 1,
        min: float = 1.0,  # noqa: A002 - the config key's name
        max: float = math.inf,  # noqa: A002
        on_min: str = "raise",
        consecutive_hysteresis: bool = False,
    ):
        if kind not in ("static", "dynamic"):
            raise ValueError(f"loss scaler kind must be static or dynamic, not {kind!r}")
        if on_min not in ("raise", "clamp", BF16.name):
            raise ValueError(f"loss scaler on_min must be raise, clamp or bf16, not {on_min!r}")
        self.kind = kind
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.hysteresis = int(growth_interval), int(hysteresis)
        self.min, self.max, self.on_min = float(min), float(max), on_min
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.scale = float(init)
        self.growth_tracker = 0  # clean steps in a row since the last growth or overflow
        self.hysteresis_tracker = self.hysteresis  # overflows still tolerated before backing off
        self.consecutive_overflows = 0
        self.skipped = 0  # skipped steps in all
        # run statistics for summary.json (see stats())
        self.scale_min = self.scale_max = self.scale
        self.backoffs = 0

    enabled = True  # NoScaler: False

    @property
    def dynamic(self) -> bool:
        return self.kind == "dynamic"

    @property
    def at_min(self) -> bool:
        """The scale has reached its minimum (an overflow now stops or switches the run)."""
        return self.scale <= self.min

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """Divide `grads` by the scale in place; return a 0-dim flag (on the grads' first device),
        non-zero when any gradient is inf or NaN. No host synchronisation happens here."""
        if not grads:
            return None
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            groups[(g.device, g.dtype)].append(g)
        flags = []
        for (device, _dtype), group in groups.items():
            found_inf = torch.zeros(1, dtype=torch.float32, device=device)
            inv_scale = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=device)
            # the same fused kernel torch.amp.GradScaler uses: unscale and check in one pass
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
            flags.append(found_inf)
        first = flags[0].device
        return torch.stack([f.to(first) for f in flags]).sum() if len(flags) > 1 else flags[0][0]

    def update(self, overflow: bool) -> None:
        """Advance the scaler after one optimizer step (`overflow` = that step was skipped)."""
        if overflow:
            self.skipped += 1
            self.consecutive_overflows += 1
            self.growth_tracker = 0
            if not self.dynamic:
                return
            self.hysteresis_tracker = max(self.hysteresis_tracker - 1, 0)
            if self.hysteresis_tracker > 0:
                return  # tolerated: skipped without backing off
            if self.scale <= self.min:
                if self.on_min == "raise":
                    raise LossScalingError(self._on_min_message())
                if self.on_min == BF16.name:
                    raise SwitchToBF16(self._at_min_facts(), {
                        "loss_scale": self.scale, "consecutive_overflows": self.consecutive_overflows,
                        "skipped": self.skipped})
                self.scale = self.min
                return
            self.scale = max(self.scale * self.backoff_factor, self.min)
            self.backoffs += 1
            self.scale_min = min(self.scale_min, self.scale)
            return
        self.consecutive_overflows = 0
        if not self.dynamic:
            return
        if self.consecutive_hysteresis:
            self.hysteresis_tracker = self.hysteresis
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            # a full window of clean steps: the growth event (it refills the hysteresis count even
            # where `max` or float range caps the growth itself, as Megatron-LM and DeepSpeed do)
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis
            grown = min(self.scale * self.growth_factor, self.max)
            if math.isfinite(grown):
                self.scale = grown
                self.scale_max = max(self.scale_max, self.scale)

    def stats(self) -> dict:
        """The scale's range over the run and how often it backed off (for summary.json)."""
        return {"loss_scale_min": self.scale_min, "loss_scale_max": self.scale_max,
                "loss_scale_backoffs": self.backoffs}

    def _at_min_facts(self) -> str:
        return (f"loss scale is at its minimum {self.min:g} and the gradients still overflow "
                f"({self.consecutive_overflows} overflowing steps in a row, {self.skipped} skipped in all)")

    def _on_min_message(self) -> str:
        return (
            f"{self._at_min_facts()}: "
            "float16 cannot hold this run's gradients. Likely cause: the run diverges (learning rate "
            "too high) or activations exceed 65504. Try precision=bf16, a lower optimizer.lr, or "
            "trainer.clip_grad_norm=1.0 (precision.loss_scale.on_min=clamp keeps skipping instead)."
        )

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
            "consecutive_overflows": self.consecutive_overflows,
            "skipped": self.skipped,
            "scale_min": self.scale_min,
            "scale_max": self.scale_max,
            "backoffs": self.backoffs,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
        self.consecutive_overflows = int(state["consecutive_overflows"])
        self.skipped = int(state["skipped"])
        # checkpoints from before the statistics: the range starts at the resumed scale
        self.scale_min = float(state.get("scale_min", self.scale))
        self.scale_max = float(state.get("scale_max", self.scale))
        self.backoffs = int(state.get("backoffs", 0))



class NoScaler:
    """No loss scaling, behind LossScaler's interface (the step has no `scaler is None` branches). After an
    on_min=bf16 switch it keeps the figures of the scaler it replaced: its skipped steps and statistics."""

    kind = "none"
    enabled = False
    dynamic = False
    scale = 1.0
    at_min = False

    def __init__(self, skipped: int = 0, stats: dict | None = None):
        self.skipped = skipped
        self._stats = dict(stats or {})

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        return None

    def update(self, overflow: bool) -> None:
        pass

    def stats(self) -> dict:
        return dict(self._stats)
