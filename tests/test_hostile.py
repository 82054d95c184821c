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
    import logging
    import os

    from mptrain.cli.main import main

    err, here, argv = io.StringIO(), os.getcwd(), sys.argv
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # Hydra configures logging per run: undone below
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
        for h in [h for h in root.handlers if h not in handlers]:  # e.g. the run's train.log handler
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
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
    "gpt vocab smaller than the data's": (
        [*GPT, "model.vocab_size=8"],
        "model.vocab_size=8 is smaller than the data's 64 token ids",
    ),
    "gpt window shorter than the data's": (
        [*GPT, "model.seq_len=8"],
        "model.seq_len=8 is smaller than the data's 16 tokens per sample",
    ),
    "no training tokens": ([*GPT, "dataset.train_tokens=0"], "dataset.train_tokens=0 is invalid: must exceed"),
    "vocab 0": ([*GPT, "dataset.vocab_size=0"], "dataset.vocab_size=0 is invalid"),
    "seq_len 0": ([*GPT, "dataset.seq_len=0", "model.seq_len=4"], "dataset.seq_len=0 is invalid"),
    "seed 10**20": ([*MLP, f"seed={10**20}"], f"seed={10**20} is invalid: must be an integer in [0, 2**32)"),
    "dcgan latent 0": (["model=dcgan", "model.latent_dim=0", *TINY], "model.latent_dim=0 is invalid: must be >= 1"),
    "cnn on 1x1 images": (
        ["model=cnn", "dataset=synthetic", "dataset.image_size=1", *TINY],
        "model=cnn needs dataset.image_size >= 2",
    ),
    "mlp on 0x0 images": ([*MLP, "dataset=synthetic", "dataset.image_size=0"], "dataset.image_size=0 is invalid"),
    "empty text file": (
        [*GPT_MODEL, "dataset=text", "dataset.path={empty}"],
        "holds no text (empty or only whitespace)",
    ),
    "whitespace text file": ([*GPT_MODEL, "dataset=text", "dataset.path={blank}"], "holds no text"),
    "word level, max_vocab 0": (
        [*GPT_MODEL, "dataset=text", "dataset.path={words}", "dataset.level=word", "dataset.max_vocab=0"],
        "dataset.max_vocab=0 is invalid: must be >= 2",
    ),
}


FAST_INPUTS = ("gpt vocab smaller than the data's", "seed 10**20", "empty text file", "word level, max_vocab 0")


@pytest.mark.parametrize("case", [c if c in FAST_INPUTS else pytest.param(c, marks=pytest.mark.slow)
                                  for c in BAD_INPUTS])
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


def test_a_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    from PIL import Image

    from mptrain.library.data.vision import imagefolder

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (6, 6), color=(40 * i, 80, 200 if cls == "a" else 10)).save(
                    tmp_path / split / cls / f"{i}.png")
    bad = tmp_path / "train" / "a" / "1.png"
    bad.write_bytes(b"not a png at all")
    data = imagefolder(str(tmp_path), image_size=4)
    index = [p for p, _ in data.train.samples].index(str(bad))
    import torch

    torch.manual_seed(0)
    got = data.train[index]
    torch.manual_seed(0)
    substitute = data.train[index + 1]  # the next readable image takes its place, the same on every read
    assert torch.equal(got[0], substitute[0]) and got[1] == substitute[1]
    assert [r.getMessage() for r in caplog.records if "skipping image" in r.getMessage()] == [
        f"skipping image {bad}: cannot be read (UnidentifiedImageError); the next image takes its place"]


# ---- 16 and 8. mptrain-report / mptrain-compare on damaged files, mixed tasks, Optuna twins -------------------

def fake_job(folder: Path, overrides: list[str], summary: dict | str | None, rows: list[dict] | str = ()) -> Path:
    """A run directory as the contract describes it, written by hand (the tools only read it)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (folder / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(text)
    return folder


def compare(args: list[str]) -> list[dict]:
    import csv

    from mptrain.tools.compare import main

    main(args)
    out = Path(args[args.index("--out") + 1])
    return list(csv.DictReader(open(out / "comparison.csv")))


def summary(precision: str, task: str, model: str, **metrics) -> dict:
    return {"status": "completed", "precision": precision, "task": task, "model": model, "dataset": "d",
            "steps": 10, "skipped_steps": 0, **metrics}


def test_compare_skips_a_damaged_line_and_a_truncated_summary_before_writing(tmp_path, caplog):
    sweep = tmp_path / "multi"
    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    fake_job(sweep / "0", ["precision=fp32"], summary("fp32", "classification", "mlp", **{"val/acc": 0.5}),
             json.dumps(good[0]) + "\n{\"step\": 2, \"lo\n" + json.dumps(good[1]) + "\n")
    fake_job(sweep / "1", ["precision=bf16"], json.dumps(summary("bf16", "classification", "mlp"))[:25], good)
    rows = {r["group"]: r for r in compare([str(sweep), "--out", str(tmp_path / "out")])}
    assert rows["precision=fp32"]["val/acc mean"] == "0.5"
    assert rows["precision=bf16"]["status"] == "unreadable (1)" and rows["precision=bf16"]["completed"] == "0/1"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{sweep / '0' / 'metrics.jsonl'} line 2 is not JSON" in w for w in warnings), warnings
    assert any(f"{sweep / '1' / 'summary.json'} is not readable JSON" in w for w in warnings), warnings


def test_compare_reads_everything_before_it_writes(tmp_path):
    sweep = tmp_path / "multi"
    fake_job(sweep / "0", ["precision=fp32"], summary("fp32", "classification", "mlp", **{"val/acc": 0.5}))
    (sweep / "1" / ".hydra").mkdir(parents=True)
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")  # YAML that cannot be read
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "comparison.md").write_text("the earlier comparison\n")
    with pytest.raises(Exception):  # noqa: B017 - any failure to read
        compare([str(sweep), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "comparison.md").read_text() == "the earlier comparison\n"


def test_compare_of_mixed_tasks_uses_each_tasks_metric_and_its_own_baseline(tmp_path):
    sweep = tmp_path / "multi"
    jobs = [("precision=fp32", "mlp", "classification", {"val/acc": 0.9, "samples_per_s": 1000.0}),
            ("precision=bf16", "mlp", "classification", {"val/acc": 0.8, "samples_per_s": 1500.0}),
            ("precision=bf16 model=gpt", "gpt", "language_modeling", {"val/ppl": 7.0, "val/loss": 1.9,
                                                                      "samples_per_s": 300.0}),
            ("precision=bf16 model=dcgan", "dcgan", "gan", {"val/loss": 1.2, "samples_per_s": 200.0})]
    for i, (ov, model, task, metrics) in enumerate(jobs):
        fake_job(sweep / str(i), ov.split(), summary(ov.split()[0].split("=")[1], task, model, **metrics))
    rows = {r["group"]: r for r in compare([str(sweep), "--out", str(tmp_path / "out")])}
    assert rows["precision=bf16 model=gpt"]["metric"] == "val/ppl"
    assert float(rows["precision=bf16 model=gpt"]["metric mean"]) == 7.0
    assert float(rows["precision=bf16 model=dcgan"]["metric mean"]) == 1.2
    assert float(rows["precision=bf16"]["samples/s vs fp32"]) == 1.5  # against its own task's fp32 run
    for other in ("precision=bf16 model=gpt", "precision=bf16 model=dcgan"):  # no fp32 run of that model
        assert rows[other]["samples/s vs fp32"] == "nan" and rows[other]["diff vs fp32"] == "nan"


@pytest.mark.slow
def test_optuna_trials_with_identical_parameters_are_one_row_each(tmp_path):
    optuna = pytest.importorskip("optuna")
    sweep = tmp_path / "multi"
    study = optuna.create_study(study_name="mptrain", storage=f"sqlite:///{sweep.resolve()}/optuna.db"
                                if sweep.mkdir() is None else None, direction="maximize")
    for number, acc in enumerate((0.7, 0.9)):
        trial = study.ask({"optimizer.lr": optuna.distributions.CategoricalDistribution([0.1])})
        study.tell(trial, acc)
        fake_job(sweep / str(number), ["optimizer.lr=0.1"],
                 summary("fp32", "classification", "mlp", **{"val/acc": acc}))
    rows = compare([str(sweep), "--out", str(tmp_path / "out")])
    assert [(r["trial"], float(r["val/acc mean"])) for r in rows] == [("1", 0.9), ("0", 0.7)]  # best first


def test_report_skips_a_damaged_middle_line(tmp_path, caplog):
    from mptrain.tools.report import load_run

    run = fake_job(tmp_path / "run", [], None, '{"step": 1, "loss": 1.0}\n{"step": 2,\n{"step": 3, "loss": 0.5}\n')
    (run / "diagnostics.jsonl").write_text('{"event": "meta"}\n[1, 2]\n{"event": "sample", "step": 1}\n')
    metrics, diag = load_run(run)
    assert [r["step"] for r in metrics] == [1, 3] and [r["event"] for r in diag] == ["meta", "sample"]
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 2


# ---- 7. two sweeps into one directory; an Optuna study whose every trial fails --------------------------------

@pytest.mark.slow
def test_a_second_different_sweep_into_one_directory_is_refused(tmp_path):
    sweep = tmp_path / "multi"
    common = ["-m", *MLP, "trainer.max_steps=2", "checkpoint.enabled=false", f"hydra.sweep.dir={sweep}"]
    code, err = cli([*common, "seed=0,1"], tmp_path)
    assert code == 0, err
    before = digest(sweep)
    code, err = cli([*common, "seed=2,3"], tmp_path)
    assert code == 2
    assert f"{sweep} holds another sweep" in error_line(err) and "seed=0,1" in error_line(err)
    assert digest(sweep) == before  # multirun.yaml still describes the jobs that are there


@pytest.mark.slow
def test_an_optuna_study_without_a_completed_trial_is_one_line(tmp_path):
    pytest.importorskip("optuna")
    code, err = cli(["-m", "hparams_search=optuna", *MLP, "trainer.max_steps=2", "checkpoint.enabled=false",
                     "hydra.sweeper.n_trials=2", "optimized_metric=val/none", f"hydra.sweep.dir={tmp_path / 'multi'}",
                     'hydra.sweeper.params={optimizer.lr:"choice(0.1)"}'], tmp_path)
    assert code == 1
    assert "none of the study's 2 trials completed" in error_line(err)


# ---- 9-10. MLflow: a store that cannot be used is refused before the directory changes; URIs stored absolute ---

@pytest.mark.parametrize(("uri", "message"), [
    ("file://{tmp}/store", "is a file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true"),
    pytest.param("relative/store", "logger.tracking_uri=file://{tmp}/relative/store is a file store",
                 marks=pytest.mark.slow),
    pytest.param("sqlite:///{tmp}/afile/sub/mlflow.db", "cannot be written: {tmp}/afile is not a directory",
                 marks=pytest.mark.slow),
    ("http://127.0.0.1:9", "no tracking server answered within 5 s"),
])
def test_unusable_tracking_uri_is_one_line_before_the_directory_changes(tmp_path, monkeypatch, uri, message):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "afile").write_text("x")
    run_dir = tmp_path / "run"
    code, err = cli([*MLP, "trainer.max_steps=2", "logger=mlflow", f"logger.tracking_uri={uri.format(tmp=tmp_path)}",
                     f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 2
    assert message.format(tmp=tmp_path) in error_line(err)
    assert digest(run_dir) == {}  # no .hydra, no train.log, no summary.json


@pytest.mark.slow
def test_a_relative_sqlite_uri_is_recorded_absolute(tmp_path):
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    code, err = cli([*MLP, "trainer.max_steps=2", "logger=mlflow", "logger.tracking_uri=sqlite:///rel.db",
                     f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 0, err
    recorded = json.loads((run_dir / "mlflow.json").read_text())
    assert recorded["tracking_uri"] == f"sqlite:///{tmp_path / 'rel.db'}"
    from mlflow.tracking import MlflowClient  # read from anywhere, it is the run that trained

    assert MlflowClient(tracking_uri=recorded["tracking_uri"]).get_run(recorded["run_id"]).info.status == "FINISHED"


# ---- 11-12. signals during set-up ---------------------------------------------------------------------------

SLOW_MODEL = '''
import os, time
from pathlib import Path

def slow(**kwargs):  # a model whose set-up takes long: the signal arrives while it is being built
    Path(os.environ["MARKER"]).write_text("building")
    time.sleep(120)
'''


def start_in_setup(tmp_path: Path, args: list[str]):
    import os
    import subprocess
    import time

    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL)
    marker = tmp_path / "marker"
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MARKER": str(marker), "PYTHONPATH": f"{repo}:{tmp_path}"}
    env.pop("HYDRA_FULL_ERROR", None)
    flags = [a for a in args if a == "-m"]  # Hydra's flags come before the overrides
    args = [a for a in args if a != "-m"]
    proc = subprocess.Popen([sys.executable, "-m", "mptrain", *flags, *MLP, "model._target_=slowmodel.slow", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1]
    return proc


@pytest.mark.slow
def test_sigterm_while_a_sweep_job_sets_up_records_every_job_interrupted(tmp_path):
    sweep = tmp_path / "multi"
    proc = start_in_setup(tmp_path, ["-m", "seed=0,1", f"hydra.sweep.dir={sweep}"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM during set-up, before the first step: nothing was trained or saved" in err
    assert "sweep stopped by SIGTERM" in err and "Traceback" not in err
    for job in ("0", "1"):
        s = json.loads((sweep / job / "summary.json").read_text())
        assert s["status"] == "interrupted" and s["steps"] == 0, s
        assert (sweep / job / ".hydra" / "overrides.yaml").is_file()


@pytest.mark.slow
def test_one_ctrl_c_during_set_up_is_not_called_twice(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_in_setup(tmp_path, [f"hydra.run.dir={run_dir}"])
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err
    assert ("mptrain: stopped: stopped by SIGINT during set-up, before the first step: nothing was trained or saved; "
            "run the same command again") in err.splitlines()
    assert "twice" not in err
    assert digest(run_dir) == {}  # nothing was committed


# ---- 1-4 and the rule: a resume into another precision converts the state, or is refused ---------------------

PRESETS = ("fp32", "amp", "bf16", "master", "bf16_pure", "fp8")
K = 12  # the checkpoint's step
PAIR_RUN = ["model=mlp", "model.width=16", "model.depth=2", "diagnostics=off", "trainer.log_every=1",
            "checkpoint.every_steps=6", "optimizer.lr=0.05", "scheduler.warmup_steps=0"]
TOLERANCE = {"fp32": 1e-6, "fp8": 0.03}  # relative, of the first resumed step's loss; the rest compute in 16 bits


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


class Trained(dict):
    """Per preset, trained when first asked for: a run of K + 2 steps whose step_K.pt is resumed, and whose
    steps K + 1 and K + 2 are that checkpoint's continuation."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, mode: str) -> Path:
        from .conftest import train

        _, self[mode] = train(self.root / mode, [*PAIR_RUN, f"precision={mode}", f"trainer.max_steps={K + 2}"])
        return self[mode]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    return Trained(tmp_path_factory.mktemp("pairs"))


def resume_into(trained: dict, tmp_path: Path, saved: str, mode: str):
    from mptrain.errors import MptrainError

    from .conftest import train

    try:
        _, run_dir = train(tmp_path / f"{saved}-{mode}", [*PAIR_RUN, f"precision={mode}", f"trainer.max_steps={K + 2}",
                                                          f"resume={trained[saved] / 'checkpoints' / f'step_{K}.pt'}"])
    except MptrainError as e:
        return str(e), tmp_path / f"{saved}-{mode}" / "run"
    return losses(run_dir), run_dir


FAST_PAIRS = [("fp32", "master"), ("fp32", "bf16_pure")]  # the rest, both ways, in the slow matrix


@pytest.mark.parametrize(("saved", "mode"), FAST_PAIRS)
def test_resume_into_another_precision_continues_or_refuses(trained, tmp_path, saved, mode):
    check_pair(trained, tmp_path, saved, mode)


@pytest.mark.slow
def test_every_pair_of_presets_resumes_correctly_or_refuses(trained, tmp_path):
    for saved in PRESETS:
        for mode in PRESETS:
            if saved != mode and (saved, mode) not in FAST_PAIRS:
                check_pair(trained, tmp_path, saved, mode)


def check_pair(trained: dict, tmp_path: Path, saved: str, mode: str) -> None:
    got, run_dir = resume_into(trained, tmp_path, saved, mode)
    if "bf16_pure" in (saved, mode):  # optimizer states that do not map: one line, nothing written
        assert isinstance(got, str) and "\n" not in got
        assert f"written with precision={saved}, this run asks for precision={mode}" in got
        assert not run_dir.exists()
        return
    assert isinstance(got, dict), got
    expected = losses(trained[saved])[K + 1]  # the checkpoint's own continuation
    untrained = losses(trained[saved])[1]
    tol = max(TOLERANCE.get(saved, 0.02), TOLERANCE.get(mode, 0.02))
    assert got[K + 1] == pytest.approx(expected, rel=tol), (saved, mode, got[K + 1], expected, untrained)
    # after one resumed update: the weights that trained (a master copy cloned from fresh weights would
    # throw them away here), and an optimizer state that continues
    after = losses(trained[saved])[K + 2]
    assert got[K + 2] == pytest.approx(after, rel=max(tol, 0.05)), (saved, mode, got[K + 2], after, untrained)
    assert abs(got[K + 2] - after) < 0.25 * abs(untrained - after)


# ---- 6. a run that applied no update is not `completed` -------------------------------------------------------

UNTRAINABLE = '''
import torch.nn.functional as F

class NanLoss:  # every gradient non-finite: a loss scaler skips every step
    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).float(), y) * float("nan")

class FloatLoss:  # not a tensor: the task's contract is broken
    def loss(self, model, batch):
        return 1.0

class ConstantLoss:  # depends on the output, not on the parameters' values: zero gradients
    def loss(self, model, batch):
        x, y = batch
        return (model(x).float() * 0).sum() + 1.0
'''


@pytest.mark.parametrize(("task", "precision", "message"), [
    ("NanLoss", "static", "no update was applied: all 6 steps were skipped"),
    ("ConstantLoss", "fp32", "the run did not train: the loss's gradient was zero at every logged step of 6"),
    # under float16 too: recomputed in float32 the gradient is still zero, so it is the loss (issue 37 case 12)
    ("ConstantLoss", "noscale", "was zero at every logged step of 6, so the loss does not depend on the parameters"),
])
def test_a_run_that_applied_no_update_fails(tmp_path, monkeypatch, task, precision, message):
    (tmp_path / "untrainable.py").write_text(UNTRAINABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    code, err = cli([*MLP, "trainer.max_steps=6", f"precision={precision}", f"+task._target_=untrainable.{task}",
                     "checkpoint.monitor=null", f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 1, err
    assert message in error_line(err)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and message in summary["error"] and summary["steps"] == 6


def test_noscale_whose_gradients_underflow_names_float16_not_the_loss(tmp_path):
    # issue 37 case 12: it said "the loss does not depend on the parameters' values". With loss_weight 2^-40,
    # |dL/dlogits| <= 2^-40 and each weight gradient is a batch mean of such terms times activations of
    # order 1: every nonzero float32 gradient is far below 2^-24, which float16 flushes to zero
    run_dir = tmp_path / "run"
    code, err = cli([*MLP, "trainer.max_steps=4", "precision=noscale", f"trainer.loss_weight={2.0 ** -40!r}",
                     "checkpoint.monitor=null", f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 1, err
    line = error_line(err)
    assert ("was zero at every logged step of 4 under float16 with no loss scaling, but in float32 (one batch "
            "recomputed) it is not: 100.0% of the model output's and 100.0% of the parameters' nonzero gradients "
            "lie below float16's smallest subnormal (2^-24)") in line
    assert "use a loss-scaling preset: precision=dynamic" in line and "does not depend" not in line
    assert json.loads((run_dir / "summary.json").read_text())["error"] == line.removeprefix("mptrain: error: ")


def test_float32_recomputation_counts_the_gradients_float16_flushes():
    import copy

    import torch
    import torch.nn.functional as F

    from mptrain.config import validate
    from mptrain.train.diagnose import fp32_gradients
    from mptrain.train.recipe import build

    from .conftest import compose_config

    weight, scale = 2.0 ** -16, 2.0  # a share of the gradients on each side of 2^-24 at scale 2
    cfg = compose_config([*MLP, "precision=noscale", f"trainer.loss_weight={weight!r}"])
    validate(cfg)
    c = build(cfg)
    x, y = c.to_device(next(iter(c.train_loader)))
    model = copy.deepcopy(c.model)
    out = model(x)
    out.retain_grad()
    (F.cross_entropy(out, y) * weight).backward()

    def share(t):  # of the nonzero values, those below 2^-24 once scaled
        a = t.abs().flatten() * scale
        return ((a > 0) & (a < 2.0 ** -24)).sum().item() / (a > 0).sum().item()

    expected = {"output": share(out.grad), "params": share(torch.cat([p.grad.flatten() for p in model.parameters()]))}
    assert 0.05 < expected["output"] < 0.95 and 0.05 < expected["params"] < 0.95  # both sides are populated
    got = fp32_gradients(c, (x, y), scale)
    assert got == pytest.approx(expected, abs=1e-12)
    assert all(p.grad is None for p in c.model.parameters())  # the run's gradients are left as they were


# ---- 5 and the rule: summary.json is a function of the whole run ------------------------------------------------

TIMING = ("wall_s", "samples_per_s", "peak_memory_mb")  # the only fields that may differ, covering every attempt


@pytest.mark.slow
def test_summary_after_three_kills_equals_an_uninterrupted_runs(tmp_path):
    import random

    from .conftest import run_cli
    from .test_faults import CLI, STEPS, run_faulted

    ref = run_cli([*CLI, f"hydra.run.dir={tmp_path / 'ref'}"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    reference = json.loads((tmp_path / "ref" / "summary.json").read_text())
    rows = len(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    run_dir, rng = tmp_path / "run", random.Random(25)
    for attempt in range(3):  # kill -9 at a random metrics write of each attempt, then resume=auto
        k = rng.randint(2, rows // 3)
        killed = run_faulted(run_dir, tmp_path, f"log:{k}:{rng.random()}:SIGKILL", *(["resume=auto"] * bool(attempt)))
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    proc = run_cli([*CLI, f"hydra.run.dir={run_dir}", "resume=auto"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["diag/samples"] == reference["diag/samples"] > 0
    assert {k: v for k, v in summary.items() if k not in TIMING} == {k: v for k, v in reference.items()
                                                                      if k not in TIMING}
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > 0


@pytest.mark.slow
def test_resume_auto_on_a_finished_run_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    args = [*MLP, "trainer.max_steps=3", "diagnostics=default", "diagnostics.every=1", f"hydra.run.dir={run_dir}"]
    code, err = cli(args, tmp_path)
    assert code == 0, err
    before = digest(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["diag/samples"] == 3 and summary["samples_per_s"] > 0
    code, err = cli([*args, "resume=auto"], tmp_path)
    assert code == 0, err
    assert digest(run_dir) == before  # no .hydra/attempt_<k>, no rewritten summary with zeroed means


# ---- the resume rule: a resume continues the run that was started ------------------------------------------------

@pytest.mark.slow
def test_resume_as_the_readme_shows_it_continues_the_run_that_was_started(tmp_path):
    started = [*MLP, "trainer.max_steps=8", "checkpoint.every_steps=4", "trainer.log_every=1", "scheduler=cosine",
               "scheduler.warmup_steps=2"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    for d in (ref_dir, run_dir):
        code, err = cli([*started, f"hydra.run.dir={d}"], tmp_path)
        assert code == 0, err
    for name in ("last.pt", "step_8.pt"):  # as if stopped after step 4: its newest checkpoint is step_4.pt
        (run_dir / "checkpoints" / name).unlink()
    code, err = cli(["resume=auto", f"hydra.run.dir={run_dir}"], tmp_path)  # the README's command, nothing else
    assert code == 0, err
    ref, got = read_jsonl(ref_dir / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    assert [(r["step"], r.get("loss"), r.get("lr")) for r in got] == [
        (r["step"], r.get("loss"), r.get("lr")) for r in ref
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and "events" not in summary  # nothing was changed
    # a change given now is applied, logged, and recorded in the summary
    code, err = cli(["resume=auto", "trainer.max_steps=10", f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 10
    assert summary["events"] == [{"event": "resume_change", "step": 8, "key": "trainer.max_steps", "from": 8, "to": 10}]
    assert "trainer.max_steps changed 8 -> 10 (given now)" in (run_dir / "train.log").read_text()


def test_the_hint_for_a_run_directory_names_its_last_checkpoint(tmp_path):
    from mptrain.checkpoint.files import load_file
    from mptrain.errors import CheckpointError

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for folder, named in ((tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"),
                          (tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "last.pt")):
        (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
        with pytest.raises(CheckpointError) as info:
            load_file(folder)
        assert f"pass a checkpoint file (e.g. {named})" in str(info.value) and "\n" not in str(info.value)


# ---- the rule: everything that can refuse, refuses before the run directory changes ----------------------------

REFUSALS = {  # resuming a completed run with: (the change, what the one line says)
    "tracker": (["logger=mlflow", "logger.tracking_uri=file://{tmp}/fs"], "is a file store"),
    "monitor": (["checkpoint.monitor=val/nope"], "checkpoint.monitor='val/nope' is not a metric this task reports"),
    "task contract": (["+task._target_=untrainable.FloatLoss"], "loss() returned a float, not a tensor"),
    "data": (["dataset.val_fraction=2"], "dataset.val_fraction=2"),
    "model vs data": (["model.num_classes=3"], "was written for another model"),
    "precision": (["precision=bf16_pure"], "written with precision=amp, this run asks for precision=bf16_pure"),
    "optimizer": (["optimizer=adamw"], "written with optimizer=sgd: the optimizer state does not fit this optimizer"),
    "seed": ([f"seed={10**20}"], "is invalid: must be an integer in [0, 2**32)"),
}


@pytest.mark.slow
def test_every_refusal_leaves_the_run_directory_byte_identical(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    (tmp_path / "untrainable.py").write_text(UNTRAINABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    code, err = cli([*MLP, "trainer.max_steps=3", f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 0, err
    before = digest(run_dir)
    for name, (change, message) in REFUSALS.items():
        change = [c.format(tmp=tmp_path) for c in change]
        code, err = cli([*MLP, "trainer.max_steps=3", "resume=auto", *change, f"hydra.run.dir={run_dir}"], tmp_path)
        assert code != 0 and message in error_line(err), (name, err)
        assert digest(run_dir) == before, name
    code, err = cli([*MLP, "trainer.max_steps=3", f"hydra.run.dir={run_dir}"], tmp_path)  # a fresh run into it
    assert code == 2 and "already holds checkpoints" in error_line(err)
    assert digest(run_dir) == before


def test_an_explicit_precision_on_resume_outlives_an_on_min_bf16_switch(tmp_path):
    from .conftest import train

    # every fp16 step overflows at a scale that cannot back off: the run switches to bf16 (case 2)
    switching = [*PAIR_RUN, "precision=dynamic", "precision.dtype=float16", "precision.loss_scale.init=65536",
                 "precision.loss_scale.min=65536", "precision.loss_scale.on_min=bf16", "trainer.loss_weight=1e6"]
    first, run_dir = train(tmp_path, [*switching, "trainer.max_steps=6"])
    assert first["compute_dtype"] == "bf16" and first["events"][0]["event"] == "switch_to_bf16"
    resumed, _ = train(tmp_path, [*PAIR_RUN, "precision=fp32", "trainer.max_steps=8", "resume=auto"])
    assert resumed["compute_dtype"] == "fp32" and resumed["precision"] == "fp32"
    assert resumed["steps"] == 8 and resumed["status"] == "completed"


@pytest.mark.slow
def test_master_resumed_with_another_norm_layout_continues(tmp_path):
    from .conftest import train

    cnn = ["model=cnn", "model.width=4", "diagnostics=off", "trainer.log_every=1", "checkpoint.every_steps=4",
           "optimizer.lr=0.05", "scheduler.warmup_steps=0", "trainer.batch_size=32", "precision=master"]
    _, ref = train(tmp_path / "ref", [*cnn, "trainer.max_steps=6"])
    resumed, _ = train(tmp_path / "new", [*cnn, "trainer.max_steps=6", "precision.keep_norm_fp32=false",
                                          f"resume={ref / 'checkpoints' / 'step_4.pt'}"])
    assert resumed["status"] == "completed"  # was: ValueError, 6 master tensors for 14 (case 4)
    expected, got = losses(ref), losses(tmp_path / "new" / "run")
    assert got[5] == pytest.approx(expected[5], rel=0.02) and got[6] == pytest.approx(expected[6], rel=0.05)


def test_a_group_chosen_at_resume_replaces_the_runs_settings_of_that_group(tmp_path, capsys):
    # found by a hostile pass: precision=fp32 at resume kept the run's 'precision.layers={*: nvfp4}' silently
    from mptrain.cli.main import continue_the_run

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "- precision=bf16\n- 'precision.layers={*: nvfp4}'\n- model=mlp\n- model.width=16\n- trainer.max_steps=30\n")
    argv = ["resume=auto", f"hydra.run.dir={run}", "precision=fp32"]
    assert continue_the_run(argv) == ["model=mlp", "model.width=16", "trainer.max_steps=30", *argv]
    assert "precision= given now replaces the run's own precision.layers={*: nvfp4}" in capsys.readouterr().err
    # without a group choice the run's own settings are the base, all of them
    assert continue_the_run(argv[:2]) == ["precision=bf16", "precision.layers={*: nvfp4}", "model=mlp",
                                          "model.width=16", "trainer.max_steps=30", *argv[:2]]
