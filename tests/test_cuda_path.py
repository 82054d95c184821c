"""The CUDA path checked on CPU (issue 26): what a GPU would trip over, tested where a CPU can show it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from mptrain.library.models.language import GPT
from mptrain.precision import cast_model

from .conftest import read_jsonl, train

GPT_TINY = ["model=gpt", "model.dim=32", "model.layers=2", "model.heads=2", "dataset=synthetic_tokens",
            "dataset.seq_len=16", "dataset.vocab_size=64", "dataset.train_tokens=4096", "dataset.val_tokens=512",
            "trainer.batch_size=8", "scheduler=none", "optimizer=adamw", "optimizer.lr=3e-3", "diagnostics=off",
            "checkpoint.enabled=false"]


# ---- 3. norm layers compute in float32 -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_sees_matching_dtypes_and_returns_the_models(monkeypatch, dtype):
    """The CUDA LayerNorm kernel refuses an fp16 input with fp32 weights; every call must get matching dtypes."""
    seen = []
    real = torch.nn.functional.layer_norm

    def checked(x, shape, weight=None, bias=None, eps=1e-5):
        seen.append((x.dtype, weight.dtype))
        return real(x, shape, weight, bias, eps)

    model = cast_model(GPT(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2, dropout=0.0), dtype)
    monkeypatch.setattr(torch.nn.functional, "layer_norm", checked)
    tokens = torch.randint(0, 64, (2, 16))
    logits = model(tokens)
    assert len(seen) == 5 and all(x == w == torch.float32 for x, w in seen)  # 2 per block and the final one
    assert logits.dtype == dtype and model.ln_f.weight.dtype == torch.float32
    # the output is what float32 statistics give, rounded once to the model's dtype
    x = torch.randn(4, 32).to(dtype)
    ref = real(x.float(), (32,), model.ln_f.weight, model.ln_f.bias).to(dtype)
    assert torch.equal(model.ln_f(x), ref)
    # the override is the module's own: state_dict keys unchanged, a deep copy keeps it bound to the copy
    assert "ln_f.weight" in model.state_dict()
    twin = copy.deepcopy(model)
    assert twin.ln_f.forward.__self__ is twin.ln_f and twin(tokens).dtype == dtype


def test_group_norm_in_a_bf16_model_computes_in_fp32():
    model = cast_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)), torch.bfloat16)
    x = torch.randn(2, 3, 8, 8).bfloat16()
    h = model[0](x)
    ref = torch.nn.functional.group_norm(h.float(), 2, model[1].weight, model[1].bias).bfloat16()
    assert torch.equal(model(x), ref)


@pytest.mark.parametrize("mode", ["master", "nomaster", "bf16_pure"])
def test_gpt_trains_with_fp32_norms(tmp_path, mode):
    # eps 1e-4: AdamW's 1e-8 is zero in an fp16 optimizer state (nomaster keeps it in fp16)
    summary, _ = train(tmp_path, [*GPT_TINY, f"precision={mode}", "trainer.max_steps=12", "optimizer.eps=1e-4"])
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert summary["val/loss"] < 4.15 * 0.97  # below chance (ln 64 = 4.16) after a few steps
