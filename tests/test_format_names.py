"""A format's name is spelled only in the registry (mptrain/precision/formats/) and the preset table (issue 33):
everything else asks the registry or refers to its named constants (FP32, BF16, FP16, FP8 ...).

Record keys and config values that are format names (a row's "fp8" layers, on_min=bf16, an advice's "fp16" plan)
are spelled through those constants too, so a rename is one edit."""

from __future__ import annotations

import ast
from pathlib import Path

from mptrain.precision.formats import BUILTINS

REPO = Path(__file__).resolve().parent.parent
# the registry and the preset table (families.PRESETS; config.PRESET_FAMILIES and FP8_RECIPES mirror it), and
# pyproject's extra names (library/extras.py: mptrain[fp8] installs torchao; the library layer imports no precision)
HOME = ("mptrain/precision/formats/", "mptrain/precision/families.py", "mptrain/config.py",
        "mptrain/library/extras.py")
# format names and their short aliases, and torchao's recipe names (precision.dtype's float32 / float16 / bfloat16
# are config values, not names of the registry: not counted)
NAMES = (set(BUILTINS) | {"e4m3", "e5m2", "mxfp6", "tensorwise", "rowwise", "rowwise_with_gw_hp"})


def spelled(source: str) -> list[tuple[int, str]]:
    """(line, name) of every string constant that is a format name, docstrings aside."""
    tree = ast.parse(source)
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            docs.add(id(body[0].value))
    return sorted((n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant)
                  and isinstance(n.value, str) and n.value in NAMES and id(n) not in docs)


def test_format_names_live_in_the_registry():
    where = {}
    for path in sorted((REPO / "mptrain").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel.startswith(HOME):
            continue
        hits = spelled(path.read_text())
        if hits:
            where[rel] = hits
    assert not where, f"format names spelled outside the registry (ask it, or use its constants): {where}"


def test_the_check_finds_a_spelled_name():
    assert spelled('"""fp8 in a docstring is prose."""\nx = "bf16"\nif f == "nvfp4":\n    pass\n') == [
        (2, "bf16"), (3, "nvfp4")]
