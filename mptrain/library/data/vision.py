"""Image datasets read from disk through torchvision: MNIST, Fashion-MNIST, CIFAR-10/100, ImageFolder.

Nothing is downloaded unless `dataset.download=true`. A missing or malformed root fails at start
with one line naming the layout expected and the download flag.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torchvision
from torchvision import transforms as T

from mptrain.config import ImageFolderConfig as IF
from mptrain.config import TorchvisionDatasetConfig as TV
from mptrain.errors import ConfigError
from mptrain.library.data.loading import Datasets

log = logging.getLogger("mptrain")

STATS = {  # per-channel mean and std of the training sets
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
LAYOUT = {
    "mnist": "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "fashion_mnist": "<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "cifar10": "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
    "cifar100": "<root>/cifar-100-python/{train,test,meta}",
}
CLASSES = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}


def torchvision_dataset(name: str, root: str = TV.root, download: bool = TV.download, augment: bool = TV.augment,
                        num_classes: int = TV.num_classes, channels: int = TV.channels,
                        image_size: int = TV.image_size) -> Datasets:
    """`name` in mnist, fashion_mnist, cifar10, cifar100, from `root` in torchvision's own layout."""
    if name not in CLASSES:
        raise ConfigError(f"dataset.name={name!r}: choose one of {', '.join(CLASSES)}")
    mean, std = STATS[name]
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = norm
    if augment and name.startswith("cifar"):
        train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm]
    try:
        train = CLASSES[name](root, train=True, transform=T.Compose(train_tf), download=download)
        val = CLASSES[name](root, train=False, transform=T.Compose(norm), download=download)
    except RuntimeError as e:
        raise ConfigError(f"dataset {name} not found or corrupt under dataset.root={root} ({str(e).splitlines()[0]}); "
                          f"expected {LAYOUT[name]}, or pass dataset.download=true to fetch it") from None
    return Datasets(train=train, val=val)


class CheckedImageFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder that skips an image it cannot decode (a truncated or corrupt file) with a warning
    naming it, taking the next readable image in its place: a deterministic substitute, so a resumed run
    sees the same batches. Opening every image at start would read all of ImageNet first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad: set[str] = set()  # warned about once each (per loader process)

    def __getitem__(self, index: int):
        for k in range(len(self.samples)):
            i = (index + k) % len(self.samples)
            try:
                return super().__getitem__(i)
            except OSError as e:  # PIL.UnidentifiedImageError, a truncated file, an unreadable one
                path = self.samples[i][0]
                if path not in self.bad:
                    self.bad.add(path)
                    log.warning("skipping image %s: cannot be read (%s); the next image takes its place",
                                path, type(e).__name__)
        raise ConfigError(f"no image under {self.root} can be read; check dataset.root")


def imagefolder(root: str = IF.root, image_size: int = IF.image_size, num_classes: int | None = IF.num_classes,
                channels: int = IF.channels, name: str = IF.name) -> Datasets:
    """ImageNet layout: <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg, standard transforms.
    `num_classes` null: one class per folder of train/ (the model's num_classes follows, as a fact of the data)."""
    base = Path(root)
    for split in ("train", "val"):
        if not (base / split).is_dir() or not any(p.is_dir() for p in (base / split).iterdir()):
            raise ConfigError(f"dataset=imagefolder expects {root}/{split}/<class>/<image> (ImageNet layout: "
                              f"train/ and val/ with one folder per class); {base / split} is missing or empty")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train = CheckedImageFolder(base / "train", T.Compose([
        T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]))
    val = CheckedImageFolder(base / "val", T.Compose([
        T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)]))
    if num_classes is not None and len(train.classes) != num_classes:
        raise ConfigError(f"dataset.num_classes={num_classes} but {base / 'train'} holds {len(train.classes)} class "
                          f"folders; set dataset.num_classes={len(train.classes)}")
    if val.classes != train.classes:
        raise ConfigError(f"{base / 'val'} and {base / 'train'} hold different class folders; they must match")
    return Datasets(train=train, val=val, facts={"num_classes": len(train.classes)})
