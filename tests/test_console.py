"""The console: on a terminal, one progress bar with log lines above it (never inside it); elsewhere, no
carriage-return animation and one plain line per metrics row."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from .conftest import REPO, run_cli

RUN = ["model=mlp", "model.width=16", "model.depth=2", "trainer.device=cpu", "trainer.max_steps=30",
       "trainer.log_every=10", "trainer.eval_every=15", "trainer.tensorboard=false", "diagnostics=off",
       "checkpoint.enabled=false"]


def logged_rows(run_dir) -> list[str]:
    """The steps of the metrics rows in train.log, each in the plain line format."""
    return re.findall(
        r"\[mptrain\]\[INFO\] - step (\d+)  loss [\d.]+  lr [\d.e-]+  scale \d+", (run_dir / "train.log").read_text()
    )


@pytest.mark.slow
def test_without_a_terminal_one_plain_line_per_row_and_no_animation(tmp_path):
    proc = run_cli([*RUN, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    rows = re.findall(r"step (\d+)  loss [\d.]+  lr", proc.stdout)
    assert rows == ["10", "20", "30"]
    assert logged_rows(tmp_path / "run") == ["10", "20", "30"]
    assert len(re.findall(r"step (\d+)  val/loss", proc.stdout)) == 2


@pytest.mark.slow
def test_on_a_terminal_log_lines_print_above_the_bar_never_inside_it(tmp_path):
    """Run under a pseudo-terminal; after carriage returns are applied, a line holding a log record holds
    nothing of the bar (`%|`), and the bar itself was drawn."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([sys.executable, "-m", "mptrain", *RUN, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path,
                            stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=300) == 0, out.decode(errors="replace")[-3000:]
    text = out.decode(errors="replace")
    assert "%|" in text  # the bar was drawn on the terminal
    assert not re.search(r"step \d+  loss [\d.]+  lr", text)  # on the terminal the rows are the bar's postfix
    assert logged_rows(tmp_path / "run") == ["10", "20", "30"]  # train.log: the same rows as without a terminal
    logged = [line for line in text.split("\n") if "[mptrain][INFO]" in line]
    assert any("val/acc" in line for line in logged)
    for line in logged:
        visible = [part for part in line.split("\r") if part.strip()]
        # the record is a part of its own: nothing of the bar before it on the same visible line
        record = next(part for part in visible if "[mptrain][INFO]" in part)
        assert "%|" not in record and record.lstrip().startswith("["), repr(line)


def test_the_config_tree_prints_the_overrides_as_typed():
    """rich would read `\\[13\\]` (Hydra's escaped bracket) as markup and print `[13\\]`."""
    import io

    from omegaconf import OmegaConf
    from rich.console import Console as RichConsole

    from mptrain.train.callbacks.console import print_config_tree

    typed = ["precision.layers={body.\\[13\\]: fp32}", "trainer.tags=[bold]"]
    out = io.StringIO()
    print_config_tree(OmegaConf.create({}), {}, typed, console=RichConsole(file=out, width=200))
    assert "overrides: " + " ".join(typed) in out.getvalue()


def test_the_config_tree_lists_the_model_first_whatever_the_defaults_order():
    # conf/config.yaml lists optimizer and scheduler before model (a model's entry may choose them); Hydra's
    # choices come last group first: the tree still reads model, dataset, precision, optimizer, ...
    import io

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from rich.console import Console as RichConsole

    from mptrain.train.callbacks.console import print_config_tree

    from .conftest import CONF

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            choices = dict(compose(config_name="config", return_hydra_config=True).hydra.runtime.choices)
    finally:
        GlobalHydra.instance().clear()
    out = io.StringIO()
    print_config_tree(OmegaConf.create({}), choices, [], console=RichConsole(file=out, width=300))
    line = out.getvalue().splitlines()[1].split()
    assert line[1:7] == ["model=cnn", "dataset=digits", "precision=amp", "optimizer=sgd", "scheduler=cosine",
                         "trainer=default"], line
