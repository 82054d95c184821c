"""The run directory's lifecycle: held exclusively, left untouched until every check has passed,
then committed (Hydra records, train.log, per-step records made exact for this attempt).

The CLI wraps each job in `RunDir` (lock + what to write on commit) and hands it to the recipe, which calls
`RunDir.commit(resume_step)` once every check has passed; before that nothing in the directory changes (the
lock file is removed again if the run is refused).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mptrain.run.layout import (
    ATTEMPT,
    CHECKPOINTS,
    HYDRA_DIR,
    HYDRA_FILES,
    PREVIOUS,
    SET_ASIDE,
    STEP_RECORDS,
    SUMMARY,
    read_jsonl,
    rewrite_jsonl,
    temp_files,
)
from mptrain.run.lock import RunDirError, RunLock

log = logging.getLogger("mptrain")


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


# ---- the per-step records ---------------------------------------------------------------------------

def set_aside(run_dir: Path) -> Path | None:
    """Move an earlier attempt's records to <run_dir>/previous_<k>/ (never deleted). Returns it, if any."""
    run_dir = Path(run_dir)
    present = [name for name in SET_ASIDE if (run_dir / name).exists()]
    if not present:
        return None
    k = 1
    while (run_dir / PREVIOUS.format(k)).exists():
        k += 1
    dest = run_dir / PREVIOUS.format(k)
    dest.mkdir()
    for name in present:
        os.replace(run_dir / name, dest / name)
    log.info("fresh start: the earlier attempt's records were moved to %s", dest)
    return dest


def remove_stale_temp_files(run_dir: Path) -> None:
    """Remove the temp files of writes a killed attempt never finished (`.<name>.<random>.tmp` beside
    checkpoints, summary.json and the per-step files). Safe: this run holds the directory's lock."""
    run_dir = Path(run_dir)
    stale = [p for name in (*STEP_RECORDS, SUMMARY) for p in temp_files(run_dir, name)]
    stale += temp_files(run_dir / CHECKPOINTS, "*.pt")
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
            rewrite_jsonl(path, [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= resume_step])


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


class HeldLines:
    """mptrain's log lines (the `mptrain` logger and its children) while a run is set up, held at each handler
    until the run directory is committed: a refused run prints only why ("run directory: ...", the precision and
    fp8 set-up lines would describe a run that never started). Warnings are not held. `release(WARNING)` on a
    refusal drops what was held. Other libraries' lines are not held."""

    def __init__(self, name: str = "mptrain"):
        self.name, self.held = name, []
        self.filters = [(h, functools.partial(self._hold, h)) for h in logging.getLogger().handlers]
        for handler, f in self.filters:
            handler.addFilter(f)

    def _hold(self, handler: logging.Handler, record: logging.LogRecord) -> bool:
        if record.name != self.name and not record.name.startswith(self.name + "."):
            return True
        if record.levelno >= logging.WARNING:  # true of the config whatever happens next: shown at once, so a
            return True  # long set-up (a tokenizer trained, a model built) is not silent about its problems
        self.held.append((handler, record))
        return False

    def release(self, at_least: int = logging.NOTSET) -> None:
        for handler, f in self.filters:
            handler.removeFilter(f)
        self.filters = []
        for handler, record in self.held:
            if record.levelno >= at_least:
                handler.handle(record)
        self.held.clear()


def write_hydra_records(run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """What Hydra writes to .hydra/ (config, hydra, overrides), after moving an earlier attempt's to
    .hydra/attempt_<k>/ (resuming into the same directory keeps what every attempt ran with)."""
    records = Path(run_dir) / HYDRA_DIR
    if (records / HYDRA_FILES[0]).is_file():
        k = 1
        while (records / ATTEMPT.format(k)).exists():
            k += 1
        (records / ATTEMPT.format(k)).mkdir()
        for name in HYDRA_FILES:
            if (records / name).is_file():
                os.replace(records / name, records / ATTEMPT.format(k) / name)
    records.mkdir(parents=True, exist_ok=True)
    config, hydra, overrides = HYDRA_FILES
    OmegaConf.save(cfg, records / config)
    OmegaConf.save(hydra_cfg, records / hydra)
    OmegaConf.save(hydra_cfg.hydra.overrides.task, records / overrides)


class RunDir:
    """One job's hold on its run directory: `with RunDir(...)` takes the lock (refusing a second run) and,
    until the recipe calls `commit`, writes nothing else. `hydra_cfg` is Hydra's config ({"hydra": ...}).
    Without `cfg` (the recipe run directly, by tests and scripts) there is no lock and no Hydra record.
    Inside `with`, mptrain's log lines are held until `commit` (HeldLines); a job that raises before it (a
    refusal) shows only its warnings, one that ends without committing (nothing to do) shows them all."""

    def __init__(self, run_dir: Path, cfg: DictConfig | None = None, hydra_cfg: DictConfig | None = None):
        self.path, self.cfg, self.hydra_cfg = Path(run_dir), cfg, hydra_cfg
        self.lock = RunLock(self.path)
        self.committed = False
        self.held: HeldLines | None = None

    def __enter__(self) -> RunDir:
        self.lock.acquire()
        self.held = HeldLines()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.lock.release()
        if self.held is not None:
            self.held.release(logging.WARNING if exc_type is not None else logging.NOTSET)
            self.held = None

    def commit(self, resume_step: int | None) -> None:
        """Every check has passed: write the Hydra records, start train.log and make the per-step records
        exact (`resume_step`: the checkpoint's step, or None for a fresh start). Once per job."""
        if self.committed:
            return
        self.committed = True
        self.path.mkdir(parents=True, exist_ok=True)
        if self.cfg is not None and self.hydra_cfg is not None:
            write_hydra_records(self.path, self.cfg, self.hydra_cfg)
        open_log_files()
        if self.held is not None:  # the set-up lines, true now, to the console and train.log
            self.held.release()
            self.held = None
        prepare_records(self.path, resume_step)
