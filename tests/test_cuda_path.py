"""The CUDA path checked on CPU (issue 26): what a GPU would trip over, tested where a CPU can show it."""

from __future__ import annotations

import collections
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
    monkeypatch.setattr(
        recipe, "resolve_device", lambda d: seen.append(recipe.os.environ.get("CUBLAS_WORKSPACE_CONFIG")) or real(d)
    )
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
    assert (
        not torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    )


# ---- 5. distributed: units, seeding, per-rank RNG --------------------------------------------------

UNITS_SCRIPT = """
import json, sys, torch
from hydra import compose, initialize_config_dir
from torch.distributed.fsdp import FSDPModule
from mptrain.cli.register import register
from mptrain.parallel import distributed
from mptrain.train.recipe import build

out = {}
base = ["trainer.device=cpu", "trainer.strategy=fsdp", "diagnostics=off", "precision=bf16", "trainer.batch_size=8",
        "seed=5", "trainer.max_steps=1", "optimizer=adamw"]
models = {"gpt": ["model=gpt", "model.dim=16", "model.layers=2", "model.heads=2", "dataset=synthetic_tokens",
                  "dataset.seq_len=8", "dataset.vocab_size=32", "dataset.train_tokens=1024", "dataset.val_tokens=64"],
          "resnet18": ["model=resnet18", "dataset=synthetic", "dataset.image_size=16", "dataset.train_size=32",
                       "dataset.val_size=8"]}
with initialize_config_dir(config_dir=register(), version_base="1.3"):
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
        proc = torchrun(
            [*args, "trainer.max_steps=4", *extra, f"hydra.run.dir={tmp_path}/{name}/run"],
            cwd=tmp_path,
            env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [(tmp_path / name / f"draws{r}.txt").read_text().split() for r in (0, 1)]
    straight, resumed = runs["straight"], runs["resumed"]
    assert straight[0] != straight[1]  # seed + rank
    assert [d[2:] for d in straight] == resumed  # steps 3 and 4, each rank its own stream
    a, b = model_state(tmp_path / "straight" / "run"), model_state(tmp_path / "resumed" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- 10. SLURM without torchrun --------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, host", [("gpu[03-05,09],cpu1", "gpu03"), ("node7", "node7"),
                                            ("a1,b[2-3]", "a1"), ("n[001-004]", "n001")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    from mptrain.parallel.distributed import first_host

    assert first_host(nodelist) == host


def test_slurm_variables_give_rank_world_and_local_rank(monkeypatch):
    from mptrain.parallel.distributed import env_info

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    info = env_info()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (5, 8, 1, False)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job step is one process
    assert not env_info().enabled
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("RANK", "0")  # torchrun inside an allocation wins
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (env_info().rank, env_info().world_size) == (0, 2)


@pytest.mark.slow
def test_two_srun_tasks_train_as_one_run_equal_to_torchrun(tmp_path):
    import socket

    from .test_distributed import BASE, model_state, torchrun

    args = [*BASE, "trainer.max_steps=4"]
    ref = torchrun([*args, f"hydra.run.dir={tmp_path}/torchrun"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    procs = [subprocess.Popen([sys.executable, "-m", "mptrain", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r),
                                   "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0",
                                   "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert [p.name for p in runs] == ["slurm-4242.0"]  # one run directory, named by the job step
    rows = [r for r in read_jsonl(runs[0] / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # written once, by rank 0
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    a, b = model_state(tmp_path / "torchrun"), model_state(runs[0])
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run, bit for bit


# ---- 8. host synchronisations in unlogged steps ------------------------------------------------------

# Every read of a tensor's value on the host (item, bool, float, int, tolist, cpu) and every torch.tensor(...,
# device=...) made during ten unlogged training steps. On a GPU each of these waits for the device, except the
# reads of tensors kept on the CPU by design, which are named here with why.
HOST_BY_DESIGN = {
    "bf16_pure:_states", "bf16_pure:<listcomp>",  # bf16_pure AdamW's step counters: CPU tensors, as in torch.optim
    "dataloader:__init__", "loading:_indices",  # the loader's seed and the sampler's order: CPU generators
}
# the documented counts per step: fp16 with a loss scaler decides on the host whether to skip the step
SYNCS_PER_STEP = {"dynamic": 1, "static": 1, "master": 1, "amp": 0, "bf16": 0, "bf16_pure": 0, "fp32": 0, "fp8": 0,
                  "nomaster": 1, "noscale": 0}


class HostReads:
    """Patches the reads; records each one's calling function (file:function)."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.monkeypatch = monkeypatch

    def where(self) -> str:
        f = sys._getframe(2)
        return f"{Path(f.f_code.co_filename).stem}:{f.f_code.co_name}"

    def __enter__(self):
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def patched(t, *a, _real=real, _name=name, **k):
                self.calls.append(f"{_name} in {self.where()}")
                return _real(t, *a, **k)
            self.monkeypatch.setattr(torch.Tensor, name, patched)
        real_tensor = torch.tensor

        def tensor(*a, _real=real_tensor, **k):
            if k.get("device") is not None:
                self.calls.append(f"torch.tensor(device=) in {self.where()}")
            return _real(*a, **k)
        self.monkeypatch.setattr(torch, "tensor", tensor)
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()

    def counted(self) -> list[str]:
        return [c for c in self.calls if c.split(" in ")[1] not in HOST_BY_DESIGN]


@pytest.mark.parametrize("preset", [p if p in ("dynamic", "bf16_pure") else pytest.param(p, marks=pytest.mark.slow)
                                    for p in sorted(SYNCS_PER_STEP)])  # about 15 s each on a busy CPU
def test_unlogged_steps_read_the_device_only_where_documented(tmp_path, monkeypatch, preset):
    from mptrain.config import validate
    from mptrain.run.writer import RunWriter
    from mptrain.train.callbacks.metrics import MetricsLogger
    from mptrain.train.loop import fit
    from mptrain.train.recipe import build
    from mptrain.train.state import TrainState

    from .conftest import TINY, compose_config

    cfg = compose_config([*TINY, *GPT_TINY, f"precision={preset}", "trainer.max_steps=12", "trainer.log_every=1000",
                          "precision.loss_scale.init=256" if SYNCS_PER_STEP[preset] else "seed=0"])
    validate(cfg)
    c = build(cfg)
    c.val_loader = None  # a validation reads its sums once: not a training step
    (tmp_path / "run").mkdir()
    writer = RunWriter(tmp_path / "run", tensorboard=False)
    callbacks = [MetricsLogger(writer, 1000)]
    state = TrainState()
    c.total_steps = 2  # warm-up: first steps create optimizer state
    fit(c, state, callbacks, log_every=1000)
    c.total_steps = 12
    with HostReads(monkeypatch) as reads:
        fit(c, state, callbacks, log_every=1000)
    writer.close()
    assert state.step == 12
    expected = ["item in engine:step"] * 10 * SYNCS_PER_STEP[preset]  # the skip decision: found_inf.item()
    expected.append("tolist in metrics:on_step_end")  # the last step is always logged: its row, one read
    assert sorted(reads.counted()) == sorted(expected), collections.Counter(reads.counted())


# ---- 6. torch.compile with diagnostics --------------------------------------------------------------

@pytest.mark.slow
def test_compiled_run_writes_the_diagnostics_rows_of_an_uncompiled_one(tmp_path, monkeypatch):
    """Sampled steps (1, 2, 4, 6) run the modules eagerly, the others compiled: every row has the same layers,
    counts and fractions as the uncompiled run's, within rounding (compiled steps between round differently),
    and the hooks of sampled steps cost no recompilation (as many graphs as with diagnostics off)."""
    from torch._dynamo.utils import counters

    graphs = [counters["stats"]["unique_graphs"]]  # cumulative over the process
    real_reset = torch._dynamo.reset

    def reset():  # the recipe resets dynamo after a compiled run: read its graph count first
        graphs.append(counters["stats"]["unique_graphs"])
        real_reset()
    monkeypatch.setattr(torch._dynamo, "reset", reset)
    rows = {}
    for compiled, diag in ((False, "default"), (True, "default"), (True, "off")):
        _, run_dir = train(tmp_path / f"{compiled}{diag}", [
            "model=mlp", "dataset=digits", "precision=fp32", "trainer.batch_size=32", "trainer.max_steps=6",
            f"diagnostics={diag}", "diagnostics.first_steps=2", "diagnostics.every=2",
            f"trainer.compile={str(compiled).lower()}", "checkpoint.enabled=false", "scheduler=none"])
        if diag != "off":
            rows[compiled] = [r for r in read_jsonl(run_dir / "diagnostics.jsonl") if r.get("event") == "sample"]
    assert len(graphs) == 3 and graphs[1] - graphs[0] == graphs[2] - graphs[1], graphs
    eager, comp = rows[False], rows[True]
    assert [r["step"] for r in comp] == [r["step"] for r in eager] == [1, 2, 4, 6]
    for a, b in zip(eager, comp):
        assert set(b["activations"]) == set(a["activations"]) and b["activations"]  # the hooks fired
        for layer in a["activations"]:
            assert b["activations"][layer]["count"] == a["activations"][layer]["count"]
            assert b["activations"][layer]["underflow"] == pytest.approx(a["activations"][layer]["underflow"], abs=1e-3)
        assert b["grads"]["overall"]["count"] == a["grads"]["overall"]["count"]
        for key in ("zero", "underflow", "subnormal", "overflow"):
            assert b["grads"]["overall"][key] == pytest.approx(a["grads"]["overall"][key], abs=1e-3)
        assert b["grads"]["overall"]["headroom"] == pytest.approx(a["grads"]["overall"]["headroom"], abs=0.05)


# ---- 9. fp8 without compile on CUDA -------------------------------------------------------------------

def test_fp8_on_cuda_without_compile_warns_and_only_then():
    from mptrain.train.recipe import fp8_eager_warning

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert "trainer.compile=true" in fp8_eager_warning(True, cuda, compiled=False)
    assert fp8_eager_warning(True, cuda, compiled=True) is None
    assert fp8_eager_warning(True, cpu, compiled=False) is None  # emulated on CPU: no speed to lose
    assert fp8_eager_warning(False, cuda, compiled=False) is None


# ---- 2. honest samples_per_s ----------------------------------------------------------------------------

@pytest.mark.slow
def test_samples_per_s_leaves_out_the_warm_up_step_and_validation(tmp_path, monkeypatch):
    """A first training call that takes 3 s (as a compile or cuDNN autotuning does) and validations of 3 s
    each: neither is training time, so the 3 timed steps of 32 samples take less than either (a busy CPU
    slows the steps, hence the wide margin; timing the first step made it over 3 s)."""
    import time

    from mptrain.library.models.vision import MLP

    real, calls = MLP.forward, {"train": 0}

    def slow(self, x):
        if self.training:
            calls["train"] += 1
            if calls["train"] == 1:
                time.sleep(3.0)
        else:
            time.sleep(3.0)
        return real(self, x)

    monkeypatch.setattr(MLP, "forward", slow)
    summary, _ = train(tmp_path, ["model=mlp", "trainer.batch_size=32", "trainer.max_steps=4", "trainer.eval_every=2",
                                  "diagnostics=off", "checkpoint.enabled=false", "scheduler=none"])
    timed = 3 * 32 / summary["samples_per_s"]  # seconds the timed steps took
    assert summary["samples"] == 4 * 32 and timed < 3.0, timed
    assert summary["wall_s"] > 3 * 3.0  # the slow parts did run


def test_peak_memory_separates_training_from_sampled_steps(monkeypatch):
    """CUDA's allocator counters stand in here (no GPU on CI): sampled steps' peaks go to the diagnostics."""
    from mptrain.train.state import PeakMemory

    peaks = iter([100, 180, 120, 90])  # allocated peak after each step (MiB)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks) * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 256 * 2**20)
    m = PeakMemory()
    assert m.summary() == {}  # off CUDA: the process RSS stays the only figure
    for sampled in (False, True, False, False):
        m.before_step(torch.device("cuda"))
        m.after_step(sampled)
    assert m.summary() == {"peak_memory_mb": 120.0, "peak_memory_kind": "cuda_max_allocated",
                           "peak_memory_reserved_mb": 256.0, "diagnostics_memory_mb": 60.0}
