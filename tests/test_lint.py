"""ruff's rules (pyproject's [tool.ruff]: pyflakes, pycodestyle with lines of at most 120 characters, import order,
bugbear, pyupgrade) hold over the package, the tests and the scripts: `make test` fails on a new long line or an
unused import, not only `make lint` (issue 33: long lines had gone unchecked)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert exe, "ruff is a dev dependency (pip install -e .[dev])"
    return [exe]


def test_ruff_is_clean():
    done = subprocess.run([*ruff(), "check", "--output-format", "concise", "mptrain", "tests", "scripts"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


def test_the_line_rule_is_on(tmp_path):
    """The check above must be able to fail on a long line: pyproject's own settings find one."""
    bad = tmp_path / "long.py"
    bad.write_text("x = '" + "a" * 130 + "'\n")
    done = subprocess.run([*ruff(), "check", "--config", str(REPO / "pyproject.toml"), "--output-format", "concise",
                           str(bad)], capture_output=True, text=True)
    assert done.returncode == 1 and "E501" in done.stdout, done.stdout
