"""nanoGPT-style token files (`dataset=tokens`): train.bin / val.bin, a flat array of uint16 or uint32 token ids.
Nothing is copied into memory and start-up is constant time (the length is the file size): each window is one
positioned read (pread) of its seq_len + 1 tokens, from the page cache once the file is warm. Not np.memmap as
nanoGPT does: every page a map touches (plus the kernel's fault-around, ~64 KB per window) stays in the
process's resident set, so a long run of random windows would show the whole file as its memory
(scripts/bench_tokens.py measures both).

Windows are seq_len + 1 tokens (input = window[:-1], target = window[1:]):
  contiguous: window i starts at i * seq_len (every token once per epoch, nanoGPT-free ordering by the sampler)
  random:     window i starts at a uniform offset drawn from (seed, i) alone (nanoGPT's get_batch), so the
              epoch's windows are fixed by the seed and a resume sees exactly the same ones.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mptrain.config import TokensDatasetConfig as TOKS
from mptrain.errors import ConfigError
from mptrain.library.data.loading import Datasets
from mptrain.library.data.tokenize import VocabTokenizer, load_saved

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
META = "meta.json"  # vocab_size, dtype and tokenizer of a directory written by mptrain-prepare-text
NANOGPT_META = "meta.pkl"  # nanoGPT's prepare.py: {"vocab_size", "itos", "stoi"}, its .bin files always uint16
# the ids checked against the vocabulary at set-up: this many chunks of CHUNK tokens spread over each file
# (~1 MB of reads, whatever the file's size), so an id beyond the vocabulary is refused before the run instead
# of an IndexError inside the embedding; an id outside the sample still fails mid-run
SAMPLE_CHUNKS, CHUNK = 64, 4096

log = logging.getLogger("mptrain")


def random_start(seed: int, index: int, high: int) -> int:
    """The start of random window `index`: uniform in [0, high), from (seed, index) alone."""
    return int(np.random.default_rng((seed, index)).integers(0, high))


class TokenWindows(Dataset):
    """Windows of a token file. The file opens lazily in each process (a DataLoader worker opens its own;
    what is pickled to it is the path)."""

    in_memory = False  # page-cache reads: loader workers overlap them with the step (trainer.num_workers=auto)
    lazy_order = True  # millions of windows: the loader streams a Feistel permutation instead of a list per epoch

    def __init__(self, path: Path, dtype: str, seq_len: int, windows: str = "contiguous", samples: int | None = None,
                 seed: int = 0, stride: int = 1):
        self.path, self.dtype, self.seq_len, self.windows, self.seed = Path(path), dtype, seq_len, windows, seed
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        size = self.path.stat().st_size
        if size % itemsize:
            raise ConfigError(
                f"{self.path} has {size} bytes, not a whole number of {dtype} tokens; check dataset.dtype"
            )
        self.tokens = size // itemsize
        if self.tokens < seq_len + 1:
            raise ConfigError(f"{self.path} holds {self.tokens} tokens: too few for dataset.seq_len={seq_len}")
        self.stride = stride  # contiguous: take every stride-th window (a validation subset spread over the file)
        if windows == "contiguous":
            self.n = ((self.tokens - 1) // seq_len + stride - 1) // stride
        else:
            self.n = samples if samples is not None else (self.tokens - 1) // seq_len
        self.itemsize = itemsize
        self._fd: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return self.n

    def start(self, i: int) -> int:
        if self.windows == "contiguous":
            return i * self.stride * self.seq_len
        return random_start(self.seed, i, self.tokens - self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        s = self.start(i)
        raw = os.pread(self._fd, (self.seq_len + 1) * self.itemsize, s * self.itemsize)
        chunk = torch.from_numpy(np.frombuffer(raw, dtype=DTYPES[self.dtype]).astype(np.int64))
        return chunk[:-1], chunk[1:]

    def sampled_max(self) -> tuple[int, int]:
        """(the largest id, how many ids read) over SAMPLE_CHUNKS chunks spread evenly over the file."""
        n = min(CHUNK, self.tokens)
        starts = np.unique(np.linspace(0, self.tokens - n, SAMPLE_CHUNKS).astype(np.int64))
        with open(self.path, "rb") as f:
            ids = [np.frombuffer(os.pread(f.fileno(), n * self.itemsize, int(s) * self.itemsize),
                                 dtype=DTYPES[self.dtype]).max() for s in starts]
        return int(max(ids)), n * len(starts)


class PlainUnpickler(pickle.Unpickler):
    """Loads no class and calls nothing: a pickle that names any global (how a pickle runs code) is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"{module}.{name}")


def plain(value) -> bool:
    """Only dicts, lists, strings and ints, all the way down (what nanoGPT's meta.pkl holds)."""
    if type(value) is dict:
        return all(plain(k) and plain(v) for k, v in value.items())
    if type(value) is list:
        return all(plain(v) for v in value)
    return type(value) in (str, int)


def read_nanogpt_meta(path: Path) -> dict:
    """nanoGPT's meta.pkl, unpickled without running anything: refused in one line unless it is a dict of
    dicts, lists, strings and ints with an int vocab_size, and its itos (if any) maps 0..vocab_size-1 to strings."""
    refuse = (f"{path} is not a nanoGPT meta.pkl of plain data (mptrain reads only dicts, lists, strings and ints "
              "from a pickle, which could otherwise run code): {}; check where it came from, or write a meta.json "
              '({{"vocab_size": N, "dtype": "uint16"}}) beside it instead')
    try:
        meta = PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as e:
        raise ConfigError(refuse.format(f"it names {e}")) from None
    except Exception as e:  # a truncated or damaged file raises many kinds
        raise ConfigError(refuse.format(f"it does not load ({type(e).__name__})")) from None
    if type(meta) is not dict or not plain(meta):
        raise ConfigError(refuse.format("it holds other types than those"))
    size, itos = meta.get("vocab_size"), meta.get("itos")
    if type(size) is not int or size < 1:
        raise ConfigError(refuse.format("it has no vocab_size"))
    if itos is not None and (type(itos) is not dict or sorted(itos) != list(range(size))
                             or not all(type(t) is str for t in itos.values())):
        raise ConfigError(refuse.format(f"its itos does not map the ids 0..{size - 1} to strings"))
    return meta


def read_meta(directory: Path) -> dict:
    """meta.json (mptrain-prepare-text), else nanoGPT's meta.pkl: vocab_size, dtype (nanoGPT's is always
    uint16) and, from a meta.pkl, the "itos" that decodes the ids."""
    meta = directory / META
    if meta.is_file():
        return json.loads(meta.read_text())
    if (directory / NANOGPT_META).is_file():
        found = read_nanogpt_meta(directory / NANOGPT_META)
        return {"vocab_size": found["vocab_size"], "dtype": "uint16",
                **({"itos": found["itos"]} if "itos" in found else {})}
    return {}


def tokens(path: str, seq_len: int = TOKS.seq_len, dtype: str | None = None, windows: str = TOKS.windows,
           samples: int | None = None, val_windows: int | None = None, vocab_size: int | None = None,
           train_file: str = TOKS.train_file, val_file: str = TOKS.val_file, seed: int = 0,
           name: str = TOKS.name) -> Datasets:
    """A directory with train.bin (and val.bin, validated in contiguous windows; `val_windows` spreads that
    many over the file instead of all). dtype and vocab_size come from its meta.json (mptrain-prepare-text),
    else nanoGPT's meta.pkl (whose itos then decodes the run's samples), unless given; a vocabulary is never
    found by scanning the file (that would read all of it)."""
    directory = Path(path)
    if not (directory / train_file).is_file():
        raise ConfigError(f"dataset.path={path} has no {train_file}; give a directory with nanoGPT-style train.bin/"
                          "val.bin (mptrain-prepare-text FILE --out DIR writes them)")
    meta = read_meta(directory)
    source = directory / (META if (directory / META).is_file() else NANOGPT_META)  # what `meta` was read from
    if dtype and meta.get("dtype") and dtype != meta["dtype"]:
        raise ConfigError(f"dataset.dtype={dtype} contradicts {source} (dtype {meta['dtype']}, as the "
                          "files were written); leave dataset.dtype unset")
    if vocab_size and meta.get("vocab_size") and vocab_size < meta["vocab_size"]:
        raise ConfigError(f"dataset.vocab_size={vocab_size} is smaller than the {meta['vocab_size']} token ids of "
                          f"{source}; leave dataset.vocab_size unset (or set it larger, to pad)")
    if not dtype and "dtype" not in meta:
        log.warning("dataset.dtype: %s has no dtype in %s; reading its token files as uint16 (set "
                    "dataset.dtype=uint32 if they hold 32-bit ids)", directory, META)
    dtype = dtype or meta.get("dtype", "uint16")
    vocab_size = vocab_size or meta.get("vocab_size")
    if dtype not in DTYPES:
        raise ConfigError(f"dataset.dtype={dtype!r} is invalid: choose uint16 or uint32")
    if vocab_size is None:
        raise ConfigError(f"dataset.vocab_size is unknown: {directory} has no {META} (nor nanoGPT's {NANOGPT_META}); "
                          "set dataset.vocab_size (e.g. 50304 for GPT-2 tokens)")
    train = TokenWindows(directory / train_file, dtype, seq_len, windows, samples, seed)
    val = None
    if (directory / val_file).is_file():
        full = TokenWindows(directory / val_file, dtype, seq_len, "contiguous")
        stride = max(1, len(full) // val_windows) if val_windows else 1
        val = TokenWindows(directory / val_file, dtype, seq_len, "contiguous", stride=stride)
    for windows_of in (train, val):
        if windows_of is not None:
            check_ids(windows_of, int(vocab_size))
    facts = {"vocab_size": int(vocab_size)}
    saved = load_saved(directory)  # copied into the run directory: what decodes the tokens
    if saved is None and "itos" in meta:  # nanoGPT's: its decode is "".join(itos[i] for i in ids), as char's
        saved = VocabTokenizer("char", [meta["itos"][i] for i in range(len(meta["itos"]))])
    if isinstance(saved, VocabTokenizer):  # byte/char/word: the run's vocab.json (mptrain-sample reads it)
        return Datasets(train=train, val=val, task="language_modeling", facts=facts, vocab=saved.to_dict())
    if saved is not None:
        facts["tokenizer"] = saved
    return Datasets(train=train, val=val, task="language_modeling", facts=facts)


def check_ids(windows: TokenWindows, vocab_size: int) -> None:
    """Refuse a file whose sampled ids reach past the vocabulary (they would index past the embedding)."""
    top, read = windows.sampled_max()
    if top >= vocab_size:
        raise ConfigError(f"{windows.path} holds token id {top} (in {read} {windows.dtype} ids sampled), beyond "
                          f"dataset.vocab_size={vocab_size}; set dataset.vocab_size > {top}, or dataset.dtype if the "
                          "file's ids are not " + windows.dtype)
