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

from ..errors import TrainingFailed


class LossScalingError(TrainingFailed):
    """Raised when the scale cannot back off any further and `on_min` is `raise`."""


class LossScaler:
    """Static or dynamic loss scaling with hysteresis, bounds and a stop rule.

    Dynamic rule (with defaults identical to ``torch.amp.GradScaler``'s scale trajectory):

    * an overflowing step is skipped; the growth count restarts;
    * hysteresis H: the scale backs off (``S *= backoff_factor``, not below ``min``) on the H-th
      overflow in a row, i.e. H-1 consecutive overflows are tolerated (skipped without backing
      off). After a back-off every further overflow in the same run of overflows backs off again;
      a clean step restarts the count (Megatron-LM / DeepSpeed semantics; H=1 = GradScaler);
    * after ``growth_interval`` clean steps in a row, ``S *= growth_factor`` (not above ``max``);
    * a back-off due while S is already at ``min``: ``on_min=raise`` stops the run with a
      :class:`LossScalingError`; ``on_min=clamp`` stays at ``min`` and keeps skipping.

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
    ):
        if kind not in ("static", "dynamic"):
            raise ValueError(f"loss scaler kind must be static or dynamic, not {kind!r}")
        self.kind = kind
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.hysteresis = int(growth_interval), int(hysteresis)
        self.min, self.max, self.on_min = float(min), float(max), on_min
        self.scale = float(init)
        self.growth_tracker = 0  # clean steps in a row since the last growth or overflow
        self.hysteresis_tracker = self.hysteresis  # overflows still tolerated before backing off
        self.consecutive_overflows = 0
        self.skipped = 0  # skipped steps in all

    @property
    def dynamic(self) -> bool:
        return self.kind == "dynamic"

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
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker > 0:
                return
            if self.scale <= self.min:
                if self.on_min == "raise":
                    raise LossScalingError(self._on_min_message())
                self.scale = self.min
                return
            self.scale = max(self.scale * self.backoff_factor, self.min)
            return
        self.consecutive_overflows = 0
        if not self.dynamic:
            return
        self.hysteresis_tracker = self.hysteresis
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.growth_tracker = 0
            grown = min(self.scale * self.growth_factor, self.max)
            if math.isfinite(grown):
                self.scale = grown

    def _on_min_message(self) -> str:
        return (
            f"loss scale is at its minimum {self.min:g} and the gradients still overflow "
            f"({self.consecutive_overflows} overflowing steps in a row, {self.skipped} skipped in all): "
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
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
        self.consecutive_overflows = int(state["consecutive_overflows"])
        self.skipped = int(state["skipped"])

