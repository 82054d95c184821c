"""mptrain-estimate: per-preset memory from one measured step, matching the tensors' own sizes, writing nothing."""

from __future__ import annotations

import os

import pytest

from mptrain.errors import MptrainError
from mptrain.tools.estimate import MB, main, measure

from .conftest import train

MLP = ["model=mlp", "model.width=64", "model.depth=2", "trainer.batch_size=64", "optimizer=adamw", "trainer.device=cpu"]


def test_components_equal_the_tensor_sizes_by_hand():
    fp32 = measure([*MLP, "precision=fp32"])
    n = fp32["params"]
    assert fp32["weights"] == pytest.approx(4 * n / MB, rel=1e-3) and fp32["grads"] == pytest.approx(
        4 * n / MB, rel=1e-3
    )
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


WIDE = [
    "model=mlp",
    "model.width=256",
    "model.depth=2",
    "trainer.batch_size=16",
    "optimizer=adamw",
    "trainer.device=cpu",
]  # rows large enough that the printed MB differ by preset
RULE = "precision.layers={head: fp32}"  # master and bf16_pure hold their weights in one dtype: they refuse rules


def table_rows(out: str) -> list[str]:
    """The table's rows without their last column, the step time (measured: it varies run to run)."""
    return [line.rsplit("|", 2)[0] for line in out.splitlines() if line.startswith("| `")]


@pytest.mark.slow
def test_a_refused_preset_gets_its_reason_and_the_others_their_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--presets", "fp32,master,bf16,bf16_pure", *WIDE, RULE]) == 0
    out = capsys.readouterr().out
    assert main(["--presets", "fp32,bf16", *WIDE, RULE]) == 0  # the same estimate without the refusing presets
    alone = capsys.readouterr().out
    assert table_rows(out) == table_rows(alone) and len(table_rows(out)) == 2
    for preset in ("master", "bf16_pure"):  # the reason training gives, word for word
        with pytest.raises(MptrainError) as refused:
            train(tmp_path, [*WIDE, RULE, f"precision={preset}"])
        assert f"`{preset}` refused: {refused.value}" in out.splitlines()
        assert not (tmp_path / "run").exists()
    assert os.listdir(tmp_path) == []


def test_every_preset_refused_is_one_line_and_non_zero(capsys):
    assert main(["--presets", "master,bf16_pure", *MLP, RULE]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("mptrain-estimate: error: every preset refused this run: precision=master: "
                                   "precision.layers with precision=master")
    assert "precision=bf16_pure: precision.layers with precision=bf16_pure" in captured.err


def test_an_unparsable_override_is_one_line(capsys):
    assert main(["--presets", "fp32", *MLP, "precision=nope"]) == 0  # --presets chooses the preset
    capsys.readouterr()
    assert main(["--presets", "fp32", *MLP, "model=nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mptrain-estimate: error: ") and "nope" in err and len(err.strip().splitlines()) == 1


def test_options_may_come_between_overrides(tmp_path, capsys, monkeypatch):
    """`mptrain-estimate model=gpt --presets fp32 trainer.ema.enabled=true`: the same table as options first."""
    monkeypatch.chdir(tmp_path)
    assert main([MLP[0], "--presets", "fp32", *MLP[1:], "trainer.ema.enabled=true"]) == 0
    mixed = capsys.readouterr()
    assert main(["--presets", "fp32", *MLP, "trainer.ema.enabled=true"]) == 0
    first = capsys.readouterr()
    memory = lambda out: [line.rsplit("|", 2)[0] for line in out.splitlines()]  # noqa: E731  (the time varies)
    assert mixed.err == "" and memory(mixed.out) == memory(first.out) and "| `fp32` |" in mixed.out
    assert "| `master` |" not in mixed.out  # --presets was read, not taken as an override


@pytest.mark.parametrize("tool", ["eval", "export", "sample"])
def test_the_run_tools_take_options_among_overrides(tool, tmp_path, capsys):
    """`mptrain-eval RUN precision=bf16 --ema` reaches the run-directory check, not argparse's refusal."""
    import importlib

    main_of = importlib.import_module(f"mptrain.tools.{tool}").main
    with pytest.raises(SystemExit) as exit_:
        main_of([str(tmp_path / "nope"), "precision=fp32", "--ema", "trainer.device=cpu"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"mptrain-{tool}: error: {tmp_path / 'nope'} is not a "
        "directory; pass a run directory, e.g. outputs/<date>/<time>-<id>"
    )


def test_ema_counts_its_fp32_copy():
    """trainer.ema keeps an fp32 copy of every floating state_dict entry: 4 bytes a parameter for an MLP (no
    buffers), under bf16_pure (2-byte weights) too, and the total includes it."""
    for mode in ("fp32", "bf16_pure"):
        off = measure([*MLP, f"precision={mode}"])
        on = measure([*MLP, f"precision={mode}", "trainer.ema.enabled=true"])
        assert "ema" not in off
        assert on["ema"] == pytest.approx(4 * on["params"] / MB, rel=1e-9)
        assert on["total"] - on["ema"] == pytest.approx(off["total"], rel=1e-6)


def test_json_gives_step_time_memory_and_each_layers_format_time_and_shape(capsys):
    """issue 34: one object per run; Linear shapes are (M = the rows of its input, K, N), the step time is measured."""
    import json

    assert main(["--json", "--steps", "1", "--presets", "fp32,bf16", *MLP]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] is None and set(out["presets"]) == {"fp32", "bf16"}
    for preset, row in out["presets"].items():
        assert row["step_time_s"] > 0 and row["memory_mb"] > 0
        linears = {n: layer for n, layer in row["layers"].items() if "shape" in layer}
        assert linears and all(layer["time_s"] > 0 for layer in linears.values())
        first = next(iter(linears.values()))
        assert first["shape"] == {"M": 64, "K": 64, "N": first["shape"]["N"]}  # batch 64 of flattened 8x8 digits
        assert {layer["format"] for layer in linears.values()} == {preset}


def test_activations_are_one_micro_batchs_whatever_the_accumulation():
    """trainer.accumulate_grad_batches=k added up the activations of all k micro-batches (166.7 MB against 62.2;
    issue 37 case 9): the peak holds one micro-batch's."""
    one = measure([*MLP, "precision=fp32", "trainer.batch_size=32"], steps=1)
    four = measure([*MLP, "precision=fp32", "trainer.batch_size=32", "trainer.accumulate_grad_batches=4"], steps=1)
    assert four["activations"] == pytest.approx(one["activations"], rel=1e-6)
    bigger = measure([*MLP, "precision=fp32", "trainer.batch_size=128"], steps=1)
    assert bigger["activations"] > 3 * one["activations"]  # and the count does grow with the micro-batch


def test_more_timed_steps_than_an_epoch_has_batches():
    """The README's GPT on LICENSE.txt has fewer batches an epoch than estimate's steps: StopIteration escaped.
    Digits at batch 1000 give one or two batches an epoch; 1 measured and 4 timed steps go on into the next."""
    row = measure([*MLP, "precision=fp32", "trainer.batch_size=1000"], steps=4)
    assert row["step_time_s"] > 0 and row["params"] > 0
