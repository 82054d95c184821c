"""Sharded checkpoints (trainer.strategy=fsdp): where and when. Every rank writes its shards (through
parallel/fsdp.py's torch.distributed.checkpoint calls) into <run>/checkpoints/sharded/step_<N>/; the
plain-container part (contents.py without the weights) is one file beside them. DCP writes `.metadata` last,
so a directory without it is an interrupted save."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mptrain.checkpoint.files import load_file, save_atomic, sharded_complete
from mptrain.parallel import fsdp
from mptrain.run.layout import SHARDED, SHARDED_EXTRA, SHARDED_STEP


def save(c: Any, extra: dict, ckpt_dir: Path, keep: int) -> Path:
    """Every rank writes its shards to <ckpt_dir>/sharded/step_<N>/; DCP writes `.metadata` last, so a
    directory without it is an interrupted save and is ignored on resume."""
    target = ckpt_dir / SHARDED / SHARDED_STEP.format(extra["train_state"]["step"])
    if c.is_main:  # the plain-container part (train state, scaler, RNG, config), before the commit marker
        save_atomic(extra, target / SHARDED_EXTRA)
    fsdp.save_shards(c.model, c.optimizer, target)
    if c.is_main:
        for old in sharded_complete(ckpt_dir)[max(keep, 1):]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load(c: Any, path: Path) -> dict:
    """Load the shards into the already sharded model and optimizer; return the plain-container state."""
    fsdp.load_shards(c.model, c.optimizer, path)
    return load_file(path / SHARDED_EXTRA)
