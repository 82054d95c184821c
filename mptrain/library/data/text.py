"""Token datasets for language modelling: a local UTF-8 text file, or synthetic tokens.

Batches are (tokens, next tokens), each (seq_len,), cut contiguously from the token stream.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from mptrain.config import SyntheticTokensConfig as TOK
from mptrain.config import TextDatasetConfig as TXT
from mptrain.errors import ConfigError
from mptrain.library.data.loading import Datasets
from mptrain.library.data.tokenize import VocabTokenizer, build_tokenizer


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


def text(path: str, level: str = TXT.level, seq_len: int = TXT.seq_len, val_fraction: float = TXT.val_fraction,
         max_vocab: int = TXT.max_vocab, vocab_size: int | None = None, tokenizer: str | None = None,
         name: str = TXT.name) -> Datasets:
    """Any local UTF-8 text file; the last val_fraction of it validates. `tokenizer` (default: `level`):
    byte | char | word | bpe:<vocab size> | <tokenizers .json> (mptrain.library.data.tokenize); the run saves
    it in its directory (vocab.json or tokenizer.json)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dataset.path={path} is not a file; dataset=text reads one local UTF-8 text file")
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"dataset.path={path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not content.strip():
        raise ConfigError(f"dataset.path={path} holds no text (empty or only whitespace); point it at a text file")
    spec = tokenizer or level
    tok = build_tokenizer(spec, [content], max_vocab)
    tokens = torch.from_numpy(tok.encode(content))
    if vocab_size is not None and vocab_size < tok.vocab_size:
        raise ConfigError(
            f"dataset.vocab_size={vocab_size} is smaller than the {tok.vocab_size} {spec} tokens of {path}"
        )
    split = int(len(tokens) * (1 - val_fraction))
    train, val = Contiguous(tokens[:split], seq_len), Contiguous(tokens[split:], seq_len)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(f"{path} has {len(tokens)} {spec} tokens: too few for dataset.seq_len={seq_len}; "
                          "use a longer file or a shorter seq_len")
    facts = {"vocab_size": vocab_size or tok.vocab_size, "seq_len": seq_len}
    if isinstance(tok, VocabTokenizer):  # byte/char/word: vocab.json, what mptrain-sample decodes with
        return Datasets(train=train, val=val, task="language_modeling", facts=facts, vocab=tok.to_dict())
    return Datasets(train=train, val=val, task="language_modeling", facts={**facts, "tokenizer": tok})


def synthetic_tokens(vocab_size: int = TOK.vocab_size, seq_len: int = TOK.seq_len, train_tokens: int = TOK.train_tokens,
                     val_tokens: int = TOK.val_tokens, name: str = TOK.name) -> Datasets:
    """A learnable stream: each token is the previous one plus a step drawn from a skewed set, mod vocab."""
    g = torch.Generator().manual_seed(3)

    def stream(n: int) -> torch.Tensor:
        steps = torch.tensor([1, 1, 1, 2, 3, 5])[torch.randint(0, 6, (n,), generator=g)]
        return torch.cumsum(steps, 0) % vocab_size

    return Datasets(train=Contiguous(stream(train_tokens), seq_len), val=Contiguous(stream(val_tokens), seq_len),
                    task="language_modeling", facts={"vocab_size": vocab_size, "seq_len": seq_len})
