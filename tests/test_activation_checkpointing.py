"""trainer.activation_checkpointing: the same gradients as without it (dropout included), fewer saved
activations, and the same training run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mptrain.errors import ConfigError
from mptrain.library.models import checkpointing
from mptrain.library.models.language import GPT

from .conftest import train


def saved_bytes(model, tokens) -> tuple[int, dict]:
    """Bytes autograd keeps for backward outside checkpointed regions (each storage once, weights excluded),
    and the gradients."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(7)  # the same dropout masks for every model
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
        logits = logits.logits if hasattr(logits, "logits") else logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params), {n: p.grad for n, p in model.named_parameters()}


def models():
    torch.manual_seed(0)
    yield "gpt", GPT(vocab_size=50, seq_len=32, dim=32, layers=3, heads=2, dropout=0.1)
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from mptrain.library.models.hf import hf_causal_lm

    yield "llama", hf_causal_lm({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 3, "num_attention_heads": 2, "attention_dropout": 0.1},
                                vocab_size=50)


@pytest.mark.parametrize("mode", ["blocks", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_same_gradients_fewer_saved_activations(mode, dtype):
    tokens = torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(1))
    for name, plain in models():
        wrapped = copy.deepcopy(plain)
        assert checkpointing.apply(wrapped, mode) == (1 if mode == "all" else 3)
        plain.train(), wrapped.train()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            kept, grads = saved_bytes(plain, tokens)
            kept_ckpt, grads_ckpt = saved_bytes(wrapped, tokens)
        assert grads.keys() == grads_ckpt.keys()
        for k in grads:
            torch.testing.assert_close(grads_ckpt[k], grads[k], rtol=1e-5, atol=1e-7, msg=f"{name} {k}")
        assert kept_ckpt < (0.6 if mode == "blocks" else 0.1) * kept, (name, kept_ckpt, kept)
        assert list(dict(plain.state_dict())) == list(dict(wrapped.state_dict()))  # names unchanged


def test_a_run_with_checkpointed_blocks_trains_like_one_without(tmp_path):
    from .test_checkpoint import final_state

    base = ["model=gpt", "model.dim=32", "model.layers=2", "model.heads=2", "dataset=synthetic_tokens",
            "dataset.seq_len=16", "dataset.train_tokens=4000", "dataset.val_tokens=400", "trainer.batch_size=8",
            "optimizer=adamw", "trainer.max_steps=4", "precision=fp32", "scheduler=none", "diagnostics.every=2"]
    _, plain = train(tmp_path / "plain", base)
    summary, ckpt = train(tmp_path / "ckpt", [*base, "trainer.activation_checkpointing=blocks"])
    assert summary["status"] == "completed"
    a, b = final_state(plain)["model"], final_state(ckpt)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_blocks_on_a_model_without_repeated_blocks_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.activation_checkpointing=blocks: SmallCNN has no repeated blocks"):
        train(tmp_path, ["model=cnn", "trainer.activation_checkpointing=blocks"])
    assert not (tmp_path / "run").exists()
