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


# ---- case 3: mptrain-prepare-text --out ----------------------------------------------------------------

TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n" * 40


def test_prepare_text_refuses_a_run_directory_and_leaves_it_as_it_was(cnn_run, tmp_path, capsys):
    from mptrain.tools.prepare import main

    (tmp_path / "notes.txt").write_text(TEXT)
    before = tree(cnn_run)
    assert main([str(tmp_path / "notes.txt"), "--tokenizer", "char", "--out", str(cnn_run)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mptrain-prepare-text: error: --out {cnn_run} is an mptrain run directory: its vocab.json/"
                   "tokenizer.json decodes the run's samples and would be replaced; give a directory of its own, "
                   "e.g. --out data/"]
    assert tree(cnn_run) == before


def test_prepare_text_refuses_a_tokenizer_it_did_not_write(tmp_path, capsys):
    from mptrain.tools.prepare import main, prepare

    (tmp_path / "notes.txt").write_text(TEXT)
    other = tmp_path / "other"
    prepare(tmp_path / "notes.txt", "bpe:300", other, val_fraction=0.2)
    (other / "meta.json").unlink()  # a tokenizer.json from elsewhere: no meta.json beside it
    before = tree(other)
    assert main([str(tmp_path / "notes.txt"), "--tokenizer", "char", "--out", str(other)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds a tokenizer that mptrain-prepare-text did not write (no meta.json)" in err[0]
    assert tree(other) == before
    # a directory of other files (the text itself) is fine: only the tool's own files are added
    assert main([str(tmp_path / "notes.txt"), "--tokenizer", "char", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "notes.txt").read_text() == TEXT and (tmp_path / "meta.json").is_file()


@pytest.mark.parametrize(("where", "message"), [
    ("file", "--out {out} is a file; give a directory for train.bin, val.bin and meta.json"),
    ("under a file", "--out {out}: cannot make the directory (Not a directory); give a writable directory"),
])
def test_prepare_text_out_that_cannot_be_a_directory_is_one_line(tmp_path, capsys, where, message):
    from mptrain.tools.prepare import main

    (tmp_path / "notes.txt").write_text(TEXT)
    (tmp_path / "taken").write_text("mine")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "data"
    assert main([str(tmp_path / "notes.txt"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"mptrain-prepare-text: error: {message.format(out=out)}"]
    assert (tmp_path / "taken").read_text() == "mine"


# ---- case 16: a damaged or incomplete .hydra/config.yaml ----------------------------------------------

def damage(text: str, kind: str) -> str:
    """The run's config.yaml, damaged as a disk, an editor or a half-finished copy would leave it."""
    import yaml

    if kind == "truncated":
        return text[: text.index("\n", len(text) // 2) + 1]  # whole lines: the later sections are lost
    if kind == "bad yaml":
        return "model: [\n  x: {"
    if kind == "empty":
        return ""
    if kind == "a number":
        return "3\n"
    if kind == "a list":
        return "- 1\n- 2\n"
    data = yaml.safe_load(text)
    if kind == "no trainer":
        del data["trainer"]
    elif kind == "wrong type":
        data["trainer"]["batch_size"] = "abc"
    elif kind == "no precision.mode":
        del data["precision"]["mode"]
    elif kind == "dangling interpolation":
        del data["seed"]  # trainer.seed is ${seed}
    return yaml.safe_dump(data)


DAMAGES = {
    "truncated": r"is incomplete: no \w+(, \w+)* sections?; the run's config is damaged or was edited",
    "bad yaml": r"is not readable YAML \(expected the node content, but found '<stream end>' at line 2, column 7\)",
    "empty": r"is incomplete: no model, dataset, precision, optimizer, scheduler, trainer, checkpoint, "
    r"diagnostics sections",
    "a number": r"is not a run's config \(Invalid loaded object type: int\)",
    "a list": r"is not a run's config \(a list, not a mapping\)",
    "no trainer": r"is incomplete: no trainer section",
    "wrong type": r": trainer.batch_size: Value 'abc' of type 'str' could not be converted to Integer; "
    r"the run's config",
    "no precision.mode": r"is incomplete: no precision.mode;",
    "dangling interpolation": r"cannot be resolved \(Interpolation key 'seed' not found\)",
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_run_config_is_one_line_for_every_tool(cnn_run, tmp_path, capsys, kind):
    import shutil

    from mptrain.tools.eval import main as eval_main
    from mptrain.tools.export import main as export_main
    from mptrain.tools.sample import main as sample_main

    run_dir = tmp_path / "run"
    shutil.copytree(cnn_run, run_dir)
    config = run_dir / ".hydra" / "config.yaml"
    config.write_text(damage(config.read_text(), kind))
    before = tree(run_dir)
    for main in (eval_main, sample_main, export_main):
        line = refused(main, [str(run_dir)], capsys)
        assert line.split(": error: ")[1].startswith(str(config)), line
        assert __import__("re").search(DAMAGES[kind], line), line
    assert tree(run_dir) == before


def test_a_config_key_an_older_mptrain_did_not_write_takes_the_default_with_a_warning(cnn_run, tmp_path, caplog):
    import shutil

    import yaml

    from mptrain.tools.eval import evaluate

    run_dir = tmp_path / "run"
    shutil.copytree(cnn_run, run_dir)
    config = run_dir / ".hydra" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    del data["trainer"]["ema"]
    config.write_text(yaml.safe_dump(data))
    record, _ = evaluate(run_dir, "last")
    assert "lacks trainer.ema: this mptrain's defaults are used" in caplog.text
    assert record["step"] == 2


def test_an_override_of_the_wrong_type_is_one_line(cnn_run, capsys):
    from mptrain.tools.eval import main

    before = tree(cnn_run)
    line = refused(main, [str(cnn_run), "trainer.batch_size=abc"], capsys)
    assert line == ("mptrain-eval: error: trainer.batch_size: Value 'abc' of type 'str' could not be converted to "
                    "Integer; fix the override")
    assert tree(cnn_run) == before


# ---- cases 17 and 20: mptrain-export's files ----------------------------------------------------------

@pytest.mark.parametrize("where", ["file", "under a file"])
def test_export_out_that_cannot_be_a_directory_is_one_line(cnn_run, tmp_path, capsys, where):
    from mptrain.tools.export import main

    (tmp_path / "taken").write_text("mine")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "export"
    before = tree(cnn_run)
    line = refused(main, [str(cnn_run), "--out", str(out)], capsys)
    want = (f"--out {out} is a file; give a directory" if where == "file"
            else f"--out {out}: {tmp_path / 'taken'} is a file; give a directory")
    assert line.startswith(f"mptrain-export: error: {want}")
    assert (tmp_path / "taken").read_text() == "mine" and tree(cnn_run) == before


def test_export_onnx_without_onnxruntime_writes_nothing(cnn_run, tmp_path, capsys, monkeypatch):
    import sys

    from mptrain.tools.export import main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the export extra were not installed
    out = tmp_path / "export"
    line = refused(main, [str(cnn_run), "--format", "onnx", "--out", str(out)], capsys)
    assert line == "mptrain-export: error: this export needs onnxruntime: pip install mptrain[export]"
    assert not out.exists()


def test_a_re_export_replaces_every_file_and_all_get_the_umask_mode(cnn_run, tmp_path):
    from mptrain.run.layout import umask_mode
    from mptrain.tools.export import export

    out = tmp_path / "export"
    export(cnn_run, "torchscript", "last", out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model.ts", "model_config.yaml"]
    (out / "notes.txt").write_text("the user's own file")
    export(cnn_run, "safetensors", "last", out_dir=out)
    # the program of the earlier export is gone: nothing beside the new weights describes another export
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_config.yaml", "notes.txt"]
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.name != "notes.txt"} == {
        "model.safetensors": umask_mode(), "model_config.yaml": umask_mode()}


def test_a_failed_export_leaves_the_earlier_export_as_it_was(cnn_run, tmp_path, capsys, monkeypatch):
    from mptrain.tools import export as exp

    out = tmp_path / "export"
    exp.export(cnn_run, "safetensors", "last", out_dir=out)
    before = tree(out)

    def broken(fmt, model, x, path):
        path.write_bytes(b"half a program")
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(exp, "write_program", broken)
    with pytest.raises(SystemExit) as stopped:
        exp.main([str(cnn_run), "--format", "torchscript", "--checkpoint", "last", "--out", str(out)])
    assert stopped.value.code == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("(RuntimeError: exporter failed); nothing was written; try another --format")
    )
    assert tree(out) == before  # no model.ts, no staging folder, the earlier files untouched
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit):
        exp.main([str(cnn_run), "--format", "torchscript", "--checkpoint", "last", "--out", str(fresh)])
    assert not fresh.exists()  # a directory this call made is removed again
