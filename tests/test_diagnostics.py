"""Diagnostics against independent numpy computations, provenance on known layers, zero cost when off."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mptrain.diagnostics import BIN_LABELS, EXPONENTS, range_stats, trace_overflow, update_underflow

from .conftest import compose_config, read_jsonl, train

EDGES = [2.0**-24, 2.0**-25, 2.0**-14, 65504.0, 65520.0, 0.0, -0.0, -3.0, -(2.0**-30), 1e-45,
         float("inf"), float("-inf"), float("nan"), 1.0, 2.0**-40, 2.0**-41, 2.0**16, 70000.0, 2.0**-14 * 0.999]


def numpy_reference(values: np.ndarray, scale: float) -> dict:
    """Independent: classify each |x|*S with numpy's float64 log2 and comparisons."""
    a = np.abs(values.astype(np.float64)) * scale
    finite = np.isfinite(a)
    nz = finite & (a > 0)
    hist = np.zeros(len(BIN_LABELS), dtype=np.int64)
    for v in a[nz]:
        e = math.floor(math.log2(v))
        if e < EXPONENTS[0]:
            hist[0] += 1
        elif e > EXPONENTS[-1]:
            hist[len(EXPONENTS) + 1] += 1
        else:
            hist[e - EXPONENTS[0] + 1] += 1
    hist[BIN_LABELS.index("zero")] = np.sum(a == 0)
    hist[BIN_LABELS.index("inf")] = np.sum(np.isinf(a))
    hist[BIN_LABELS.index("nan")] = np.sum(np.isnan(a))
    n = len(a)
    peak = a[finite].max() if finite.any() else 0.0
    return {
        "hist": hist.tolist(),
        "zero": np.sum(a == 0) / n,
        "underflow": np.sum(nz & (a < 2.0**-24)) / n,
        "subnormal": np.sum(nz & (a >= 2.0**-24) & (a < 2.0**-14)) / n,
        "overflow": np.sum(~np.isnan(a) & (a > 65504.0)) / n,
        "nonfinite": np.sum(~finite) / n,
        "headroom": math.log2(65504.0 / peak) if peak > 0 else math.inf,
    }


def check(ours: dict, ref: dict) -> None:
    assert ours["hist"] == ref["hist"]
    for key in ("zero", "underflow", "subnormal", "overflow", "nonfinite"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ours["headroom"] == pytest.approx(ref["headroom"]) or (
        math.isinf(ours["headroom"]) and math.isinf(ref["headroom"])
    )


@pytest.mark.parametrize("scale", [1.0, 1024.0, 65536.0])
def test_range_stats_match_numpy_on_edges_and_random_values(scale):
    rng = np.random.default_rng(0)
    a = np.array(EDGES, dtype=np.float32)
    b = (rng.standard_normal(500) * np.exp2(rng.uniform(-45, 20, 500))).astype(np.float32)
    c = np.zeros(7, dtype=np.float32)
    tensors = [torch.from_numpy(a), torch.from_numpy(b).reshape(20, 25), torch.from_numpy(c)]
    stats = range_stats(tensors, ["a", "b", "c"], scale=scale)
    for name, values in zip("abc", (a, b, c)):
        check(stats.per_tensor()[name], numpy_reference(values, scale))
    check(stats.overall, numpy_reference(np.concatenate([a, b, c]), scale))


def test_edge_classification_by_hand():
    """2^-24 is subnormal, 2^-25 underflows, 2^-14 is normal, 65504 fits, 65520 overflows (rounds to inf)."""
    stats = range_stats([torch.tensor([x]) for x in [2.0**-24, 2.0**-25, 2.0**-14, 65504.0, 65520.0]],
                        list("abcde"))
    rows = stats.per_tensor()
    assert (rows["a"]["subnormal"], rows["a"]["underflow"]) == (1.0, 0.0)
    assert (rows["b"]["subnormal"], rows["b"]["underflow"]) == (0.0, 1.0)
    assert (rows["c"]["subnormal"], rows["c"]["underflow"]) == (0.0, 0.0)
    assert rows["d"]["overflow"] == 0.0 and rows["d"]["headroom"] == 0.0
    assert rows["e"]["overflow"] == 1.0
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(65520.0)) and np.float16(65504.0) == 65504.0  # the fp16 facts themselves


def test_update_underflow_matches_numpy():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(1000).astype(np.float32)
    delta = (w0 * np.exp2(rng.uniform(-16, -6, 1000))).astype(np.float32)
    w1 = w0 - delta
    per, overall = update_underflow([torch.from_numpy(w0)], [torch.from_numpy(w1)])
    ref = np.mean(np.abs(w1.astype(np.float64) - w0) < np.abs(w0.astype(np.float64)) * 2.0**-11)
    assert per[0] == pytest.approx(ref, abs=2e-3) and overall == per[0]
    assert 0.2 < ref < 0.8  # the case is not trivial


# ---- provenance -------------------------------------------------------------------------------------

class Amplify(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1e39  # inf in fp32


class GradBomb(nn.Module):
    def forward(self, x):
        return Amplify.apply(x)


class Boom(nn.Module):
    def forward(self, x):
        return x * 1e6  # beyond fp16 in the forward pass


def test_trace_names_the_forward_overflow_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), Boom(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    result = trace_overflow(model, lambda: model(x).half().float().sum(), lambda loss: loss.backward())
    assert result["forward"]["module"] == "2" and result["forward"]["type"] == "Boom"


def test_trace_names_the_backward_overflow_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), GradBomb(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    result = trace_overflow(model, lambda: model(x).sum(), lambda loss: loss.backward())
    assert result["forward"] is None
    assert result["backward"]["module"] == "3" and result["backward"]["where"] == "gradient of input"
    assert set(result["nonfinite_params"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert model[1].inplace is True  # restored


def test_run_traces_an_overflowing_run_and_reports_it(tmp_path):
    """Dynamic scaling with a scale that cannot back off: the run stops, the trace names the head's
    input gradient (the first place the scaled gradient leaves fp16's range)."""
    with pytest.raises(Exception, match="minimum"):
        train(
            tmp_path,
            [
                "precision=dynamic",
                "model.width=4",
                "trainer.max_steps=5",
                "trainer.batch_size=16",
                "precision.loss_scale.init=1e10",
                "precision.loss_scale.min=1e10",
                "precision.loss_scale.max=1e10",
            ],
        )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    trace = summary["overflow_trace"]
    assert trace["reason"] == "loss scale reached its minimum" and trace["backward"] is not None
    assert trace["backward"]["module"].startswith("head")
    rows = read_jsonl(tmp_path / "run" / "diagnostics.jsonl")
    assert any(r["event"] == "overflow" and r["nonfinite_params"] for r in rows)
    assert any(r["event"] == "trace" for r in rows)


# ---- in a run ------------------------------------------------------------------------------------

def test_sampled_steps_write_rows_with_every_statistic(tmp_path):
    summary, run_dir = train(tmp_path, ["trainer.max_steps=8", "diagnostics.every=4", "diagnostics.first_steps=1",
                                        "precision=fp32", "trainer.tensorboard=true"])
    rows = read_jsonl(run_dir / "diagnostics.jsonl")
    assert rows[0]["event"] == "meta" and rows[0]["fp16_view"] == "hypothetical"
    samples = [r for r in rows if r["event"] == "sample"]
    assert [r["step"] for r in samples] == [1, 4, 8]
    cfg = compose_config([])
    n_params = sum(
        1
        for p in __import__("mptrain.library.models.vision", fromlist=["SmallCNN"])
        .SmallCNN(width=cfg.model.width)
        .parameters()
    )
    for r in samples:
        assert len(r["grads"]["params"]) == n_params
        assert set(r["activations"]) == {"block1", "pool1", "block2", "pool2", "head"}
        assert 0.0 <= r["update_underflow"]["overall"] <= 1.0
        assert sum(r["grads"]["overall"]["hist"]) == r["grads"]["overall"]["count"]
    assert summary["diag/samples"] == 3 and 0.0 <= summary["diag/grad_underflow"] <= 1.0


def test_diagnostics_off_adds_no_hooks_and_no_work(tmp_path, monkeypatch):
    import mptrain.diagnostics.collector as collector
    import mptrain.diagnostics.stats as stats

    calls = []
    monkeypatch.setattr(stats, "range_stats", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(collector, "range_stats", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(collector.Diagnostics, "__init__", lambda *a, **k: calls.append("init"))
    hooks_seen = []
    original = nn.Module.register_forward_hook
    monkeypatch.setattr(nn.Module, "register_forward_hook",
                        lambda self, *a, **k: hooks_seen.append(self) or original(self, *a, **k))
    summary, run_dir = train(tmp_path, ["trainer.max_steps=6", "diagnostics=off"])
    assert summary["status"] == "completed"
    assert calls == [] and hooks_seen == []
    assert not (run_dir / "diagnostics.jsonl").exists()
    assert "diag/samples" not in summary


def test_unsampled_steps_do_no_statistics(tmp_path, monkeypatch):
    import mptrain.diagnostics.collector as collector

    real = collector.range_stats
    calls = []
    monkeypatch.setattr(collector, "range_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(tmp_path, ["trainer.max_steps=10", "diagnostics.every=5", "diagnostics.first_steps=0"])
    assert len(calls) == 2  # steps 5 and 10 only


# ---- the report ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_report_renders_pngs_and_a_risk_table_from_a_real_run(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    _, run_dir = train(
        tmp_path,
        [
            "model=mlp",
            "precision=noscale",
            "trainer.max_steps=20",
            "diagnostics.every=5",
            "trainer.loss_weight=6.103515625e-05",
            "optimizer.lr=819.2",
            "optimizer.weight_decay=0",
        ],
    )
    proc = subprocess.run([sys.executable, "-m", "mptrain.tools.report", str(run_dir)], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "Layers at most risk" in proc.stdout and "body.1.weight" in proc.stdout
    for name in ("activation_gradients", "loss_scale", "underflow_heatmap", "update_underflow"):
        path = run_dir / "report" / f"{name}.png"
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L"), dtype=float)
        assert img.size[0] > 500 and pixels.std() > 10, name  # not a blank canvas


def test_report_on_a_directory_that_is_not_a_run(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mptrain.tools.report", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "is not an mptrain run directory" in proc.stderr and "Traceback" not in proc.stderr
