"""Language models: recurrent (LSTM, GRU; the paper's bigLSTM in miniature) and a GPT-style decoder.

Both map token ids (B, T) to next-token logits (B, T, vocab). Softmax and layer norm run in float32
where float16 could overflow: the loss is computed on float32 logits, attention uses
scaled_dot_product_attention (which keeps its softmax in float32 internally), and LayerNorm is
autocast to float32.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.config import GPTConfig as GPTC
from mptrain.config import RecurrentLMConfig as LM
from mptrain.errors import ConfigError


class RecurrentLM(nn.Module):
    """Embedding -> LSTM or GRU (num_layers) -> dropout -> linear head (optionally tied to the embedding)."""

    task = "language_modeling"

    def __init__(self, vocab_size: int, cell: str = LM.cell, embed_dim: int = LM.embed_dim,
                 hidden_dim: int = LM.hidden_dim, num_layers: int = LM.num_layers, dropout: float = LM.dropout,
                 tie_weights: bool = LM.tie_weights):
        super().__init__()
        if tie_weights and embed_dim != hidden_dim:
            raise ConfigError(
                f"model.tie_weights=true needs model.embed_dim == model.hidden_dim ({embed_dim} != {hidden_dim})"
            )
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                       dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)
        if tie_weights:
            self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embedding(tokens))
        # oneDNN's CPU LSTM/GRU has no float16 kernel: under fp16 autocast on a CPU use PyTorch's own
        fp16_on_cpu = (tokens.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                       and torch.get_autocast_dtype("cpu") == torch.float16)
        if fp16_on_cpu:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a note about Intel GPUs' TF32 that does not apply
                with torch.backends.mkldnn.flags(enabled=False):
                    out, _ = self.rnn(x)
        else:
            out, _ = self.rnn(x)
        return self.head(self.drop(out))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm blocks, tied output head."""

    task = "language_modeling"

    def __init__(self, vocab_size: int, seq_len: int = 64, dim: int = GPTC.dim, layers: int = GPTC.layers,
                 heads: int = GPTC.heads, dropout: float = GPTC.dropout):
        super().__init__()
        self.seq_len = seq_len
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(seq_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, heads, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.tokens.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than model.seq_len={self.seq_len}")
        pos = torch.arange(t, device=tokens.device)
        x = self.drop(self.tokens(tokens) + self.positions(pos))
        return self.head(self.ln_f(self.blocks(x)))
