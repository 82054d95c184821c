"""Any timm architecture by name (`model=timm model.name=<arch>`), built offline: random weights, or a
local checkpoint file. timm is an extra: pip install mptrain[timm]."""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from mptrain.config import TimmModelConfig as TIMM
from mptrain.errors import ConfigError
from mptrain.library.extras import require


def timm_model(name: str, num_classes: int | None = None, in_channels: int = 3, checkpoint_path: str | None = None,
               drop_path_rate: float = TIMM.drop_path_rate, kwargs: dict | None = None) -> nn.Module:
    """`timm.create_model(name, pretrained=False, ...)`; `checkpoint_path` loads a local state dict (timm's
    own loader: .pth, .pt or .safetensors), never the hub. `kwargs` go to the architecture's constructor
    (e.g. a ConvNeXt's depths and dims)."""
    timm = require("timm", "timm", "model=timm")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ConfigError(f"model.name={name!r} is not a timm architecture"
                          + (f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"))
    if checkpoint_path is not None and not Path(checkpoint_path).is_file():
        raise ConfigError(f"model.checkpoint_path={checkpoint_path} is not a file; give a local .pth/.safetensors "
                          "file (mptrain never downloads weights)")
    extra = dict(kwargs or {})
    if drop_path_rate:
        extra["drop_path_rate"] = drop_path_rate
    return timm.create_model(name, pretrained=False, num_classes=num_classes if num_classes is not None else 1000,
                             in_chans=in_channels, checkpoint_path=checkpoint_path or "", **extra)
