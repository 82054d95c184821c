"""The training step reaches the optimizer through a few calls (issue 33): from the loop (train/loop.fit) through
the step (train/step.train_step) and the precision's step (Precision.step, which unscales, clips and skips), and
nothing else. A new layer between them is a choice to make here, not by accident."""

from __future__ import annotations

import traceback

import torch.optim.optimizer as optimizer_module

import mptrain

# the frames of mptrain between the loop and torch's optimizer.step, in call order
EXPECTED = [("train/loop.py", "fit"), ("train/step.py", "train_step"), ("precision/engine.py", "step")]


def test_optimizer_step_is_three_frames_below_the_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stacks = []

    def hook(opt, args, kwargs):
        if not stacks:
            stacks.append(traceback.extract_stack()[:-1])

    handle = optimizer_module.register_optimizer_step_pre_hook(hook)
    try:
        mptrain.train(["trainer.max_steps=1", "dataset=synthetic", "model=mlp", "precision=fp32",
                       f"hydra.run.dir={tmp_path / 'run'}"])
    finally:
        handle.remove()
    assert stacks, "the optimizer never stepped"
    ours = [(f.filename.split("mptrain/", 1)[-1], f.name) for f in stacks[0]
            if "/mptrain/" in f.filename and "/tests/" not in f.filename]
    loop = ours.index(("train/loop.py", "fit"))
    assert ours[loop:] == EXPECTED, ours
