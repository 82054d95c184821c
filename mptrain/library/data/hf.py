"""`dataset=hf`: a local Hugging Face `datasets` directory (save_to_disk) or data files (parquet, arrow, jsonl,
json, csv) with a text column (language modelling: the texts joined by newlines, tokenised with
dataset.tokenizer) or an image column (classification, with a label column). Never the hub: a name that is
not a local path is refused with how to fetch it. datasets is an extra: pip install mptrain[hf]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mptrain.config import HFDatasetConfig as HFD
from mptrain.errors import ConfigError
from mptrain.library.data.loading import Datasets
from mptrain.library.data.text import Contiguous
from mptrain.library.data.tokenize import VocabTokenizer, build_tokenizer
from mptrain.library.extras import require

FILE_KINDS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def load(path: str):
    """A Dataset or DatasetDict from a save_to_disk directory, a data file, or a directory of data files."""
    datasets = require("datasets", "hf", "dataset=hf")
    p = Path(path)
    if p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return datasets.load_from_disk(str(p))
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.suffix in FILE_KINDS) if p.is_dir() else []
    if not files:
        why = ("looks like a hub name: mptrain never downloads; fetch it first (e.g. datasets' load_dataset(...)"
               ".save_to_disk(DIR)) and pass dataset.path=DIR") if not p.exists() else \
              f"holds no save_to_disk dataset and no {', '.join(FILE_KINDS)} files"
        raise ConfigError(f"dataset.path={path} {why}")
    kinds = {FILE_KINDS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ConfigError(f"dataset.path={path}: give files of one kind ({', '.join(FILE_KINDS)})")
    return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")


def splits(ds, split: str, val_split: str | None, val_fraction: float):
    """(train, val): named splits of a DatasetDict, or the last val_fraction of a single Dataset."""
    if hasattr(ds, "keys"):  # DatasetDict
        names = list(ds.keys())
        if split not in ds:
            raise ConfigError(f"dataset.split={split!r} is not in {names}")
        val = val_split or next((s for s in ("validation", "valid", "val", "test") if s in ds), None)
        if val is not None and val not in ds:
            raise ConfigError(f"dataset.val_split={val!r} is not in {names}")
        return ds[split], ds[val] if val else None
    n_val = int(round(len(ds) * val_fraction))
    return ds.select(range(len(ds) - n_val)), ds.select(range(len(ds) - n_val, len(ds)))


class ImageColumn(Dataset):
    """(image, label) from an image column: a float tensor in [0, 1], resized to image_size, channels fixed."""

    def __init__(self, ds, column: str, label_column: str, image_size: int, channels: int):
        self.ds, self.column, self.label_column, self.image_size, self.channels = (
            ds,
            column,
            label_column,
            image_size,
            channels,
        )

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.ds[int(i)]
        img = row[self.column].convert("L" if self.channels == 1 else "RGB")
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[0]
        return x, int(row[self.label_column])


def hf(path: str, column: str = HFD.column, label_column: str = HFD.label_column, split: str = HFD.split,
       val_split: str | None = None, val_fraction: float = HFD.val_fraction, tokenizer: str = HFD.tokenizer,
       seq_len: int = HFD.seq_len, max_vocab: int = HFD.max_vocab, image_size: int = HFD.image_size,
       channels: int = HFD.channels, num_classes: int | None = None, vocab_size: int | None = None,
       name: str = HFD.name) -> Datasets:
    ds = load(path)
    train, val = splits(ds, split, val_split, val_fraction)
    if column not in train.column_names:
        raise ConfigError(
            f"dataset.column={column!r} is not a column of {path} (columns: {', '.join(train.column_names)})"
        )
    feature = type(train.features[column]).__name__
    if feature == "Image":
        if label_column not in train.column_names:
            raise ConfigError(f"dataset.label_column={label_column!r} is not a column of {path} "
                              f"(columns: {', '.join(train.column_names)})")
        labels = train.features[label_column]
        classes = num_classes or getattr(labels, "num_classes", None) or int(max(train[label_column])) + 1
        make = lambda d: ImageColumn(d, column, label_column, image_size, channels)  # noqa: E731
        return Datasets(train=make(train), val=make(val) if val is not None else None, facts={"num_classes": classes})
    text = "\n".join(train[column])
    tok = build_tokenizer(tokenizer, [text], max_vocab)
    train_ids = torch.from_numpy(tok.encode(text))
    val_ids = torch.from_numpy(tok.encode("\n".join(val[column]))) if val is not None else None
    if vocab_size is not None and vocab_size < tok.vocab_size:
        raise ConfigError(f"dataset.vocab_size={vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    facts = {"vocab_size": vocab_size or tok.vocab_size}
    vocab = tok.to_dict() if isinstance(tok, VocabTokenizer) else None  # byte/char/word: the run's vocab.json
    if vocab is None:
        facts["tokenizer"] = tok  # tokenizer.json in the run directory
    return Datasets(
        train=Contiguous(train_ids, seq_len),
        val=Contiguous(val_ids, seq_len) if val_ids is not None else None,
        task="language_modeling",
        facts=facts,
        vocab=vocab,
    )
