"""Token data (issue 28): memory-mapped nanoGPT token files, tokenizers (byte/char/word/BPE/JSON), and
mptrain-prepare-text. Windows are checked against numpy reading the file itself; tokenizers round-trip."""

from __future__ import annotations

import json
import pickle
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mptrain.errors import ConfigError
from mptrain.library.data.tokenize import build_tokenizer, load_saved
from mptrain.library.data.tokens import TokenWindows, tokens
from mptrain.tools.prepare import prepare

from .conftest import train

TEXT = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"  # a real ~14 KB English text, always present
GPT = ["model=gpt", "model.dim=32", "model.layers=1", "model.heads=2", "trainer.batch_size=8", "optimizer=adamw",
       "scheduler=none", "checkpoint.enabled=false", "diagnostics=off"]


def write_bin(path: Path, n: int, dtype, high: int, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, high, n).astype(dtype)
    data.tofile(path)
    return data


@pytest.mark.parametrize(("dtype", "high"), [("uint16", 65535), ("uint32", 2**20)])
def test_contiguous_windows_equal_numpy_slices_of_the_file(tmp_path, dtype, high):
    write_bin(tmp_path / "train.bin", 1000, dtype, high)
    ref = np.fromfile(tmp_path / "train.bin", dtype=dtype).astype(np.int64)  # numpy's own read of the bytes
    ds = TokenWindows(tmp_path / "train.bin", dtype, seq_len=7, windows="contiguous")
    assert len(ds) == (1000 - 1) // 7
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.int64
        np.testing.assert_array_equal(x.numpy(), ref[7 * i : 7 * i + 7])
        np.testing.assert_array_equal(y.numpy(), ref[7 * i + 1 : 7 * i + 8])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_random_windows_are_nanogpt_offsets_fixed_by_the_seed(tmp_path):
    ref = write_bin(tmp_path / "train.bin", 5000, np.uint16, 50000).astype(np.int64)
    ds = TokenWindows(tmp_path / "train.bin", "uint16", seq_len=16, windows="random", samples=300, seed=5)
    assert len(ds) == 300
    starts = []
    for i in range(len(ds)):
        s = int(np.random.default_rng((5, i)).integers(0, 5000 - 16))  # the documented rule, any process
        x, y = ds[i]
        np.testing.assert_array_equal(x.numpy(), ref[s : s + 16])
        np.testing.assert_array_equal(y.numpy(), ref[s + 1 : s + 17])
        starts.append(s)
    assert min(starts) < 500 and max(starts) > 4400  # spread over the file, last window ends inside it
    other = TokenWindows(tmp_path / "train.bin", "uint16", seq_len=16, windows="random", samples=300, seed=6)
    assert not torch.equal(other[0][0], ds[0][0])


def test_the_file_is_read_per_window_never_copied(tmp_path):
    write_bin(tmp_path / "train.bin", 200_000, np.uint16, 1000)
    ds = TokenWindows(tmp_path / "train.bin", "uint16", seq_len=32)
    assert len(pickle.dumps(ds)) < 2000  # what a loader worker receives: the path, not the tokens
    ds[3]
    clone = pickle.loads(pickle.dumps(ds))  # a worker reopens the file itself
    assert len(pickle.dumps(ds)) < 2000 and torch.equal(clone[5][0], ds[5][0])


def test_val_windows_spread_over_the_file(tmp_path):
    write_bin(tmp_path / "train.bin", 1000, np.uint16, 100)
    val = write_bin(tmp_path / "val.bin", 1001, np.uint16, 100, seed=1).astype(np.int64)
    d = tokens(str(tmp_path), seq_len=10, vocab_size=100, val_windows=20)
    assert len(d.val) == 20 and d.facts["vocab_size"] == 100
    starts = [5 * 10 * i for i in range(20)]  # 100 windows, every 5th
    for i, s in enumerate(starts):
        np.testing.assert_array_equal(d.val[i][0].numpy(), val[s : s + 10])


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, r"has no train.bin"),
    (lambda d: write_bin(d / "train.bin", 100, np.uint16, 10), r"^dataset.vocab_size is unknown"),
    (lambda d: (d / "train.bin").write_bytes(b"abc"), r"3 bytes, not a whole number of uint16 tokens"),
])
def test_bad_token_directories_fail_in_one_line(tmp_path, setup, message):
    setup(tmp_path)
    vocab = [] if "unknown" in message else ["dataset.vocab_size=10"]
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, ["dataset=tokens", f"dataset.path={tmp_path}", *vocab, *GPT])
    assert not (tmp_path / "run").exists()


def prepared_dir(d: Path, dtype: str = "uint16", vocab: int = 50) -> None:
    write_bin(d / "train.bin", 3000, dtype, vocab)
    (d / "meta.json").write_text(json.dumps({"vocab_size": vocab, "dtype": dtype}))


@pytest.mark.parametrize(
    ("setup", "overrides", "message"),
    [
        # what meta.json says, contradicted: uint32 ids read as uint16 (halves, zeros), or an embedding too small
        (
            lambda d: prepared_dir(d, "uint32"),
            ["dataset.dtype=uint16"],
            r"^dataset.dtype=uint16 contradicts .*meta.json \(dtype uint32, as the files were written\); leave",
        ),
        (
            lambda d: prepared_dir(d, vocab=50),
            ["dataset.vocab_size=20"],
            r"^dataset.vocab_size=20 is smaller than the 50 token ids of .*meta.json",
        ),
        # no meta.json: an id the vocabulary cannot hold, wherever it is in the file (here: the last token)
        (
            lambda d: (
                np.append(write_bin(d / "train.bin", 3000, np.uint16, 10), 10).astype(np.uint16).tofile(d / "train.bin")
            ),
            ["dataset.vocab_size=10"],
            r"train.bin holds token id 10 \(in \d+ uint16 ids sampled\), beyond dataset.vocab_size=10",
        ),
        (
            lambda d: (prepared_dir(d, vocab=50), write_bin(d / "val.bin", 3000, np.uint16, 60)),
            [],
            r"val.bin holds token id 5\d .*beyond dataset.vocab_size=50",
        ),
    ],
)
def test_token_files_contradicting_the_vocabulary_fail_in_one_line(tmp_path, setup, overrides, message):
    setup(tmp_path)
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, ["dataset=tokens", f"dataset.path={tmp_path}", "dataset.seq_len=16", *overrides, *GPT])
    assert not (tmp_path / "run").exists()


def test_assumed_uint16_is_warned_and_a_larger_vocab_pads(tmp_path, caplog):
    write_bin(tmp_path / "train.bin", 1000, np.uint16, 10)
    with caplog.at_level("WARNING", logger="mptrain"):
        d = tokens(str(tmp_path), seq_len=8, vocab_size=10)
    assert [r.getMessage() for r in caplog.records if "reading its token files as uint16" in r.getMessage()]
    caplog.clear()
    prepared_dir(tmp_path, vocab=50)
    with caplog.at_level("WARNING", logger="mptrain"):
        d = tokens(str(tmp_path), seq_len=8, vocab_size=64, dtype="uint16")  # agrees with meta.json; pads
    assert d.facts["vocab_size"] == 64 and not caplog.records


@pytest.mark.parametrize("spec", ["byte", "char", "bpe:400"])
def test_prepared_files_decode_back_to_the_text(tmp_path, spec):
    meta = prepare(TEXT, spec, tmp_path / "data", val_fraction=0.2)
    text = TEXT.read_text(encoding="utf-8")
    tok = load_saved(tmp_path / "data")
    ids = np.concatenate([np.fromfile(tmp_path / "data" / f"{n}.bin", dtype=meta["dtype"]) for n in ("train", "val")])
    assert tok.decode(ids) == text  # nothing lost or reordered at the train/val cut
    assert meta["train_tokens"] + meta["val_tokens"] == len(ids)
    assert 0.1 < meta["val_tokens"] / len(ids) < 0.3
    if spec == "bpe:400":
        assert tok.vocab_size == 400 and len(ids) < 0.6 * len(text.encode())  # merges compress the text


def test_bpe_round_trips_any_text_and_the_dataset_saves_it(tmp_path):
    text = TEXT.read_text(encoding="utf-8")
    tok = build_tokenizer("bpe:300", [text])
    for sample in (text, "naïve café — 日本語\r\n\ttabs  and  spaces\n", ""):
        assert tok.decode(tok.encode(sample)) == sample  # bytes outside the training text too
    summary, run_dir = train(tmp_path, ["dataset=text", f"dataset.path={TEXT}", "dataset.tokenizer=bpe:300",
                                        "dataset.seq_len=16", "trainer.max_steps=3", *GPT])
    assert summary["status"] == "completed"
    saved = load_saved(run_dir)  # the run directory holds what decodes its model's ids
    np.testing.assert_array_equal(saved.encode(text), tok.encode(text))


def test_word_and_char_vocabularies_are_saved_in_the_run(tmp_path):
    _, run_dir = train(tmp_path, ["dataset=text", f"dataset.path={TEXT}", "dataset.tokenizer=word",
                                  "dataset.max_vocab=200", "dataset.seq_len=16", "trainer.max_steps=2", *GPT])
    saved = json.loads((run_dir / "vocab.json").read_text())
    assert saved["level"] == "word" and len(saved["tokens"]) == 200 and saved["tokens"][0] == "<unk>"


@pytest.mark.slow
def test_prepare_text_cli_then_train_on_the_token_files(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "shakespeare"
    p = subprocess.run([sys.executable, "-m", "mptrain.tools.prepare", str(TEXT), "--tokenizer", "char", "--out",
                        str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (out / "train.bin").is_file() and (out / "val.bin").is_file() and (out / "vocab.json").is_file()
    meta = json.loads((out / "meta.json").read_text())
    summary, run_dir = train(tmp_path, ["dataset=tokens", f"dataset.path={out}", "dataset.seq_len=16",
                                        "dataset.samples=64", "dataset.val_windows=8", "trainer.max_epochs=1", *GPT])
    assert summary["status"] == "completed" and summary["steps"] == 64 // 8
    assert json.loads((run_dir / "vocab.json").read_text()) == json.loads((out / "vocab.json").read_text())
    assert summary["val/loss"] < np.log(meta["vocab_size"]) + 0.5


@pytest.mark.slow
def test_bad_tokenizer_spec_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^dataset.tokenizer='bpe' is invalid: choose byte, char, word, bpe:"):
        train(tmp_path, ["dataset=text", f"dataset.path={TEXT}", "dataset.tokenizer=bpe", *GPT])
    assert not (tmp_path / "run").exists()


def test_prepare_text_refuses_bad_input_in_one_line_and_leaves_dir_as_it_was(tmp_path, capsys):
    from mptrain.tools.prepare import main

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello\nworld\n\xff\xfe tail\n")  # the 13th byte is not UTF-8
    assert main([str(bad), "--out", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"mptrain-prepare-text: error: {bad} is not UTF-8 text "
                                                    "(invalid start byte at byte 12)"]
    assert not (tmp_path / "new").exists()

    old = tmp_path / "old"
    assert main([str(TEXT), "--tokenizer", "char", "--out", str(old)]) == 0
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    for args in (
        [str(bad), "--out", str(old)],
        [str(TEXT), "--tokenizer", "word", "--max-vocab", "0", "--out", str(old)],
    ):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("mptrain-prepare-text: error: "), err
        assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # no staging folder left either
    assert "--max-vocab=0 is invalid: must be >= 2" in err[0]


@pytest.mark.parametrize(("text", "message"), [
    ("", "holds no text (empty or only whitespace); give a text file"),  # it succeeded with vocabulary 0
    (" \n\t\n", "holds no text (empty or only whitespace)"),
    ("one line only\n", "gives 14 training and 0 validation tokens at --val-fraction=0.1: both parts need tokens"),
], ids=["empty", "whitespace", "one line"])
def test_prepare_text_refuses_a_text_that_gives_no_tokens(tmp_path, capsys, text, message):
    # issue 37 (21): one line, nothing written, an earlier preparation in DIR left as it was
    from mptrain.tools.prepare import main

    src = tmp_path / "in.txt"
    src.write_text(text)
    old = tmp_path / "old"
    assert main([str(TEXT), "--tokenizer", "char", "--out", str(old)]) == 0
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    for out, spec in ((tmp_path / "new", "byte"), (old, "char")):
        capsys.readouterr()
        assert main([str(src), "--tokenizer", spec, "--out", str(out)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"mptrain-prepare-text: error: {src} {message}"), line
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_prepare_text_into_a_dir_of_another_tokenizer_keeps_only_the_new_one(tmp_path):
    out = tmp_path / "data"
    prepare(TEXT, "bpe:300", out, val_fraction=0.2)
    assert (out / "tokenizer.json").is_file()
    prepare(TEXT, "char", out, val_fraction=0.2)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin", "vocab.json"]
    text = TEXT.read_text(encoding="utf-8")
    ids = np.concatenate([np.fromfile(out / f, dtype=np.uint16) for f in ("train.bin", "val.bin")])
    assert load_saved(out).decode(ids.tolist()) == text  # the data decodes with what the loader picks
    prepare(TEXT, "bpe:300", out, val_fraction=0.2)  # and back
    assert not (out / "vocab.json").exists()
    ids = np.concatenate([np.fromfile(out / f, dtype=np.uint16) for f in ("train.bin", "val.bin")])
    assert load_saved(out).decode(ids.tolist()) == text


@pytest.mark.parametrize(
    "data", [b"abc\xc3\xa9d\n\xff", b"abc\xc3", b"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xed\xa0\x80x"]
)
def test_first_bad_byte_is_the_file_offset_across_chunks(tmp_path, monkeypatch, data):
    from mptrain.tools import prepare as prep

    monkeypatch.setattr(prep, "CHUNK_BYTES", 4)  # multi-byte characters cut between reads
    (tmp_path / "f").write_bytes(data)
    with pytest.raises(UnicodeDecodeError) as whole:
        data.decode("utf-8")  # Python's own decode of the whole file
    assert prep.first_bad_byte(tmp_path / "f") == (whole.value.reason, whole.value.start)


def nanogpt_prepare(text: str, out: Path) -> dict:
    """nanoGPT's data/shakespeare_char/prepare.py, its code path line for line (the download left out)."""
    data = text
    chars = sorted(list(set(data)))
    vocab_size = len(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}

    def encode(s):
        return [stoi[c] for c in s]

    n = len(data)
    train_data = data[:int(n * 0.9)]
    val_data = data[int(n * 0.9):]
    out.mkdir()
    np.array(encode(train_data), dtype=np.uint16).tofile(out / "train.bin")
    np.array(encode(val_data), dtype=np.uint16).tofile(out / "val.bin")
    meta = {"vocab_size": vocab_size, "itos": itos, "stoi": stoi}
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return meta


def test_nanogpt_meta_pkl_gives_the_vocabulary_and_decodes_samples(tmp_path):
    from mptrain.tools.sample import continuation, sample_text

    from .test_use import trained_run

    out = tmp_path / "shakespeare_char"
    meta = nanogpt_prepare(TEXT.read_text(), out)
    run_dir, summary = trained_run(tmp_path, ["dataset=tokens", f"dataset.path={out}", "dataset.seq_len=16",
                                        "dataset.samples=64", "dataset.val_windows=8", "trainer.max_epochs=1",
                                        *GPT, "checkpoint.enabled=true", "checkpoint.keep_last=0"])
    assert summary["status"] == "completed"
    # the run's vocabulary is nanoGPT's itos, in id order; the model has exactly vocab_size outputs
    assert json.loads((run_dir / "vocab.json").read_text()) == {
        "level": "char", "tokens": [meta["itos"][i] for i in range(meta["vocab_size"])]}
    ids, _ = continuation(run_dir, "The ", tokens=20, seed=0)
    assert len(ids) == 20 and max(ids) < meta["vocab_size"]
    # decoded as nanoGPT's sample.py does: decode = lambda l: ''.join([itos[i] for i in l])
    assert sample_text(run_dir, "The ", tokens=20, seed=0) == "".join(meta["itos"][i] for i in ids)


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(("meta", "why"), [
    (Payload(), "it names builtins.print"),  # the way a pickle runs code
    ({"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "extra": Path("/tmp")}, r"it names pathlib\."),
    ({"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "x": 1.5}, "it holds other types than those"),
    ({"vocab_size": 3, "itos": {0: "a", 1: "b", 2: b"c"}}, "it holds other types than those"),
    ({"vocab_size": 3, "itos": {0: "a", 1: "b"}}, r"its itos does not map the ids 0\.\.2 to strings"),
    ({"itos": {0: "a"}}, "it has no vocab_size"),
])
def test_a_meta_pkl_holding_anything_but_plain_data_is_refused_in_one_line(tmp_path, meta, why, capsys):
    nanogpt_prepare("abcabc" * 100, tmp_path / "d")
    (tmp_path / "d" / "meta.pkl").write_bytes(pickle.dumps(meta))
    with pytest.raises(ConfigError) as e:
        tokens(str(tmp_path / "d"), seq_len=8)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'd' / 'meta.pkl'} is not a nanoGPT meta.pkl")
    assert re.search(why, message), message
    assert "pwned" not in capsys.readouterr().out  # nothing in it ran
