"""dataset=hf: local datasets directories and data files, text and image columns; hub names refused."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mptrain.errors import ConfigError

from .conftest import train

datasets = pytest.importorskip("datasets")
TEXT = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
GPT = ["model=gpt", "model.dim=32", "model.layers=1", "model.heads=2", "trainer.batch_size=8", "optimizer=adamw",
       "scheduler=none", "checkpoint.enabled=false", "diagnostics=off", "trainer.max_steps=3", "dataset.seq_len=16"]


def test_jsonl_text_column_trains_a_language_model_on_exactly_its_text(tmp_path):
    lines = TEXT.read_text().splitlines()
    with open(tmp_path / "docs.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps({"text": line, "n": len(line)}) + "\n")
    from mptrain.library.data.hf import hf

    d = hf(str(tmp_path / "docs.jsonl"), tokenizer="byte", seq_len=16, val_fraction=0.1)
    n_val = int(round(len(lines) * 0.1))
    expected = np.frombuffer("\n".join(lines[: len(lines) - n_val]).encode(), dtype=np.uint8)
    got = np.concatenate([d.train[i][0].numpy() for i in range(len(d.train))])
    np.testing.assert_array_equal(got, expected[: len(got)])  # the windows are the joined texts' bytes, in order
    summary, _ = train(tmp_path, ["dataset=hf", f"dataset.path={tmp_path / 'docs.jsonl'}", *GPT])
    assert summary["status"] == "completed" and "val/loss" in summary


def test_saved_dataset_dict_with_images_trains_a_classifier(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    imgs = [Image.fromarray((im * 16).astype(np.uint8)) for im in digits.images[:300]]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"image": imgs, "label": digits.target[:300].tolist()}, features=feats)
    datasets.DatasetDict({"train": ds.select(range(240)), "test": ds.select(range(240, 300))}).save_to_disk(
        tmp_path / "d"
    )
    summary, _ = train(tmp_path, ["dataset=hf", f"dataset.path={tmp_path / 'd'}", "dataset.column=image",
                                  "dataset.channels=1", "dataset.image_size=8", "model=cnn", "model.width=4",
                                  "trainer.batch_size=32", "trainer.max_steps=4", "checkpoint.enabled=false",
                                  "diagnostics=off"])
    assert summary["status"] == "completed" and 0 <= summary["val/acc"] <= 1


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param(
            "wikitext/wikitext-2-raw-v1", r"looks like a hub name: mptrain never downloads", marks=pytest.mark.slow
        ),
        pytest.param("{tmp}", r"holds no save_to_disk dataset", marks=pytest.mark.slow),
    ],
)
def test_bad_paths_fail_in_one_line(tmp_path, path, message):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, ["dataset=hf", f"dataset.path={path.format(tmp=tmp_path)}", *GPT])
    assert not (tmp_path / "run").exists()


def test_missing_column_names_the_columns(tmp_path):
    datasets.Dataset.from_dict({"body": ["a b c"] * 50}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(ConfigError, match=r"^dataset.column='text' is not a column of .*\(columns: body\)"):
        train(tmp_path, ["dataset=hf", f"dataset.path={tmp_path / 'x.parquet'}", *GPT])
