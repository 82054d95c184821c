"""Shared fixtures: compose configs with Hydra's compose API, shrink runs, run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mptrain.cli.register import register

CONF = Path(register())
REPO = Path(__file__).resolve().parent.parent
# Small and quiet: CPU, no progress bar or TensorBoard unless a test asks for them.
TINY = ["trainer.device=cpu", "trainer.progress_bar=false", "trainer.tensorboard=false"]


def compose_config(overrides: list[str] | None = None, config_path: Path = CONF):
    """The composed config, as `mptrain <overrides>` would see it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_path), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides or []))
    finally:
        GlobalHydra.instance().clear()


def train(tmp_path: Path, overrides: list[str]) -> tuple[dict, Path]:
    """Run the recipe in this process on a composed config; return (summary, run_dir)."""
    from mptrain.config import validate
    from mptrain.train.recipe import run

    cfg = compose_config(TINY + overrides)
    validate(cfg)
    run_dir = tmp_path / "run"
    return run(cfg, run_dir), run_dir


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m mptrain ARGS` in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)  # the user's view: Hydra's short messages
    return subprocess.run([sys.executable, "-m", "mptrain", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Tests share a process, like Hydra multirun jobs: nothing global may leak between them."""
    m = torch.backends.cuda.matmul
    before = (torch.are_deterministic_algorithms_enabled(), m.allow_fp16_reduced_precision_reduction,
              m.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.benchmark, m.allow_tf32,
              torch.backends.cudnn.allow_tf32)
    yield
    after = (torch.are_deterministic_algorithms_enabled(), m.allow_fp16_reduced_precision_reduction,
             m.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.benchmark, m.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    assert after == before, "a run leaked a global torch setting"

