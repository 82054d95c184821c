"""trainer.activation_checkpointing: keep fewer activations for backward and recompute them instead.

  blocks  each repeated block (a member of an nn.Sequential or nn.ModuleList whose children are >= 2 of one
          class: a GPT's blocks, a Hugging Face model's layers, a timm ConvNeXt stage's blocks) keeps only its
          input; its forward runs again in backward, block by block
  all     the whole forward keeps only the model's input and is recomputed once in backward
  none    everything autograd saves is kept (the default)

torch.utils.checkpoint's non-reentrant form: the recomputation restores the RNG (dropout masks are the same)
and the autocast state, so gradients equal those without checkpointing up to kernel reordering. The
forward of each chosen module is wrapped on the instance: parameter names and state_dicts do not change.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from mptrain.errors import ConfigError

MODES = ("none", "blocks", "all")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The members of containers holding >= 2 modules of one class, outermost first (a block inside a block
    is not wrapped twice)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        children = list(module.children())
        if len(children) >= 2 and len({type(c) for c in children}) == 1 and any(True for _ in children[0].parameters()):
            found += children
            inside.update(id(m) for c in children for m in c.modules())
    return found


def _wrap(module: nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not module.training:  # evaluation keeps nothing for backward anyway
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed
    module._mptrain_checkpointed = True


def apply(model: nn.Module, mode: str) -> int:
    """Wrap the modules `mode` chooses; returns how many."""
    if mode not in MODES:
        raise ConfigError(f"trainer.activation_checkpointing={mode!r} is invalid: choose none, blocks or all")
    if mode == "none":
        return 0
    targets = [model] if mode == "all" else repeated_blocks(model)
    if not targets:
        raise ConfigError(f"trainer.activation_checkpointing=blocks: {type(model).__name__} has no repeated blocks "
                          "(an nn.Sequential or nn.ModuleList of >= 2 modules of one class); use all or none")
    for m in targets:
        if not getattr(m, "_mptrain_checkpointed", False):
            _wrap(m)
    return len(targets)
