"""precision.schedule under FSDP2 (issue 36): a switch that keeps the dtype FSDP2 gathers the weights in (fixed
when the model was sharded) converts the sharded modules in place, and equals a stop at that step and a resume
into the new precision; a switch that would change that dtype is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import read_jsonl
from .test_distributed import BASE, torchrun
from .test_distributed_resume import flatten
from .test_plan import needs_torchao

FSDP = [*BASE, "trainer.strategy=fsdp", "optimizer.lr=0.05"]
STEPS, AT = 6, 3


def schedule(preset: str) -> str:
    return f"precision.schedule=[{{at: {AT}, preset: {preset}}}]"


def final(run) -> dict:
    """The model and optimizer state after the last step, read back from the sharded checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(run / "checkpoints" / "sharded" / f"step_{STEPS}", run / "final.pt")
    state = torch.load(run / "final.pt", weights_only=True)
    return {**flatten(state["model"], "model."), **flatten(state["optim"], "optim.")}


CASES = [
    # torchao's Float8Linear (emulated on a CPU) back to Linear under bf16 autocast: both gather bf16 weights
    pytest.param(["precision=fp8", "precision.fp8.dim_multiple=1"], "bf16", marks=needs_torchao, id="fp8-bf16"),
    # a per-layer plan gathers float32 weights: bf16 autocast with an fp32 head, then fp32 throughout
    pytest.param(["precision=bf16", "precision.layers={head: fp32}"], "fp32", id="bf16-layers-fp32"),
]


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize(("start", "target"), CASES)
def test_fsdp_switch_equals_a_stop_and_a_resume_into_the_new_precision(tmp_path, start, target):
    switch = torchrun([*FSDP, *start, schedule(target), f"trainer.max_steps={STEPS}",
                       f"hydra.run.dir={tmp_path}/switch"], cwd=tmp_path)
    assert switch.returncode == 0, switch.stderr[-3000:]
    ref = tmp_path / "restart"
    stop = torchrun([*FSDP, *start, f"trainer.max_steps={AT}", f"hydra.run.dir={ref}"], cwd=tmp_path)
    assert stop.returncode == 0, stop.stderr[-3000:]
    resumed = [o for o in start if not o.startswith("precision=")] + [f"precision={target}", "resume=auto"]
    resume = torchrun([*FSDP, *resumed, f"trainer.max_steps={STEPS}", f"hydra.run.dir={ref}"], cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr[-3000:]

    got, want = final(tmp_path / "switch"), final(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k  # the same ranks, the same sums: bitwise
    run = tmp_path / "switch"
    (row,) = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "precision_switch"]
    first = start[0].removeprefix("precision=")
    assert (row["step"], row["from"], row["to"]) == (AT + 1, first, target)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compute_dtype"] == target and summary["world_size"] == 2
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses == [r["loss"] for r in read_jsonl(ref / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow  # torchrun
def test_fsdp_switch_that_changes_the_gathered_dtype_is_refused_in_one_line(tmp_path):
    proc = torchrun([*FSDP, "precision=bf16", schedule("fp32"), f"trainer.max_steps={STEPS}",
                     f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode != 0
    assert ("the switch after step 3 (preset=fp32) is refused: trainer.strategy=fsdp gathers the weights in bfloat16 "
            "(FSDP2's param_dtype, fixed when the model was sharded) and precision=fp32 needs them in float32; stop "
            "and resume into it (resume=auto precision=fp32)") in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
