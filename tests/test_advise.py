"""mptrain-advise: the scale rule on hand-made histograms, and the advice on real runs."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from mptrain.diagnostics.stats import range_stats, update_ratio_hist
from mptrain.errors import TrainingFailed
from mptrain.tools.advise import (
    FORMATS,
    advise_run,
    decide,
    fits,
    from_recorded,
    layer_plan,
    not_measured,
    overflow,
    overflow_cap,
    run_command,
    s_high,
    scale_plan,
    underflow,
    update_fractions,
)

from .conftest import train

FP16 = FORMATS["fp16"]
SMALL_GRADS = ["model=mlp", "trainer.loss_weight=7.62939453125e-06", "optimizer.lr=6553.6",  # 2^-17, 0.05 * 2^17
               "optimizer.weight_decay=0"]


def recorded(values: np.ndarray, scale: float = 1.0):
    """The statistic the collector records for these gradient values at loss scale `scale`, read back raw."""
    stats = range_stats([torch.from_numpy(values.astype(np.float32))], ["w"], scale=scale)
    return from_recorded(stats.overall, scale)


@pytest.mark.parametrize("run_scale", [1.0, 2.0**10, 2.0**16])
def test_hand_made_histogram_2_pow_minus_30_to_minus_10(run_scale):
    """Values only at 2^-30 .. 2^-10: the bulk clears 2^-23 from S = 2^7; 2^-10 * 2^25 = 32768 <= 65504 < 2^16,
    so S <= 2^25; the pick is the middle, 2^16. The same whatever scale the run recorded them at."""
    values = np.exp2(np.arange(-30, -9, dtype=np.float64)).repeat(10)
    h = recorded(values, run_scale)
    plan = scale_plan(h, FP16)
    assert (plan["s_lo"], plan["s_hi"], plan["s"]) == (7, 25, 16)
    assert plan["workable"] and plan["underflow"] == 0.0 and plan["overflow"] == 0.0
    # without scaling, the binades 2^-30 .. 2^-25 (6 of 21) are below 2^-24
    assert underflow(h, FP16, 0) == pytest.approx(6 / 21)


def test_tail_below_the_bulk_is_ignored_up_to_0_1_percent():
    bulk = np.exp2(np.arange(-30, -9, dtype=np.float64)).repeat(100)  # 2100 values
    assert scale_plan(recorded(np.concatenate([bulk, [2.0**-36] * 2])), FP16)["s_lo"] == 7  # 0.095%: tail
    assert scale_plan(recorded(np.concatenate([bulk, [2.0**-36] * 30])), FP16)["s_lo"] == 13  # 1.4%: bulk


def test_fractions_and_top_scale_match_numpy_on_random_values():
    rng = np.random.default_rng(0)
    g = (np.exp2(rng.uniform(-42, 5, 20000)) * rng.choice([-1, 1], 20000)).astype(np.float32)
    h = recorded(g, 2.0**3)  # recorded from 2^-43 up: every value in a binade of its own
    a = np.abs(g.astype(np.float64))
    for name, fmt in FORMATS.items():
        for s in (-8, 0, 7, 20):
            assert underflow(h, fmt, s) == pytest.approx(np.mean(a * 2.0**s < fmt.min_subnormal), abs=1e-12), name
        top = 2.0 ** np.floor(np.log2(fmt.max) + 1)  # binade resolution: wholly above the largest value
        assert overflow(h, fmt, 7) == pytest.approx(np.mean(a * 2.0**7 >= top), abs=1e-12), name
        s_hi = s_high(h.max_abs, fmt)
        assert a.max() * 2.0**s_hi <= fmt.max < a.max() * 2.0 ** (s_hi + 1), name


def test_empty_range_picks_the_largest_scale_without_overflow():
    """2^-40 .. 2^4 spans more binades than fp16 holds: no S keeps the bulk, the best is the top, 2^11."""
    h = recorded(np.exp2(np.arange(-40, 5, dtype=np.float64)).repeat(10))
    plan = scale_plan(h, FP16)
    assert not plan["workable"] and plan["s"] == plan["s_hi"] == 11
    assert plan["underflow"] == pytest.approx(5 / 45)  # 2^-40 .. 2^-36 land below 2^-24 at S = 2^11
    assert overflow_cap([{"loss_scale": 2.0**16}, {"loss_scale": 2.0**14}]) == 13


def test_update_ratio_fractions_match_numpy():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(5000).astype(np.float32)
    w0[:50] = 0.0  # updates of zero weights: always kept
    w1 = (w0 - w0 * np.exp2(rng.uniform(-16, -4, 5000)) - (w0 == 0) * 1e-3).astype(np.float32)
    w1[50:100] = w0[50:100]  # no update at all: not counted
    f = update_fractions(update_ratio_hist([torch.from_numpy(w0)], [torch.from_numpy(w1)]))
    d, w = np.abs(w1.astype(np.float64) - w0), np.abs(w0.astype(np.float64))
    moved = d > 0
    assert f["updates"] == moved.sum() == 4950
    assert f["fp16"] == pytest.approx(np.mean((d < w * 2.0**-11)[moved]), abs=1e-3)
    assert f["bf16"] == pytest.approx(np.mean((d < w * 2.0**-8)[moved]), abs=1e-3)
    assert 0.2 < f["fp16"] < f["bf16"] < 0.9


FIT, OUT = {"err": 0.001, "flush": 0.0, "sat": 0.0}, {"err": 0.5, "flush": 0.0, "sat": 0.0}


@pytest.mark.parametrize(("base", "expected"), [
    ("fp16", {"a": "bf16", "b": "fp16", "c": "fp8", "d": "fp32"}),  # a: fp16 measured out; b: fp16 not measured
    ("bf16", {"a": "bf16", "b": "bf16", "c": "fp8", "d": "fp32"}),
    ("fp32", {"a": "bf16", "b": "bf16", "c": "fp8", "d": "fp32"}),  # below fp32: the cheapest that fits
])
def test_layer_plan_leaves_the_verdicts_16bit_format_only_where_it_was_measured_out(base, expected):
    per_layer = {"a": {"bf16": FIT, "fp16": OUT}, "b": {"bf16": FIT}, "c": {"bf16": FIT, "fp8": FIT},
                 "d": {"bf16": OUT}}
    per_layer = {m: {f: {**fig, "fits": fits(fig)} for f, fig in per.items()} for m, per in per_layer.items()}
    plan = layer_plan(per_layer, fp16_viable=True, base=base)
    assert plan == expected
    # issue 37: the one 16-bit choice no measurement backs is named, with what was measured
    assert not_measured(plan, per_layer) == ({"b": ["bf16"]} if base == "fp16" else {})


def test_the_printed_command_pastes_into_a_shell_as_the_overrides(tmp_path):
    """A dict override (braces and commas: bash would brace-expand it unquoted) and a plan with spaces come
    back from shlex.split, the shell's own rule, as the exact override strings."""
    (tmp_path / ".hydra").mkdir()
    own = ["model=timm", "model.kwargs={depths:[1,1,1,1],dims:[8,16,16,16]}", "precision=fp32", "diagnostics.every=1"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(own))
    advised = ["precision=bf16", "precision.layers={head: fp32, stem.0: fp8}"]
    argv = shlex.split(run_command(tmp_path, advised))
    assert argv == ["mptrain", "model=timm", "model.kwargs={depths:[1,1,1,1],dims:[8,16,16,16]}", *advised]


# ---- real runs ----------------------------------------------------------------------------------------------

def advise_cli(run_dir):
    return subprocess.run([sys.executable, "-m", "mptrain.tools.advise", str(run_dir)], capture_output=True, text=True,
                          timeout=120)


def test_ordinary_task_is_safe_with_dynamic_scaling_and_a_torn_line_is_skipped(tmp_path):
    own = ["model=mlp", "precision=fp32", "trainer.max_steps=6", "diagnostics.every=1", "diagnostics.shadow=null"]
    _, run_dir = train(tmp_path, own)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(own))  # as the CLI records them
    with open(run_dir / "diagnostics.jsonl", "a") as f:
        f.write('{"event": "sample", "step": 7, "grads": {"ove')  # an interrupted write
    proc = advise_cli(run_dir)
    assert proc.returncode == 0, proc.stderr
    advice = json.loads((run_dir / "advice.json").read_text())
    assert advice["probe"]["samples"] == 6
    assert advice["verdict"] == "fp16 is safe with dynamic loss scaling"
    assert advice["recommended_overrides"][0] == "precision=dynamic"
    fp16 = advice["fp16"]
    assert fp16["s_lo"] <= 0 and fp16["underflow_at_1"] < 1e-3  # S = 1 already holds the bulk
    assert 1.0 <= fp16["S"] <= 2.0**16  # no extreme scale
    lines = proc.stdout.splitlines()
    assert lines[lines.index("recommended overrides:") + 1] == "precision=dynamic"
    # the probe ran on this CPU, where fp16 is emulated: the run: line is what runs here (bf16 holds), the fp16
    # advice a line for a GPU, and the note gives fp16's slowdown as measured on this machine
    # issue 34: the run: line is the fastest that holds here, by the step times measured on this machine (bf16
    # holds; fp32 always does): bf16, unless fp32 ran a step clearly faster; with its speed against both
    times = advice["step_time_s"]
    assert set(times) == {"advised", "bf16", "fp32"} and times["advised"] == times["bf16"]
    fastest = "fp32" if times["fp32"] < 0.95 * times["bf16"] else "bf16"
    assert lines[lines.index("run:") + 1].endswith(f"precision={fastest}")
    speed = next(line for line in lines if line.startswith("predicted here:"))
    assert f"{times['bf16'] / times[fastest]:.2f}x bf16's speed, {times['fp32'] / times[fastest]:.2f}x fp32's" in speed
    assert "precision=dynamic" in lines[lines.index("on a GPU (fp16 is emulated on this CPU):") + 1]
    assert advice["fp16_slowdown_here"] > 0 and f"{advice['fp16_slowdown_here']:.1f}x fp32's time" in proc.stdout
    # the CPU probe measured only bf16 per layer: the plan keeps the verdict's fp16 (bf16 would leave the loss
    # scale serving no layer), so there is no per-layer override to add
    assert set(advice["recommended_plan"].values()) == {"fp16"} and advice["plan_overrides"] == []
    # issue 37: and it says that fp16 rests on the verdict, naming the one format measured per layer
    assert advice["plan_not_measured"] == dict.fromkeys(advice["recommended_plan"], ["bf16"])
    assert "  head: planned fp16 (the verdict's format, not measured for this layer; measured: bf16)" in lines
    # the master-weight figures are the update statistics of the recorded samples
    rows = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()[:-1]]
    samples = [r for r in rows if r["event"] == "sample"]
    assert advice["master_weights"]["updates"] == sum(
        sum(r["update_ratio_hist"]) - r["update_ratio_hist"][-3] - r["update_ratio_hist"][-1] for r in samples)


def test_a_scale_range_above_one_is_advised_as_dynamic_scaling_from_its_middle():
    """The hand-worked range of docs/diagnostics.md: s in [7, 25], S = 2^16. Dynamic scaling started at S and held
    at or above the floor 2^7 holds wherever static S does, and follows a drift: it is advised, not static."""
    fp16 = {"viable": True, "workable": True, "feasible": True, "s": 16, "s_lo": 7, "s_hi": 25,
            "dynamic_start_overflows": False}
    formats = {"bf16": {"underflow": 0.0, "overflow": 0.0}}
    verdict, overrides = decide(fp16, formats)
    assert overrides == ["precision=dynamic", "precision.loss_scale.init=65536", "precision.loss_scale.min=128"]
    assert verdict.startswith("fp16 needs a loss scale: S = 2^16")


def test_directory_without_diagnostics_is_one_line_and_exit_2(tmp_path):
    proc = advise_cli(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("mptrain-advise: error:")
    assert not (tmp_path / "advice.json").exists()


@pytest.mark.slow
def test_advised_static_scale_matches_fp32_where_scale_1_fails(tmp_path):
    """Gradients 2^17 below their usual size: the advice from a 20-step fp32 probe trains static fp16 to
    fp32's accuracy within a point; S = 1 loses most gradients and fails."""
    _, probe = train(
        tmp_path / "probe", SMALL_GRADS + ["precision=fp32", "trainer.max_steps=20", "diagnostics.every=1"]
    )
    advice, lines = advise_run(probe)
    assert advice["verdict"].startswith("fp16 needs a loss scale")
    overrides = advice["recommended_overrides"]
    assert overrides[0] == "precision=dynamic" and all(o in lines for o in overrides)
    assert advice["fp16"]["S"] >= 2.0**10 and advice["fp16"]["underflow_at_1"] > 0.5
    runs = {"fp32": ["precision=fp32"], "advised": overrides,
            "one": ["precision=static", "precision.loss_scale.init=1"]}
    acc = {}
    for name, extra in runs.items():
        summary, _ = train(tmp_path / name, SMALL_GRADS + ["trainer.max_steps=44", "diagnostics=off",
                                                            "checkpoint.enabled=false", *extra])
        assert summary["skipped_steps"] == 0
        acc[name] = summary["val/acc"]
    assert acc["fp32"] > 0.9, acc
    assert abs(acc["advised"] - acc["fp32"]) <= 0.01, acc
    assert acc["one"] < acc["fp32"] - 0.2, acc


def test_from_a_run_that_skips_every_step_to_one_that_skips_none(tmp_path):
    """fp16 at S = 2^30 overflows on every step; the advice, read from that run alone, caps S below the
    scales that skipped, and its overrides train without a skipped step."""
    scale = ["precision=dynamic", "precision.loss_scale.init=1073741824", "precision.loss_scale.max=1073741824"]
    with pytest.raises(TrainingFailed, match="no update was applied: all 6 steps were skipped"):  # not `completed`
        train(tmp_path / "bad", ["model=mlp", "trainer.max_steps=6", "diagnostics.every=1", *scale])
    run_dir = tmp_path / "bad" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == 6 and summary["status"] == "failed"
    advice, lines = advise_run(run_dir)
    events = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    smallest_skipped = min(e["loss_scale"] for e in events if e["event"] == "overflow")
    assert advice["fp16"]["S_hi"] <= smallest_skipped / 2
    assert advice["fp16"]["S"] <= advice["fp16"]["S_hi"]
    summary, _ = train(tmp_path / "good", ["model=mlp", "trainer.max_steps=4", "diagnostics=off",
                                           *advice["recommended_overrides"]])
    assert summary["skipped_steps"] == 0 and summary["status"] == "completed"


def test_verify_trains_at_the_runs_median_lr_not_its_schedules_tail(tmp_path):
    """A finished cosine ends near zero: a trial continuing its schedule would be weak evidence. The trial holds
    the run's median logged lr constant (both arms), and its line says so."""
    from mptrain.config import validate
    from mptrain.tools import verify

    _, run_dir = train(tmp_path, ["model=mlp", "trainer.max_steps=12", "trainer.log_every=1", "scheduler=cosine",
                                  "scheduler.warmup_steps=0", "diagnostics=off"])
    lrs = [r["lr"] for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
           if "lr" in r]
    assert lrs[-1] < 0.1 * max(lrs)  # the tail of the schedule
    lr = verify.representative_lr(run_dir)
    assert min(lrs) < lr < max(lrs) and sum(x < lr for x in lrs) == sum(x > lr for x in lrs)  # the median
    checkpoint = run_dir / "checkpoints" / "last.pt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]
    cfg, start = verify.trial_config(saved, ["precision=bf16"], checkpoint, 4, lr)
    validate(cfg)
    assert start == 12 and cfg.optimizer.lr == lr and cfg.scheduler.name == "none" and cfg.precision.mode == "bf16"
    arm = verify.run_arm(saved, [], checkpoint, 4, tmp_path / "arm", lambda *a: [], lr)
    ran = [r["lr"] for r in (json.loads(x) for x in (tmp_path / "arm" / "metrics.jsonl").read_text().splitlines())
           if r.get("step", 0) > 12 and "lr" in r]
    assert arm["steps"] == 4 and ran and all(x == pytest.approx(lr) for x in ran)


def test_verify_refuses_a_run_with_a_schedule(tmp_path):
    """Both arms would resume through the run's own switches into the same precision and 'verify' the advice by
    comparing a run with itself: refused in one line, nothing written."""
    from mptrain.tools import verify

    (tmp_path / "checkpoints").mkdir()
    torch.save({"config": {"precision": {"mode": "amp", "schedule": [{"at": 0.5, "preset": "master"}]}}},
               tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(verify.VerifyError, match="ran with precision.schedule"):
        verify.verify(tmp_path, {}, ["precision=dynamic"], lambda *a: [], steps=2)
    assert not (tmp_path / "verify").exists()


def test_the_run_line_is_fp32_where_fp32_steps_clearly_faster_than_the_advice():
    """The decision on stubbed step times, not this machine's luck: where bf16 is the slow format (a Xeon without
    AVX512-BF16), fp32 is the run: line, and why; within the 0.95 margin the advice stays."""
    from mptrain.tools.advise import ADVISED, fastest_here, speed_line

    bf16 = ["precision=bf16"]
    chosen, why = fastest_here(bf16, {ADVISED: 0.030, "bf16": 0.030, "fp32": 0.011})
    assert chosen == ["precision=fp32"] and "fp32 runs a step in 11 ms here, precision=bf16 in 30 ms" in why
    assert speed_line({ADVISED: 0.030, "bf16": 0.030, "fp32": 0.011}, "fp32").startswith(
        "predicted here: 11 ms a training step (2.73x bf16's speed, 1.00x fp32's speed")
    assert fastest_here(bf16, {ADVISED: 0.010, "fp32": 0.0096}) == (bf16, None)  # 0.96: not clearly faster
    assert fastest_here(bf16, {ADVISED: 0.010}) == (bf16, None)  # fp32 not measured: the advice stands


def test_a_damaged_recorded_config_is_one_line_not_a_traceback(tmp_path):
    """The advisor reads the run's precision.formats from .hydra/config.yaml: a precision that is not a mapping
    leaves the built-ins; formats that are not a mapping are a one-line error naming the file."""
    from mptrain.errors import ConfigError
    from mptrain.precision.formats import BUILTINS
    from mptrain.tools.advise import run_registry

    (tmp_path / ".hydra").mkdir()
    config = tmp_path / ".hydra" / "config.yaml"
    config.write_text("precision: bf16\n")
    assert run_registry(tmp_path) is BUILTINS
    for bad in ("oops", "[1, 2]"):
        config.write_text(f"precision:\n  formats: {bad}\n")
        with pytest.raises(ConfigError, match=r"config.yaml: precision.formats is .* not a mapping of format names"):
            run_registry(tmp_path)
