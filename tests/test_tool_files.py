"""What eval, sample, export and prepare-text write (issue 37, part A): only their own files, inside the
directory they were given; bad names, paths and damaged run configs get one line and change nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from .test_use import trained_run


def tree(folder: Path) -> dict:
    """Every file's digest and every directory, by relative path: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """Two steps of a narrow CNN on digits: checkpoints/last.pt and .hydra/config.yaml, as the CLI leaves them."""
    run_dir, _ = trained_run(tmp_path_factory.mktemp("cnn"), ["model.width=4", "trainer.max_steps=2",
                                                               "trainer.batch_size=32", "diagnostics=off"])
    return run_dir


def refused(main, argv: list[str], capsys) -> str:
    """Run a tool's main; it must exit 2 with one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1, err
    return err[0]


# ---- case 2: mptrain-eval --name ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../summary", "../summary", "x/../../metrics", "sub/name", "/tmp/abs", "",
                                  "x" * 300])
def test_eval_name_that_is_a_path_is_refused_and_nothing_changes(cnn_run, tmp_path, capsys, name):
    from mptrain.tools.eval import main

    outside = cnn_run.parent
    before, around = tree(cnn_run), tree(outside)
    line = refused(main, [str(cnn_run), "--name", name], capsys)
    assert line.startswith(f"mptrain-eval: error: --name {name!r} is not a plain file name")
    assert tree(outside) == around and tree(cnn_run) == before


def test_eval_name_writes_its_file_in_the_run_directory(cnn_run):
    from mptrain.tools.eval import evaluate

    _, out = evaluate(cnn_run, name="my run.v2")
    assert out == cnn_run / "eval_my run.v2.json" and out.is_file()
    out.unlink()


def test_a_long_default_eval_name_is_shortened_and_kept_distinct():
    from mptrain.tools.eval import default_name

    overrides = [f"dataset.some_long_key_{i}=value_{i}" for i in range(30)]
    a, b = default_name(Path("best.pt"), overrides), default_name(Path("best.pt"), overrides[:-1] + ["x=1"])
    assert len(a) <= 200 and len(b) <= 200 and a != b and a.startswith("best-dataset.some_long_key_0")
