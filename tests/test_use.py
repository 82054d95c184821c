"""Using a trained run: mptrain-eval, mptrain-sample, mptrain-export (issue 27)."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from mptrain.errors import ConfigError
from mptrain.tools.eval import evaluate
from mptrain.tools.export import export
from mptrain.tools.sample import sample_text
from mptrain.tools.trained import run_config

from .conftest import TINY, compose_config, read_jsonl


def trained_run(root, overrides):
    """Train in this process and keep the run's .hydra/config.yaml, as the CLI does."""
    from mptrain.train.recipe import run

    cfg = compose_config(TINY + overrides)
    run_dir = root / "run"
    summary = run(cfg, run_dir)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir, summary


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """2 epochs of the default CNN on digits (11 steps each): last.pt, step_11.pt, step_22.pt, best.pt."""
    return trained_run(tmp_path_factory.mktemp("digits"), ["trainer.max_epochs=2", "trainer.batch_size=128",
                                                           "diagnostics=off"])


TEXT = "\n".join(f"the {a} sat on the {b}." for a in ("cat", "dog", "bird", "fox") for b in ("mat", "log", "hill")) * 20


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    (root / "notes.txt").write_text(TEXT)
    run_dir, _ = trained_run(root, ["model=gpt", "model.dim=16", "model.layers=1", "model.heads=2", "dataset=text",
                                    f"dataset.path={root / 'notes.txt'}", "dataset.seq_len=16",
                                    "trainer.max_steps=20", "diagnostics=off"])
    return run_dir, root / "notes.txt"


# ---- eval ------------------------------------------------------------------------------------------

def test_eval_reproduces_the_runs_own_validation_exactly(digits_run):
    run_dir, summary = digits_run
    record, out = evaluate(run_dir, "last")
    assert out == run_dir / "eval_last.json" and json.loads(out.read_text()) == record
    assert record["step"] == summary["steps"] == 22
    assert record["val/acc"] == summary["val/acc"] and record["val/loss"] == summary["val/loss"]  # bitwise
    # best.pt: the validation row of the best val/acc (the first of equals: later ones do not improve)
    vals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/acc" in r]
    best = max(vals, key=lambda r: (r["val/acc"], -r["step"]))
    record, _ = evaluate(run_dir)  # default: best.pt
    assert record["checkpoint"] == "checkpoints/best.pt" and record["step"] == best["step"]
    assert record["val/acc"] == best["val/acc"] and record["val/loss"] == best["val/loss"]


def test_eval_in_another_precision_writes_its_own_file(digits_run):
    run_dir, summary = digits_run
    record, out = evaluate(run_dir, "last", ["precision=fp32"])
    assert out.name == "eval_last-precision_fp32.json"
    assert record["precision"] == "fp32" and record["compute_dtype"] == "fp32" and record["trained_precision"] == "amp"
    assert record["val/loss"] != summary["val/loss"]  # the bf16-trained weights, evaluated in fp32: other rounding
    assert abs(record["val/loss"] - summary["val/loss"]) < 0.05


def test_eval_refuses_bad_input_in_one_line_and_writes_nothing(digits_run):
    run_dir, _ = digits_run
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(ConfigError, match=r"trainer.max_step is not a key .*did you mean trainer.max_steps\?"):
        evaluate(run_dir, overrides=["trainer.max_step=3"])
    with pytest.raises(
        ConfigError, match=r"nope.pt does not exist; this run has best.pt, last.pt, step_11.pt, step_22.pt"
    ):
        evaluate(run_dir, "nope")
    with pytest.raises(ConfigError, match="not an mptrain run directory"):
        evaluate(run_dir / "checkpoints")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_a_model_override_that_does_not_fit_the_checkpoint_says_what_to_drop(digits_run, tmp_path):
    # issue 37 (21): eval/export users were told to "resume with the checkpoint's model settings"
    from mptrain.errors import CheckpointError

    run_dir, _ = digits_run
    before = sorted(p.name for p in run_dir.iterdir())
    fix = (" in the model. Drop the overrides that change the model (model.*, or the dataset's classes "
           "or vocabulary): the run's own model settings (.hydra/config.yaml) are what it was written with")
    for use in (lambda: evaluate(run_dir, "last", ["model.width=16"]),
                lambda: export(run_dir, checkpoint="last", overrides=["model.width=16"], out_dir=tmp_path / "export")):
        with pytest.raises(CheckpointError, match=r"^checkpoint .*last.pt was written for another model: .*") as info:
            use()
        assert str(info.value).endswith(fix) and "resume" not in str(info.value).lower()
    assert sorted(p.name for p in run_dir.iterdir()) == before and not (tmp_path / "export").exists()


def test_eval_and_export_say_the_plan_once_and_nothing_of_training(digits_run, tmp_path, caplog):
    # issue 37 case 22: eval printed "22 steps (11 per epoch)" and the schedule's warm-up warning; export its plan twice
    import logging
    import re

    run_dir, _ = digits_run
    for use in (lambda: evaluate(run_dir, "last", name="quiet"),
                lambda: export(run_dir, checkpoint="last", out_dir=tmp_path / "export")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mptrain"):
            use()
        lines = [r.getMessage() for r in caplog.records]
        assert sum(m.startswith("precision plan") for m in lines) == 1, lines
        assert not [m for m in lines if "per epoch" in m or "warmup" in m or "steps" in m], lines
        assert [m for m in lines if re.fullmatch(r"model SmallCNN, task classification: [0-9.]+M parameters on cpu", m)]


def test_best_pt_is_a_hard_link_of_the_step_it_equals(digits_run):
    """No second write of the same checkpoint: best.pt shares its file with the step file of its step."""
    run_dir, _ = digits_run
    ckpt = run_dir / "checkpoints"
    step = torch.load(ckpt / "best.pt", weights_only=True)["train_state"]["step"]
    assert os.path.samefile(ckpt / "best.pt", ckpt / f"step_{step}.pt")
    assert os.stat(ckpt / "best.pt").st_nlink == (3 if step == 22 else 2)  # step_22.pt, last.pt and best.pt


# ---- export ----------------------------------------------------------------------------------------

def checkpoint_model(run_dir, x):
    """The checkpoint's model built by hand (plain PyTorch: the class and its arguments, torch.load)."""
    from mptrain.library.models.vision import SmallCNN

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    model = SmallCNN(num_classes=10, in_channels=1, width=cfg.model.width, dropout=cfg.model.dropout)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"])
    with torch.no_grad():
        return model.eval()(x)


def val_inputs():
    from mptrain.library.data.loading import digits

    return torch.stack([digits().val[i][0] for i in range(8)])


def test_export_safetensors_loads_without_mptrain_and_matches_bitwise(digits_run):
    from safetensors.torch import load_file

    run_dir, _ = digits_run
    r = export(run_dir, "safetensors")
    out = run_dir / "export"
    config = yaml.safe_load((out / "model_config.yaml").read_text())
    assert config["task"] == "classification" and config["input"]["shape"] == [8, 1, 8, 8]
    module, name = config["model"]["_target_"].rsplit(".", 1)
    model = getattr(importlib.import_module(module), name)(
        **{k: v for k, v in config["model"].items() if k != "_target_"}
    )
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    x = val_inputs()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), checkpoint_model(run_dir, x))
    assert r["check"]["weights_max_abs_diff"] == 0.0


@pytest.mark.parametrize("fmt", [pytest.param("pt2", marks=pytest.mark.slow), "torchscript"])
def test_export_program_matches_the_checkpoint_model(digits_run, fmt):
    run_dir, _ = digits_run
    export(run_dir, fmt)
    x = val_inputs()
    path = run_dir / "export" / ("model.pt2" if fmt == "pt2" else "model.ts")
    program = torch.export.load(str(path)).module() if fmt == "pt2" else torch.jit.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(program(x), checkpoint_model(run_dir, x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_export_onnx_runs_in_onnxruntime(digits_run):
    ort = pytest.importorskip("onnxruntime")  # the export extra (in dev)
    run_dir, _ = digits_run
    export(run_dir, "onnx")
    session = ort.InferenceSession(str(run_dir / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = val_inputs()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), checkpoint_model(run_dir, x), rtol=1e-4, atol=1e-5)


# ---- sample ----------------------------------------------------------------------------------------

def test_text_run_saves_its_vocabulary(lm_run):
    run_dir, _ = lm_run
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert vocab == {"level": "char", "tokens": sorted(set(TEXT))}


def test_sampling_is_reproducible_under_a_seed(lm_run):
    from mptrain.tools.sample import generate, load_model, read_tokenizer

    run_dir, _ = lm_run
    vocab = read_tokenizer(run_dir)
    model, _, precision = load_model(run_dir, [], None, {"vocab_size": vocab.vocab_size})
    prompt = [int(i) for i in vocab.encode("the ")]
    a = generate(model, prompt, 30, seed=3, precision=precision)
    assert len(a) == 30 and all(0 <= i < vocab.vocab_size for i in a)
    assert generate(model, prompt, 30, seed=3, precision=precision) == a
    assert generate(model, prompt, 30, seed=4, precision=precision) != a
    # greedy two ways: the single most likely token (top-k 1) is what temperature 0 picks
    assert generate(model, prompt, 12, top_k=1, seed=9) == generate(model, prompt, 12, temperature=0)


def test_sample_decodes_with_the_saved_vocab_not_the_training_file(lm_run, tmp_path):
    run_dir, text_file = lm_run
    a = sample_text(run_dir, "the ", tokens=30, seed=3)
    assert len(a) == 30 and set(a) <= set(TEXT)
    # without the training file, with every token renamed (upper case), the same ids come out under the new names
    text_file.rename(tmp_path / "moved.txt")
    vocab_path = run_dir / "vocab.json"
    saved = vocab_path.read_text()
    try:
        vocab = json.loads(saved)
        vocab_path.write_text(json.dumps({**vocab, "tokens": [t.upper() for t in vocab["tokens"]]}))
        assert sample_text(run_dir, "THE ", tokens=30, seed=3) == a.upper()
        with pytest.raises(ConfigError, match="characters the training text never had"):
            sample_text(run_dir, "the ", tokens=3)
    finally:
        vocab_path.write_text(saved)
        (tmp_path / "moved.txt").rename(text_file)


def test_sample_refuses_a_run_without_vocabulary(digits_run):
    with pytest.raises(ConfigError, match="has no vocab.json or tokenizer.json: only language-model runs"):
        sample_text(digits_run[0], "x", tokens=1)


def test_gan_sample_grid_is_readable(tmp_path):
    """8x8 digits, 64 of them: each enlarged to 64 px, 8 a row with 2 px padding -> 8 * 66 + 2 = 530 px."""
    from PIL import Image

    from mptrain.library.models.gan import DCGAN, sample_grid

    torch.manual_seed(0)
    model = DCGAN(channels=1, image_size=8).eval()
    path = sample_grid(model, tmp_path / "grid.png", seed=5)
    assert Image.open(path).size == (530, 530)
    again = sample_grid(model, tmp_path / "again.png", seed=5)
    assert path.read_bytes() == again.read_bytes()


def test_run_config_applies_group_and_key_overrides(digits_run):
    cfg = run_config(digits_run[0], ["precision=bf16", "trainer.batch_size=32", "+extra.key=1"])
    assert cfg.precision.mode == "bf16" and cfg.precision.loss_scale.init == 65536.0  # the group entry, in full
    assert cfg.trainer.batch_size == 32 and cfg.extra.key == 1
    assert cfg.model.num_classes == 10  # interpolations still resolve


def test_a_master_weights_run_is_used_through_its_fp32_masters(tmp_path):
    """precision=master keeps fp16 weights in the model and their fp32 masters in the precision state: a
    rebuilt fp32 model takes the masters (in MasterWeights' order: the fp16 parameters), not the fp16 copies."""
    from mptrain.library.models.vision import MLP
    from mptrain.tools.trained import weights

    run_dir, _ = trained_run(tmp_path, ["model=mlp", "model.width=16", "model.depth=2", "precision=master",
                                        "optimizer.lr=0.01", "trainer.max_steps=3", "diagnostics=off"])
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    masters = ckpt["precision"]["master"]["masters"]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    model = MLP(**{k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"})
    state = weights(ckpt, model)
    fp16_names = [n for n, _ in model.named_parameters() if ckpt["model"][n].dtype == torch.float16]
    assert len(fp16_names) == len(masters) > 0
    for name, master in zip(fp16_names, masters):
        assert state[name].dtype == torch.float32 and torch.equal(state[name], master)
        assert torch.equal(master.half(), ckpt["model"][name])  # the fp16 weights are the masters rounded
    assert any(not torch.equal(m, m.half().float()) for m in masters)  # and the masters hold more than fp16 does
    model.load_state_dict(state)


# ---- sample: every tokenizer a run can train with ---------------------------------------------------

GPT = ["model=gpt", "model.dim=16", "model.layers=1", "model.heads=2", "trainer.max_steps=10", "diagnostics=off"]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A tiny GPT on TEXT with a byte-level BPE the run trains (dataset.tokenizer=bpe:300)."""
    pytest.importorskip("tokenizers")  # the hf extra (in dev)
    root = tmp_path_factory.mktemp("bpe")
    (root / "notes.txt").write_text(TEXT)
    run_dir, _ = trained_run(root, [*GPT, "dataset=text", f"dataset.path={root / 'notes.txt'}",
                                    "dataset.tokenizer=bpe:300", "dataset.seq_len=16"])
    return run_dir


@pytest.fixture(scope="module")
def tokens_run(tmp_path_factory):
    """A tiny GPT on a token directory written by mptrain-prepare-text (bpe:300): its DIR holds tokenizer.json."""
    pytest.importorskip("tokenizers")
    from mptrain.tools.prepare import prepare

    root = tmp_path_factory.mktemp("tokens")
    (root / "notes.txt").write_text(TEXT)
    prepare(root / "notes.txt", "bpe:300", root / "data")
    run_dir, _ = trained_run(root, [*GPT, "dataset=tokens", f"dataset.path={root / 'data'}", "dataset.seq_len=16"])
    return run_dir, root / "data"


def independent(tokenizer_json, prompt, run_dir, tokens=24, seed=3, **kw):
    """The ids the run's model generates from a prompt encoded by `tokenizers` itself, and their decode by it."""
    from tokenizers import Tokenizer

    from mptrain.tools.sample import generate, load_model

    tk = Tokenizer.from_file(str(tokenizer_json))
    model, _, precision = load_model(run_dir, [], None, {"vocab_size": tk.get_vocab_size()})
    ids = generate(model, tk.encode(prompt, add_special_tokens=False).ids, tokens, seed=seed, precision=precision, **kw)
    return ids, tk.decode(ids)


def test_sample_decodes_a_bpe_run_as_tokenizers_itself_does(bpe_run):
    from mptrain.tools.sample import continuation

    tokenizer_json = bpe_run / "tokenizer.json"
    assert tokenizer_json.is_file() and not (bpe_run / "vocab.json").exists()
    ids, tok = continuation(bpe_run, "the dog ", tokens=24, seed=3)
    want_ids, want_text = independent(tokenizer_json, "the dog ", bpe_run)
    assert ids == want_ids and len(ids) == 24
    text = sample_text(bpe_run, "the dog ", tokens=24, seed=3)
    assert text == want_text == tok.decode(ids)
    assert any(len(tok.decode([i])) > 1 for i in ids)  # merged tokens, not bytes: the BPE is what decoded them
    assert sample_text(bpe_run, "the dog ", tokens=24, seed=3) == text  # reproducible under --seed
    assert sample_text(bpe_run, "the dog ", tokens=24, seed=4) != text


@pytest.mark.slow
def test_sample_decodes_a_token_file_run_with_its_directorys_tokenizer(tokens_run):
    run_dir, data = tokens_run
    # the run copied DIR's tokenizer when it started: the same file, so sampling needs no data
    assert (run_dir / "tokenizer.json").read_text() == (data / "tokenizer.json").read_text()
    _, want = independent(data / "tokenizer.json", "the cat ", run_dir)
    assert sample_text(run_dir, "the cat ", tokens=24, seed=3) == want
    assert sample_text(run_dir, "the cat ", tokens=24, seed=3) == want


@pytest.mark.slow
def test_a_token_file_run_without_a_tokenizer_says_what_to_do(tokens_run, tmp_path):
    import shutil

    run_dir, data = tokens_run
    copy = run_dir / "tokenizer.json"
    kept = tmp_path / "kept.json"
    shutil.move(copy, kept)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        shutil.copy(data / name, bare / name)
    try:
        # no copy in the run directory: the tokenizer of its dataset.path decodes
        _, want = independent(data / "tokenizer.json", "the cat ", run_dir)
        assert sample_text(run_dir, "the cat ", tokens=24, seed=3) == want
        before = sorted(p.name for p in run_dir.iterdir())
        with pytest.raises(ConfigError, match=r"has no vocab.json or tokenizer.json, nor has its dataset.path=.*bare: "
                                              r"the token files were written without a tokenizer; put the one that "
                                              r"made them in .*tokenizer.json"):
            sample_text(run_dir, "the cat ", tokens=3, overrides=[f"dataset.path={bare}"])
        assert sorted(p.name for p in run_dir.iterdir()) == before
    finally:
        shutil.move(kept, copy)


def test_sample_prints_the_text_not_the_set_up(lm_run, caplog):
    # issue 37 case 22: a 30-line precision plan came before the text
    import logging

    run_dir, _ = lm_run
    with caplog.at_level(logging.INFO, logger="mptrain"):
        text = sample_text(run_dir, "the ", tokens=5, seed=0)
    assert len(text) == 5 and not [r.getMessage() for r in caplog.records if r.levelno < logging.WARNING]


def test_an_empty_prompt_starts_from_the_tokenizers_newline(lm_run, bpe_run, capsys):
    """char: the id of "\\n" (TEXT has newlines); bpe: tokenizers' own ids for "\\n"; the CLI needs no --prompt."""
    from mptrain.tools.sample import generate, load_model, main

    run_dir, _ = lm_run
    tokens = json.loads((run_dir / "vocab.json").read_text())["tokens"]
    model, _, precision = load_model(run_dir, [], None, {"vocab_size": len(tokens)})
    ids = generate(model, [tokens.index("\n")], 20, seed=5, precision=precision)
    assert sample_text(run_dir, "", tokens=20, seed=5) == "".join(tokens[i] for i in ids)
    main([str(run_dir), "--tokens", "20", "--seed", "5"])
    assert capsys.readouterr().out == "".join(tokens[i] for i in ids) + "\n"
    _, want = independent(bpe_run / "tokenizer.json", "\n", bpe_run, tokens=10, seed=5)
    assert sample_text(bpe_run, tokens=10, seed=5) == want


def test_start_token_without_a_newline_is_token_0():
    from mptrain.library.data.tokenize import VocabTokenizer
    from mptrain.tools.sample import start_ids

    assert start_ids(VocabTokenizer.fit("char", ["ab\nc"], 10)) == [sorted("ab\nc").index("\n")]
    assert start_ids(VocabTokenizer.fit("char", ["abc"], 10)) == [0]  # no newline in its text
    assert start_ids(VocabTokenizer.fit("word", ["a b\nb"], 10)) == [0]  # words drop whitespace: <unk>
    assert start_ids(VocabTokenizer.fit("byte", [""], 10)) == [10]


def test_sampling_draws_only_ids_the_tokenizer_decodes():
    """A model with more outputs than the tokenizer has tokens (a padded vocabulary) never yields an id the
    tokenizer lacks: at temperature 0 the argmax over the tokenizer's ids, not over every output."""
    from mptrain.tools.sample import generate

    torch.manual_seed(0)

    class Padded(torch.nn.Module):  # logits favour the padding ids 10..15
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16))

        def forward(self, ids):
            logits = self.w.expand(*ids.shape, 16).clone()
            logits[..., 10:] += 100.0
            return logits

    model = Padded()
    assert min(generate(model, [1], 5, temperature=0)) >= 10  # unrestricted: a padding id wins
    want = int(model.w[:10].argmax())
    assert generate(model, [1], 5, temperature=0, vocab=10) == [want] * 5
    assert max(generate(model, [1], 50, seed=1, vocab=10)) < 10
    with pytest.raises(ConfigError, match="tokenizer has 20 tokens but the model predicts 16"):
        generate(model, [1], 1, vocab=20)


# ---- --ema: the checkpoint's averaged weights ------------------------------------------------------

@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """precision=master with trainer.ema: fp16 weights, fp32 masters, an fp32 average of the masters."""
    return trained_run(tmp_path_factory.mktemp("ema"), [
        "model=mlp", "model.width=16", "model.depth=2", "precision=master", "optimizer.lr=0.01", "scheduler=none",
        "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ema.enabled=true", "trainer.ema.decay=0.8",
        "checkpoint.every_steps=3", "diagnostics=off"])


def test_eval_ema_reproduces_the_runs_own_val_ema_exactly(ema_run):
    run_dir, summary = ema_run
    live, _ = evaluate(run_dir, "last")
    record, out = evaluate(run_dir, "last", ema=True)
    assert out.name == "eval_last-ema.json" and json.loads(out.read_text()) == record
    assert record["ema"] is True and live["ema"] is False
    assert live["val/loss"] == summary["val/loss"] and live["val/acc"] == summary["val/acc"]  # bitwise
    assert record["val/loss"] == summary["val_ema/loss"] and record["val/acc"] == summary["val_ema/acc"]  # bitwise
    assert record["val/loss"] != live["val/loss"]  # the average is another model
    # the first validation (step 3) from its own checkpoint: that row's val_ema
    row = next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("step") == 3 and "val_ema/loss" in r)
    record, _ = evaluate(run_dir, "step_3", ema=True)
    assert record["val/loss"] == row["val_ema/loss"] and record["val/acc"] == row["val_ema/acc"]


def test_export_ema_writes_the_shadow_in_the_models_dtype(ema_run):
    from safetensors.torch import load_file

    run_dir, _ = ema_run
    out = run_dir / "export_ema"
    r = export(run_dir, "safetensors", "last", out_dir=out, ema=True)
    shadow = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["ema"]["shadow"]
    saved = load_file(out / "model.safetensors")
    assert r["ema"] is True and r["dtype"] == "float32"
    assert yaml.safe_load((out / "model_config.yaml").read_text())["ema"] is True
    assert saved.keys() == shadow.keys()
    for k, v in saved.items():
        assert v.dtype == torch.float32 and torch.equal(v, shadow[k].to(torch.float32)), k
    # in the run's own precision (fp16 weights) the shadow is cast as EMA.swap casts it: rounded to fp16
    r16 = export(run_dir, "safetensors", "last", ["precision=master"], out_dir=run_dir / "export_ema16", ema=True)
    saved = load_file(run_dir / "export_ema16" / "model.safetensors")
    assert r16["dtype"] == "float16"
    for k, v in saved.items():
        assert torch.equal(v, shadow[k].to(torch.float16)), k
    live = load_file(
        export(run_dir, "safetensors", "last", out_dir=run_dir / "export_live")["out_dir"] + "/model.safetensors"
    )
    assert any(not torch.equal(live[k], saved[k].float()) for k in live)


def test_ema_of_a_run_without_an_average_is_refused_before_anything_is_written(digits_run, lm_run):
    run_dir, _ = digits_run
    before = sorted(p.name for p in run_dir.iterdir())
    for tool in (lambda: evaluate(run_dir, "last", ema=True), lambda: export(run_dir, "safetensors", ema=True,
                                                                            out_dir=run_dir / "export_refused")):
        with pytest.raises(ConfigError, match=r"(last|best).pt holds no EMA weights: the run trained without "
                                              r"trainer.ema.enabled=true; drop --ema"):
            tool()
    assert sorted(p.name for p in run_dir.iterdir()) == before
    with pytest.raises(ConfigError, match="holds no EMA weights"):
        sample_text(lm_run[0], "the ", tokens=2, ema=True)


def test_sample_ema_uses_the_average(ema_run):
    """--ema on a run's sampling path: the model load_model builds holds the shadow (cast to its fp16 weights)."""
    from mptrain.tools.sample import load_model

    run_dir, _ = ema_run
    shadow = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["ema"]["shadow"]
    model, _, _ = load_model(run_dir, [], None, {}, ema=True)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float16 and torch.equal(v, shadow[k].to(torch.float16)), k


# ---- what eval's record names -----------------------------------------------------------------------

def test_eval_records_the_plan_it_ran_under(digits_run):
    run_dir, _ = digits_run
    plan = {m: e["format"] for m, e in json.loads((run_dir / "precision_plan.json").read_text()).items()}
    record, _ = evaluate(run_dir, "last")
    assert record["plan"] == plan and record["precision"] == "amp" and record["ema"] is False
    assert sum(record["plan_modules"].values()) == len(plan)
    record, _ = evaluate(run_dir, "last", ["precision=fp32"])
    assert set(record["plan"]) == set(plan) and set(record["plan"].values()) == {"fp32"}
    assert record["plan_modules"] == {"fp32": len(plan)}


def test_eval_of_an_auto_run_runs_under_the_plan_the_checkpoint_measured(tmp_path):
    """precision=auto plans at step 3 (mid2 fp8, mid1 bf16: tests/test_auto.py): eval rebuilds that plan from the
    checkpoint, not the unmeasured start, records it, and so reproduces the run's validation bitwise."""
    from .test_auto import AUTO

    run_dir, summary = trained_run(tmp_path, [*AUTO, "trainer.max_steps=5"])
    plan = {m: e["format"] for m, e in json.loads((run_dir / "precision_plan.json").read_text()).items()
            if m != "history"}
    assert plan["mid2"] == "fp8" and plan["mid1"] == "bf16"
    record, _ = evaluate(run_dir, "last")
    assert record["plan"] == plan and record["precision"] == "auto"
    assert record["val/loss"] == summary["val/loss"]


def test_a_fresh_start_sets_an_earlier_tokenizer_aside(tmp_path):
    """A bpe run's tokenizer.json must not outlive it: a char run started fresh in the same directory would
    otherwise be decoded with the stale BPE (load_saved prefers tokenizer.json)."""
    from mptrain.run.directory import set_aside

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "vocab.json").write_text("{}")
    dest = set_aside(tmp_path)
    assert (dest / "tokenizer.json").is_file() and not (tmp_path / "tokenizer.json").exists()


@pytest.mark.slow
def test_sample_from_a_hugging_face_llama_on_token_files(tokens_run, tmp_path):
    """model=hf_causal_lm returns a ModelOutput and has max_position_embeddings (32) for a context: 40 greedy
    tokens equal a hand-written greedy loop over the model's own logits, decoded by tokenizers."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    from mptrain.tools.sample import continuation, load_model

    from .test_hub_models import LLAMA

    _, data = tokens_run
    llama = [o for o in LLAMA if not o.startswith("dataset.")]
    llama = [o.replace("dataset=synthetic_tokens", "dataset=tokens") for o in llama]
    run_dir, _ = trained_run(tmp_path, [*llama, f"dataset.path={data}", "dataset.seq_len=16", "trainer.max_steps=6",
                                        "precision=fp32", "diagnostics=off"])
    tk = Tokenizer.from_file(str(data / "tokenizer.json"))
    ids, tok = continuation(run_dir, "the fox ", tokens=40, temperature=0)
    model, _, _ = load_model(run_dir, [], None, {"vocab_size": tk.get_vocab_size()})
    seq = tk.encode("the fox ", add_special_tokens=False).ids
    with torch.no_grad():
        for _ in range(40):
            logits = model(torch.tensor([seq[-32:]])).logits[0, -1, : tk.get_vocab_size()]
            seq.append(int(logits.argmax()))
    want = seq[len(seq) - 40:]
    assert ids == want
    assert sample_text(run_dir, "the fox ", tokens=40, temperature=0) == tk.decode(want)


def test_eval_of_a_run_that_switched_to_bf16_computes_in_bf16(tmp_path):
    """loss_scale.on_min=bf16: every fp16 step overflows, the run switches to bf16 and validates in it
    (tests/test_hostile.py's case). Eval in the run's preset continues from the switch, as a resume does."""
    from .test_hostile import PAIR_RUN

    run_dir, summary = trained_run(tmp_path, [
        *PAIR_RUN, "precision=dynamic", "precision.dtype=float16", "precision.loss_scale.init=65536",
        "precision.loss_scale.min=65536", "precision.loss_scale.on_min=bf16", "trainer.loss_weight=1e6",
        "trainer.max_steps=6"])
    assert summary["compute_dtype"] == "bf16"
    record, _ = evaluate(run_dir, "last")
    assert record["compute_dtype"] == "bf16" and record["precision"] == "dynamic"
    assert record["val/loss"] == summary["val/loss"] and record["val/acc"] == summary["val/acc"]
    record, _ = evaluate(run_dir, "last", ["precision=fp32"])  # another preset: no switch carried over
    assert record["compute_dtype"] == "fp32"
