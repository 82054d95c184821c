"""The CUDA path checked on CPU (issue 26): what a GPU would trip over, tested where a CPU can show it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mptrain.library.models.language import GPT
from mptrain.precision import cast_model

from .conftest import read_jsonl, train

GPT_TINY = ["model=gpt", "model.dim=32", "model.layers=2", "model.heads=2", "dataset=synthetic_tokens",
            "dataset.seq_len=16", "dataset.vocab_size=64", "dataset.train_tokens=4096", "dataset.val_tokens=512",
            "trainer.batch_size=8", "scheduler=none", "optimizer=adamw", "optimizer.lr=3e-3", "diagnostics=off",
            "checkpoint.enabled=false"]


# ---- 3. norm layers compute in float32 -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_sees_matching_dtypes_and_returns_the_models(monkeypatch, dtype):
    """The CUDA LayerNorm kernel refuses an fp16 input with fp32 weights; every call must get matching dtypes."""
    seen = []
    real = torch.nn.functional.layer_norm

    def checked(x, shape, weight=None, bias=None, eps=1e-5):
        seen.append((x.dtype, weight.dtype))
        return real(x, shape, weight, bias, eps)

    model = cast_model(GPT(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2, dropout=0.0), dtype)
    monkeypatch.setattr(torch.nn.functional, "layer_norm", checked)
    tokens = torch.randint(0, 64, (2, 16))
    logits = model(tokens)
    assert len(seen) == 5 and all(x == w == torch.float32 for x, w in seen)  # 2 per block and the final one
    assert logits.dtype == dtype and model.ln_f.weight.dtype == torch.float32
    # the output is what float32 statistics give, rounded once to the model's dtype
    x = torch.randn(4, 32).to(dtype)
    ref = real(x.float(), (32,), model.ln_f.weight, model.ln_f.bias).to(dtype)
    assert torch.equal(model.ln_f(x), ref)
    # the override is the module's own: state_dict keys unchanged, a deep copy keeps it bound to the copy
    assert "ln_f.weight" in model.state_dict()
    twin = copy.deepcopy(model)
    assert twin.ln_f.forward.__self__ is twin.ln_f and twin(tokens).dtype == dtype


def test_group_norm_in_a_bf16_model_computes_in_fp32():
    model = cast_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)), torch.bfloat16)
    x = torch.randn(2, 3, 8, 8).bfloat16()
    h = model[0](x)
    ref = torch.nn.functional.group_norm(h.float(), 2, model[1].weight, model[1].bias).bfloat16()
    assert torch.equal(model(x), ref)


@pytest.mark.parametrize("mode", ["master", "nomaster", "bf16_pure"])
def test_gpt_trains_with_fp32_norms(tmp_path, mode):
    # eps 1e-4: AdamW's 1e-8 is zero in an fp16 optimizer state (nomaster keeps it in fp16)
    summary, _ = train(tmp_path, [*GPT_TINY, f"precision={mode}", "trainer.max_steps=12", "optimizer.eps=1e-4"])
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert summary["val/loss"] < 4.15 * 0.97  # below chance (ln 64 = 4.16) after a few steps


# ---- 4. trainer.deterministic on CUDA ------------------------------------------------------------

def test_deterministic_sets_the_cublas_workspace_before_the_device_is_touched(monkeypatch):
    from mptrain.train import recipe

    from .conftest import compose_config

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    real = recipe.resolve_device
    monkeypatch.setattr(recipe, "resolve_device", lambda d: seen.append(recipe.os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
                        or real(d))
    recipe.build(compose_config(["trainer.device=cpu", "trainer.deterministic=true", "trainer.max_steps=1"]))
    assert seen == [":4096:8"]
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice is kept
    recipe.build(compose_config(["trainer.device=cpu", "trainer.deterministic=true", "trainer.max_steps=1"]))
    assert seen[-1] == ":16:8"


@pytest.mark.parametrize("warn_only", [False, True])
def test_deterministic_warn_only_reaches_torch_and_is_restored(warn_only):
    from mptrain.train.recipe import backend_settings

    from .conftest import compose_config

    t = compose_config(["trainer.deterministic=true", f"trainer.deterministic_warn_only={warn_only}"]).trainer
    with backend_settings(t):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled() == warn_only
        assert not torch.backends.cudnn.benchmark  # autotuning picks kernels by timing: not reproducible
    assert not torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


# ---- 5. distributed: units, seeding, per-rank RNG --------------------------------------------------

UNITS_SCRIPT = """
import json, sys, torch
from hydra import compose, initialize_config_dir
from torch.distributed.fsdp import FSDPModule
from mptrain.cli.main import config_dir
from mptrain.parallel import distributed
from mptrain.train.recipe import build

out = {}
base = ["trainer.device=cpu", "trainer.strategy=fsdp", "precision=bf16", "trainer.batch_size=8", "seed=5",
        "trainer.max_steps=1", "optimizer=adamw"]
models = {"gpt": ["model=gpt", "model.dim=16", "model.layers=2", "model.heads=2", "dataset=synthetic_tokens",
                  "dataset.seq_len=8", "dataset.vocab_size=32", "dataset.train_tokens=1024", "dataset.val_tokens=64"],
          "resnet18": ["model=resnet18", "dataset=synthetic", "dataset.image_size=16", "dataset.train_size=32",
                       "dataset.val_size=8"]}
with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    for name, ov in models.items():
        c = build(compose("config", overrides=base + ov))
        fsdp = {n: m for n, m in c.base_model.named_modules() if isinstance(m, FSDPModule)}
        norms = [n for n, m in fsdp.items() if isinstance(m, torch.nn.BatchNorm2d)]
        out[name] = {"units": sorted(n for n in fsdp if n not in norms), "norm_units": len(norms),
                     "norm_dtypes": sorted({str(p.dtype) for n in norms for p in fsdp[n].parameters()}),
                     "fused": c.optimizer.defaults.get("fused"), "draw": torch.rand(4).tolist()}
        step = c.optimizer.step  # the fused kernel runs on the sharded (DTensor) parameters
        with c.precision.autocast():
            loss = c.task.loss(c.model, c.to_device(next(iter(c.train_loader))))
        loss.backward()
        step()
json.dump(out, open(sys.argv[1] + f"/rank{c.dist.rank}.json", "w"))
distributed.teardown(c.dist)
"""


def torchrun_script(script: str, tmp_path: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    (tmp_path / "script.py").write_text(script)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(tmp_path / "script.py"), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_fsdp_units_per_block_fused_adamw_and_seed_plus_rank(tmp_path):
    proc = torchrun_script(UNITS_SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # each transformer block its own unit; the tied embedding/head in the root (""); each ResNet stage one unit
    assert ranks[0]["gpt"]["units"] == ["", "blocks.0", "blocks.1", "ln_f", "positions"]
    assert ranks[0]["resnet18"]["units"] == ["", "conv1", "fc", "layer1", "layer2", "layer3", "layer4"]
    # batch norms: float32 units of their own beside their float32 statistics (bf16 weights were refused)
    assert ranks[0]["resnet18"]["norm_units"] == 20 and ranks[0]["resnet18"]["norm_dtypes"] == ["torch.float32"]
    assert ranks[0]["gpt"]["fused"] is True
    for r, got in enumerate(ranks):  # after the model is built, rank r draws from seed + r
        torch.manual_seed(5 + r)
        assert got["gpt"]["draw"] == pytest.approx(torch.rand(4).tolist(), abs=0)
    assert ranks[0]["gpt"]["draw"] != ranks[1]["gpt"]["draw"]


DRAW_MODEL = """
import os
import torch
from torch import nn

class Draws(nn.Module):
    '''An MLP with dropout that logs, per rank, one draw of the global generator at each training call.'''

    def __init__(self, num_classes, log_dir):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.5), nn.Linear(32, num_classes))
        self.log_dir = log_dir

    def forward(self, x):
        if self.training:
            with open(os.path.join(self.log_dir, f"draws{os.environ['RANK']}.txt"), "a") as f:
                f.write(f"{torch.rand(()).item():.10f}\\n")
        return self.net(x)
"""


@pytest.mark.slow
def test_each_rank_resumes_its_own_generator(tmp_path):
    """Two ranks draw different dropout masks; a resume restores each rank's own generator, so the draws after
    the resume are those of the straight run, on both ranks (restoring rank 0's on every rank breaks rank 1)."""
    from .test_distributed import BASE, model_state, torchrun

    (tmp_path / "drawmodel.py").write_text(DRAW_MODEL)
    (tmp_path / "conf" / "model").mkdir(parents=True)
    args = ["--config-dir", str(tmp_path / "conf"), *[a for a in BASE if not a.startswith("model=")], "model=draws",
            "checkpoint.every_steps=2", "checkpoint.keep_last=3"]
    runs = {}
    for name, extra in [("straight", []), ("resumed", [f"resume={tmp_path}/straight/run/checkpoints/step_2.pt"])]:
        (tmp_path / name).mkdir()
        (tmp_path / "conf" / "model" / "draws.yaml").write_text(
            f"_target_: drawmodel.Draws\nnum_classes: ${{dataset.num_classes}}\nlog_dir: {tmp_path / name}\n")
        proc = torchrun([*args, "trainer.max_steps=4", *extra, f"hydra.run.dir={tmp_path}/{name}/run"],
                        cwd=tmp_path, env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [(tmp_path / name / f"draws{r}.txt").read_text().split() for r in (0, 1)]
    straight, resumed = runs["straight"], runs["resumed"]
    assert straight[0] != straight[1]  # seed + rank
    assert [d[2:] for d in straight] == resumed  # steps 3 and 4, each rank its own stream
    a, b = model_state(tmp_path / "straight" / "run"), model_state(tmp_path / "resumed" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
