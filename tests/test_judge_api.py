"""The judgement in your own loop (issue 40 part 2): mptrain.precision.measure / Report.plan / apply on a model
mptrain never built, in a plain PyTorch loop."""

from __future__ import annotations

import torch
from torch import nn

import mptrain.precision as mp

from .judge_nets import Outlier


def batches(n: int = 3):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    return nn.functional.cross_entropy(logits.float(), y)


def test_the_outlier_layer_stays_out_of_fp8_and_the_other_converts():
    torch.manual_seed(0)
    model = Outlier()
    params = list(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before: it must keep working after apply
    report = mp.measure(model, batches(), loss_fn, formats=["fp8", "bf16"], dim_multiple=1)
    errors = report.errors()
    assert errors["mid1"]["fp8"] > 0.9 > 0.1 > errors["mid2"]["fp8"]  # the 1e8 channel flushes mid1's inputs
    assert all(p.grad is None for p in model.parameters())  # measured, nothing applied or left behind
    plan = report.plan(tolerance=0.1, objective="bits")
    assert plan["mid1"] == "bf16" and plan["mid2"] == "fp8"
    done = mp.apply(model, plan, autocast="bf16", dim_multiple=1)
    assert type(model.mid2).__name__ == "Float8Linear" and type(model.mid1) is nn.Linear
    assert done["converted"]["mid2"] == "fp8" and done["emulated"]["mid2"] == "fp8"  # no fp8 kernels on a CPU
    assert all(a is b for a, b in zip(model.parameters(), params))
    for batch in batches(2):  # the user's own loop trains on
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    assert torch.isfinite(loss_fn(model, batches(1)[0]))


def test_time_never_picks_a_format_emulated_here():
    torch.manual_seed(0)
    model = Outlier()
    report = mp.measure(model, batches(1), loss_fn, formats=["mxfp4", "bf16"])
    plan = report.plan(tolerance=10.0, objective="time", repeats=1)  # every format holds at this tolerance
    assert "mxfp4" not in plan.values() and set(plan.values()) <= {"bf16", "fp32"}
    assert report.plan(tolerance=10.0, objective="bits")["mid2"] == "mxfp4"


def test_the_docs_loop_runs_as_written(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "python.md").read_text()
    block = text.split("## The judgement in your own loop")[1].split("```python")[1].split("```")[0]
    exec(compile(block, "docs/python.md", "exec"), {"__name__": "docs"})
    out = capsys.readouterr().out
    assert "'1': 'fp8'" in out and out.strip().splitlines()[-1].startswith("loss ")
