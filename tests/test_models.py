"""Model families and datasets: each family learns a fixed batch in fp32, amp and master; the loaders
read small files written here in the real on-disk formats."""

from __future__ import annotations

import struct
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mptrain.config import validate
from mptrain.errors import ConfigError
from mptrain.train.recipe import build
from mptrain.train.step import train_step

from .conftest import TINY, compose_config, run_cli, train

PYTHON_LICENSE = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"

FAMILIES = {
    "cnn": ["model=cnn", "model.width=4", "trainer.batch_size=16"],
    "resnet18": ["model=resnet18", "model.small_input=true", "dataset.image_size=16", "trainer.batch_size=8"],
    "lstm": [
        "model=lstm",
        "dataset=synthetic_tokens",
        "dataset.seq_len=16",
        "model.embed_dim=32",
        "model.hidden_dim=32",
        "model.tie_weights=true",
        "trainer.batch_size=8",
        "optimizer=adamw",
        "optimizer.lr=1e-2",
    ],
    "gru": [
        "model=gru",
        "dataset=synthetic_tokens",
        "dataset.seq_len=16",
        "model.embed_dim=32",
        "model.hidden_dim=48",
        "trainer.batch_size=8",
        "optimizer=adamw",
        "optimizer.lr=1e-2",
    ],
    "gpt": [
        "model=gpt",
        "dataset=synthetic_tokens",
        "dataset.seq_len=16",
        "model.dim=32",
        "model.layers=2",
        "model.heads=2",
        "trainer.batch_size=8",
        "optimizer=adamw",
        "optimizer.lr=1e-2",
    ],
    "dcgan": [
        "model=dcgan",
        "model.width=8",
        "model.latent_dim=16",
        "trainer.batch_size=16",
        "optimizer=adamw",
        "optimizer.lr=2e-3",
    ],
}


def fixed_batch_losses(overrides: list[str], steps: int) -> tuple[list[float], object]:
    cfg = compose_config([*TINY, "diagnostics=off", "scheduler=none", *overrides])
    validate(cfg)
    c = build(cfg)
    batch = next(iter(c.train_loader))

    def same_batch():
        while True:
            yield batch

    losses = []
    it = same_batch()
    for i in range(steps):
        out = train_step(c, it, i + 1)  # the step the CLI's loop runs
        if out.applied:
            c.scheduler.step()
        losses.append(out.loss.item())
    return losses, c


CASES = [(f, m) for f in ("cnn", "lstm", "gru", "gpt") for m in ("fp32", "amp", "master")]
CASES += [("lstm", "dynamic"), ("gru", "dynamic")]  # fp16 autocast: oneDNN has no fp16 RNN on CPU
CASES += [("resnet18", "fp32"), ("resnet18", "amp")]  # fp16 convolutions are emulated on a CPU: the CNN covers master
SLOW_CASES = {("resnet18", "fp32"), ("resnet18", "amp")}  # the longest on a CPU


@pytest.mark.parametrize(
    ("family", "mode"),
    [pytest.param(f, m, marks=pytest.mark.slow) if (f, m) in SLOW_CASES else (f, m) for f, m in CASES],
    ids=[f"{f}-{m}" for f, m in CASES],
)
def test_family_learns_a_fixed_batch(family, mode):
    losses, c = fixed_batch_losses([*FAMILIES[family], f"precision={mode}"], 20)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
    if mode == "master":
        assert any(p.dtype == torch.float16 for p in c.model.parameters())


@pytest.mark.parametrize("mode", ["fp32", "amp", "master", "dynamic", "static", "bf16", "noscale", "nomaster"])
def test_dcgan_trains_in_every_precision_mode(mode, tmp_path):
    """Both networks step, with one loss scaler; the discriminator learns to tell the fixed batch."""
    losses, c = fixed_batch_losses([*FAMILIES["dcgan"], f"precision={mode}"], 10)
    assert all(np.isfinite(losses))
    d = c.model.discriminator
    g = c.model.generator
    assert [p.name for p in c.parts] == ["discriminator", "generator"] and all(p.params for p in c.parts)
    assert {id(p) for p in d.parameters()}.isdisjoint({id(p) for p in g.parameters()})
    assert losses[-1] != losses[0]


def test_dcgan_run_writes_sample_grids_and_losses(tmp_path):
    summary, run_dir = train(tmp_path, [*FAMILIES["dcgan"], "trainer.max_steps=4", "trainer.eval_every=2"])
    assert summary["task"] == "gan" and summary["status"] == "completed"
    assert {"val/loss_d", "val/loss_g"} <= summary.keys()
    from PIL import Image

    for step in (2, 4):
        with Image.open(run_dir / "samples" / f"step_{step}.png") as img:
            assert img.size[0] >= 8 * 8


@pytest.mark.slow
def test_lstm_on_a_real_text_file(tmp_path):
    """Python's own LICENSE file, character level: perplexity falls below the vocabulary size."""
    assert PYTHON_LICENSE.is_file()
    summary, _ = train(tmp_path, ["model=lstm", "dataset=text", f"dataset.path={PYTHON_LICENSE}", "dataset.seq_len=32",
                                  "model.embed_dim=32", "model.hidden_dim=64", "trainer.max_steps=200",
                                  "trainer.batch_size=16", "optimizer=adamw", "optimizer.lr=1e-2"])
    assert summary["task"] == "language_modeling"
    vocab = len(set(PYTHON_LICENSE.read_text()))
    assert summary["val/ppl"] < vocab / 4  # well below a uniform guess over the characters


@pytest.mark.parametrize("level", ["byte", "char", "word"])
def test_text_tokenisation_levels(tmp_path, level):
    from mptrain.library.data.text import text

    data = text(str(PYTHON_LICENSE), level=level, seq_len=8, max_vocab=50)
    x, y = data.train[0]
    assert torch.equal(x[1:], y[:-1])  # targets are the next tokens
    vocab = data.facts["vocab_size"]
    assert {"byte": 256, "word": 50}.get(level, len(set(PYTHON_LICENSE.read_text()))) == vocab
    assert int(x.max()) < vocab


def test_gpt_keeps_softmax_and_norms_in_fp32_under_fp16():
    from mptrain.library.models.language import GPT

    model = GPT(vocab_size=11, seq_len=8, dim=16, layers=1, heads=2)
    tokens = torch.randint(0, 11, (2, 8))
    with torch.autocast("cpu", dtype=torch.float16):
        ln_out = model.blocks[0].ln1(model.tokens(tokens))
        logits = model(tokens)
    assert ln_out.dtype == torch.float32  # autocast runs layer_norm in fp32
    assert torch.isfinite(logits).all()


# ---- loaders on real on-disk formats -------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of MNIST: magic (dtype 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
@pytest.mark.slow
def test_mnist_loader_reads_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 16)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    summary, _ = train(tmp_path / "run", [f"dataset={name}", f"dataset.root={tmp_path}", "trainer.max_steps=3",
                                          "trainer.batch_size=16", "model.width=4"])
    assert summary["status"] == "completed" and summary["dataset"] == name


def test_cifar10_integrity_check_gives_the_one_line_error(tmp_path):
    """torchvision verifies CIFAR-10's files against their published MD5 sums, so a hand-made batch
    directory cannot pass (and the real files cannot be fetched offline): check the message instead."""
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    import pickle

    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        with open(batches / name, "wb") as f:
            pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    cfg = compose_config([*TINY, "dataset=cifar10", f"dataset.root={tmp_path}", "model=resnet18"])
    with pytest.raises(
        ConfigError, match=r"dataset cifar10 not found or corrupt .*cifar-10-batches-py.*dataset.download=true"
    ):
        build(cfg)


@pytest.mark.slow
def test_imagefolder_reads_pngs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog", "owl"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    summary, _ = train(tmp_path / "run", ["dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.image_size=32",
                                          "dataset.num_classes=3", "model=resnet18", "model.small_input=true",
                                          "trainer.batch_size=6", "trainer.max_steps=2"])
    assert summary["status"] == "completed"


def test_imagefolder_class_count_mismatch_is_named(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        d = tmp_path / split / "only"
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "0.png")
    cfg = compose_config([*TINY, "dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.num_classes=5"])
    with pytest.raises(ConfigError, match="holds 1 class folders; set dataset.num_classes=1"):
        build(cfg)


@pytest.mark.parametrize(("dataset", "expected"), [
    pytest.param("mnist", "expected <root>/MNIST/raw/", marks=pytest.mark.slow),
    pytest.param("cifar10", "expected <root>/cifar-10-batches-py/", marks=pytest.mark.slow),
    pytest.param("imagefolder", "ImageNet layout", marks=pytest.mark.slow),
])
def test_missing_root_fails_at_start_with_one_line(tmp_path, dataset, expected):
    proc = run_cli([f"dataset={dataset}", f"dataset.root={tmp_path}/nowhere", "trainer.device=cpu",
                    f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    if dataset != "imagefolder":
        assert "dataset.download=true" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("mptrain: error")]) == 1


@pytest.mark.slow
def test_model_and_dataset_tasks_must_match(tmp_path):
    proc = run_cli(["model=gpt", "trainer.device=cpu", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "language_modeling task but the dataset serves classification" in proc.stderr


def test_same_seed_same_order_different_seed_different_order():
    from mptrain.library.data.loading import make_loader
    from mptrain.library.data.loading import synthetic as synth

    ds = synth(train_size=64, val_size=8).train
    order = lambda seed: [y.tolist() for _, y in make_loader(ds, 8, train=True, seed=seed)]  # noqa: E731
    assert order(1) == order(1) and order(1) != order(2)
