"""`mptrain --help`: names mptrain, says what each group is for, lists the real choices only."""

from __future__ import annotations

import re
import textwrap

from mptrain.cli.help import PURPOSE

from .conftest import CONF, run_cli


def groups_in_help(text: str) -> dict[str, set[str]]:
    """{group: choices} parsed from the help's groups block (a group line, then indented choice lines)."""
    block = text.split("Config groups", 1)[1].split("Common commands:", 1)[0].splitlines()[1:]
    groups: dict[str, set[str]] = {}
    current = None
    for line in block:
        if re.match(r"^  \S", line):
            current = line.split()[0]
            groups[current] = set()
        elif line.strip() and current is not None:  # "a, b*" or "label: a = x, b = y"
            items = line.split(": ", 1)[-1].split(",")
            groups[current] |= {c.split(" = ")[0].strip().rstrip("*") for c in items if c.strip()}
    return groups


def test_help_lists_each_group_its_purpose_and_only_the_real_choices(tmp_path):
    proc = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("mptrain")
    assert "powered by Hydra" not in text and "_schema" not in text
    for group, purpose in PURPOSE.items():
        assert f"  {group:<12} {purpose}" in text
    # the choices are exactly conf/<group>/*.yaml; the experiment arms (conf/arm/) stay hidden
    expected = {g: {p.stem for p in (CONF / g).glob("*.yaml")} for g in PURPOSE}
    assert groups_in_help(text) == expected
    assert "arm" not in groups_in_help(text) and (CONF / "arm").is_dir()
    commands = text.split("Common commands:", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    assert len(commands) == 8 and all(c.strip().startswith("mptrain") for c in commands)


def test_help_marks_the_current_choices(tmp_path):
    proc = run_cli(["--help", "model=resnet18", "debug=fast"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resnet18*" in proc.stdout and "fast*" in proc.stdout and "cnn*" not in proc.stdout
    assert "digits*" in proc.stdout  # the default stays marked


def test_help_shows_a_users_own_config_dir_entries(tmp_path):
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "my_mlp.yaml").write_text(textwrap.dedent("""
        _target_: mymodels.MyMLP
        num_classes: ${dataset.num_classes}
    """))
    proc = run_cli(["--config-dir", str(tmp_path / "myconf"), "--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "my_mlp" in groups_in_help(proc.stdout)["model"]


def test_help_lists_the_everyday_presets_apart_from_aliases_and_the_papers_ablations(tmp_path):
    proc = run_cli(["--help", "precision=bf16-mixed"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split("\n  precision ", 1)[1].split("\n  optimizer ", 1)[0].splitlines()[1:]
    assert " ".join(line.strip() for line in block) == (
        "amp, auto, bf16, bf16_pure, dynamic, fp32, fp8, master "
        "other tools' names: 16-mixed = dynamic, 32-true = fp32, bf16-mixed* = bf16, bf16-true = bf16_pure, "
        "transformer-engine = fp8 "
        "the paper's ablations: noscale, nomaster, static")
