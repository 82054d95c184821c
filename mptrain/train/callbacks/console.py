"""What the terminal shows: the config tree at start, one progress bar (or plain lines where there is no
terminal) while training, and the summary table at the end."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from omegaconf import DictConfig
from rich.console import Console as RichConsole
from rich.table import Table
from rich.text import Text
from rich.tree import Tree
from tqdm import tqdm

from mptrain.run.directory import DeferredFileHandler
from mptrain.train.callbacks.base import Callback

log = logging.getLogger("mptrain")


ROW_LINE = "step %d  loss %.4f  lr %.3g  scale %g%s"  # a metrics row as a log line (and in train.log)


class Console(Callback):
    """One display: on a terminal, a progress bar with log lines printed above it (never into it); elsewhere
    (CI, SLURM, `| tee`) no animation, one plain line per metrics row."""

    def __init__(self, enabled: bool = True, total: int = 0, initial: int = 0):
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, leave=False, disable=not self.interactive)

    def on_step_end(self, c, state, out) -> None:
        self.bar.update(1)

    def row(self, row: dict) -> None:
        """Show a metrics row: in the bar's postfix on a terminal, else as one log line. train.log gets the
        same line either way."""
        norm = f"  grad_norm {row['grad_norm']:.3g}" if row.get("grad_norm") is not None else ""
        args = (row["step"], row["loss"], row["lr"], row["loss_scale"], norm)
        if not self.interactive:
            log.info(ROW_LINE, *args)
            return
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.3g}", scale=f"{row['loss_scale']:g}",
                             refresh=False)
        # the bar shows the row on the terminal; the log files get the line they get without a terminal
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, ROW_LINE, args, None)
        for handler in logging.getLogger().handlers + log.handlers:
            if isinstance(handler, (logging.FileHandler, DeferredFileHandler)) and record.levelno >= handler.level:
                handler.handle(record)

    @contextlib.contextmanager
    def logging_above(self) -> Iterator[None]:
        """Route console log lines through tqdm.write while the bar is shown (file handlers untouched)."""
        if not self.interactive:
            yield
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            yield

    def close(self) -> None:
        self.bar.close()


FIRST = ("model", "task", "dataset", "precision")  # the config tree's first groups, in this order


def print_config_tree(cfg: DictConfig, choices: dict | None = None, overrides: list[str] | None = None,
                      console: RichConsole | None = None) -> None:
    """The run's config in a few lines: each group's choice and the command-line overrides. The whole
    composed config is in <run>/.hydra/config.yaml (and `mptrain --cfg job` prints it)."""
    console = console or RichConsole()
    tree = Tree(
        "[bold]config[/bold] [dim](in full: <run>/.hydra/config.yaml; mptrain --cfg job)[/dim]", guide_style="dim"
    )
    # Hydra lists the choices last group first: show them in the defaults list's order, what is trained first
    # (conf/config.yaml lists optimizer and scheduler before model, so that a model's entry can choose them)
    groups = {k: v for k, v in reversed(list((choices or {}).items()))
              if v is not None and "/" not in k and not k.startswith("hydra")}
    groups = dict(sorted(groups.items(), key=lambda kv: FIRST.index(kv[0]) if kv[0] in FIRST else len(FIRST)))
    if groups:
        tree.add("  ".join(f"[bold]{k}[/bold]={v}" for k, v in groups.items()))
    if overrides:
        tree.add(Text("overrides: " + " ".join(overrides)))  # as typed, not read as markup (body.\[13\])
    console.print(tree)


SUMMARY_ROWS = ("status", "precision", "compute_dtype", "steps", "epochs", "skipped_steps", "final_loss_scale",
                "train_loss", "val/", "samples_per_s", "peak_memory_mb", "wall_s")  # "val/": every validation metric


def summary_rows(summary: dict) -> list[str]:
    """The keys the summary table shows, in order: every validation metric the task reports (val/loss,
    val/acc, val/ppl, a custom task's own) where "val/" stands."""
    keys: list[str] = []
    for key in SUMMARY_ROWS:
        keys += [k for k in summary if k.startswith("val/")] if key == "val/" else [key] * (key in summary)
    return keys


def print_summary(summary: dict, console: RichConsole | None = None) -> None:
    console = console or RichConsole()
    table = Table(title="mptrain summary", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key in summary_rows(summary):
        value = summary[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
