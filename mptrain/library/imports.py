"""A config's `_target_` whose module was found but failed while importing: the error that module raised, with
its file and line, instead of "cannot be imported ... put its module on PYTHONPATH", which would send the user
looking for a path problem that is not there."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from hydra.utils import get_object

from mptrain.errors import ConfigError

# modules that moved when the package was laid out in subpackages: saved `_target_`s and users' own modules may
# still name the old ones
MOVED_MODULES = {"mptrain.tasks.": "mptrain.library.tasks.", "mptrain.gan.": "mptrain.library.models.gan.",
                 "mptrain.models.": "mptrain.library.models.vision.",
                 "mptrain.language_models.": "mptrain.library.models.language.",
                 "mptrain.hydra_callbacks.": "mptrain.cli.hydra_callbacks."}


def _where(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    return f" at {frames[-1].filename}:{frames[-1].lineno} ({(frames[-1].line or '').strip()})" if frames else ""


def import_failure(key: str, target: str, exc: BaseException) -> ConfigError | None:
    """The ConfigError for `key._target_=target` when importing its module raised `exc` (Hydra's ImportError
    wraps it as its cause); None when the module itself is not there (the caller's "cannot be imported")."""
    inner = exc.__cause__ if isinstance(exc, ImportError) else None
    if not isinstance(inner, Exception):
        return None  # not an import that raised (e.g. a target that is not a class)
    if isinstance(inner, ModuleNotFoundError) and inner.name and (target + ".").startswith(inner.name + "."):
        return None  # the target's own module (or the target itself) is missing
    name = f"{inner.name}." if isinstance(inner, ModuleNotFoundError) and inner.name else None
    moved = f"; {name[:-1]} is now {MOVED_MODULES[name][:-1]}" if name in MOVED_MODULES else ""
    message = inner.msg if isinstance(inner, SyntaxError) else (str(inner).splitlines() or [""])[0]
    return ConfigError(f"{key}._target_={target}: its module was found but importing it failed with "
                       f"{type(inner).__name__}: {message}{_where(inner)}{moved}; fix that import")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def locate(key: str, target: str, fix: str) -> Any:
    """What `key._target_=target` names, imported (Hydra's get_object, without the ERROR lines it logs: the
    error is said once, in one line). A module that is not there: "cannot be imported (why); {fix}"; one that
    raised while importing: that error (import_failure)."""
    quiet = logging.getLogger("hydra.utils")
    before, quiet.disabled = quiet.disabled, True
    try:
        return get_object(target)
    except Exception as e:
        failed = import_failure(key, target, e)
        if failed is not None:
            raise failed from None
        raise ConfigError(
            f"{key}._target_={target} cannot be imported ({_first_line(e.__cause__ or e)}); {fix}"
        ) from None
    finally:
        quiet.disabled = before
