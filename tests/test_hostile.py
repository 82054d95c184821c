"""Issue 25, the second hostile round: nothing untrue after a resume, a precision change or a bad input.

Each case is its reproduction with the expected one line, exit code and records (docs/checkpoints.md,
"What can go wrong", names the test of each row). The CLI runs in this process (`cli`), as `mptrain` would
from a scratch directory: starting Python and torch per case would cost seconds each.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from .conftest import read_jsonl

TINY = ["trainer.device=cpu", "trainer.progress_bar=false", "trainer.tensorboard=false"]
MLP = ["model=mlp", "model.width=16", "model.depth=2", "diagnostics=off", *TINY]
GPT_MODEL = ["model=gpt", "model.dim=16", "model.layers=1", "model.heads=2", "trainer.batch_size=8",
             "diagnostics=off", *TINY]
GPT = [*GPT_MODEL, "dataset=synthetic_tokens", "dataset.train_tokens=2000", "dataset.val_tokens=400",
       "dataset.seq_len=16"]


def cli(args: list[str], cwd: Path) -> tuple[int, str]:
    """`mptrain ARGS` run from `cwd` in this process: (exit code, stderr)."""
    import os

    from mptrain.cli.main import main

    err, here, argv = io.StringIO(), os.getcwd(), sys.argv
    sigint = signal.getsignal(signal.SIGINT)  # main() leaves its exit-at-once handler behind
    sys.argv = ["mptrain", *args]
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
        sys.argv = argv
        signal.signal(signal.SIGINT, sigint)
        GlobalHydra.instance().clear()
    return code, err.getvalue()


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def error_line(stderr: str) -> str:
    """The one `mptrain: error:` line; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("mptrain: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


# ---- 16-17. inputs that ended in tracebacks or trained on nothing ---------------------------------------------

def _texts(tmp_path: Path) -> dict[str, Path]:
    files = {"empty": "", "blank": "  \n\t \n", "words": " ".join(f"w{i % 7}" for i in range(3000))}
    out = {}
    for name, text in files.items():
        out[name] = tmp_path / f"{name}.txt"
        out[name].write_text(text)
    return out


BAD_INPUTS = {  # case: (overrides, what the one line must say)
    "gpt vocab smaller than the data's": ([*GPT, "model.vocab_size=8"],
                                          "model.vocab_size=8 is smaller than the data's 64 token ids"),
    "gpt window shorter than the data's": ([*GPT, "model.seq_len=8"],
                                           "model.seq_len=8 is smaller than the data's 16 tokens per sample"),
    "no training tokens": ([*GPT, "dataset.train_tokens=0"], "dataset.train_tokens=0 is invalid: must exceed"),
    "vocab 0": ([*GPT, "dataset.vocab_size=0"], "dataset.vocab_size=0 is invalid"),
    "seq_len 0": ([*GPT, "dataset.seq_len=0", "model.seq_len=4"], "dataset.seq_len=0 is invalid"),
    "seed 10**20": ([*MLP, f"seed={10**20}"], f"seed={10**20} is invalid: must be an integer in [0, 2**32)"),
    "dcgan latent 0": (["model=dcgan", "model.latent_dim=0", *TINY], "model.latent_dim=0 is invalid: must be >= 1"),
    "cnn on 1x1 images": (["model=cnn", "dataset=synthetic", "dataset.image_size=1", *TINY],
                          "model=cnn needs dataset.image_size >= 2"),
    "mlp on 0x0 images": ([*MLP, "dataset=synthetic", "dataset.image_size=0"], "dataset.image_size=0 is invalid"),
    "empty text file": ([*GPT_MODEL, "dataset=text", "dataset.path={empty}"], "holds no text (empty or only whitespace)"),
    "whitespace text file": ([*GPT_MODEL, "dataset=text", "dataset.path={blank}"], "holds no text"),
    "word level, max_vocab 0": ([*GPT_MODEL, "dataset=text", "dataset.path={words}", "dataset.level=word",
                                 "dataset.max_vocab=0"], "dataset.max_vocab=0 is invalid: must be >= 2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_one_line_and_change_nothing(tmp_path, case):
    overrides, message = BAD_INPUTS[case]
    texts = _texts(tmp_path)
    overrides = [o.format(**{k: str(v) for k, v in texts.items()}) for o in overrides]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("the user's own file\n")
    before = digest(run_dir)
    code, err = cli([f"hydra.run.dir={run_dir}", "trainer.max_steps=2", *overrides], tmp_path)
    assert code == 2, err
    assert message in error_line(err)
    assert digest(run_dir) == before  # refused before the directory changed: no .hydra, no train.log
