"""timm and Hugging Face models (issue 28): built offline from a config, trained by the built-in tasks in
fp32, bf16 and fp16 with dynamic scaling, diagnostics on, resumed bitwise; hub names refused in one line."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mptrain.errors import ConfigError

from .conftest import compose_config, read_jsonl, run_cli, train
from .test_checkpoint import assert_same_tensors, final_state

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

# a ConvNeXt (timm's convnext_atto with one block per stage and narrow stages) on small 32x32 images
CONVNEXT = ["model=timm", "model.name=convnext_atto", "model.kwargs={depths:[1,1,1,1],dims:[8,16,16,16]}",
            "dataset=synthetic", "dataset.channels=1", "dataset.train_size=256", "dataset.val_size=64",
            "dataset.pool_size=64", "trainer.conv_wgrad=native", "trainer.batch_size=16", "optimizer=adamw",
            "optimizer.lr=2e-3"]
# a two-layer Llama on the synthetic token stream
LLAMA = ["model=hf_causal_lm", "model.config.hidden_size=32", "model.config.intermediate_size=64",
         "model.config.num_hidden_layers=2", "model.config.num_attention_heads=2", "model.config.num_key_value_heads=1",
         "model.config.max_position_embeddings=32", "dataset=synthetic_tokens", "dataset.seq_len=16",
         "dataset.train_tokens=8000", "dataset.val_tokens=800", "trainer.batch_size=8", "optimizer=adamw",
         "optimizer.lr=1e-2"]
VIT = ["model=hf_image_classification", "model.config.image_size=8", "model.config.patch_size=2",
       "model.config.hidden_size=16", "model.config.num_hidden_layers=1", "model.config.num_attention_heads=2",
       "model.config.intermediate_size=32", "trainer.batch_size=32", "optimizer=adamw", "optimizer.lr=3e-3"]
FAMILIES = {"convnext": CONVNEXT, "llama": LLAMA, "vit": VIT}
SHORT = ["trainer.max_steps=8", "scheduler=none", "trainer.log_every=2", "diagnostics.every=4"]


# fast: fp32 and fp16 for the Llama, fp32 for the ConvNeXt (fp16 convolutions are emulated on a CPU: slow)
CASES = [pytest.param(f, m, marks=[pytest.mark.slow] * (m == "bf16" or (f, m) == ("convnext", "dynamic")))
         for f in ("convnext", "llama") for m in ("fp32", "bf16", "dynamic")]


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_family_trains_in_each_precision(family, mode, tmp_path):
    summary, run_dir = train(tmp_path, [*FAMILIES[family], *SHORT, f"precision={mode}", "checkpoint.enabled=false"])
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["compute_dtype"] == {"fp32": "fp32", "bf16": "bf16", "dynamic": "fp16"}[mode]
    assert rows[-1]["loss"] < rows[0]["loss"], rows  # it learns
    metric = "val/acc" if family == "convnext" else "val/loss"
    assert metric in summary
    # the diagnostics saw every parameter tensor of the model and its activation gradients
    sample = next(r for r in read_jsonl(run_dir / "diagnostics.jsonl") if r.get("event") == "sample")
    assert len(sample["grads"]["params"]) > 0 and sample.get("activations")


@pytest.mark.parametrize("family", ["llama", pytest.param("convnext", marks=pytest.mark.slow)])
def test_resume_is_bitwise_under_dynamic_scaling(family, tmp_path):
    base = [*FAMILIES[family], *SHORT, "precision=dynamic", "checkpoint.every_steps=4", "checkpoint.keep_last=2"]
    _, ref = train(tmp_path / "ref", base)
    summary, cut = train(tmp_path / "cut", [*base, f"resume={ref / 'checkpoints' / 'step_4.pt'}"])
    assert summary["steps"] == 8
    assert_same_tensors(final_state(ref), final_state(cut))
    assert read_jsonl(ref / "metrics.jsonl")[2:] == read_jsonl(cut / "metrics.jsonl")


@pytest.mark.slow
def test_hf_image_classifier_reads_logits_of_its_model_output(tmp_path):
    summary, _ = train(tmp_path, [*VIT, *SHORT, "precision=fp32", "checkpoint.enabled=false", "diagnostics=off"])
    assert summary["status"] == "completed" and 0 <= summary["val/acc"] <= 1


def test_llama_equals_transformers_own_loss():
    """The language-modelling task's loss on an HF model is transformers' own shifted loss (labels=input)."""
    from mptrain.library.models.hf import hf_causal_lm
    from mptrain.library.tasks import LanguageModeling

    torch.manual_seed(0)
    model = hf_causal_lm({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "num_key_value_heads": 2}, vocab_size=40)
    seq = torch.randint(0, 40, (3, 11))
    ours = LanguageModeling().loss(model, (seq[:, :-1], seq[:, 1:]))
    theirs = model(seq, labels=seq).loss  # transformers shifts the labels itself
    logits = model(seq).logits[:, :-1].float()
    assert torch.allclose(ours, torch.nn.functional.cross_entropy(logits.reshape(-1, 40), seq[:, 1:].reshape(-1)))
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_a_local_hf_directory_loads_its_weights(tmp_path):
    """model.path: config.json + safetensors written by save_pretrained are read back exactly."""
    from mptrain.library.models.hf import hf_causal_lm

    small = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 32}
    saved = hf_causal_lm(small, vocab_size=50)
    saved.save_pretrained(tmp_path / "gpt2-tiny")
    loaded = hf_causal_lm(path=str(tmp_path / "gpt2-tiny"), vocab_size=50)
    assert_same_tensors(saved.state_dict(), loaded.state_dict())


def test_timm_checkpoint_path_loads_a_local_state_dict(tmp_path):
    from mptrain.library.models.timm_models import timm_model

    kwargs = {"depths": [1, 1, 1, 1], "dims": [8, 8, 8, 8]}
    first = timm_model("convnext_atto", num_classes=10, in_channels=1, kwargs=kwargs)
    torch.save(first.state_dict(), tmp_path / "w.pth")
    second = timm_model("convnext_atto", num_classes=10, in_channels=1, kwargs=kwargs,
                        checkpoint_path=str(tmp_path / "w.pth"))
    assert_same_tensors(first.state_dict(), second.state_dict())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [
                "model=hf_causal_lm",
                "model.config=null",
                "model.path=meta-llama/Llama-3.2-1B",
                "dataset=synthetic_tokens",
            ],
            r"^model.path=meta-llama/Llama-3.2-1B is not a local model directory: .*never downloads; fetch it first",
        ),
        (
            ["model=timm", "model.name=convnxt_atto"],
            r"^model.name='convnxt_atto' is not a timm architecture; close names: "
            r"convnext_atto",
        ),
        (
            ["model=timm", "model.checkpoint_path=/nonexistent.pth"],
            r"^model.checkpoint_path=/nonexistent.pth is not a file",
        ),
        (["model=hf_causal_lm", "model.path=/tmp", "dataset=synthetic_tokens"], r"^model.config=.*give exactly one of"),
    ],
)
def test_bad_model_settings_fail_in_one_line_before_the_run_dir(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, overrides)
    assert not (tmp_path / "run").exists()


def test_missing_extra_names_the_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"^model=timm needs timm: pip install mptrain\[timm\]$"):
        train(tmp_path, ["model=timm"])
    assert not (tmp_path / "run").exists()


def test_another_architecture_replaces_the_default_config():
    """The documented way: null the default Llama config, then give the whole new one."""
    cfg = compose_config(["model=hf_causal_lm", "model.config=null", "model.config={model_type: gpt2, n_embd: 16}"])
    assert dict(cfg.model.config) == {"model_type": "gpt2", "n_embd": 16}


def documented_sweeps() -> dict[str, list[str]]:
    """The every-preset commands of docs/models.md, as a user would paste them: {model group: argv}."""
    text = (Path(__file__).parent.parent / "docs" / "models.md").read_text()
    blocks = re.findall(r"```\n(mptrain -m .*?)```", text, flags=re.S)
    argvs = [shlex.split(b.replace("\\\n", " ")) for b in blocks]
    return {next(a for a in argv if a.startswith("model=")): argv[1:] for argv in argvs if "precision=fp32,amp,"
            in " ".join(argv)}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["model=timm", "model=hf_causal_lm"])
def test_every_preset_trains_from_the_documented_command(model, tmp_path):
    """The done-when of issue 28: one documented command trains the model in every precision preset; each
    job's summary names the preset it ran, its compute dtype and plan, and at least one applied update."""
    from mptrain.precision import PRESETS

    argv = documented_sweeps()[model]
    swept = next(a for a in argv if a.startswith("precision=")).split("=", 1)[1].split(",")
    assert sorted(swept) == sorted(PRESETS)  # every preset, none left out
    if "dataset.path=tok" in argv:  # the token file the docs make first
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        subprocess.run([sys.executable, "-m", "mptrain.tools.prepare", str(stdlib / "LICENSE.txt"), "--tokenizer",
                        "char", "--out", str(tmp_path / "tok")], check=True, capture_output=True)
    p = run_cli(argv, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    summaries = [json.loads(f.read_text()) for f in sorted((tmp_path / "multirun").glob("*/*/*/summary.json"))]
    assert sorted(s["precision"] for s in summaries) == sorted(swept)
    for s in summaries:
        assert s["status"] == "completed" and s["steps"] - s.get("skipped_steps", 0) > 0, s
        assert math.isfinite(s["val/loss"]), s
        expected = {"fp32": "fp32", "bf16": "bf16", "bf16_pure": "bf16", "fp8": "bf16"}.get(s["precision"])
        if expected is not None:
            assert s["compute_dtype"] == expected, s
        elif s["precision"] not in ("amp", "auto"):  # amp: bf16 on a CPU, fp16 on a GPU; auto: as measured
            assert s["compute_dtype"] == "fp16", s
        if s["precision"] == "fp8":
            assert s["plan_modules"].get("fp8", 0) > 0, s  # it converted Linear layers, not a bf16 run so named


@pytest.mark.parametrize("mode", ["bf16_pure", pytest.param("master", marks=pytest.mark.slow)])
def test_hf_rmsnorm_is_kept_fp32_and_trains_under_16bit_weights(mode, tmp_path):
    """Llama's own LlamaRMSNorm (not a torch.nn norm) is a norm layer: float32 under 16-bit weights, so its
    updates (lr 1e-2 * ~1 on a weight of 1.0, below half a bf16 ulp at 1.0 = 2^-8 once Adam's moments settle)
    are not rounded away. In bf16 it stayed exactly 1.0."""
    summary, run_dir = train(tmp_path, [*LLAMA, *SHORT, f"precision={mode}", "diagnostics=off",
                                        "optimizer.lr=1e-3"])
    assert summary["status"] == "completed"
    weights = final_state(run_dir)["model"]
    norms = {k: v for k, v in weights.items() if k.endswith("norm.weight")}
    assert len(norms) == 2 * 2 + 1  # two per layer and the final one
    low = torch.bfloat16 if mode == "bf16_pure" else torch.float16
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == low
    for k, v in norms.items():
        assert v.dtype == torch.float32, k
        assert not torch.equal(v, torch.ones_like(v)), k  # it trained
    plan = json.loads((run_dir / "precision_plan.json").read_text())
    assert all(plan[k.rsplit(".", 1)[0]]["format"] == "fp32" for k in norms), plan


@pytest.mark.parametrize("ls_init_value", [1e-6, 1.0])
def test_master_convnext_computes_in_fp16(ls_init_value):
    """Issue 37: `master` on a timm ConvNeXt was reported to give fp32's val/loss to 16 digits. Its every
    convolution and Linear takes and gives float16 (hooks), and its logits differ from the same weights'
    float32 forward by fp16 rounding: not zero, and (with timm's 1e-6 layer scale, whose blocks barely reach
    the output) not more than a few fp16 ulps of the logits."""
    import copy

    from mptrain.library.models.timm_models import timm_model
    from mptrain.precision import Precision

    torch.manual_seed(0)
    kwargs = {"depths": [1, 1, 1, 1], "dims": [8, 16, 16, 16], "ls_init_value": ls_init_value}
    model = timm_model("convnext_atto", num_classes=10, in_channels=1, kwargs=kwargs)
    reference = copy.deepcopy(model)
    precision = Precision(compose_config([*CONVNEXT, "precision=master"]).precision, torch.device("cpu"))
    precision.prepare_model(model)
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            m.register_forward_hook(
                lambda m, a, o, name=name: seen.update({name: (a[0].dtype, m.weight.dtype, o.dtype)})
            )
    x = torch.randn(4, 1, 32, 32)
    with precision.autocast():
        out = model(x)
    assert len(seen) == 1 + 3 + 4 * 3 + 1  # stem, 3 downsamples, dw conv + 2 MLP 1x1 convs per block, head
    assert set(seen.values()) == {(torch.float16,) * 3}
    with torch.no_grad():
        expected = reference(x)
    diff = (out.float() - expected).abs().max().item()
    ulp = torch.finfo(torch.float16).eps * expected.abs().max().item()
    assert 0 < diff < 8 * ulp, (diff, ulp)
