"""Model builders. Each is a `_target_` of a `model=` config entry and takes only that entry's keys."""

from __future__ import annotations

import logging

import torch
import torchvision
from torch import nn

from mptrain.config import CNNModelConfig as CNN
from mptrain.config import MLPModelConfig as MLPC
from mptrain.config import TorchvisionModelConfig as TVM
from mptrain.errors import ConfigError

log = logging.getLogger("mptrain")


class SmallCNN(nn.Module):
    """Two conv blocks (conv-BN-ReLU x2, pooling), global average pooling, dropout, a linear head.

    Small enough to train on digits in seconds on a CPU; big enough to reach ~98% there.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = CNN.width,
        dropout: float = CNN.dropout,
        image_size: int | None = None,
    ):
        super().__init__()
        if image_size is not None and image_size < 2:  # the first block pools by 2
            raise ConfigError(f"model=cnn needs dataset.image_size >= 2 (it pools by 2), not {image_size}")

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.block1 = block(in_channels, width)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = block(width, 2 * width)
        self.pool2 = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool2(self.block2(self.pool1(self.block1(x)))))


class MLP(nn.Module):
    """A tanh MLP on flattened images: `depth` hidden layers of `width`. fp16 matmuls run fast on
    CPUs with AVX512-FP16/AMX, so this is the model for fp16 experiments on a CPU. A small
    `init_gain` makes gradients shrink by about that factor per layer on the way back."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: int = MLPC.width,
                 depth: int = MLPC.depth, init_gain: float = MLPC.init_gain):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        sizes = [in_channels * image_size * image_size] + [width] * depth
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            linear = nn.Linear(a, b)
            nn.init.normal_(linear.weight, std=(1.0 if i == 0 else init_gain) / a**0.5)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def torchvision_model(
    name: str,
    num_classes: int | None,
    in_channels: int = 3,
    weights: str | None = TVM.weights,
    small_input: bool = TVM.small_input,
    image_size: int | None = None,
) -> nn.Module:
    """Build torchvision's classification model `name` with a head of `num_classes` outputs.

    `weights` other than null would need a download, which mptrain never does behind a user's back.
    `small_input` swaps a ResNet-style stem for a 3x3 stride-1 conv without max-pool (for 32x32 images).
    `image_size` (the dataset's) lets a warning say when the model would shrink the images to almost nothing.
    """
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ConfigError(
            f"model.name={name!r} is not a torchvision classification model; try one of: "
            f"{', '.join(sorted(m for m in available if m.startswith(('resnet', 'mobilenet', 'vgg'))))}, ..."
        )
    if weights is not None:
        raise ConfigError("model.weights must be null: pretrained weights need a download; load them yourself "
                         "and pass a checkpoint instead")
    if num_classes is None:
        raise ConfigError("model.num_classes is null and the dataset does not say how many classes it has; "
                          "set dataset.num_classes")
    model = _build(name, num_classes, in_channels, small_input)
    if image_size is not None:
        final = smallest_feature_map(name, in_channels, small_input, image_size)
        if final is not None and final < MIN_FEATURE_MAP:
            fix = ("raise dataset.image_size (e.g. 32)" if small_input else
                   "set model.small_input=true (3x3 stride-1 stem, no max-pool) or raise dataset.image_size")
            log.warning("model %s shrinks %dx%d images to %dx%d feature maps%s: %s", name, image_size, image_size,
                        final, final, " even with model.small_input=true" if small_input else "", fix)
    return model


MIN_FEATURE_MAP = 2  # pixels: below this the last stages see one pixel, i.e. no spatial structure at all


def _build(name: str, num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3 or small_input:
        _adapt_stem(model, in_channels, small_input)
    return model


def smallest_feature_map(name: str, in_channels: int, small_input: bool, image_size: int) -> int | None:
    """The smallest height/width any convolution or pooling of the model outputs for a square image, found
    by a forward pass on the meta device (shapes only: no memory, no compute). None if the model cannot
    run on that size at all (its own error will then say so)."""
    sizes: list[int] = []

    def record(module: nn.Module, args: tuple, out: object) -> None:
        # a map that was 1x1 already (squeeze-excitation after global pooling) is not a shrunk image
        if isinstance(out, torch.Tensor) and out.dim() == 4 and min(args[0].shape[-2:]) > 1:
            sizes.append(min(out.shape[-2:]))

    with torch.device("meta"):
        probe = _build(name, 2, in_channels, small_input)
        for m in probe.modules():
            if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
                m.register_forward_hook(record)
        try:
            probe.eval()(torch.empty(1, in_channels, image_size, image_size))
        except Exception:  # e.g. a kernel larger than the feature map: the real model fails the same way
            return None
    return min(sizes) if sizes else None


def _adapt_stem(model: nn.Module, in_channels: int, small_input: bool) -> None:
    """Replace the first conv to take `in_channels`; for small inputs also drop its stride and max-pool."""
    parent, attr, conv = _first_conv(model)
    stride, kernel, padding = (1, 3, 1) if small_input else (conv.stride, conv.kernel_size, conv.padding)
    new = nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding, bias=conv.bias is not None)
    setattr(parent, attr, new)
    if small_input and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ConfigError("model has no Conv2d layer to adapt to the input channels")
