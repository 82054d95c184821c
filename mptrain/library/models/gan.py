"""DCGAN (Radford et al.): a transposed-conv generator and a conv discriminator, sized to the images,
and the adversarial task that trains them (a discriminator step, then a generator step)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.config import DCGANConfig as DC
from mptrain.errors import ConfigError
from mptrain.library.tasks import Task


class Generator(nn.Module):
    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int):
        super().__init__()
        steps = int(math.log2(image_size)) - 2  # 4x4 -> image_size, doubling each step
        c = width * 2 ** (steps - 1) if steps > 0 else width
        layers: list[nn.Module] = [
            nn.Unflatten(1, (latent_dim, 1, 1)),
            nn.ConvTranspose2d(latent_dim, c, 4, 1, 0, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(True),
        ]
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

    def __init__(self, channels: int = 1, image_size: int = 8, latent_dim: int = DC.latent_dim, width: int = DC.width):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ConfigError(f"model=dcgan needs a power-of-two dataset.image_size >= 8, not {image_size}")
        self.latent_dim = latent_dim
        self.generator = Generator(latent_dim, channels, image_size, width)
        self.discriminator = Discriminator(channels, image_size, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


class Adversarial(Task):
    """DCGAN training: the discriminator's loss and step, then the generator's, with one loss scaler for
    both (PyTorch's recipe for several models, losses and optimizers: scale each loss, step each
    optimizer, update the scale once per iteration). Validation: val/loss_d, val/loss_g, a PNG grid."""

    name = "gan"
    datasets = ("classification",)  # any image dataset; the labels are ignored
    parts = ("discriminator", "generator")
    metrics = ("val/loss_d", "val/loss_g", "val/loss")

    @staticmethod
    def _noise(gan: DCGAN, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(n, gan.latent_dim, device=like.device)

    def loss_d(self, gan: DCGAN, real: torch.Tensor) -> torch.Tensor:
        fake = gan.generator(self._noise(gan, real.shape[0], real)).detach()
        d_real, d_fake = gan.discriminator(real).float(), gan.discriminator(fake).float()
        return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))

    def loss_g(self, gan: DCGAN, real: torch.Tensor) -> torch.Tensor:
        d_fake = gan.discriminator(gan.generator(self._noise(gan, real.shape[0], real))).float()
        return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))

    def loss(self, model: nn.Module, batch, part: str = "discriminator") -> torch.Tensor:
        real = batch[0]
        return self.loss_d(model, real) if part == "discriminator" else self.loss_g(model, real)

    def validation_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        real = batch[0]
        return {"loss_d": self.loss_d(model, real), "loss_g": self.loss_g(model, real), "count": 1}

    def validation_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        n = max(totals["count"], 1.0)
        loss_d, loss_g = totals["loss_d"] / n, totals["loss_g"] / n
        return {"val/loss_d": loss_d, "val/loss_g": loss_g, "val/loss": loss_d + loss_g}

    def after_validation(self, model: nn.Module, run_dir: Path | None, step: int) -> None:
        """A grid of 64 samples from fixed noise (its own generator: the global RNG is not touched)."""
        if run_dir is not None:
            sample_grid(model, Path(run_dir) / "samples" / f"step_{step}.png")


GRID_CELL_PX = 64  # each sample is enlarged (nearest neighbour) to at least this many pixels a side


@torch.no_grad()
def sample_grid(model: DCGAN, path: Path, count: int = 64, seed: int = 1234) -> Path:
    """A PNG grid of `count` generated images from the noise of `seed` (a generator of its own: the global
    RNG is not touched), 8 a row, each enlarged to >= 64 px so that 8x8 digits are readable (530 px wide)."""
    import torchvision

    device = next(model.parameters()).device
    z = torch.randn(count, model.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    images = model.generator(z).float().cpu()
    factor = max(1, math.ceil(GRID_CELL_PX / images.shape[-1]))
    images = F.interpolate(images, scale_factor=factor, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(images, path, nrow=8, normalize=True)
    return path
