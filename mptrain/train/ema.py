"""trainer.ema: an exponential moving average of the weights, kept in fp32 whatever the training precision
(the master-weights argument: an average's small increments (1 - decay) * (w - ema) vanish in fp16/bf16).

After every applied optimizer step: ema <- ema + (1 - decay) * (w - ema), over every floating-point entry of
the model's state_dict (parameters and float buffers such as batch-norm statistics, as timm's ModelEmaV2);
integer buffers are copied. Under master weights a parameter is averaged from its fp32 master. Validation also
runs with the averaged weights (`val_ema/...`); the average is
saved in checkpoints (`ema`) and resumed bitwise.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mptrain.train.components import Components
from mptrain.train.loop import Callback, validate
from mptrain.train.state import TrainState

log = logging.getLogger("mptrain")


class EMA:
    """`masters`: the run's MasterWeights (precision=master): a parameter with an fp32 master is averaged from
    the master, not from its fp16 copy, whose rounding (2^-11 relative) would enter every increment."""

    def __init__(self, model: nn.Module, decay: float, masters=None):
        self.model, self.decay, self.masters = model, decay, masters
        self.restart()

    def restart(self) -> None:
        """The average starts from the weights as they are now (masters included)."""
        self.shadow = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                       for k, v in self._sources().items()}

    def _sources(self) -> dict[str, torch.Tensor]:
        """Each state_dict entry's float32 truth: the master where there is one, else the entry itself."""
        live = self.model.state_dict(keep_vars=True)
        if self.masters is None:
            return live
        return {k: self.masters.master_of(v) if isinstance(v, nn.Parameter) else v for k, v in live.items()}

    @torch.no_grad()
    def update(self) -> None:
        live = self._sources()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.shadow[k] for k in floats], [live[k].detach().float() for k in floats],
                             1.0 - self.decay)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(live[k].detach())

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the average (in the model's own dtypes); twice restores the model
        exactly (the live weights are kept aside in their own dtype)."""
        live = self.model.state_dict()
        if getattr(self, "_aside", None) is None:
            self._aside = {k: v.detach().clone() for k, v in live.items()}
            for k, v in live.items():
                v.copy_(self.shadow[k])
        else:
            for k, v in live.items():
                v.copy_(self._aside[k])
            self._aside = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("the checkpoint's EMA was taken of another model")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


class EmaCallback(Callback):
    """Validates the average beside the live weights (the loop updates it after each applied step, before
    validation). First in the callbacks, so the metrics row and the summary hold val_ema/..."""

    def __init__(self, ema: EMA):
        self.ema = ema

    def on_validation_end(self, c: Components, state: TrainState, metrics: dict) -> None:
        self.ema.swap()
        try:
            averaged = validate(c)
        finally:
            self.ema.swap()
        extra = {k.replace("val/", "val_ema/", 1): v for k, v in averaged.items()}
        metrics.update(extra)
        state.last_val.update(extra)
