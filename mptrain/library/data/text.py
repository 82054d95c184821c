"""Token datasets for language modelling: a local UTF-8 text file, or synthetic tokens.

Batches are (tokens, next tokens), each (seq_len,), cut contiguously from the token stream.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mptrain.config import SyntheticTokensConfig as TOK
from mptrain.config import TextDatasetConfig as TXT
from mptrain.errors import ConfigError
from mptrain.library.data.loading import Datasets


class Contiguous(Dataset):
    """Non-overlapping windows of seq_len + 1 tokens: input = window[:-1], target = window[1:]."""

    in_memory = True  # a slice of one tensor: no loader worker processes needed (trainer.num_workers=auto)

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = max(0, (len(tokens) - 1) // seq_len)  # an empty stream holds no window, not -1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return chunk[:-1], chunk[1:]


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


def tokenize(text: str, level: str, max_vocab: int) -> tuple[torch.Tensor, list[str]]:
    """Token ids and the vocabulary. byte: 256 ids; char: the file's characters; word: whitespace
    words, the max_vocab - 1 most frequent plus <unk>."""
    if level == "byte":
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long), [chr(i) for i in range(256)]
    if level == "char":
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        return torch.tensor([index[c] for c in text], dtype=torch.long), vocab
    if level == "word":
        words = text.split()
        vocab = ["<unk>"] + [w for w, _ in Counter(words).most_common(max_vocab - 1)]
        index = {w: i for i, w in enumerate(vocab)}
        return torch.tensor([index.get(w, 0) for w in words], dtype=torch.long), vocab
    raise ValueError(f"unknown token level {level!r}")  # the schema (TextDatasetConfig) refuses it first


def text(path: str, level: str = TXT.level, seq_len: int = TXT.seq_len, val_fraction: float = TXT.val_fraction,
         max_vocab: int = TXT.max_vocab, vocab_size: int | None = None, name: str = TXT.name) -> Datasets:
    """Any local UTF-8 text file; the last val_fraction of it validates."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dataset.path={path} is not a file; dataset=text reads one local UTF-8 text file")
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"dataset.path={path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not content.strip():
        raise ConfigError(f"dataset.path={path} holds no text (empty or only whitespace); point it at a text file")
    tokens, vocab = tokenize(content, level, max_vocab)
    if vocab_size is not None and vocab_size < len(vocab):
        raise ConfigError(f"dataset.vocab_size={vocab_size} is smaller than the {len(vocab)} {level} tokens of {path}")
    split = int(len(tokens) * (1 - val_fraction))
    train, val = Contiguous(tokens[:split], seq_len), Contiguous(tokens[split:], seq_len)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(f"{path} has {len(tokens)} {level} tokens: too few for dataset.seq_len={seq_len}; "
                          "use a longer file or a shorter seq_len")
    return Datasets(train=train, val=val, task="language_modeling", facts={"vocab_size": vocab_size or len(vocab), "seq_len": seq_len},
                    vocab=Vocab(level, vocab).to_json())


def synthetic_tokens(vocab_size: int = TOK.vocab_size, seq_len: int = TOK.seq_len, train_tokens: int = TOK.train_tokens,
                     val_tokens: int = TOK.val_tokens, name: str = TOK.name) -> Datasets:
    """A learnable stream: each token is the previous one plus a step drawn from a skewed set, mod vocab."""
    g = torch.Generator().manual_seed(3)

    def stream(n: int) -> torch.Tensor:
        steps = torch.tensor([1, 1, 1, 2, 3, 5])[torch.randint(0, 6, (n,), generator=g)]
        return torch.cumsum(steps, 0) % vocab_size

    return Datasets(train=Contiguous(stream(train_tokens), seq_len), val=Contiguous(stream(val_tokens), seq_len),
                    task="language_modeling", facts={"vocab_size": vocab_size, "seq_len": seq_len})
