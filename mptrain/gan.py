"""DCGAN (Radford et al.): a transposed-conv generator and a conv discriminator, sized to the images."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError


class Generator(nn.Module):
    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int):
        super().__init__()
        steps = int(math.log2(image_size)) - 2  # 4x4 -> image_size, doubling each step
        c = width * 2 ** (steps - 1) if steps > 0 else width
        layers: list[nn.Module] = [nn.Unflatten(1, (latent_dim, 1, 1)),
                                   nn.ConvTranspose2d(latent_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        for _ in range(steps - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # linear output: standardised data are not confined to [-1, 1]


class Discriminator(nn.Module):
    def __init__(self, channels: int, image_size: int, width: int):
        super().__init__()
        steps = int(math.log2(image_size)) - 2
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = width
        for _ in range(steps - 1):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c * 2), nn.LeakyReLU(0.2, True)]
            c *= 2
        layers += [nn.Conv2d(c, 1, 4, 1, 0), nn.Flatten()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # logits (B, 1)


class DCGAN(nn.Module):
    """Generator and discriminator in one module (one checkpoint, one precision policy); the gan task
    trains them with two optimizers."""

    task = "gan"

    def __init__(self, channels: int = 1, image_size: int = 8, latent_dim: int = 64, width: int = 32):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ConfigError(f"model=dcgan needs a power-of-two dataset.image_size >= 8, not {image_size}")
        self.latent_dim = latent_dim
        self.generator = Generator(latent_dim, channels, image_size, width)
        self.discriminator = Discriminator(channels, image_size, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)
