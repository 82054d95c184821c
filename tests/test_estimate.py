"""mptrain-estimate: per-preset memory from one measured step, matching the tensors' own sizes, writing nothing."""

from __future__ import annotations

import os

import pytest

from mptrain.tools.estimate import MB, main, measure

MLP = ["model=mlp", "model.width=64", "model.depth=2", "trainer.batch_size=64", "optimizer=adamw", "trainer.device=cpu"]


def test_components_equal_the_tensor_sizes_by_hand():
    fp32 = measure([*MLP, "precision=fp32"])
    n = fp32["params"]
    assert fp32["weights"] == pytest.approx(4 * n / MB, rel=1e-3) and fp32["grads"] == pytest.approx(4 * n / MB, rel=1e-3)
    assert fp32["optimizer_state"] == pytest.approx(8 * n / MB, rel=1e-3) and fp32["master"] == 0
    # batch 64 x flattened 8x8 digits: at least the input and each hidden layer's activations are kept
    assert fp32["activations"] > (64 * 64 * 4 * 3) / MB
    pure = measure([*MLP, "precision=bf16_pure"])
    assert pure["weights"] == pytest.approx(fp32["weights"] / 2, rel=1e-3)
    assert pure["optimizer_state"] == pytest.approx(fp32["optimizer_state"] / 2, rel=1e-3)
    assert pure["activations"] < 0.75 * fp32["activations"]  # bf16 activations (the float input stays)


def test_cli_prints_a_row_per_preset_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--presets", "fp32,master", *MLP]) == 0
    out = capsys.readouterr().out
    assert "| `fp32` |" in out and "| `master` |" in out
    assert os.listdir(tmp_path) == []


def test_bad_override_is_one_line(capsys):
    assert main(["--presets", "fp32", *MLP, "optimizer.lr=-1"]) == 2
    assert capsys.readouterr().err.startswith("mptrain-estimate: error: optimizer.lr=-1.0 is invalid")
