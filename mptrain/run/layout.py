"""The one JSONL reader for run files (metrics.jsonl, diagnostics.jsonl), and what makes a record JSON-safe.

A process killed mid-write can leave a torn final line: it is dropped with a warning, since the
checkpoint that a resume continues from never covers it. A bad line anywhere else means the file
was edited or damaged, and is an error naming the file and the line.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from mptrain.errors import MptrainError

log = logging.getLogger("mptrain")


def json_safe(value):
    """Non-finite floats become null at any depth (JSON has no inf/NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


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
