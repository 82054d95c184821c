"""Per-module value ranges on sampled steps: the largest |input|, |output| and |weight| of every module in the
forward, and the largest |output gradient| in the backward. These are every tensor an fp16 run would hold: the
advisor bounds the loss scale by all of them (forward <= 65504 unscaled; each gradient times S <= 65504).

Cost model: hooks exist only on sampled steps. Each module call adds a few amax kernels on the device; the
figures stay there until `end`, which stacks them and reads them with one copy to the host.
"""

from __future__ import annotations

import torch
from torch import nn

from mptrain.diagnostics.shadow import Shadow, whole
from mptrain.diagnostics.trace import _tensors

ROOT = "(model)"  # the name under which the model itself (its output, its own parameters) is recorded
FIELDS = ("in", "out", "w", "grad")


def module_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module, the model itself included (as ROOT)."""
    return [(name or ROOT, m) for name, m in model.named_modules()]


def _amax(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return None
    return torch.stack([t.abs().amax().float() for t in floats]).amax()


class ModuleRanges:
    """Hooks every module on a sampled step; `end` returns {module: {in, out, w, grad}} (raw, unscaled)."""

    def __init__(self, model: nn.Module, shadow: Shadow | None = None, only: set[str] | None = None,
                 grad_share: float = 1.0):
        # `only`: the modules to hook (precision=auto measures its planned modules; diagnostics, every module)
        # `grad_share`: what the output gradients are multiplied by (FSDP2's diagnostics: 1 / world_size, a rank's
        # loss being the mean of its own micro-batch)
        self.grad_share = grad_share
        self.modules = [(n, m) for n, m in module_names(model) if only is None or n in only]
        self.shadow = shadow  # also measure each candidate format on the modules that hold parameters
        self._handles: list = []
        self._peak: dict[str, dict[str, torch.Tensor]] = {}
        self._busy = False  # inside a shadow re-run: its module calls are not the step's

    def begin(self) -> None:
        self._peak = {}
        for name, module in self.modules:
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))

    def _keep(self, name: str, field: str, value: torch.Tensor | None) -> None:
        if value is None:
            return
        row = self._peak.setdefault(name, {})
        row[field] = value if field not in row else torch.maximum(row[field], value)  # NaN propagates: kept

    def _hook(self, name: str):
        def forward_hook(module, args, kwargs, output):
            if self._busy:
                return
            self._keep(name, "in", _amax(_tensors(args)))
            outs = _tensors(output)
            self._keep(name, "out", _amax(outs))
            own = list(module.parameters(recurse=False))
            if own:  # a sharded module's own weights (FSDP2 resharded them after its forward): gathered
                self._keep(name, "w", _amax([whole(p) for p in own]))
            shadowed = bool(own and self.shadow and self.shadow.measures(name))
            if shadowed:
                self._busy = True
                try:
                    self.shadow.forward(module, name, args, kwargs, output)
                finally:
                    self._busy = False
            for i, t in enumerate(outs):
                if t.requires_grad:
                    t.register_hook(self._grad_hook(name, module, shadowed and i == 0))
        return forward_hook

    def _grad_hook(self, name: str, module: nn.Module, shadowed: bool):
        def hook(g: torch.Tensor) -> None:
            g = g * self.grad_share if self.grad_share != 1.0 else g
            self._keep(name, "grad", _amax([g]))
            if shadowed:
                self.shadow.grad(name, module, g)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def end(self, loss_scale: float = 1.0) -> dict[str, dict[str, float | None]]:
        """The step's figures, gradients divided by the loss scale they were computed at. A non-finite figure
        is None (JSON has no inf/NaN): that tensor overflowed or was NaN."""
        self.remove()
        keys = [(n, f) for n, row in self._peak.items() for f in FIELDS if f in row]
        if not keys:
            return {}
        values = torch.stack([self._peak[n][f] for n, f in keys]).cpu().tolist()  # the one copy to the host
        out: dict[str, dict] = {}
        for (name, field), v in zip(keys, values):
            v = v / loss_scale if field == "grad" else v
            out.setdefault(name, {})[field] = v if v == v and abs(v) != float("inf") else None
        self._peak = {}
        return out
