"""The package layout is the architecture (docs/design.md): imports go one way, and the run directory's file
names are spelled in one module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mptrain.run import layout

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mptrain"

# lower layers never import higher ones; a layer may import its own (the middle layer's packages each other)
LAYERS = {
    "mptrain": 0, "mptrain.errors": 0, "mptrain.config": 0,
    "mptrain.library": 1,
    "mptrain.precision": 2, "mptrain.diagnostics": 2, "mptrain.checkpoint": 2, "mptrain.run": 2,
    "mptrain.parallel": 2,
    "mptrain.train": 3,
    "mptrain.cli": 4, "mptrain.tools": 4,
    "mptrain.__main__": 5, "mptrain.api": 5,
}
# the one way up: the Python API's names, imported on first use (mptrain.train is the callable mptrain/train
# package, mptrain.evaluate / sample are mptrain.api's), so that `import mptrain` alone stays cheap
LAZY_API = {("mptrain", "mptrain.api"), ("mptrain.train", "mptrain.api")}


def layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        mod = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[mod.removesuffix(".__init__")] = path
    return out


def imports(mod: str, path: Path) -> set[str]:
    """Every mptrain module `path` imports, at top level, inside functions and under TYPE_CHECKING."""
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}  # `from mptrain.x import module`
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "mptrain" or m.startswith("mptrain.")}


def test_every_module_has_a_layer():
    assert all(layer(m) is not None for m in modules())


def test_imports_go_one_way():
    """cli/tools -> train -> precision, diagnostics, checkpoint, run, parallel -> library -> config, errors."""
    wrong = [f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
             for mod, path in sorted(modules().items()) for dep in sorted(imports(mod, path))
             if layer(dep) > layer(mod) and not any(mod == m and (dep == d or dep.startswith(d + "."))
                                                    for m, d in LAZY_API)]
    assert not wrong, "\n".join(wrong)


def test_the_layer_rule_catches_a_reverse_import(tmp_path):
    # the check above must be able to fail: library importing train is a reverse import
    path = tmp_path / "bad.py"
    path.write_text("from mptrain.train.recipe import build\n")
    assert {layer(d) for d in imports("mptrain.library.bad", path)} == {3} and layer("mptrain.library.bad") == 1


def run_dir_names() -> set[str]:
    names = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str) and "{" not in v}
    names |= {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, tuple)
              for v in v if isinstance(v, str)}
    # ordinary words too; their constants are used all the same
    return names - {"report", "comparison", "profile", "samples", "export"}


def spelled_names(path: Path, names: set[str]) -> list[str]:
    """String literals (docstrings aside) that are a run-directory file name, or a path ending in one."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            last = re.split(r"[/ ]", node.value.strip())[-1]
            if node.value in names or last in names:
                out.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    return out


def name_sources() -> set[str]:
    """Modules whose names run/layout.py re-exports (a tokenizer's own file names): they define them."""
    tree = ast.parse((PACKAGE / "run" / "layout.py").read_text())
    return {
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        and (n.module or "").startswith("mptrain.")
        and any(a.name.isupper() for a in n.names)
    }


def test_no_module_outside_run_spells_a_run_directory_file_name():
    names = run_dir_names()
    assert {"summary.json", "metrics.jsonl", "diagnostics.jsonl", "last.pt", "vocab.json"} <= names
    found = [hit for mod, path in modules().items() if not mod.startswith("mptrain.run") and mod not in name_sources()
             for hit in spelled_names(path, names)]
    assert not found, "\n".join(found)


def test_the_file_name_check_catches_a_literal(tmp_path):
    path = REPO / "mptrain" / "_probe_literal.py"  # inside the package: spelled_names reports it relative to REPO
    try:
        path.write_text('from pathlib import Path\np = Path("run") / "summary.json"\n')
        assert spelled_names(path, run_dir_names()) == ["mptrain/_probe_literal.py:2: 'summary.json'"]
    finally:
        path.unlink()


def test_import_mptrain_has_no_side_effects():
    import os
    import subprocess
    import sys

    code = ("import os, sys; before = dict(os.environ); import mptrain; "
            "from hydra.core.config_store import ConfigStore; "
            "assert dict(os.environ) == before, 'environment changed'; "
            "assert not any(k.startswith('mptrain') for k in ConfigStore.instance().repo), 'schemas registered'; "
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"})
    assert proc.returncode == 0, proc.stderr


def schema_defaults(node) -> dict:
    """The literal defaults a schema states (interpolations and MISSING aside)."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(node):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value is dataclasses.MISSING or (isinstance(value, str) and ("${" in value or value == "???")):
            continue
        out[f.name] = value
    return out


def test_conf_entries_name_only_what_differs_from_their_schema():
    import yaml

    from mptrain.cli.register import SCHEMAS

    schemas = {(g, n): node for g, n, node in SCHEMAS}
    restated = []
    for path in sorted((REPO / "conf").rglob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        group = path.parent.name
        names = [d for d in data.get("defaults", []) if isinstance(d, str) and d.endswith("_schema")]
        if not names or (group, names[0]) not in schemas:
            continue
        defaults = flat(schema_defaults(schemas[(group, names[0])]))
        restated += [
            f"{path.relative_to(REPO)}: {k}: {v!r}"
            for k, v in flat(data).items()
            if k in defaults
            and (v == defaults[k] or (isinstance(defaults[k], (list, tuple)) and list(defaults[k]) == v))
        ]
    assert not restated, "the schema states these already:\n" + "\n".join(restated)


def flat(values: dict, prefix: str = "") -> dict:
    """Nested mappings and schema dataclasses as dotted keys (fp8.recipe, loss_scale.kind): a restated nested
    default is found too (issue 33)."""
    import dataclasses

    out = {}
    for k, v in values.items():
        if dataclasses.is_dataclass(v):
            v = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_restated_defaults_check_sees_nested_keys():
    assert flat({"fp8": {"recipe": "tensorwise", "include": []}, "mode": "fp8"}) == {
        "fp8.recipe": "tensorwise", "fp8.include": [], "mode": "fp8"}


def test_builders_take_their_defaults_from_the_schema():
    """A model or dataset builder named by a schema's _target_ does not restate the schema's defaults as literals."""
    import importlib
    import inspect

    from mptrain.cli.register import SCHEMAS

    restated = []
    for _, _, node in SCHEMAS:
        target = getattr(node, "_target_", None)
        if not isinstance(target, str) or not target.startswith("mptrain."):
            continue
        module, name = target.rsplit(".", 1)
        obj = getattr(importlib.import_module(module), name)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        tree = ast.parse(inspect.getsource(fn).lstrip())
        args = tree.body[0].args
        pairs = list(zip(args.args[len(args.args) - len(args.defaults):], args.defaults))
        pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        defaults = schema_defaults(node)
        restated += [f"{target}({a.arg}={ast.unparse(d)})" for a, d in pairs
                     if a.arg in defaults and isinstance(d, ast.Constant) and d.value is not None]
    assert not restated, "stated in the schema already; take it from there:\n" + "\n".join(restated)
