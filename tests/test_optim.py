"""Optimizers and schedules (issue 28): any class by _target_ equals PyTorch's own loop step for step,
torchao's low-bit AdamW equals torchao's own loop, parameter groups, schedulers by _target_ after the warm-up."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mptrain.config import SchedulerConfig, validate
from mptrain.errors import ConfigError
from mptrain.library.optim import build_scheduler, param_groups
from mptrain.train.recipe import build
from mptrain.train.step import train_step

from .conftest import TINY, compose_config, read_jsonl, train

MLP = ["model=mlp", "model.width=64", "model.depth=2", "trainer.batch_size=32", "precision=fp32", "scheduler=none",
       "diagnostics=off", "checkpoint.enabled=false"]
STEPS = 5


def steps_both_ways(overrides: list[str], reference_optimizer) -> tuple[torch.nn.Module, torch.nn.Module]:
    """mptrain's step (train_step over the run's own components) and a plain PyTorch loop (a copy of the same
    initial model, the same batches, `reference_optimizer(model)`), STEPS steps each."""
    cfg = compose_config([*TINY, *MLP, *overrides])
    validate(cfg)
    c = build(cfg)
    plain = copy.deepcopy(c.model)
    init = [p.detach().clone() for p in plain.parameters()]
    batches = [b for b, _ in zip(c.train_loader, range(STEPS))]
    it = iter(batches)
    for i in range(STEPS):
        assert train_step(c, it, i + 1).applied
        c.scheduler.step()
    opt = reference_optimizer(plain)
    for x, y in batches:
        F.cross_entropy(plain(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(not torch.equal(p, q) for p, q in zip(plain.parameters(), init))  # every tensor moved
    return c.model, plain


def nanogpt_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's configure_optimizers: decay tensors of >= 2 dims only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, exact: bool = True) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


TARGETS = [
    ("torch.optim.RAdam", None, 0.0, lambda m: torch.optim.RAdam(m.parameters(), lr=3e-3)),
    (
        "torch.optim.NAdam",
        "{momentum_decay: 0.004, betas: [0.8, 0.99]}",
        0.01,
        lambda m: torch.optim.NAdam(
            m.parameters(), lr=3e-3, weight_decay=0.01, momentum_decay=0.004, betas=(0.8, 0.99)
        ),
    ),
    (
        "torch.optim.Adagrad",
        "{lr_decay: 0.01}",
        0.0,
        lambda m: torch.optim.Adagrad(m.parameters(), lr=3e-3, lr_decay=0.01),
    ),
    # AdamW by _target_ groups like the built-in: no decay on biases (nanoGPT's groups, built here by hand)
    ("torch.optim.AdamW", None, 0.1, lambda m: torch.optim.AdamW(nanogpt_groups(m, 0.1), lr=3e-3)),
]


@pytest.mark.parametrize(("target", "kwargs", "wd", "reference"),
                         [pytest.param(*t, marks=[pytest.mark.slow] * (i < 2)) for i, t in enumerate(TARGETS)],
                         ids=[t[0].rsplit(".")[-1] for t in TARGETS])  # RAdam, NAdam: slow suite
def test_optimizer_by_target_equals_pytorchs_own_loop(target, kwargs, wd, reference):
    overrides = ["optimizer=torch", f"optimizer._target_={target}", "optimizer.lr=3e-3", f"optimizer.weight_decay={wd}"]
    if kwargs:
        overrides.append(f"optimizer.kwargs={kwargs}")
    ours, theirs = steps_both_ways(overrides, reference)
    assert_same_params(ours, theirs)


def test_optimizer_by_target_takes_the_given_betas_eps_momentum_and_nesterov():
    # issue 37 case 4: they were dropped silently (betas=[0.5,0.6] recorded, (0.9, 0.999) run)
    ours, theirs = steps_both_ways(
        ["optimizer=torch", "optimizer._target_=torch.optim.Adam", "optimizer.lr=3e-3", "optimizer.betas=[0.5,0.6]",
         "optimizer.eps=1e-3"],
        lambda m: torch.optim.Adam(m.parameters(), lr=3e-3, betas=(0.5, 0.6), eps=1e-3))
    assert_same_params(ours, theirs)
    ours, theirs = steps_both_ways(
        ["optimizer=torch", "optimizer._target_=torch.optim.SGD", "optimizer.lr=0.05", "optimizer.momentum=0.5",
         "optimizer.nesterov=true"],
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5, nesterov=True))
    assert_same_params(ours, theirs)


def test_optimizer_by_target_records_its_own_name_and_leaves_unset_keys_to_the_class():
    cfg = compose_config(["optimizer=torch", "optimizer._target_=torch.optim.Adam"])
    assert cfg.optimizer.name == "torch"  # it said sgd
    c = build(compose_config([*TINY, *MLP, "optimizer=torch", "optimizer._target_=torch.optim.Adam"]))
    group = c.optimizer.param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.9, 0.999), 1e-8)  # Adam's own defaults, nothing imposed


def test_builtin_adamw_groups_biases_out_of_weight_decay_and_decay_all_puts_them_back():
    cfg = OmegaConf.create({"name": "adamw", "weight_decay": 0.1, "decay_all": None})
    w, b, ln = torch.zeros(4, 3), torch.zeros(4), torch.zeros(4)
    groups = param_groups(cfg, [w, b, ln])
    assert [len(g["params"]) for g in groups] == [1, 2] and [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert param_groups(OmegaConf.create({"name": "adamw", "weight_decay": 0.1, "decay_all": True}), [w, b]) == [w, b]
    assert param_groups(OmegaConf.create({"name": "sgd", "weight_decay": 0.1, "decay_all": None}), [w, b]) == [w, b]
    # the whole run: biases under AdamW keep their value apart from the gradient step (no decay pull to 0)
    ours, theirs = steps_both_ways(["optimizer=adamw", "optimizer.lr=3e-3", "optimizer.weight_decay=0.5",
                                    "optimizer.implementation=foreach"],
                                   lambda m: torch.optim.AdamW(nanogpt_groups(m, 0.5), lr=3e-3, foreach=True))
    assert_same_params(ours, theirs)


torchao_optim = pytest.importorskip("torchao.optim")
# torch.compile of torchao's update on a CPU costs 10-40 s a class: one fast, the others slow
LOW_BIT = [pytest.param("adamw8bit", "AdamW8bit", marks=pytest.mark.slow),
           pytest.param("adamw4bit", "AdamW4bit", marks=pytest.mark.slow), ("adamwfp8", "AdamWFp8")]


@pytest.mark.parametrize(("name", "cls"), LOW_BIT)
def test_low_bit_adamw_equals_torchaos_own_loop(name, cls, tmp_path):
    ours, theirs = steps_both_ways(
        [f"optimizer={name}", "optimizer.lr=3e-3"],
        lambda m: getattr(torchao_optim, cls)(nanogpt_groups(m, 0.01), lr=3e-3, weight_decay=0.01))
    assert_same_params(ours, theirs, exact=False)  # torch.compile'd updates: the same kernels, not always the same bits


@pytest.mark.slow  # torch.compile of torchao's update on a CPU: ~20 s a run
@pytest.mark.parametrize(("name", "low", "high"), [("adamw8bit", 2.0, 2.3), ("adamwfp8", 2.0, 2.3)])
def test_low_bit_state_bytes_per_parameter_in_the_summary(name, low, high, tmp_path):
    """Two moments per parameter: 1 byte each plus one fp32 scale per block of 256 (8-bit, fp8); the small
    tensors (biases here, 0.4% of the parameters) stay fp32. AdamW's fp32 moments are 8 bytes."""
    summary, _ = train(tmp_path, [*MLP, "model.width=256", f"optimizer={name}", "trainer.max_steps=2"])
    state = summary["memory_per_param"]["optimizer_state"]
    assert low < state < high, summary["memory_per_param"]
    fp32, _ = train(tmp_path / "fp32", [*MLP, "model.width=256", "optimizer=adamw", "trainer.max_steps=2"])
    assert fp32["memory_per_param"]["optimizer_state"] == 8.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw8bit", "adamwfp8"])
def test_low_bit_resume_is_bitwise(name, tmp_path):
    from .test_checkpoint import assert_same_tensors, final_state

    base = [*MLP, f"optimizer={name}", "trainer.max_steps=6", "checkpoint.enabled=true", "checkpoint.every_steps=3",
            "trainer.log_every=1"]
    _, ref = train(tmp_path / "ref", base)
    _, cut = train(tmp_path / "cut", [*base, f"resume={ref / 'checkpoints' / 'step_3.pt'}"])
    assert_same_tensors(final_state(ref)["model"], final_state(cut)["model"])


@pytest.mark.slow
def test_a_low_bit_resume_logs_and_records_its_tensor_lr_as_a_number(tmp_path, caplog):
    """Issue 37: resume logged torchao's tensor lr raw. Its records kept the live tensor, which the scheduler then
    updated in place, so a handler formatting late (here caplog) said "lr 0 from here" (the cosine's end). The
    records hold numbers now; metrics.jsonl's lr is a float."""
    base = [*[o for o in MLP if o != "scheduler=none"], "scheduler=cosine", "scheduler.warmup_steps=2",
            "optimizer=adamwfp8", "trainer.max_steps=4", "checkpoint.enabled=true", "checkpoint.every_steps=2",
            "trainer.log_every=1"]
    _, ref = train(tmp_path / "ref", base)
    with caplog.at_level("INFO"):
        train(tmp_path / "cut", [*base, "trainer.max_steps=6", "optimizer.lr=5e-3",
                                 f"resume={ref / 'checkpoints' / 'step_2.pt'}"])
    said = [r.getMessage() for r in caplog.records if "from here)" in r.getMessage()]
    assert said == ["resume: the optimizer runs with this run's optimizer.* settings (lr 0.005 from here)",
                    "resume: the learning rate follows this run's schedule (lr 0.005 from here)"]
    assert not any("tensor(" in r.getMessage() for r in caplog.records)
    rows = [r for r in read_jsonl(tmp_path / "cut" / "run" / "metrics.jsonl") if "lr" in r]
    assert rows and all(type(r["lr"]) is float for r in rows)


@pytest.mark.slow
def test_a_fresh_process_reads_a_low_bit_checkpoint(tmp_path):
    """A resume starts in a new process, where torchao.optim (which registers its state classes as safe to
    load) is not imported yet: the checkpoint still loads, its state is torchao's; without torchao, one line."""
    _, run = train(tmp_path, [*MLP, "optimizer=adamw8bit", "trainer.max_steps=2", "checkpoint.enabled=true"])
    path = run / "checkpoints" / "last.pt"
    read = ("import sys; from mptrain.checkpoint.files import load_file; ckpt = load_file(sys.argv[1]); "
            "print(type(next(iter(ckpt['optimizer']['state'].values()))['exp_avg']).__name__)")
    p = subprocess.run([sys.executable, "-c", read, str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "OptimState8bit", p.stderr[-2000:]
    hidden = "import sys; sys.modules['torchao'] = None; " + read  # torchao not installed
    p = subprocess.run([sys.executable, "-c", hidden, str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "pip install mptrain[fp8]" in p.stderr.splitlines()[-1], p.stderr[-2000:]


@pytest.mark.parametrize("warmup", [0, 2])
def test_a_target_schedule_of_a_tensor_lr_optimizer_follows_pytorchs_own(warmup):
    """Issue 37: torchao's optimizers keep lr as a tensor, which the set-up probe of a scheduler._target_ shared and
    stepped in place: the run started at lr 1e-3 * 0.5^20. Their lrs now equal a float-lr optimizer's under
    PyTorch's own StepLR (after LinearLR's warm-up when given)."""
    cfg = sched(_target_="torch.optim.lr_scheduler.StepLR", kwargs={"step_size": 1, "gamma": 0.5}, warmup_steps=warmup)

    def ours(o):
        return build_scheduler(cfg, o, 20)

    def theirs(o):
        main = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
        if not warmup:
            return main
        ramp = torch.optim.lr_scheduler.LinearLR(o, start_factor=cfg.warmup_start_factor, total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(o, [ramp, main], milestones=[warmup])

    p = torch.nn.Parameter(torch.zeros(256, 256))
    opt = torchao_optim.AdamWFp8([p], lr=0.1)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # what made it shared
    s = ours(opt)
    got = []
    for _ in range(6):
        got.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        s.step()
    assert got == pytest.approx(lrs_of(theirs, 6), rel=1e-6)  # the tensor lr is float32


def sched(**kw) -> OmegaConf:
    return OmegaConf.structured(SchedulerConfig(**kw))


def lrs_of(make, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    s = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_scheduler_by_target_equals_pytorchs_own():
    ours = lrs_of(lambda o: build_scheduler(sched(_target_="torch.optim.lr_scheduler.StepLR",
                                                  kwargs={"step_size": 3, "gamma": 0.5}), o, 20), 12)
    theirs = lrs_of(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), 12)
    assert ours == theirs


def test_scheduler_by_target_follows_the_linear_warm_up():
    ours = lrs_of(lambda o: build_scheduler(sched(_target_="torch.optim.lr_scheduler.ExponentialLR",
                                                  kwargs={"gamma": 0.9}, warmup_steps=4, warmup_start_factor=0.2),
                                            o, 20), 10)
    by_hand = [0.1 * (0.2 + 0.8 * k / 4) for k in range(4)] + [0.1 * 0.9 ** (k - 4) for k in range(4, 10)]
    assert ours == pytest.approx(by_hand, rel=1e-12)


def test_scheduler_by_target_resumes_from_its_state_dict():
    make = lambda o: build_scheduler(sched(_target_="torch.optim.lr_scheduler.CosineAnnealingLR",  # noqa: E731
                                           kwargs={"T_max": 10}, warmup_steps=3), o, 20)
    straight = lrs_of(make, 12)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    first = make(opt)
    for _ in range(5):
        opt.step()
        first.step()
    state, group_lr = first.state_dict(), opt.param_groups[0]["lr"]
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    second = make(opt2)
    second.load_state_dict(state)
    opt2.param_groups[0]["lr"] = group_lr  # the optimizer's own state_dict carries it in a checkpoint
    rest = []
    for _ in range(7):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        second.step()
    assert rest == pytest.approx(straight[5:], rel=1e-12)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["optimizer=torch", "optimizer._target_=torch.optim.Nope"],
            r"^optimizer._target_=torch.optim.Nope cannot be imported",
        ),
        (
            ["optimizer=torch", "optimizer._target_=torch.optim.SGD", "optimizer.kwargs={bogus: 1}"],
            r"^optimizer._target_=torch.optim.SGD: .*bogus.*optimizer.kwargs",
        ),
        (["optimizer=adamw8bit", "precision=bf16_pure"], r"^precision=bf16_pure updates bf16 weights with its own"),
        (["scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau"], r"is not a step-driven LR scheduler"),
        (["optimizer.name=lion"], r"^optimizer.name='lion' is invalid: choose one of sgd, adamw, adamw8bit"),
        # a given key the class does not take is refused, never dropped (issue 37 case 4)
        (
            ["optimizer=torch", "optimizer._target_=torch.optim.RAdam", "optimizer.momentum=0.5"],
            r"^optimizer.momentum=0.5: torch.optim.RAdam takes no momentum "
            r"\(it takes lr, betas, eps, weight_decay, .*\); "
            r"remove optimizer.momentum",
        ),
        (
            ["optimizer=torch", "optimizer._target_=torch.optim.SGD", "optimizer.betas=[0.5,0.6]"],
            r"^optimizer.betas=\[0.5, 0.6\]: torch.optim.SGD takes no betas",
        ),
        (
            [
                "optimizer=torch",
                "optimizer._target_=torch.optim.Adam",
                "optimizer.eps=1e-3",
                "optimizer.kwargs={eps: 1e-4}",
            ],
            r"^optimizer.eps is given twice",
        ),
        (
            ["optimizer=sgd", "optimizer._target_=torch.optim.Adam"],
            r"^optimizer._target_='torch.optim.Adam' is invalid: a class goes with optimizer=torch, not optimizer=sgd",
        ),
        (
            ["optimizer=torch", "optimizer._target_=null"],
            r"^optimizer._target_=None is invalid: optimizer=torch builds",
        ),
        (
            ["optimizer=adamw", "optimizer.betas=null"],
            r"^optimizer.betas=None is invalid: null .* is for optimizer=torch",
        ),
        # the classes' own ValueErrors and TypeErrors, and targets that are not optimizers / schedulers
        (
            ["optimizer=torch", "optimizer._target_=torch.optim.Adam", "optimizer.kwargs={betas: [2.0, 0.9]}"],
            r"^optimizer._target_=torch.optim.Adam: Invalid beta parameter at index 0: 2.0; .*optimizer.kwargs$",
        ),
        (["optimizer=adamw", "optimizer.kwargs={bogus: 1}"], r"^optimizer=adamw: .*'bogus'; .*optimizer.kwargs$"),
        (
            ["optimizer=sgd", "optimizer.kwargs={dampening: 0.5}", "optimizer.nesterov=true", "optimizer.momentum=0.9"],
            r"^optimizer=sgd: Nesterov momentum requires a momentum and zero dampening; .*optimizer.kwargs$",
        ),
        (
            ["optimizer=torch", "optimizer._target_=builtins.dict"],
            r"^optimizer._target_=builtins.dict is not a torch.optim.Optimizer",
        ),
        (
            ["scheduler._target_=torch.optim.lr_scheduler.OneCycleLR", "scheduler.kwargs={max_lr: 0.01}"],
            r"^scheduler._target_=torch.optim.lr_scheduler.OneCycleLR: "
            r"You must define either total_steps.*scheduler.kwargs$",
        ),
        (
            ["scheduler._target_=torch.optim.SGD"],
            r"^scheduler._target_=torch.optim.SGD is not a step-driven LR scheduler",
        ),
        # failures that would come only within the run: found at set-up
        (
            [
                "trainer.max_steps=5",
                "scheduler._target_=torch.optim.lr_scheduler.OneCycleLR",
                "scheduler.kwargs={max_lr: 0.01, total_steps: 4}",
            ],
            r"^scheduler._target_=.*OneCycleLR lasts total_steps=4, fewer than the run's 5 steps.*total_steps to 5",
        ),
        (
            [
                "trainer.max_steps=9",
                "scheduler.warmup_steps=3",
                "scheduler._target_=torch.optim.lr_scheduler.OneCycleLR",
                "scheduler.kwargs={max_lr: 0.01, total_steps: 5}",
            ],
            r"fewer than the run's 6 steps after 3 of warm-up",
        ),
        (
            [
                "trainer.max_steps=2",
                "scheduler._target_=torch.optim.lr_scheduler.StepLR",
                "scheduler.kwargs={step_size: 0}",
            ],
            r"^scheduler._target_=.*StepLR fails at step 1 of the run's 2: ZeroDivisionError",
        ),
        (
            [
                "optimizer.lr=0.01",
                "scheduler._target_=torch.optim.lr_scheduler.ExponentialLR",
                "scheduler.kwargs={gamma: -1.0}",
            ],
            r"^scheduler._target_=.*ExponentialLR sets lr=-0.01 at step 1; fix scheduler.kwargs",
        ),
    ],
)
def test_bad_optimizer_settings_fail_before_the_run_dir(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, [*MLP, *overrides])
    assert not (tmp_path / "run").exists()


def test_bf16_pure_adamw_takes_the_parameter_groups(tmp_path):
    summary, _ = train(tmp_path, [*MLP, "precision=bf16_pure", "optimizer=adamw", "optimizer.weight_decay=0.1",
                                  "trainer.max_steps=3"])
    assert summary["status"] == "completed"


def test_a_longer_run_resumed_follows_the_new_schedule_from_its_first_step(tmp_path):
    """2 warm-up steps (the same whatever the run length), then cosine to the end. A 3-step run resumed with
    trainer.max_steps=6 is the straight 6-step run bitwise: step 4 trains at the 6-step schedule's lr. (The
    saved optimizer state held the lr the 3-step schedule set for after its end; step 4 trained at that.)"""
    from .test_checkpoint import assert_same_tensors, final_state

    base = [*MLP, "scheduler=cosine", "scheduler.warmup_steps=2", "trainer.log_every=1", "checkpoint.enabled=true"]
    _, short = train(tmp_path / "short", [*base, "trainer.max_steps=3"])
    _, longer = train(tmp_path / "long", [*base, "trainer.max_steps=6"])
    _, resumed = train(tmp_path / "resumed", [*base, "trainer.max_steps=6",
                                              f"resume={short / 'checkpoints' / 'last.pt'}"])
    assert_same_tensors(final_state(longer)["model"], final_state(resumed)["model"])
    rows = {run: [r["lr"] for r in read_jsonl(run / "metrics.jsonl") if "lr" in r] for run in (longer, resumed)}
    assert rows[resumed] == rows[longer][3:]


def test_a_run_by_target_from_before_optimizer_torch_had_its_name_resumes(tmp_path):
    # such a checkpoint's config says name: sgd (and the momentum/betas it never passed): it is the same optimizer
    overrides = [*MLP, "optimizer=torch", "optimizer._target_=torch.optim.Adam", "optimizer.lr=3e-3",
                 "checkpoint.enabled=true", "checkpoint.every_steps=2"]
    train(tmp_path, [*overrides, "trainer.max_steps=2"])
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["config"]["optimizer"].update(name="sgd", momentum=0.9, nesterov=False, betas=[0.9, 0.999], eps=1e-8)
    torch.save(ckpt, last)
    summary, _ = train(tmp_path, [*overrides, "trainer.max_steps=4", "resume=auto"])
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert [e["key"] for e in summary["events"]] == ["trainer.max_steps"]  # no optimizer.* change recorded
