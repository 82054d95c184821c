"""Small models that break precision advice (issue 24). Built as `model._target_=tests.judge_nets.<Name>` over
model=mlp, so they take the MLP's arguments."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Case 1: inputs in tiny units (x * 2^-15) into a bias-free Linear with weights 2^15 times their usual size.
# In fp32 this is ordinary logistic regression, reparametrised: with SGD at lr * 2^30 every step moves the
# logits exactly as the usual parametrisation would. The weight gradients are 2^15 below their usual size,
# the output gradient (the loss's own, about 1/batch) is ordinary.
TINY_UNITS = 2.0**-15


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class TinyUnits(nn.Module):
    """Case 1. The head is applied in the model's own forward (as a tied embedding is), so no child module's
    output is the logits: only the model's output gradient is ordinary."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, **_):
        super().__init__()
        n = in_channels * image_size * image_size
        self.flat = nn.Flatten()
        self.units = Scale(TINY_UNITS)
        self.weight = nn.Parameter(torch.randn(num_classes, n) / TINY_UNITS / n**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.units(self.flat(x)), self.weight)


class MassiveChannel(nn.Module):
    """Appends one channel of constant `value` to its input (from step `after` of training on: a channel that
    appears as training goes on; until step `until`, when given: a transient). The step count is a buffer, so it
    is checkpointed."""

    def __init__(self, value: float, after: int = 0, until: int | None = None):
        super().__init__()
        self.value, self.after, self.until = value, after, until
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        calls = int(self.calls)
        on = float(self.value) if calls > self.after and (self.until is None or calls <= self.until) else 0.0
        # made in float32 and cast: in an fp16 model the channel becomes inf, as an overflowing activation does
        return torch.cat([x, torch.full_like(x[:, :1], on, dtype=torch.float32).to(x.dtype)], dim=1)


def read_massive(layer: nn.Linear, massive: float) -> None:
    """`layer` reads its last input, the massive channel, through a fixed weight of 1/massive: a bias of 1."""
    with torch.no_grad():
        layer.weight[:, -1] = 1.0 / massive
    mask = torch.ones_like(layer.weight)
    mask[:, -1] = 0.0
    layer.weight.register_hook(lambda g: g * mask.to(g.dtype))  # the outlier's weight stays fixed


class Outlier(nn.Module):
    """Case 2: a tanh MLP whose first middle layer `mid1` reads a constant 1e8 channel (a "massive activation",
    as in LLM residual streams) through a fixed, untrained weight of 1e-8: in exact arithmetic it adds a
    constant 1 to each output, a bias. The other middle layer, `mid2`, sees ordinary inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: int = 32,
                 massive: float = 1e8, after: int = 0, **_):
        super().__init__()
        n = in_channels * image_size * image_size
        self.flat = nn.Flatten()
        self.inp = nn.Linear(n, width)
        self.act0 = nn.Tanh()
        self.massive = MassiveChannel(massive, after)
        self.mid1 = nn.Linear(width + 1, width)
        self.act1 = nn.Tanh()
        self.mid2 = nn.Linear(width, width)
        self.act2 = nn.Tanh()
        self.head = nn.Linear(width, num_classes)
        read_massive(self.mid1, massive)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act0(self.inp(self.flat(x)))
        h = self.act1(self.mid1(self.massive(h)))
        return self.head(self.act2(self.mid2(h)))


class DropNorm(nn.Module):
    """Layers whose forward has state: attention with dropout inside (a module with its own parameters that
    draws from the RNG) and batch norm (running statistics): a re-run of them must change nothing."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, **_):
        super().__init__()
        self.side = image_size
        self.attn = nn.MultiheadAttention(image_size * in_channels, 2, dropout=0.5, batch_first=True)
        self.norm = nn.BatchNorm1d(in_channels * image_size * image_size)
        self.head = nn.Linear(in_channels * image_size * image_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(x.shape[0], self.side, -1)  # rows as tokens
        t, _ = self.attn(t, t, t, need_weights=False)
        return self.head(self.norm(t.reshape(x.shape[0], -1)))


class LayerScaled(nn.Module):
    """A model that holds a parameter of its own and calls modules that hold theirs (a ConvNeXt block's layer
    scale, a ViT's class token): the shadow re-runs the model itself with all of them."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: int = 32, **_):
        super().__init__()
        n = in_channels * image_size * image_size
        self.flat = nn.Flatten()
        self.inp = nn.Linear(n, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width))
        self.gamma = nn.Parameter(torch.full((width,), 0.5))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(self.flat(x)))
        return self.head(h + self.gamma * self.mlp(h))


class Transient(nn.Module):
    """A tanh MLP whose `fc2` reads a 1e8 channel through a fixed weight of 1e-8 (Outlier's construction) only
    during training steps `after`+1 .. `until`: a transient outlier (a warm-up spike), gone afterwards."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: int = 32,
                 massive: float = 1e8, after: int = 0, until: int | None = None, **_):
        super().__init__()
        n = in_channels * image_size * image_size
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(n, width)
        self.act1 = nn.Tanh()
        self.massive = MassiveChannel(massive, after, until)
        self.fc2 = nn.Linear(width + 1, width)
        self.act2 = nn.Tanh()
        self.head = nn.Linear(width, num_classes)
        read_massive(self.fc2, massive)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.fc1(self.flat(x)))
        return self.head(self.act2(self.fc2(self.massive(h))))
