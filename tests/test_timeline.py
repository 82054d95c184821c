"""mptrain-report's precision timeline (issue 35 part 3): each layer's format over the steps, from
precision_plan.json's history."""

from __future__ import annotations

import json

import pytest

from mptrain.tools.report import make_report
from mptrain.tools.timeline import formats_over_steps

from .test_schedule import BASE


def test_segments_follow_the_history():
    """auto probes in bf16, plans fp8 at step 3; fc2 demoted at 8, promoted at 18; a switch to bf16 after 20:
    each change takes effect from the next step."""
    plan = {
        "fc1": {"format": "bf16"},
        "fc2": {"format": "bf16"},
        "history": [
            {"step": 3, "event": "plan", "probe": "bf16", "formats": {"fc1": "fp8", "fc2": "fp8"}},
            {"step": 8, "event": "demote", "changes": [{"layer": "fc2", "old": "fp8", "new": "bf16"}]},
            {"step": 18, "event": "promote", "changes": [{"layer": "fc2", "old": "bf16", "new": "fp8"}]},
            {
                "step": 20,
                "event": "switch",
                "before": {"fc1": "fp8", "fc2": "fp8"},
                "formats": {"fc1": "bf16", "fc2": "bf16"},
            },
        ],
    }
    assert formats_over_steps(plan, 30) == {
        "fc1": [(1, 3, "bf16"), (4, 20, "fp8"), (21, 30, "bf16")],
        "fc2": [(1, 3, "bf16"), (4, 8, "fp8"), (9, 18, "bf16"), (19, 20, "fp8"), (21, 30, "bf16")],
    }


@pytest.mark.slow
def test_report_draws_the_timeline_of_a_switched_run_without_diagnostics(tmp_path):
    _, run = train_switched(tmp_path)
    (path,) = make_report(run)
    assert path.name == "precision_timeline.png" and path.stat().st_size > 0
    segments = formats_over_steps(json.loads((run / "precision_plan.json").read_text()), 6)
    assert segments["head"] == [(1, 2, "bf16"), (3, 6, "fp32")] and segments["body.1"] == [(1, 6, "bf16")]


def train_switched(tmp_path):
    from .conftest import train

    return train(tmp_path, BASE + ["precision=bf16", "precision.schedule=[{at: 2, layers: {head: fp32}}]",
                                   "checkpoint.enabled=false"])
