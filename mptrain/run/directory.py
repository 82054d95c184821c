"""The run directory's lifecycle: held exclusively, left untouched until every check has passed,
then committed (Hydra records, train.log, per-step records made exact for this attempt).

The CLI wraps each job in `RunDir` (lock + what to write on commit). The recipe calls
`commit_run_dir(run_dir, resume_step)` once every check has passed; before that nothing in the
directory changes (the lock file is removed again if the run is refused).
"""

from __future__ import annotations

import contextvars
import errno
import fcntl
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mptrain.errors import MptrainError
from mptrain.run.layout import VOCAB, read_jsonl

log = logging.getLogger("mptrain")

HYDRA_DIR = ".hydra"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
LOCK_FILE = ".lock"
# files a run writes step by step: cut back on resume, set aside (previous_<k>/) on a fresh start
STEP_RECORDS = ("metrics.jsonl", "diagnostics.jsonl")
SET_ASIDE = (*STEP_RECORDS, "summary.json", "tensorboard", "checkpoints", "report", "advice.json", VOCAB)


class RunDirError(MptrainError):
    """The run directory cannot be used: held by another run, not a directory, not writable."""


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


# ---- checks before Hydra touches the directory -----------------------------------------------------

def check_usable(run_dir: Path) -> None:
    """Refuse a run directory that is a file or cannot be written (or created)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file, not a directory; choose another hydra.run.dir")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"cannot create run directory {run_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "run directory" if existing == run_dir else f"cannot create run directory {run_dir}: directory"
        raise RunDirError(f"{what} {existing} is not writable; fix its permissions or choose another hydra.run.dir")


# ---- exclusive use ---------------------------------------------------------------------------------

class RunLock:
    """An exclusive flock on <run_dir>/.lock, holding the owner's PID.

    The kernel drops the lock when the process ends, kill -9 included, so a stale .lock file never
    blocks a run. The file is removed on release (while still locked), so a refused or finished run
    leaves nothing behind; `acquire` re-checks the inode to tolerate that race.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise RunDirError(f"cannot use run directory {self.run_dir}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise RunDirError(f"cannot lock run directory {self.run_dir}: {e.strerror}") from None
                raise RunDirError(f"run directory {self.run_dir} is in use by another mptrain run (pid {holder}); "
                                  "wait for it to end or choose another hydra.run.dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed it between our open and flock: try again
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


# ---- the per-step records ---------------------------------------------------------------------------

def _rewrite_lines(path: Path, rows: list[dict]) -> None:
    import json

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.chmod(tmp, path.stat().st_mode & 0o777)  # mkstemp made it 0600: keep the file's own mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_aside(run_dir: Path) -> Path | None:
    """Move an earlier attempt's records to <run_dir>/previous_<k>/ (never deleted). Returns it, if any."""
    run_dir = Path(run_dir)
    present = [name for name in SET_ASIDE if (run_dir / name).exists()]
    if not present:
        return None
    k = 1
    while (run_dir / f"previous_{k}").exists():
        k += 1
    dest = run_dir / f"previous_{k}"
    dest.mkdir()
    for name in present:
        os.replace(run_dir / name, dest / name)
    log.info("fresh start: the earlier attempt's records were moved to %s", dest)
    return dest


def remove_stale_temp_files(run_dir: Path) -> None:
    """Remove the temp files of writes a killed attempt never finished (`.<name>.<random>.tmp` beside
    checkpoints, summary.json and the per-step files). Safe: this run holds the directory's lock."""
    run_dir = Path(run_dir)
    stale = [p for name in (*STEP_RECORDS, "summary.json") for p in run_dir.glob(f".{name}.*.tmp")]
    stale += list((run_dir / "checkpoints").glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temp file(s) left by a write that a killed attempt never finished", len(stale))


def prepare_records(run_dir: Path, resume_step: int | None) -> None:
    """Make the per-step files exact for this attempt.

    Resuming from a checkpoint of `resume_step`: drop every row with "step" > resume_step (the resumed
    run writes them again) and a torn last line; rows without a step (diagnostics' meta row) stay.
    Starting fresh: set an earlier attempt's records aside, so no row is appended to them.
    """
    run_dir = Path(run_dir)
    remove_stale_temp_files(run_dir)
    if resume_step is None:
        set_aside(run_dir)
        return
    for name in STEP_RECORDS:
        path = run_dir / name
        if path.is_file():
            rows = read_jsonl(path)
            _rewrite_lines(path, [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= resume_step])


# ---- committing: Hydra records and train.log -------------------------------------------------------

class DeferredFileHandler(logging.Handler):
    """Hydra's train.log handler, deferred: records are held in memory until `open()` (the run
    directory's commit), so a refused run creates no train.log. Named in conf/config.yaml."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = "utf-8"):
        super().__init__()
        self.filename, self.mode, self.encoding = filename, mode, encoding
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        else:
            self.held.append(record)

    def open(self) -> None:
        if self.file is not None:
            return
        self.file = logging.FileHandler(self.filename, self.mode, encoding=self.encoding)
        self.file.setFormatter(self.formatter)
        for record in self.held:
            self.file.emit(record)
        self.held.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def open_log_files() -> None:
    """Start writing train.log: every deferred handler on the root logger opens its file."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, DeferredFileHandler):
            handler.open()


def write_hydra_records(run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """What Hydra writes to .hydra/ (config, hydra, overrides), after moving an earlier attempt's to
    .hydra/attempt_<k>/ (resuming into the same directory keeps what every attempt ran with)."""
    records = Path(run_dir) / HYDRA_DIR
    if (records / "config.yaml").is_file():
        k = 1
        while (records / f"attempt_{k}").exists():
            k += 1
        (records / f"attempt_{k}").mkdir()
        for name in HYDRA_FILES:
            if (records / name).is_file():
                os.replace(records / name, records / f"attempt_{k}" / name)
    records.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, records / "config.yaml")
    OmegaConf.save(hydra_cfg, records / "hydra.yaml")
    OmegaConf.save(hydra_cfg.hydra.overrides.task, records / "overrides.yaml")


class RunDir:
    """One job's hold on its run directory: `with RunDir(...)` takes the lock (refusing a second run)
    and, until `commit_run_dir`, writes nothing else. `hydra_cfg` is Hydra's config ({"hydra": ...})."""

    def __init__(self, run_dir: Path, cfg: DictConfig | None = None, hydra_cfg: DictConfig | None = None):
        self.path, self.cfg, self.hydra_cfg = Path(run_dir), cfg, hydra_cfg
        self.lock = RunLock(self.path)
        self.committed = False
        self._token: Any = None

    def __enter__(self) -> RunDir:
        self.lock.acquire()
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _current.reset(self._token)
        self.lock.release()

    def commit(self, resume_step: int | None) -> None:
        if self.committed:
            return
        self.committed = True
        if self.cfg is not None and self.hydra_cfg is not None:
            write_hydra_records(self.path, self.cfg, self.hydra_cfg)
        open_log_files()
        prepare_records(self.path, resume_step)


# the job's RunDir, set only inside `with RunDir(...)`: lets the recipe commit without threading it through
_current: contextvars.ContextVar[RunDir | None] = contextvars.ContextVar("mptrain_run_dir", default=None)


def commit_run_dir(run_dir: Path, resume_step: int | None) -> None:
    """Every check has passed: write the Hydra records, start train.log and make the per-step records
    exact (`resume_step`: the checkpoint's step, or None for a fresh start). Called once per job."""
    job = _current.get()
    if job is not None and job.path.resolve() == Path(run_dir).resolve():
        job.commit(resume_step)
    else:  # the recipe run directly (tests, scripts): no lock or Hydra records to write
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        prepare_records(run_dir, resume_step)


def committed(run_dir: Path) -> bool:
    """Has this job committed its run directory (False when refused before that)?"""
    job = _current.get()
    return job is not None and job.path.resolve() == Path(run_dir).resolve() and job.committed


def remove_tree_if_empty(path: Path) -> None:
    """Remove a directory Hydra created for a run that was then refused, if nothing is in it."""
    try:
        path.rmdir()
    except OSError:
        pass

