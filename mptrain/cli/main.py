"""The `mptrain` command (and `python -m mptrain`): Hydra composes conf/, then the recipe runs."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mptrain.cli.hydra_callbacks import CheckRunDir
from mptrain.cli.keys import check_override_keys
from mptrain.cli.register import register
from mptrain.config import CONFIG_NAME, validate
from mptrain.errors import ConfigError, MptrainError
from mptrain.parallel.launch import env_info
from mptrain.run.directory import RunDir, write_hydra_records
from mptrain.run.layout import CHECKPOINTS, HYDRA_SETTINGS, OVERRIDES, SUMMARY, TRAIN_LOG, write_json_atomic

log = logging.getLogger("mptrain")


def objective(cfg: DictConfig, summary: dict) -> float | None:
    """The task's return value, which a sweeper (Optuna) optimizes: summary[optimized_metric], else
    val/acc, else val/loss. A missing or non-finite objective raises, so the trial is marked failed."""
    metric = cfg.get("optimized_metric")
    if metric is None:
        return summary.get("val/acc", summary.get("val/loss"))
    value = summary.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MptrainError(f"optimized_metric={metric} is {value!r} in this run's summary, not a finite number "
                           f"(summary keys: {', '.join(sorted(summary))})")
    return float(value)


def check_sweeper_installed(argv: list[str]) -> None:
    """`hparams_search=optuna` without the extra: one line instead of Hydra's missing-config message."""
    if any(a.startswith("hparams_search=") and a != "hparams_search=null" for a in argv):
        try:
            import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
        except ImportError:
            print("mptrain: error: hparams_search=optuna needs hydra-optuna-sweeper: pip install mptrain[optuna]",
                  file=sys.stderr)
            sys.exit(2)


@dataclass
class SweepOutcome:
    """What the jobs of one `mptrain` invocation tell each other and the exit code (one per process
    invocation, passed to the task function; not module state)."""

    jobs: int = 0
    failed: list[str] = field(default_factory=list)
    exit_code: int = 0
    stopped_by: int | None = None  # a signal stopped a job: later jobs of the sweep do not run


def _minimal_summary(cfg: DictConfig, status: str, error: str) -> dict:
    def pick(node: str, *keys: str):
        sub = cfg.get(node)
        return next((sub.get(k) for k in keys if isinstance(sub, DictConfig) and sub.get(k) is not None), None)

    return {"status": status, "error": error, "precision": pick("precision", "mode"), "steps": 0,
            "model": pick("model", "name", "_target_"), "dataset": pick("dataset", "name", "_target_"),
            "seed": pick("trainer", "seed")}


def _record_unrun_job(cfg: DictConfig, job: RunDir, status: str, error: str) -> None:
    """A sweep job that did not train still gets .hydra records and a summary, so mptrain-compare lists it.
    Only into a directory that held nothing before (a fresh sweep job's): a refused run changes no records."""
    write_hydra_records(job.path, cfg, job.hydra_cfg)
    write_json_atomic(job.path / SUMMARY, _minimal_summary(cfg, status, error))


def _job(cfg: DictConfig, outcome: SweepOutcome) -> float | None:
    from mptrain.checkpoint.signals import Interrupted  # the run's modules import torch: only now
    from mptrain.train.callbacks.console import print_config_tree, print_summary
    from mptrain.train.recipe import run

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    main_rank = env_info().is_main  # torchrun's RANK, or SLURM_PROCID under srun
    if not main_rank:  # only rank 0 writes train.log and the console
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)
        logging.getLogger().addHandler(logging.NullHandler())
    run_dir = Path(hc.runtime.output_dir)
    outcome.jobs += 1
    refused = False
    try:
        was_empty = not any(run_dir.iterdir())
        with RunDir(run_dir, cfg, HydraConfig.instance().cfg) if main_rank else contextlib.nullcontext() as job:
            try:
                if outcome.stopped_by is not None:
                    raise SweepStopped(outcome.stopped_by)
                validate(cfg)
                if main_rank:
                    print_config_tree(cfg, dict(hc.runtime.choices), list(hc.overrides.task))
                log.info("run directory: %s", run_dir)
                summary = run(cfg, job if job is not None else run_dir)
            except MptrainError as e:
                refused = was_empty and job is not None and not job.committed
                if multirun and refused:
                    status = "interrupted" if isinstance(e, (Interrupted, SweepStopped)) else "failed"
                    _record_unrun_job(cfg, job, status, str(e))
                raise
            except Exception as e:
                if not multirun:
                    raise
                # a sweep job's unexpected error (a library's, or a bug): recorded like any failed job, so the
                # sweep goes on and mptrain-compare lists it; its traceback goes to the job's train.log
                failed = JobFailed(e, run_dir / TRAIN_LOG if job is not None else None)
                refused = was_empty and job is not None and not job.committed
                if refused:
                    _record_unrun_job(cfg, job, "failed", str(failed))
                failed.keep_traceback()
                raise failed from e
    except MptrainError as e:
        if not isinstance(e, SweepStopped):
            print(error_line(e), file=sys.stderr)
        if not multirun:
            if refused:  # Hydra made the directories for this run; it was refused and they hold nothing
                for made in CheckRunDir.made.get(str(run_dir.absolute()), [run_dir]):
                    remove_if_empty(made)
            sys.exit(e.exit_code)
        # a sweep: record the failure and go on; main() exits non-zero at the end
        outcome.failed.append(f"{run_dir.name}: {e}")
        outcome.exit_code = outcome.exit_code or e.exit_code
        if isinstance(e, Interrupted):
            outcome.stopped_by = e.signum
        return None
    if main_rank:
        print_summary(summary)
    return objective(cfg, summary)  # what a sweeper (Optuna) optimizes; None above marks a failed trial


def remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (or gone): leave it
        path.rmdir()


def error_line(e: MptrainError) -> str:
    """How the CLI prints an error: a requested stop (Ctrl-C, SIGTERM) is not an error."""
    from mptrain.checkpoint.signals import Interrupted

    return f"mptrain: {'stopped' if isinstance(e, Interrupted) else 'error'}: {e}"


class JobFailed(MptrainError):
    """A sweep job stopped by an exception mptrain did not expect (a library's TypeError, a bug)."""

    exit_code = 1

    def __init__(self, error: Exception, log_file: Path | None):
        self.error, self.log_file = error, log_file
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        where = f"; the traceback is in {log_file}" if log_file is not None else ""
        super().__init__(f"unexpected {type(error).__name__}: {first}{where}")

    def keep_traceback(self) -> None:
        if self.log_file is None:
            return
        import traceback

        with contextlib.suppress(OSError), open(self.log_file, "a", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(self.error)))


class SweepStopped(MptrainError):
    """An earlier job of this sweep was stopped by a signal: this one does not run."""

    def __init__(self, signum: int):
        self.exit_code = 128 + signum
        super().__init__(f"not run: the sweep was stopped by {signal.Signals(signum).name} during an earlier job")


def check_config_dirs(argv: list[str]) -> None:
    """A YAML syntax error in a --config-dir becomes one line (Hydra would print a traceback)."""
    import yaml

    dirs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config-dir", "-cd")]
    dirs += [a.split("=", 1)[1] for a in argv if a.startswith("--config-dir=")]
    for d in dirs:
        for path in sorted(Path(d).rglob("*.yaml")):
            try:
                yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from None
            except OSError as e:
                raise ConfigError(f"cannot read {path}: {e.strerror}") from None


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def continue_the_run(argv: list[str]) -> list[str]:
    """`resume=...` continues the run that was started: its own overrides (.hydra/overrides.yaml) are the base,
    and only the overrides given now change it (each one then logged by the resume as a change). Without this,
    `mptrain resume=auto hydra.run.dir=<run>` would compose the defaults: another run length, another schedule.
    Sweeps are left alone (each job's overrides come from the sweep)."""
    if any(a in ("-m", "--multirun") for a in argv):
        return argv
    given = [a for a in argv if "=" in a and not a.startswith("-")]
    values = {override_key(o): o.split("=", 1)[1] for o in given}
    resume = values.get("resume")
    if resume in (None, "null", "None"):
        return argv
    if resume == "auto":
        run_dir = Path(values["hydra.run.dir"]) if "hydra.run.dir" in values else None
    else:  # a checkpoint file: the run it belongs to (<run>/checkpoints/<file>)
        run_dir = Path(resume).parent.parent if Path(resume).parent.name == CHECKPOINTS else None
    saved_file = run_dir / OVERRIDES if run_dir is not None else None
    if saved_file is None or not saved_file.is_file():
        return argv
    import yaml

    try:
        saved = [str(o) for o in (yaml.safe_load(saved_file.read_text()) or [])]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{saved_file} cannot be read ({e}); the run's own overrides are the base of a resume: "
                          "fix or remove that file") from None
    # a group chosen now (precision=fp32) replaces the run's settings of that group (its precision.layers, ...)
    chosen = {k for k in values if "." not in k and "/" not in k}
    dropped = [o for o in saved if override_key(o).split(".", 1)[0] in chosen and "." in override_key(o)]
    if dropped:
        print(f"mptrain: resume: {', '.join(sorted({override_key(o).split('.', 1)[0] for o in dropped}))}= given now "
              f"replaces the run's own {' '.join(dropped)}", file=sys.stderr)
    base = [o for o in saved if override_key(o) not in values and o not in dropped]
    # beside the overrides given now: Hydra's parser takes its options (--config-dir X) before the overrides only
    at = argv.index(given[0])
    return saved_config_dirs(run_dir, argv, values) + argv[:at] + base + argv[at:]


CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def saved_config_dirs(run_dir: Path, argv: list[str], values: dict) -> list[str]:
    """Where the run found its own config groups (--config-dir, hydra.searchpath), when not given again now: its
    saved overrides may name groups only those hold (model=mine). From .hydra/hydra.yaml; [] if unreadable."""
    import yaml

    try:
        hydra_cfg = (yaml.safe_load((run_dir / HYDRA_SETTINGS).read_text()) or {}).get("hydra") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    found: list[str] = []
    if not any(a in CONFIG_DIR_FLAGS or a.startswith("--config-dir=") for a in argv):
        sources = (hydra_cfg.get("runtime") or {}).get("config_sources") or []
        for source in sources:
            if isinstance(source, dict) and source.get("provider") == "command-line" and source.get("schema") == "file":
                if not Path(source["path"]).is_dir():
                    raise ConfigError(f"the run was started with --config-dir {source['path']}, which is no longer a "
                                      "directory; pass the directory its config groups are in with --config-dir")
                found = ["--config-dir", source["path"]]
    if "hydra.searchpath" not in values:
        found += [o for o in ((hydra_cfg.get("overrides") or {}).get("hydra") or [])
                  if isinstance(o, str) and o.startswith("hydra.searchpath=")]
    if found:
        print(f"mptrain: resume: the run's own config directories are used again: {' '.join(found)}", file=sys.stderr)
    return found


# loggers whose INFO lines say nothing to a user: alembic's "setup plugin ..." when Optuna or MLflow opens
# its SQLite store (Hydra's logging shows every logger's INFO)
QUIET_LOGGERS = ("alembic",)


def quiet_third_party_logs() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def exit_at_once(message: str) -> None:
    """Exit 130 now, skipping atexit callbacks (DataLoader workers, TensorBoard, logging): a Ctrl-C there
    would print a traceback from inside them."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    print(f"mptrain: {message}", file=sys.stderr, flush=True)
    os._exit(130)


def main() -> None:
    # PyTorch's CPU allocator backs buffers of 2 MB and more with transparent huge pages only when this is set,
    # and reads it once, at its first allocation: so it is set here, before the run imports torch (this module
    # does not). On the development VM it made CPU training steps faster and run-to-run speed far steadier
    # (page faults per step fell ~10x; docs/benchmarks.md). THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        _main()
    finally:
        # mptrain's work is done (files written, exit code chosen): a Ctrl-C during the interpreter's
        # shutdown exits at once instead of raising KeyboardInterrupt inside an atexit callback
        with contextlib.suppress(ValueError):  # not the main thread: leave signals to the host program
            signal.signal(
                signal.SIGINT, lambda *_: exit_at_once("interrupted while exiting; the run's files are complete")
            )


def _main() -> None:
    outcome = SweepOutcome()

    def mptrain_job(cfg: DictConfig) -> float | None:
        return _job(cfg, outcome)

    check_sweeper_installed(sys.argv[1:])
    conf = register()
    quiet_third_party_logs()
    try:
        check_config_dirs(sys.argv[1:])
        check_override_keys(sys.argv[1:])
        sys.argv[1:] = continue_the_run(sys.argv[1:])
        hydra.main(version_base="1.3", config_path=conf, config_name=CONFIG_NAME)(mptrain_job)()
    except MptrainError as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        from mptrain.checkpoint.signals import InterruptedTwice

        if isinstance(e, InterruptedTwice):  # Ctrl-C twice: stopped at once, no checkpoint for this step
            exit_at_once("interrupted twice: stopped without saving a checkpoint; resume=auto continues from the "
                         "last one")
        # once, before a run began (Hydra composing, Python importing): there was nothing to save
        exit_at_once("interrupted before training began: nothing was trained or saved")
    if outcome.stopped_by is not None:
        name = signal.Signals(outcome.stopped_by).name
        print(f"mptrain: stopped: sweep stopped by {name}; unfinished jobs are recorded as interrupted "
              "(resume=auto continues them)", file=sys.stderr)
        sys.exit(128 + outcome.stopped_by)
    if outcome.failed:
        print(f"mptrain: error: {len(outcome.failed)} of {outcome.jobs} jobs failed: "
              + "; ".join(outcome.failed[:3]) + (" ..." if len(outcome.failed) > 3 else ""), file=sys.stderr)
        sys.exit(outcome.exit_code)


if __name__ == "__main__":
    main()
