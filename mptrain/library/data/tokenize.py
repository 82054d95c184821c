"""Tokenizers for text (`dataset.tokenizer=byte|char|word|bpe:<vocab size>|<path to a tokenizers JSON>`).

byte, char and word are mptrain's own (a vocabulary list); bpe:N trains a byte-level BPE with Hugging Face
`tokenizers` on the text (GPT-2's scheme: every byte is in the alphabet, so any text round-trips), and a JSON
path loads a saved `tokenizers` file. Each one saves what decodes its ids (`save(dir)`): vocab.json or
tokenizer.json, in the run directory or beside the .bin files of mptrain-prepare-text.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mptrain.errors import ConfigError
from mptrain.library.extras import require

LEVELS = ("byte", "char", "word")
VOCAB_FILE, TOKENIZER_FILE = "vocab.json", "tokenizer.json"


@dataclass
class Vocab:
    """A text dataset's tokens: id i is tokens[i]. Encodes a prompt and decodes generated ids the way
    the dataset tokenized its file."""

    level: str  # byte | char | word
    tokens: list[str]

    def encode(self, text: str) -> list[int]:
        if self.level == "byte":
            return list(text.encode("utf-8"))
        if self.level == "word":
            index = {w: i for i, w in enumerate(self.tokens)}
            return [index.get(w, 0) for w in text.split()]  # 0 is <unk>
        index = {c: i for i, c in enumerate(self.tokens)}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise ConfigError(f"the prompt has characters the training text never had ({''.join(unknown)!r}); "
                              "use only characters of the training file")
        return [index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        if self.level == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return (" " if self.level == "word" else "").join(self.tokens[i] for i in ids)

    def to_json(self) -> dict:
        return {"level": self.level, "tokens": self.tokens}

    @classmethod
    def from_json(cls, data: dict) -> Vocab:
        return cls(level=data["level"], tokens=list(data["tokens"]))


class VocabTokenizer:
    """byte: the 256 byte values; char: the text's characters; word: whitespace words, the max_vocab - 1 most
    frequent plus <unk> (words are joined by one space when decoding)."""

    def __init__(self, level: str, vocab: list[str]):
        self.level, self.vocab = level, vocab
        self.index = {t: i for i, t in enumerate(vocab)}

    @classmethod
    def fit(cls, level: str, chunks: Iterable[str], max_vocab: int) -> VocabTokenizer:
        """From the text, given as chunks of whole lines (a large file need not be in memory at once)."""
        if level == "byte":
            return cls(level, [chr(i) for i in range(256)])
        if level == "char":
            return cls(level, sorted(set().union(*(set(c) for c in chunks))))
        counts: Counter = Counter()
        for c in chunks:
            counts.update(c.split())
        return cls(level, ["<unk>"] + [w for w, _ in counts.most_common(max_vocab - 1)])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        if self.level == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        if self.level == "char":
            try:
                return np.fromiter((self.index[c] for c in text), dtype=np.int64, count=len(text))
            except KeyError:  # named here, not per character: the training text's own pass costs nothing more
                unknown = "".join(sorted({c for c in text if c not in self.index}))
                raise ConfigError(f"the text has characters the training text never had ({unknown!r}); a char "
                                  "tokenizer knows only the characters of the text it was fitted on") from None
        return np.fromiter((self.index.get(w, 0) for w in text.split()), dtype=np.int64)

    def decode(self, ids) -> str:
        return Vocab(self.level, self.vocab).decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        """The run directory's vocab.json (run/layout.VOCAB), what mptrain-sample reads (text.Vocab)."""
        return Vocab(self.level, self.vocab).to_json()

    def save(self, directory: Path) -> Path:
        path = Path(directory) / VOCAB_FILE
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False))
        return path


class HFTokenizer:
    """A Hugging Face `tokenizers` Tokenizer: trained byte-level BPE, or loaded from a JSON file."""

    LINES_PER_BATCH = 4096  # encode_batch runs a batch of lines in parallel (Rust threads)

    def __init__(self, tokenizer, kind: str):
        self.tokenizer, self.kind = tokenizer, kind

    @classmethod
    def train_bpe(cls, chunks: Iterable[str], vocab_size: int) -> HFTokenizer:
        tk = require("tokenizers", "hf", "dataset.tokenizer=bpe:N")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((batch for c in chunks for batch in _line_batches(c)), trainer)
        return cls(tok, f"bpe:{vocab_size}")

    @classmethod
    def load(cls, path: str) -> HFTokenizer:
        tk = require("tokenizers", "hf", "dataset.tokenizer=<tokenizer.json>")
        try:
            return cls(tk.Tokenizer.from_file(path), "json")
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ConfigError(
                f"dataset.tokenizer={path} is not a tokenizers JSON file ({str(e).splitlines()[0]})"
            ) from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        parts = [np.asarray(e.ids, dtype=np.int64) for batch in _line_batches(text)
                 for e in self.tokenizer.encode_batch(batch, add_special_tokens=False)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"level": self.kind, "file": TOKENIZER_FILE}

    def to_str(self) -> str:
        """tokenizer.json's text (a run directory writes it through its atomic writer)."""
        return self.tokenizer.to_str(pretty=True)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        self.tokenizer.save(str(path))
        return path


def _line_batches(text: str):
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), HFTokenizer.LINES_PER_BATCH):
        yield lines[i : i + HFTokenizer.LINES_PER_BATCH]


def build_tokenizer(spec: str, chunks: Iterable[str], max_vocab: int = 10000) -> VocabTokenizer | HFTokenizer:
    """The tokenizer `spec` names, fitted where it learns from the data to the text (chunks of whole lines; a
    callable returning a fresh iterator over them may be given for a file read as it is needed)."""
    chunks = chunks() if callable(chunks) else chunks
    if spec in LEVELS:
        return VocabTokenizer.fit(spec, chunks, max_vocab)
    m = re.fullmatch(r"bpe:(\d+)", spec)
    if m:
        if int(m.group(1)) < 257:
            raise ConfigError(f"dataset.tokenizer={spec}: a byte-level BPE needs a vocabulary of at least 257 "
                              "(256 bytes + merges)")
        return HFTokenizer.train_bpe(chunks, int(m.group(1)))
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise ConfigError(f"dataset.tokenizer={spec} is not a file")
        return HFTokenizer.load(spec)
    raise ConfigError(f"dataset.tokenizer={spec!r} is invalid: choose byte, char, word, bpe:<vocab size> or the path "
                      "of a tokenizers .json file")


def load_saved(directory: Path) -> VocabTokenizer | HFTokenizer | None:
    """The tokenizer saved in `directory` (vocab.json or tokenizer.json), if any."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).is_file():
        return HFTokenizer.load(str(directory / TOKENIZER_FILE))
    if (directory / VOCAB_FILE).is_file():
        saved = Vocab.from_json(json.loads((directory / VOCAB_FILE).read_text()))
        return VocabTokenizer(saved.level, saved.tokens)
    return None
