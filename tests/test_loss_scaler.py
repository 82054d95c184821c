"""Loss-scale hysteresis against the peers' rules, scaler statistics, and the on_min=bf16 fallback.

Each peer's rule is re-stated below from its own source (not from mptrain's scaler), in its own terms:
torch.amp.GradScaler (float32 scale, growth only when finite), Megatron-LM's DynamicGradScaler.update
(a hysteresis tracker refilled at growth), DeepSpeed's DynamicLossScaler.update_scale (iteration counters,
`cur_hysteresis` floored at 1, `consecutive_hysteresis`, an error at the minimum scale).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from mptrain.errors import ConfigError
from mptrain.library.optim import build_optimizer
from mptrain.precision import LossScaler, LossScalingError, Precision, SwitchToBF16
from mptrain.precision.engine import check_bf16_fallback

from .conftest import REPO, compose_config, run_cli

CPU = torch.device("cpu")


# ---- the peers' rules, re-stated ----------------------------------------------------------------

class GradScalerRule:
    """torch.amp.GradScaler: back off on every overflow, grow after `interval` clean steps; float32 scale."""

    def __init__(self, init, growth, backoff, interval):
        self.scale, self.growth, self.backoff, self.interval = np.float32(init), growth, backoff, interval
        self.tracker = 0

    def update(self, overflow):
        if overflow:
            self.scale, self.tracker = np.float32(self.scale * np.float32(self.backoff)), 0
            return
        self.tracker += 1
        if self.tracker == self.interval:
            grown = np.float32(self.scale * np.float32(self.growth))
            if np.isfinite(grown):
                self.scale = grown
            self.tracker = 0


class MegatronRule:
    """Megatron-LM DynamicGradScaler: the tracker counts down on overflows (backing off once it is <= 0)
    and is refilled only when the scale grows; the scale never goes below min; no upper bound."""

    def __init__(self, init, min_scale, growth, backoff, interval, hysteresis):
        self.scale, self.min, self.growth, self.backoff = init, min_scale, growth, backoff
        self.interval, self.hysteresis = interval, hysteresis
        self.growth_tracker, self.hysteresis_tracker = 0, hysteresis

    def update(self, overflow):
        if overflow:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff, self.min)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth


class DeepSpeedRule:
    """DeepSpeed DynamicLossScaler.update_scale: one scale_factor both ways, growth when the steps since
    the last overflow are a multiple of scale_window, `cur_hysteresis` stops at 1 (every further overflow
    backs off), refilled at growth or (consecutive_hysteresis) on every clean step."""

    def __init__(self, init, factor, window, min_scale, delayed_shift, consecutive, raise_at_min):
        self.cur_scale, self.factor, self.window, self.min_scale = init, factor, window, min_scale
        self.delayed_shift = self.cur_hysteresis = delayed_shift
        self.consecutive, self.raise_at_min = consecutive, raise_at_min
        self.cur_iter, self.last_overflow_iter = 0, -1

    @property
    def scale(self):
        return self.cur_scale

    def update(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_at_min:
                    raise RuntimeError("DeepSpeed: loss scale already at minimum")
                self.cur_scale = max(self.cur_scale / self.factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.window == 0:
                if not self.consecutive:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.factor
        self.cur_iter += 1


def replay(ours: LossScaler, ref, rate: float, steps: int, seed: int, ceiling: float = 2.0**30, floor: float = 0.0):
    """Feed both the same overflow flags, step by step: random ones at `rate` while the scale is above
    `floor`, plus every step whose scale is above `ceiling` (a model whose gradients overflow there, so the
    scale rides an edge as in training). Return the reference's trajectory and the step where both
    stopped (None if they did not); fail at the first step where they differ."""
    rng = np.random.default_rng(seed)
    trajectory = []
    for i in range(steps):
        scale = float(ref.scale)
        overflow = bool((rng.random() < rate and scale > floor) or scale > ceiling)
        ref_error = ours_error = None
        try:
            ref.update(overflow)
        except RuntimeError as e:
            ref_error = e
        try:
            ours.update(overflow)
        except LossScalingError as e:
            ours_error = e
        assert (ref_error is None) == (ours_error is None), f"step {i}: stop rule differs ({ref_error or ours_error})"
        if ref_error is not None:
            return trajectory, i  # both stopped at the same step
        assert ours.scale == float(ref.scale), f"step {i}: scale {ours.scale} != {float(ref.scale)} (seed {seed})"
        trajectory.append(float(ref.scale))
    return trajectory, None


CASES = [(h, w, rate) for h in (1, 2, 3, 5) for w in (1, 3, 8, 50) for rate in (0.02, 0.1, 0.3)]


def test_gradscaler_restatement_matches_the_real_gradscaler():
    """The re-statement itself, against torch.amp.GradScaler on one random pattern."""
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.0)
    real = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=4)
    rule = GradScalerRule(2.0**10, 2.0, 0.5, 4)
    rng = np.random.default_rng(7)
    for _ in range(200):
        overflow = bool(rng.random() < 0.15)
        real.scale(w.sum()).backward()
        if overflow:
            w.grad[0] = float("inf")
        real.step(opt)
        real.update()
        opt.zero_grad(set_to_none=True)
        rule.update(overflow)
        assert real.get_scale() == float(rule.scale)


@pytest.mark.parametrize("window", [1, 3, 8, 50])
@pytest.mark.parametrize("rate", [0.02, 0.1, 0.3])
def test_hysteresis_1_equals_gradscaler_over_random_patterns(window, rate):
    for seed in range(3):
        ours = LossScaler("dynamic", init=2.0**16, growth_interval=window, hysteresis=1, on_min="clamp")
        ref = GradScalerRule(2.0**16, 2.0, 0.5, window)
        # GradScaler has no `min`: random overflows stop at 2^4 so the scale stays above ours (1)
        trajectory, _ = replay(ours, ref, rate, 2000, seed, floor=2.0**4)
        assert min(trajectory) >= 2.0**3 and len(set(trajectory)) > 5


@pytest.mark.parametrize(("hysteresis", "window", "rate"), CASES)
def test_default_rule_equals_megatron_over_random_patterns(hysteresis, window, rate):
    for seed in range(3):
        ours = LossScaler("dynamic", init=2.0**16, growth_interval=window, hysteresis=hysteresis, min=1.0,
                          on_min="clamp")
        ref = MegatronRule(2.0**16, 1.0, 2.0, 0.5, window, hysteresis)
        replay(ours, ref, rate, 2000, seed)


@pytest.mark.parametrize(("hysteresis", "window", "rate"), CASES)
@pytest.mark.parametrize("consecutive", [False, True])
def test_rules_equal_deepspeed_over_random_patterns(hysteresis, window, rate, consecutive):
    """DeepSpeed's default and its consecutive_hysteresis option, with its stop at the minimum scale
    (on_min=raise) and without it (raise_error_at_min_scale=False = on_min=clamp); factor 4 both ways."""
    for seed in range(2):
        for raise_at_min in (True, False):
            ours = LossScaler("dynamic", init=2.0**16, growth_factor=4.0, backoff_factor=0.25, growth_interval=window,
                              hysteresis=hysteresis, min=1.0, on_min="raise" if raise_at_min else "clamp",
                              consecutive_hysteresis=consecutive)
            ref = DeepSpeedRule(2.0**16, 4.0, window, 1.0, hysteresis, consecutive, raise_at_min)
            replay(ours, ref, rate, 2000, seed)


def test_the_two_refill_rules_differ_when_hysteresis_exceeds_1():
    """The premise of the option: the references disagree in most runs with H > 1, agree with H = 1."""
    def trajectory(h, w, rate, seed, consecutive):
        ref = DeepSpeedRule(2.0**16, 2.0, w, 1.0, h, consecutive, raise_at_min=False)
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(2000):
            ref.update(bool(rng.random() < rate or ref.scale > 2.0**30))
            out.append(ref.scale)
        return out

    differ = [trajectory(h, w, r, 0, False) != trajectory(h, w, r, 0, True) for h, w, r in CASES if h > 1]
    assert sum(differ) > len(differ) / 2
    assert all(trajectory(1, w, r, 0, False) == trajectory(1, w, r, 0, True) for _, w, r in CASES)


def test_hand_worked_hysteresis_2_window_5():
    """Overflow, clean, clean, overflow: the second overflow backs off under the default rule (the count was
    not refilled: no growth yet), not under consecutive_hysteresis (the clean steps refilled it)."""
    default = LossScaler("dynamic", init=1024, growth_interval=5, hysteresis=2)
    consecutive = LossScaler("dynamic", init=1024, growth_interval=5, hysteresis=2, consecutive_hysteresis=True)
    for flag in (True, False, False, True):
        default.update(flag)
        consecutive.update(flag)
    assert default.scale == 512
    assert consecutive.scale == 1024
    # five clean steps grow both and refill the default rule's count: one overflow is tolerated again
    for flag in (False,) * 5 + (True,):
        default.update(flag)
    assert default.scale == 1024


def scaler_state_roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("consecutive", [False, True])
def test_resume_in_the_middle_of_a_hysteresis_run_is_bitwise(consecutive):
    kw = dict(init=2.0**16, growth_interval=4, hysteresis=3, min=1.0, on_min="clamp",
              consecutive_hysteresis=consecutive)
    rng = np.random.default_rng(3)
    flags = [bool(x) for x in rng.random(400) < 0.3]
    whole = LossScaler("dynamic", **kw)
    scales = []
    for f in flags:
        whole.update(f)
        scales.append(whole.scale)
    # cut where part of the hysteresis count is spent (and, under the default rule, clean steps counted)
    first = LossScaler("dynamic", **kw)
    cut = None
    for i, f in enumerate(flags):
        first.update(f)
        if i > 20 and 0 < first.hysteresis_tracker < 3 and (consecutive or first.growth_tracker > 0):
            cut = i + 1
            break
    assert cut is not None
    second = LossScaler("dynamic", **kw)
    second.load_state_dict(scaler_state_roundtrip(first.state_dict()))
    resumed = scales[:cut]
    for f in flags[cut:]:
        second.update(f)
        resumed.append(second.scale)
    assert resumed == scales
    assert second.state_dict() == whole.state_dict()


# ---- statistics -------------------------------------------------------------------------------

def test_stats_track_range_and_backoffs_by_hand():
    s = LossScaler("dynamic", init=8, growth_interval=2)
    for flag in "OOCCCCO":  # 4, 2, 2, 4, 4, 8, 4
        s.update(flag == "O")
    assert s.stats() == {"loss_scale_min": 2.0, "loss_scale_max": 8.0, "loss_scale_backoffs": 3}
    for flag in "CCCC":  # 4, 8, 8, 16
        s.update(flag == "O")
    assert s.stats()["loss_scale_max"] == 16.0

    # at min with clamp nothing backs off: one back-off (2 -> 1), then two skips at 1
    s = LossScaler("dynamic", init=2, min=1, on_min="clamp")
    for _ in range(3):
        s.update(True)
    assert s.stats() == {"loss_scale_min": 1.0, "loss_scale_max": 2.0, "loss_scale_backoffs": 1}

    # the statistics survive a checkpoint; a state dict from before them loads, its range starting there
    restored = LossScaler("dynamic", init=2, min=1)
    restored.load_state_dict(scaler_state_roundtrip(s.state_dict()))
    assert restored.stats() == s.stats()
    old = {k: v for k, v in s.state_dict().items() if k not in ("scale_min", "scale_max", "backoffs")}
    old.update(scale=64.0, hysteresis_tracker=-3)  # the earlier rule let the tracker go negative
    restored = LossScaler("dynamic", init=2, min=1)
    restored.load_state_dict(old)
    assert restored.stats() == {"loss_scale_min": 64.0, "loss_scale_max": 64.0, "loss_scale_backoffs": 0}
    restored.update(True)
    assert restored.scale == 32.0


# ---- on_min=bf16 --------------------------------------------------------------------------------

def test_scaler_signals_bf16_switch_with_the_facts():
    s = LossScaler("dynamic", init=2, min=1, on_min="bf16", hysteresis=2)
    s.update(True)  # tolerated
    s.update(True)  # backs off to 1
    assert s.scale == 1.0
    with pytest.raises(SwitchToBF16, match=r"minimum 1 .*\(3 overflowing steps in a row") as info:
        s.update(True)  # the count stays spent (no growth since), at min: the switch
    assert info.value.facts == {"loss_scale": 1.0, "consecutive_overflows": 3, "skipped": 3}
    assert isinstance(info.value, LossScalingError)  # unhandled, it still stops the run with the diagnosis


def bf16_precision(*overrides: str) -> Precision:
    cfg = compose_config(["precision=dynamic", "precision.loss_scale.init=1", "precision.loss_scale.min=1",
                          "precision.loss_scale.on_min=bf16", *overrides])
    return Precision(cfg.precision, CPU)


def sgd(params):
    return build_optimizer(compose_config(["optimizer=sgd", "optimizer.lr=0.5", "optimizer.momentum=0",
                                           "optimizer.nesterov=false", "optimizer.weight_decay=0"]).optimizer, params)


def test_overflow_at_min_switches_the_engine_to_bf16_and_the_next_step_applies():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    p = bf16_precision()
    p.prepare_model(model)
    opt = sgd(p.optimizer_params())
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])

    with p.autocast():
        out = model(x)
    assert out.dtype == torch.float16
    p.backward(nn.functional.cross_entropy(out.float(), y))
    model.weight.grad[0, 0] = float("inf")
    result = p.step(opt)
    assert not result.applied and result.switched_to_bf16
    assert p.compute_dtype == torch.bfloat16 and not p.scaler.enabled and p.loss_scale == 1.0
    assert p.bf16_switch["from_dtype"] == "fp16" and p.bf16_switch["consecutive_overflows"] == 1
    assert p.skipped_steps == 1
    assert p.scaler_stats() == {"loss_scale_min": 1.0, "loss_scale_max": 1.0, "loss_scale_backoffs": 0}
    assert torch.equal(model.weight, reference.weight)  # the overflowing step was skipped
    initial = model.weight.detach().clone()

    # the next step runs in bf16 autocast, unscaled, and applies: as a plain PyTorch bf16 step does
    with p.autocast():
        out = model(x)
    assert out.dtype == torch.bfloat16
    p.backward(nn.functional.cross_entropy(out.float(), y))
    result = p.step(opt)
    assert result.applied and not result.switched_to_bf16
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out = reference(x)
    nn.functional.cross_entropy(ref_out.float(), y).backward()
    ref_opt.step()
    assert not torch.equal(model.weight, initial)  # the step moved the weights
    assert torch.equal(model.weight, reference.weight) and torch.equal(model.bias, reference.bias)

    # a resume after the switch continues in bf16; a fresh engine's own state keeps its scaler
    state = scaler_state_roundtrip(p.state_dict())
    resumed = bf16_precision()
    assert resumed.compute_dtype == torch.float16 and resumed.scaler.enabled
    resumed.load_state_dict(state)
    assert resumed.compute_dtype == torch.bfloat16 and not resumed.scaler.enabled
    assert resumed.bf16_switch == p.bf16_switch and resumed.skipped_steps == 1


def test_precision_state_dict_without_a_switch_loads_as_before():
    p = bf16_precision("precision.loss_scale.init=1024")
    p.prepare_model(nn.Linear(2, 2))
    p.scaler.update(True)
    state = p.state_dict()
    assert "bf16_switch" not in state
    old = {"mode": "dynamic", "scaler": {k: v for k, v in state["scaler"].items()
                                         if k not in ("scale_min", "scale_max", "backoffs")}}
    fresh = bf16_precision("precision.loss_scale.init=1024")
    fresh.load_state_dict(old)
    assert fresh.compute_dtype == torch.float16 and fresh.loss_scale == 512.0


@pytest.mark.parametrize(("overrides", "message"), [
    (["precision=master"], "precision=master holds them in float16"),
    (["precision=nomaster"], "precision=nomaster holds them in float16"),
    (["precision=static"], "a static scale never backs off"),
    (["precision=fp32", "precision.loss_scale.kind=dynamic"], "computes in float32"),
])
def test_on_min_bf16_is_refused_where_it_cannot_apply(overrides, message):
    cfg = compose_config([*overrides, "precision.loss_scale.on_min=bf16"])
    with pytest.raises(ConfigError, match=message):
        Precision(cfg.precision, CPU)


def test_on_min_bf16_is_accepted_where_it_applies_or_cannot_arise():
    for overrides in (["precision=dynamic"], ["precision=amp"], ["precision=bf16"], ["precision=noscale"]):
        Precision(compose_config([*overrides, "precision.loss_scale.on_min=bf16"]).precision, CPU)


def test_on_min_bf16_is_refused_on_a_gpu_without_bf16(monkeypatch):
    # no pre-Ampere GPU here: stand in for its two answers
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100 lacks"):
        check_bf16_fallback("dynamic", "dynamic", torch.float16, torch.device("cuda"))
    check_bf16_fallback("dynamic", "dynamic", torch.float16, CPU)  # CPU has bf16


@pytest.mark.slow
def test_cli_refuses_on_min_bf16_with_master_in_one_line(tmp_path):
    proc = run_cli(["precision=master", "precision.loss_scale.on_min=bf16", "trainer.device=cpu",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mptrain: error:")]
    assert len(errors) == 1 and "on_min=bf16" in errors[0]


def test_engine_resume_in_the_middle_of_a_hysteresis_run_is_bitwise():
    """Precision + model + optimizer saved where one of three tolerated overflows is spent, restored into
    fresh objects: the scale and the weights continue exactly as in the uninterrupted run."""
    overrides = ("precision.loss_scale.init=1024", "precision.loss_scale.hysteresis=3",
                 "precision.loss_scale.growth_interval=4")
    flags = [bool(x) for x in np.random.default_rng(5).random(40) < 0.35]
    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2])

    def build():
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        p = Precision(compose_config(["precision=dynamic", *overrides]).precision, CPU)
        p.prepare_model(model)
        return model, p, sgd(p.optimizer_params())

    def step(model, p, opt, overflow):
        with p.autocast():
            out = model(x)
        p.backward(nn.functional.cross_entropy(out.float(), y))
        if overflow:
            model.bias.grad[1] = float("inf")
        p.step(opt)
        return p.loss_scale

    model, p, opt = build()
    whole = [step(model, p, opt, f) for f in flags]
    final = [t.detach().clone() for t in model.parameters()]

    model, p, opt = build()
    cut = None
    resumed = []
    for i, f in enumerate(flags):
        resumed.append(step(model, p, opt, f))
        if i > 5 and p.scaler.hysteresis_tracker in (1, 2):
            cut = i + 1
            break
    assert cut is not None
    state = scaler_state_roundtrip({"model": model.state_dict(), "opt": opt.state_dict(),
                                    "precision": p.state_dict()})
    model, p, opt = build()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    p.load_state_dict(state["precision"])
    resumed += [step(model, p, opt, f) for f in flags[cut:]]
    assert resumed == whole and len(set(whole)) > 2
    assert all(torch.equal(a, b) for a, b in zip(final, model.parameters()))


def test_on_min_bf16_switches_a_run_and_records_it(tmp_path):
    """Gradients that overflow fp16 at the minimum scale (S = 1): the run checkpoints, traces the overflow,
    continues in bf16 and completes; the event is in metrics.jsonl and summary.json."""
    import json

    from .conftest import read_jsonl, train

    summary, run_dir = train(tmp_path, [
        "model=mlp", "model.width=16", "model.depth=2", "precision=dynamic", "precision.loss_scale.init=1",
        "precision.loss_scale.min=1", "precision.loss_scale.on_min=bf16", "trainer.loss_weight=1e6",
        "trainer.clip_grad_norm=1.0", "trainer.max_steps=6", "trainer.log_every=1", "trainer.batch_size=32"])
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["compute_dtype"] == "bf16" and summary["skipped_steps"] == 1
    (event,) = summary["events"]
    assert event["event"] == "switch_to_bf16" and event["step"] == 1 and event["from_dtype"] == "fp16"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("event") == "switch_to_bf16"] == [1]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["skipped"] for r in train_rows] == [1, 0, 0, 0, 0, 0]
    assert all(r["loss_scale"] == 1.0 for r in train_rows)
    ckpt = torch.load(run_dir / "checkpoints" / "step_1.pt", weights_only=True)
    assert ckpt["precision"]["bf16_switch"]["from_dtype"] == "fp16"
    traces = [r for r in read_jsonl(run_dir / "diagnostics.jsonl") if r.get("event") == "trace"]
    assert len(traces) == 1 and traces[0]["step"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["events"][0]["step"] == 1


def test_on_min_raise_stops_with_a_checkpoint_summary_and_trace(tmp_path):
    """Every step overflows until the scale would fall below its minimum: the run stops with the diagnosis,
    and writes a checkpoint of the last applied weights (unchanged by the skipped steps)."""
    from mptrain.errors import TrainingFailed

    from .conftest import read_jsonl, train

    overrides = ["model=mlp", "model.width=8", "model.depth=2", "precision=dynamic", "precision.loss_scale.init=1e38",
                 "precision.loss_scale.min=1e37", "trainer.max_steps=10", "trainer.log_every=1"]
    with pytest.raises(TrainingFailed, match="minimum"):
        train(tmp_path, overrides)
    run_dir = tmp_path / "run"
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "minimum" in summary["error"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    # 1e38 -> 5e37 -> 2.5e37 -> 1.25e37 -> 1e37 (clamped at min), and the 5th overflow is at min: 4 steps taken
    assert ckpt["train_state"]["step"] == 4 and ckpt["precision"]["scaler"]["scale"] == 1e37
    from mptrain.library.models.vision import MLP

    torch.manual_seed(0)  # the initial weights of the run (seed 0): no step was ever applied
    fresh = MLP(num_classes=10, in_channels=1, image_size=8, width=8, depth=2)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in ckpt["model"].items())
    assert [r["event"] for r in read_jsonl(run_dir / "diagnostics.jsonl") if r.get("event") == "trace"] == ["trace"]


def test_on_min_bf16_under_fsdp_is_refused_in_one_line():
    """FSDP2 casts the shards to the param_dtype of set-up (fp16): a switch of autocast to bf16 could not apply."""
    with pytest.raises(ConfigError, match=r"on_min=bf16 with trainer.strategy=fsdp") as refused:
        bf16_precision().check_strategy("fsdp")
    assert "\n" not in str(refused.value)
    bf16_precision().check_strategy("ddp")  # DDP keeps whole fp32 weights: the switch applies
