"""Data defaults: trainer.num_workers=auto, ImageFolder's classes from its folders, the stem warning."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from mptrain.config import validate
from mptrain.errors import ConfigError
from mptrain.library.data.loading import make_loader, resolve_num_workers, synthetic
from mptrain.library.data.vision import imagefolder
from mptrain.library.models.vision import torchvision_model

from .conftest import compose_config, train


class OnDisk(Dataset):
    """Stands for a dataset that decodes files in __getitem__ (nothing marks it as in memory)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.zeros(1), i


def cpus() -> int:
    return len(os.sched_getaffinity(0))


def test_num_workers_auto_is_none_for_in_memory_data_and_cpus_minus_one_otherwise(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_workers("auto", TensorDataset(torch.zeros(4))) == 0
    assert resolve_num_workers("auto", synthetic().train) == 0
    assert resolve_num_workers("auto", OnDisk()) == max(0, min(8, cpus() - 1))
    assert resolve_num_workers(3, OnDisk()) == 3 and resolve_num_workers(0, OnDisk()) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two ranks share this machine's CPUs
    assert resolve_num_workers("auto", OnDisk()) == max(0, min(8, cpus() // 2 - 1))


def test_make_loader_resolves_auto_and_keeps_workers_alive(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    loader = make_loader(OnDisk(), 2, train=True, seed=0, num_workers="auto")
    expected = max(0, min(8, cpus() - 1))
    assert loader.num_workers == expected and loader.persistent_workers == (expected > 0)
    assert sorted(int(i) for _, idx in loader for i in idx) == list(range(8))


def test_num_workers_config_default_and_checks():
    assert compose_config([]).trainer.num_workers == "auto"
    validate(compose_config(["trainer.num_workers=4"]))
    for bad in ("-1", "many"):
        with pytest.raises(ConfigError, match="trainer.num_workers"):
            validate(compose_config([f"trainer.num_workers={bad}"]))


def make_folders(root, classes=("ant", "bee", "cat"), per_class=4):
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 12), color=(40 * k, 10 * i, 200)).save(root / split / name / f"{i}.png")
    return root


def test_imagefolder_counts_its_classes_when_not_told(tmp_path):
    root = make_folders(tmp_path / "imgs")
    data = imagefolder(str(root), image_size=8)
    assert data.facts == {"num_classes": 3} and len(data.train) == 12
    assert imagefolder(str(root), image_size=8, num_classes=3).facts == {"num_classes": 3}
    with pytest.raises(ConfigError, match="holds 3 class folders; set dataset.num_classes=3"):
        imagefolder(str(root), image_size=8, num_classes=5)


def test_imagefolder_run_without_num_classes_builds_a_head_per_folder(tmp_path):
    root = make_folders(tmp_path / "imgs")
    cfg = compose_config(["dataset=imagefolder", f"dataset.root={root}"])
    assert cfg.dataset.num_classes is None and cfg.model.num_classes is None
    validate(cfg)
    summary, run_dir = train(tmp_path, ["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=8",
                                        "model.width=4", "trainer.batch_size=4", "trainer.max_steps=2",
                                        "trainer.num_workers=0", "diagnostics=off"])
    assert summary["status"] == "completed" and summary["steps"] == 2
    head = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]["head.2.weight"]
    assert head.shape == (3, 8)  # 3 classes from the folders; 2 * model.width features


def last_map_size(model: torch.nn.Module, channels: int, size: int) -> int:
    """Independent check: the real CPU forward's layer4 output of a torchvision ResNet."""
    out = {}
    model.layer4.register_forward_hook(lambda m, a, o: out.setdefault("x", o))
    model.eval()(torch.zeros(1, channels, size, size))
    return out["x"].shape[-1]


@pytest.mark.parametrize(("small_input", "size", "warns"), [(False, 8, True), (True, 8, True), (False, 64, False),
                                                            (True, 32, False)])
def test_stem_warning_when_the_images_would_shrink_below_two_pixels(caplog, small_input, size, warns):
    with caplog.at_level(logging.WARNING, logger="mptrain"):
        model = torchvision_model("resnet18", 10, in_channels=1, small_input=small_input, image_size=size)
    final = last_map_size(model, 1, size)
    assert (final < 2) == warns
    if warns:
        assert f"{size}x{size} images to {final}x{final}" in caplog.text
        assert ("raise dataset.image_size" if small_input else "model.small_input=true") in caplog.text
    else:
        assert "shrinks" not in caplog.text


def test_torchvision_models_get_the_dataset_image_size():
    cfg = compose_config(["model=resnet50", "dataset=synthetic", "dataset.image_size=48"])
    validate(cfg)
    assert cfg.model.image_size == 48
