"""The run directory's contract (docs/design.md; README "The run directory"): every file name, the one atomic
writer, the one JSONL reader.

No module outside mptrain/run spells a run-directory file name: they import these constants. The atomic
writer (`write_atomic`) is the only way a run file is replaced: a temp file in the same directory, fsynced,
given the mode an ordinary new file gets (0666 & ~umask), renamed over the old file, and the directory fsynced,
so a crash or kill -9 at any moment leaves the old file or the new one, never half of either.

The JSONL reader (`read_jsonl`): a process killed mid-write can leave a torn final line; it is dropped with a
warning, since the checkpoint that a resume continues from never covers it. A bad line anywhere else means the
file was edited or damaged, and is an error naming the file and the line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from mptrain.errors import MptrainError
from mptrain.library.data.tokenize import TOKENIZER_FILE, VOCAB_FILE

log = logging.getLogger("mptrain")

# ---- the files of a run directory ------------------------------------------------------------------
HYDRA_DIR = ".hydra"                      # Hydra's records of what the run was started with
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
OVERRIDES = f"{HYDRA_DIR}/overrides.yaml"
CONFIG = f"{HYDRA_DIR}/config.yaml"        # the composed config the run ran with (mptrain-eval/-sample/-export read it)
HYDRA_SETTINGS = f"{HYDRA_DIR}/hydra.yaml"  # Hydra's own settings: where the run found its configs (a resume reads it)
LOCK = ".lock"                            # the running process's flock
TRAIN_LOG = "train.log"
METRICS = "metrics.jsonl"                 # one row per logged step and per validation
DIAGNOSTICS = "diagnostics.jsonl"         # one row per sampled diagnostics step
SUMMARY = "summary.json"                  # the run's final figures
CHECKPOINTS = "checkpoints"               # last.pt, step_<N>.pt, best.pt; sharded/step_<N>/ under FSDP
LAST, BEST = "last.pt", "best.pt"
STEP_CKPT = "step_{}.pt"                  # checkpoints/step_<N>.pt (the newest checkpoint.keep_last)
STEP_CKPT_RE = re.compile(r"step_(\d+)\.pt$")
SHARDED = "sharded"                       # checkpoints/sharded/step_<N>/: DCP's shards + SHARDED_EXTRA
SHARDED_STEP = "step_{}"
SHARDED_STEP_RE = re.compile(r"step_(\d+)$")
SHARDED_EXTRA = "extra.pt"
DIVERGED = "diverged"                     # checkpoints/diverged/: written after the last finite loss
TENSORBOARD = "tensorboard"
PROFILE = "profile"                       # debug=profile's traces and top_ops.txt
REPORT = "report"                         # mptrain-report's PNGs
ADVICE = "advice.json"                    # mptrain-advise's verdict
VERIFY = "verify"                         # mptrain-advise --verify's trial runs: verify/probe/, verify/advised/
PRECISION_PLAN = "precision_plan.json"    # module -> {format, emulated, kernel, why, ...} (precision/plan.py)
MLFLOW = "mlflow.json"                    # logger=mlflow: the tracking URI and run id
WANDB = "wandb.json"                      # logger=wandb: the W&B run id and mode (W&B's own files: wandb/)
# dataset=text's vocab.json ({"level", "tokens"}) or tokenizer.json, what decodes a language model's ids: the
# tokenizer's own file names (library/data/tokenize.py writes them wherever a tokenizer is saved)
VOCAB, TOKENIZER = VOCAB_FILE, TOKENIZER_FILE
SAMPLES = "samples"                       # a GAN's grids: step_<N>.png at validation, seed_<S>.png (mptrain-sample)
EXPORT = "export"                         # mptrain-export: model.safetensors, model_config.yaml, model.<format>
EVAL = "eval_{}.json"                     # mptrain-eval's metrics of a checkpoint (eval_file)
PREVIOUS = "previous_{}"                  # an earlier attempt's records, set aside by a fresh start
ATTEMPT = "attempt_{}"                    # .hydra/attempt_<k>/: what an earlier attempt ran with
# of a sweep directory
MULTIRUN = "multirun.yaml"                # Hydra's record of the sweep; its jobs are the numbered folders beside it
OPTUNA_DB = "optuna.db"
COMPARISON = ("comparison.md", "comparison.csv", "comparison.png")  # mptrain-compare's outputs
COMPARISON_ARTIFACTS = "comparison"       # their folder among a tracked run's MLflow artifacts
REPORT_ARTIFACTS = "report"

# files a run writes step by step: cut back on resume, set aside (previous_<k>/) on a fresh start
STEP_RECORDS = (METRICS, DIAGNOSTICS)
SET_ASIDE = (*STEP_RECORDS, SUMMARY, TENSORBOARD, CHECKPOINTS, REPORT, ADVICE, VOCAB, TOKENIZER)


def eval_file(name: str) -> str:
    """mptrain-eval's metrics of checkpoint `name` (e.g. best, last-precision_bf16): eval_<name>.json."""
    return EVAL.format(name)


class OutputError(MptrainError):
    """A run file cannot be written (disk full, permission denied)."""


def umask_mode() -> int:
    """The mode an ordinary new file gets, 0666 less the umask (mkstemp makes its files 0600).
    Read from /proc: setting the umask to read it would race with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temp_files(directory: Path, name: str = "*") -> list[Path]:
    """The temp files `write_atomic` leaves only when killed mid-write (`.<name>.<random>.tmp`)."""
    return list(Path(directory).glob(f".{name}.*.tmp"))


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], also: Path | None = None,
                 mode: int | None = None) -> None:
    """Replace `path` with what `write(file)` writes, atomically (see the module docstring).
    `also`: a second name, hard-linked to the same file (a copy would double the write). `mode`: the file's
    permission bits (default: an ordinary new file's). An OSError propagates; the temp file is removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, umask_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if also is not None:
            also.unlink(missing_ok=True)
            os.link(tmp, also)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """Non-finite floats become null at any depth (JSON has no inf/NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    """A JSON file (summary.json, advice.json, ...) through the atomic writer. A write that fails (disk full,
    no permission) raises OutputError naming the path and the cause."""
    text = (json.dumps(json_safe(data), indent=2) + "\n").encode()
    try:
        write_atomic(path, lambda f: f.write(text))
    except OSError as e:
        raise OutputError(f"could not write {path}: {e.strerror or e}") from None


def rewrite_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace a JSONL file's rows (a resume cutting it back), keeping the file's own mode."""
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    write_atomic(path, lambda f: f.write(text), mode=path.stat().st_mode & 0o777)


class JsonlError(MptrainError):
    """A JSONL run file has a damaged line before its last one."""


def read_jsonl(path: Path, skip_damaged: bool = False) -> list[dict]:
    """Every row of `path` (blank lines skipped); a torn final line is dropped and logged. `skip_damaged`
    (the offline tools, which only read): a damaged line elsewhere is skipped with a warning too."""
    path = Path(path)
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    rows: list[dict] = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                log.warning("%s: dropping a torn last line (%d bytes; a run stopped while writing it)", path, len(line))
                break
            if skip_damaged:
                log.warning("%s line %d is not JSON (%s): skipped; the file was edited or damaged", path, i + 1, e.msg)
                continue
            raise JsonlError(f"{path} line {i + 1} is not JSON ({e.msg}); the file was edited or damaged, "
                             "fix or remove that line") from None
        if not isinstance(row, dict):
            if skip_damaged:
                log.warning("%s line %d is not a JSON object: skipped", path, i + 1)
                continue
            raise JsonlError(f"{path} line {i + 1} is not a JSON object")
        rows.append(row)
    return rows

