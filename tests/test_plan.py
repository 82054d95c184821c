"""Precision as a per-layer plan: rules resolved per module, each module converted to what its entry says, the
records (precision_plan.json, summary.json, the log) saying what ran, and presets that contradict their
settings refused."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mptrain.errors import ConfigError
from mptrain.precision import PRESETS, Precision
from mptrain.precision.convert import EmulatedConv2d, EmulatedLinear
from mptrain.precision.formats import get_format

from .conftest import REPO, TINY, compose_config, read_jsonl, train

CPU = torch.device("cpu")
needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao not installed (pip install mptrain[fp8])")
# the digits MLP: body.1 (64x64), body.3, body.5, body.7 (64x64), head (64x10)
MLP = ["model=mlp", "dataset=digits", "trainer.batch_size=32", "optimizer.lr=0.05"]
NVFP4 = "precision.layers={*: nvfp4, @first: bf16, @last: bf16}"


def precision(*overrides: str) -> Precision:
    return Precision(compose_config(list(overrides)).precision, CPU)


def ladder() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 24),
                         nn.Linear(24, 4))


# ---- resolution ---------------------------------------------------------------------------------------

def test_rules_resolve_last_match_wins_and_first_last():
    p = precision("precision=bf16", "precision.layers={*: mxfp4, 2: fp32, @first: fp16, @last: bf16, 2: mxfp8}")
    plan = p.resolve_plan(ladder())
    assert list(plan) == ["0", "1", "2", "4", "5"]  # modules holding parameters, in order
    # "2" appears twice: Hydra keeps the key's first position and the last value
    assert plan.formats() == {"0": "fp16", "1": "fp32", "2": "mxfp8", "4": "mxfp4", "5": "bf16"}
    assert plan["1"].why.endswith("(mxfp4 emulation covers Linear and Conv2d, not LayerNorm)")
    assert plan["4"].emulated and plan["4"].kernel == "emulated" and plan["4"].scaling == "block-32 (e8m0)"
    assert not plan["0"].emulated and plan["0"].kernel == "autocast"
    assert plan["1"].kernel == "fp32"  # autocast runs LayerNorm in fp32: said so, not claimed bf16
    assert plan["2"].params == 32 * 32 + 32


def test_presets_produce_plans():
    model = ladder()
    assert set(precision("precision=fp32").resolve_plan(model).formats().values()) == {"fp32"}
    amp = precision("precision=bf16").resolve_plan(model)
    assert amp.formats() == {"0": "bf16", "1": "fp32", "2": "bf16", "4": "bf16", "5": "bf16"}
    master = precision("precision=master").resolve_plan(model)
    assert master.formats()["1"] == "fp32" and master["0"].format == "fp16" and master["0"].kernel == "weights"
    pure = precision("precision=bf16_pure").resolve_plan(model)
    assert pure["2"].format == "bf16" and pure["2"].kernel == "weights"


@pytest.mark.parametrize(("overrides", "match"), [
    (["precision=bf16", "precision.layers={head: fp3}"], "precision.layers.head: unknown format 'fp3'"),
    (["precision=master", "precision.layers={head: bf16}"], "per-layer formats need an autocast preset"),
    (["precision=bf16", "precision.layers=nvfp4"], "must be a mapping"),
])
def test_bad_layer_rules_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match):
        precision(*overrides)


def test_a_rule_matching_nothing_is_refused():
    with pytest.raises(ConfigError, match=r"precision.layers: blocks.\* matches no module"):
        precision("precision=bf16", "precision.layers={blocks.*: fp32}").resolve_plan(ladder())


# ---- execution ----------------------------------------------------------------------------------------

def test_emulated_linear_quantizes_input_weight_and_output_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)  # 40: not a multiple of the block, padded
    x = torch.randn(8, 40, requires_grad=True)
    p = precision("precision=fp32", "precision.layers={*: mxfp4}")
    model = nn.Sequential(lin)
    p.prepare_model(model)
    assert isinstance(model[0], EmulatedLinear) and model[0].weight is lin.weight  # the same parameter
    y = model(x)
    fmt = get_format("mxfp4")
    qx, qw = fmt.quantize(x.detach()), fmt.quantize(lin.weight.detach())
    assert torch.equal(y, qx @ qw.T + lin.bias.detach())  # F.linear in fp32 on the quantized operands
    g = torch.randn(8, 24)
    y.backward(g)
    qg = fmt.quantize(g)
    assert torch.allclose(x.grad, qg @ qw, rtol=1e-6, atol=1e-6)  # straight through the input's quantizer
    assert torch.allclose(lin.weight.grad, qg.T @ qx, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(x.grad, g @ lin.weight.detach(), atol=1e-3)  # the gradient really was quantized


def test_emulated_conv2d_blocks_along_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 8, 3, padding=1)
    x = torch.randn(2, 32, 5, 5)
    model = nn.Sequential(conv)
    precision("precision=fp32", "precision.layers={*: mxfp8}").prepare_model(model)
    assert isinstance(model[0], EmulatedConv2d)
    fmt = get_format("mxfp8")
    qx = fmt.quantize(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    qw = fmt.quantize(conv.weight.detach().permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.equal(model(x).detach(), F.conv2d(qx, qw, conv.bias.detach(), padding=1))


def test_fp32_layer_inside_autocast_runs_with_autocast_off_on_float32(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    precision("precision=bf16", "precision.layers={2: fp32}").prepare_model(model)
    seen, linear = [], F.linear

    def spy(x, w, b=None):  # what each Linear's matmul receives, and whether autocast is on around it
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        hidden = model[1](model[0](x))  # bf16, as autocast left it
    assert seen[:2] == [(torch.float32, True), (torch.float32, False)]  # layer 0 under autocast, layer 2 not
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert torch.equal(out, linear(hidden.float(), model[2].weight, model[2].bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(out, linear(hidden, model[2].weight, model[2].bias).float())  # bf16 differs


@needs_torchao
def test_fp8_with_a_middle_linear_in_bf16(tmp_path):
    from mptrain.train.recipe import build

    overrides = ["precision=fp8", "precision.layers={body.5: bf16}", *MLP]
    cfg = compose_config(TINY + overrides)
    c = build(cfg)
    kinds = {n: type(m).__name__ for n, m in c.base_model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {"body.1": "Linear", "body.3": "Float8Linear", "body.5": "Linear", "body.7": "Float8Linear",
                     "head": "Linear"}
    summary, run_dir = train(tmp_path, [*overrides, "trainer.max_steps=2", "checkpoint.enabled=false"])
    plan = json.loads((run_dir / "precision_plan.json").read_text())
    assert {n: e["format"] for n, e in plan.items()} == {"body.1": "bf16", "body.3": "fp8", "body.5": "bf16",
                                                         "body.7": "fp8", "head": "bf16"}
    assert plan["body.5"]["why"] == "precision.layers body.5" and plan["head"]["why"].startswith("last Linear")
    assert plan["body.3"]["emulated"] is True and plan["body.3"]["grad_format"] == "fp8_e5m2"  # CPU: torchao emulates
    assert summary["fp8_layers"] == 2 and summary["plan_modules"] == {"bf16": 3, "fp8": 2}


@pytest.mark.slow
def test_emulated_nvfp4_run_trains_is_labelled_and_resumes_bitwise(tmp_path, caplog):
    from .test_checkpoint import assert_same_tensors, final_state

    base = ["precision=bf16", NVFP4, "trainer.max_steps=8", "checkpoint.every_steps=4", "checkpoint.keep_last=2",
            "trainer.log_every=2", "scheduler.warmup_steps=0", *MLP]
    with caplog.at_level("INFO"):
        summary, ref = train(tmp_path / "ref", base)
    rows = read_jsonl(ref / "metrics.jsonl")
    assert summary["status"] == "completed" and rows[-1]["loss"] < rows[0]["loss"]
    assert summary["val/acc"] > 0.3  # it learned: 10 classes, chance is 0.1
    plan = json.loads((ref / "precision_plan.json").read_text())
    assert {n: (e["format"], e["emulated"]) for n, e in plan.items()} == {
        "body.1": ("bf16", False), "body.3": ("nvfp4", True), "body.5": ("nvfp4", True), "body.7": ("nvfp4", True),
        "head": ("bf16", False)}
    assert summary["plan_emulated"] == ["body.3", "body.5", "body.7"]
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("precision plan"))
    assert "body.3  4,160   nvfp4   emulated" in table and "precision.layers @last" in table
    # diagnostics name the layers as the plan does, and the offline tools show each layer's planned format
    diag = read_jsonl(ref / "diagnostics.jsonl")
    assert next(r for r in diag if r.get("event") == "meta")["plan"] == {n: e["format"] for n, e in plan.items()}
    grads = next(r for r in diag if r.get("event") == "sample")["grads"]["params"]
    assert {name.rpartition(".")[0] for name in grads} == set(plan)
    from rich.console import Console

    from mptrain.tools import compare, report

    console = Console(record=True, width=200)
    samples = [r for r in diag if r.get("event") == "sample"]
    console.print(report.plan_table(report.load_plan(ref, {})), report.risk_table(samples, plan=plan))
    text = console.export_text()
    assert "│ body.5 │ 4160   │ nvfp4  │ nvfp4     │ emulated │" in text and "│ body.5.weight │ nvfp4" in text
    (ref / ".hydra").mkdir()
    (ref / ".hydra" / "overrides.yaml").write_text(f"- precision=bf16\n- '{NVFP4}'\n")
    row = compare.rows(compare.group_jobs(compare.find_jobs([ref])), "val/acc")[0]
    assert row["plan"] == "bf16 x2, nvfp4 x3 (3 emulated)" and row["loss scaling"] == "none"
    summary, cut = train(tmp_path / "cut", [*base, f"resume={ref / 'checkpoints' / 'step_4.pt'}"])
    assert summary["steps"] == 8
    assert_same_tensors(final_state(ref), final_state(cut))
    assert read_jsonl(ref / "metrics.jsonl")[2:] == read_jsonl(cut / "metrics.jsonl")
    assert "plan_changed_on_resume" not in summary
    # resuming into another plan is said in the summary (the run is no longer one plan throughout)
    other, _ = train(tmp_path / "other", [*base[:1], "precision.layers={body.3: mxfp8}", *base[2:],
                                           f"resume={ref / 'checkpoints' / 'step_4.pt'}"])
    assert other["plan_changed_on_resume"] == {"body.3": "nvfp4 -> mxfp8", "body.5": "nvfp4 -> bf16",
                                               "body.7": "nvfp4 -> bf16"}
    # and the emulation changed the numbers: plain bf16 on the same seed ends elsewhere
    plain, _ = train(tmp_path / "plain", [*base[:1], *base[2:]])
    assert plain["train_loss"] != summary["train_loss"]


# ---- the records say what ran ---------------------------------------------------------------------------

def test_static_preset_with_dynamic_scaling_is_refused_and_touches_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"precision=static means static loss scaling; "
                                          r"precision.loss_scale.kind=dynamic contradicts it"):
        train(tmp_path, ["precision=static", "precision.loss_scale.kind=dynamic", *MLP])
    assert not (tmp_path / "run").exists()
    for preset, kind in (("dynamic", "static"), ("noscale", "dynamic")):
        with pytest.raises(ConfigError, match=f"precision={preset} means"):
            precision(f"precision={preset}", f"precision.loss_scale.kind={kind}")
    # amp takes any kind; the summary names the one that ran
    assert precision("precision=amp", "precision.dtype=float16", "precision.loss_scale.kind=static").summary()[
        "loss_scaling"] == "static"


def preset_comparisons(source: str) -> list[tuple[int, list[str]]]:
    """(line, names) of each comparison of a precision mode against a preset name literal. Preset names are
    also ordinary words ("bf16" compression, a "master" key), so a comparison counts when its other side
    speaks of a mode or a precision (`cfg.precision.mode == "fp32"`, `precision_of(g) in ("fp8", ...)`)."""
    names = set(PRESETS)

    def literals(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [v for e in node.elts for v in literals(e)]
        return []

    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        hit = sorted(names.intersection(v for side in sides for v in literals(side)))
        about = " ".join(ast.unparse(side) for side in sides if not literals(side)).lower()
        if hit and ("mode" in about or "precision" in about):
            out.append((node.lineno, hit))
    return out


def test_no_module_outside_precision_compares_a_preset_name():
    root = REPO / "mptrain"
    found = [f"{path.relative_to(REPO)}:{line} compares {hit}" for path in root.rglob("*.py")
             if not path.is_relative_to(root / "precision") for line, hit in preset_comparisons(path.read_text())]
    assert not found, "\n".join(found)
    # and the training step and the optimizer builder no longer probe the optimizer for bf16_pure's stats
    for path in (root / "train" / "step.py", root / "library" / "optim.py"):
        assert "request_stats" not in path.read_text() and "last_stats" not in path.read_text(), path


def test_the_walk_finds_a_comparison():
    # the check above must be able to fail: it finds what the code on main before the plan had, and not the
    # ordinary words
    old = ('if precision.mode in ("master", "nomaster"):\n    pass\n'
           'hyp = dtype != f16 or precision.mode == "fp32"\n'
           'if any(precision_of(x) == "fp8" for x in groups):\n    pass\n'
           'if self.update == "nearest" or self.mode == "bf16_pure":\n    pass\n'
           'if t.grad_compression == "bf16" or key == "master":\n    pass\n')
    assert sorted(preset_comparisons(old)) == [
        (1, ["master", "nomaster"]),
        (3, ["fp32"]),
        (4, ["fp8"]),
        (6, ["bf16_pure"]),
    ]


# ---- one preset's trajectory against the code before the plan ---------------------------------------------
# The code on main before this change (commit 7698564, "Layout: ...") runs in a subprocess from a git worktree
# of that commit; the same seed and overrides must give the same metrics rows and final weights bit for bit.
# This tests the refactor against the real previous release, not against a re-implementation of it.
BEFORE = "7698564"


def _git(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dynamic", "bf16_pure"])
def test_trajectory_matches_the_code_before_the_plan(tmp_path, preset):
    if _git("cat-file", "-e", f"{BEFORE}^{{commit}}").returncode != 0:
        pytest.fail(f"commit {BEFORE} (the code before the plan) is not in this checkout; fetch the history")
    old = tmp_path / "old"
    assert _git("worktree", "add", "--detach", str(old), BEFORE).returncode == 0
    try:
        args = [*TINY, f"precision={preset}", *MLP, "trainer.max_steps=6", "trainer.log_every=1", "diagnostics=off"]
        runs = {}
        for name, src in (("old", old), ("new", REPO)):
            env = {**os.environ, "PYTHONPATH": str(src)}
            out = subprocess.run([sys.executable, "-m", "mptrain", *args, f"hydra.run.dir={tmp_path / name}"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-2000:]
            runs[name] = tmp_path / name
        from .test_registry_bitwise import assert_same_run

        assert_same_run(runs["old"], runs["new"])
    finally:
        _git("worktree", "remove", "--force", str(old))


def test_an_unknown_alias_is_named_as_one():
    # found by a hostile pass: '@middle' got "matches no module with parameters"
    from mptrain.errors import ConfigError
    from mptrain.precision.plan import user_rules

    with pytest.raises(ConfigError, match="unknown alias @middle; the aliases are @first, @last"):
        user_rules({"@middle": "fp8"})
    assert [r.pattern for r in user_rules({"@first": "bf16", "@last": "bf16"})] == ["@first", "@last"]


class Blocks(nn.Module):
    """blocks.<i>.attn / blocks.<i>.mlp, as a transformer names them."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(16, 16), "mlp": nn.Linear(16, 16)})
                                    for _ in range(4))


@pytest.mark.parametrize(("written", "as_yaml", "expected"), [
    ('precision.layers={"blocks.*.mlp": fp32}', None, [f"blocks.{i}.mlp" for i in range(4)]),
    ("precision.layers={'blocks.*.attn': fp32, blocks.0.mlp: fp16}", None,
     ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.2.attn", "blocks.3.attn"]),
    ('precision.layers={"blocks.[13].mlp": fp32}', None, ["blocks.1.mlp", "blocks.3.mlp"]),
    ("precision.layers={blocks.[02].attn: fp32}", '{"blocks.[02].attn": fp32}', ["blocks.0.attn", "blocks.2.attn"]),
])
def test_a_quoted_or_bracketed_key_names_the_form_hydra_parses(written, as_yaml, expected):
    """Hydra's grammar refuses quoted dict keys and bare [ ]: the one-line error's form composes to the rules
    YAML reads from the mapping as written, and plans the modules the glob names."""
    import yaml

    from mptrain.cli.keys import check_override_keys

    with pytest.raises(ConfigError) as e:
        check_override_keys([written])
    message = str(e.value)
    assert (
        message.startswith("precision.layers: Hydra's override grammar takes dict keys unquoted")
        and "\n" not in message
    )
    suggested = message.split("write '", 1)[1][:-1]
    check_override_keys([suggested])  # takes it as written
    cfg = compose_config(["precision=bf16", suggested])
    assert dict(cfg.precision.layers) == yaml.safe_load(as_yaml or written.split("=", 1)[1])
    plan = Precision(cfg.precision, CPU).resolve_plan(Blocks())
    assert sorted(n for n, entry in plan.items() if entry.by_rule) == expected


def test_a_quoted_key_from_the_cli_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mptrain", 'precision.layers={"blocks.*.mlp": fp32}'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["mptrain: error: precision.layers: Hydra's override grammar takes dict "
                                                "keys unquoted, with [ and ] escaped; write "
                                                "'precision.layers={blocks.*.mlp: fp32}'"]
    assert os.listdir(tmp_path) == []


def test_an_emulated_format_is_named_with_its_slowdown_measured_here(tmp_path, caplog):
    """A plan with an emulated format says so with a figure measured on this device, and the summary keeps it;
    the figure is the same layer's forward+backward in the format over fp32's, as an independent timing of the
    emulated module against a plain Linear gives it (within a factor of 2.5: two timings of a noisy machine)."""
    from mptrain.precision import timing

    with caplog.at_level("WARNING"):
        summary, _ = train(tmp_path, ["precision=bf16", "precision.layers={body.3: mxfp4}", "trainer.max_steps=1",
                                      "checkpoint.enabled=false", *MLP])
    slow = summary["emulated_slowdown_vs_fp32"]
    assert list(slow) == ["mxfp4"]
    line = next(r.getMessage() for r in caplog.records if "compute emulated" in r.getMessage())
    assert "1 of" in line and "(mxfp4 x1)" in line and f"{slow['mxfp4']:.1f}x fp32's time in mxfp4" in line
    cfg = compose_config(["precision=bf16", "precision.layers={0: mxfp4}"])
    p = Precision(cfg.precision, torch.device("cpu"))
    torch.manual_seed(0)
    emulated, plain = nn.Sequential(nn.Linear(256, 256)), nn.Linear(256, 256)
    p.prepare_model(emulated)
    assert isinstance(emulated[0], EmulatedLinear)
    x = torch.randn(256, 256)
    none = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    t = timing.interleaved_medians({"mxfp4": timing.forward_backward(emulated, x, none),
                                    "fp32": timing.forward_backward(plain, x, none)}, torch.device("cpu"), 5)
    mine = t["mxfp4"] / t["fp32"]
    assert mine > 1 and slow["mxfp4"] > 1  # the emulation does the fp32 GEMM and quantizes around it
    assert mine / 2.5 < slow["mxfp4"] < mine * 2.5


def test_the_start_up_line_says_which_modules_compute_in_float8():
    """precision=fp8 converts Linear layers; precision.layers may name fp8 for a Conv2d alone (emulated): the
    start-up line must not promise Linear layers there."""
    describe = lambda o: Precision(compose_config(o).precision, torch.device("cpu")).describe()  # noqa: E731
    assert "Linear layers in float8" in describe(["precision=fp8"])
    line = describe(["precision=bf16", "precision.layers={block1.3: fp8}"])
    assert "Linear layers in float8" not in line and "the modules precision.layers puts in fp8" in line
