"""Pure bfloat16 training: weights, gradients and optimizer state in bf16, no fp32 master copy.

bf16 keeps 8 significant bits, so round-to-nearest loses an update below 2^-8 of its weight (2^-9 just
below a power of two). The optimizers here compute each update in fp32 from the bf16 state and then
write the new weight with one of three rules (`precision.update`):

- ``nearest``: plain round-to-nearest-even (the ablation: small updates are lost);
- ``stochastic``: round up with probability equal to the distance from the lower neighbour, so the
  stored weight equals the fp32 result in expectation; the noise comes from the optimizer's own
  generator, whose state is checkpointed (resume is bitwise);
- ``kahan``: a bf16 compensation buffer per parameter keeps what rounding dropped and adds it to the
  next update (Kahan summation), so small updates accumulate exactly over steps.

Parameters that are float32 (norm layers, with keep_norm_fp32) are updated exactly in fp32 and get no
compensation buffer. Optimizer state is held in each parameter's dtype, rounded to nearest.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

UPDATES = ("nearest", "stochastic", "kahan")
BF16_RESOLUTION = 2.0**-8  # an update below |w| * 2^-8 cannot change a bf16 weight
_LOW16 = -65536  # int32 mask 0xFFFF0000: keeps sign, exponent and bf16's 7 stored mantissa bits


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 -> bfloat16, unbiased: add 16 random bits below bf16's last bit, then truncate.

    A value a fraction f of the way from its lower bf16 neighbour (in magnitude) to the next rounds up
    with probability f. inf and NaN pass through unchanged."""
    x = x.contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((x.view(torch.int32) + noise) & _LOW16).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def update_rounding_stats(before: list[torch.Tensor], intended: list[torch.Tensor], after: list[torch.Tensor],
                          compensation: list[torch.Tensor | None] | None = None) -> dict:
    """What bf16 rounding did to one step's updates (bf16 tensors only; fp32 ones lose nothing).

    `before`/`after`: the weights around the step; `intended`: the fp32 updates the optimizer computed.
    Returns the fraction of nonzero intended updates that round-to-nearest would lose (the weight rounds
    back to itself), the fraction of weights that actually changed, and, with `compensation`, the mean
    |compensation| relative to the mean |intended update| (how much the buffer carries)."""
    lost = changed = nonzero = 0
    comp_sum = upd_sum = 0.0
    n = 0
    for i, (b, d, a) in enumerate(zip(before, intended, after)):
        if b.dtype != torch.bfloat16:
            continue
        b32 = b.float()
        moving = d != 0
        nearest = (b32 + d).to(torch.bfloat16)
        lost += int(((nearest == b) & moving).sum())
        nonzero += int(moving.sum())
        changed += int((a != b).sum())
        n += b.numel()
        upd_sum += float(d.abs().sum())
        if compensation is not None and compensation[i] is not None:
            comp_sum += float(compensation[i].float().abs().sum())
    out = {
        "lost_nearest": lost / nonzero if nonzero else 0.0,
        "changed": changed / n if n else 0.0,
        "bf16_elements": n,
    }
    if compensation is not None:
        out["compensation_ratio"] = comp_sum / upd_sum if upd_sum > 0 else 0.0
    return out


class PureBf16Optimizer(torch.optim.Optimizer):
    """Base: the fp32 update of each subclass is written with the chosen rounding rule.

    `seed` (default: the run seed, ``torch.initial_seed()``) seeds the stochastic-rounding generator;
    all data-parallel ranks then draw the same noise, so replicated weights stay identical."""

    def __init__(self, params, defaults: dict, update: str = "nearest", seed: int | None = None):
        if update not in UPDATES:
            raise ConfigError(f"precision.update={update!r} is invalid: choose one of {', '.join(UPDATES)}")
        super().__init__(params, defaults)
        self.update = update
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in (torch.bfloat16, torch.float32):
                    raise ConfigError(f"precision=bf16_pure updates bfloat16 or float32 parameters, not {p.dtype}")
                if hasattr(p, "device_mesh"):
                    raise ConfigError("precision=bf16_pure does not support trainer.strategy=fsdp yet; use ddp")
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None else torch.device("cpu")
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(torch.initial_seed() if seed is None else seed)
        self._want_stats = False
        self.last_stats: dict | None = None

    # ---- diagnostics ----------------------------------------------------------------------------
    def request_stats(self) -> None:
        """Compute `last_stats` during the next step (a few extra passes over the weights)."""
        self._want_stats = True

    # ---- checkpoints: the generator state travels as a plain uint8 tensor -----------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["rng_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("rng_state", None)
        super().load_state_dict(state_dict)
        if rng is not None:
            self.generator.set_state(rng.cpu() if self.generator.device.type == "cpu" else rng)

    # ---- the write ------------------------------------------------------------------------------
    def _apply(self, p: torch.Tensor, delta: torch.Tensor, record: list | None) -> None:
        """p += delta (delta in fp32), rounded to p's dtype by the update rule."""
        before = p.detach().clone() if record is not None else None
        comp = None
        if p.dtype == torch.float32:
            p.add_(delta)
        elif self.update == "nearest":
            p.copy_(p.float() + delta)  # copy_ rounds to nearest even
        elif self.update == "stochastic":
            p.copy_(stochastic_round_bf16(p.float() + delta, self.generator))
        else:
            state = self.state[p]
            if "compensation" not in state:
                state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            comp = state["compensation"]
            y = delta + comp.float()  # this step's update plus what earlier roundings dropped
            p32 = p.float()
            p.copy_(p32 + y)
            comp.copy_(y - (p.float() - p32))  # new - old is exact in fp32: the part not applied
        if record is not None:
            record.append((before, delta, p.detach(), comp))

    def _step_params(self, group: dict, p: torch.Tensor, record: list | None) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        record = [] if self._want_stats else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_params(group, p, record)
        if record is not None:
            b, d, a, c = zip(*record) if record else ((), (), (), ())
            self.last_stats = update_rounding_stats(list(b), list(d), list(a),
                                                    list(c) if self.update == "kahan" else None)
            self._want_stats = False
        return loss


class PureBf16SGD(PureBf16Optimizer):
    """torch.optim.SGD's rule (momentum, nesterov, weight decay; dampening 0) computed in fp32."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 update: str = "nearest", seed: int | None = None):
        if nesterov and momentum <= 0:
            raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay},
                         update, seed)

    def _step_params(self, group: dict, p: torch.Tensor, record: list | None) -> None:
        g = p.grad.float()
        if group["weight_decay"] != 0:
            g = g.add(p.float(), alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            state = self.state[p]
            if "momentum_buffer" not in state:
                buf = g.clone()
                state["momentum_buffer"] = buf.to(p.dtype)
            else:
                buf = state["momentum_buffer"].float().mul_(momentum).add_(g)
                state["momentum_buffer"].copy_(buf)
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        self._apply(p, g * -group["lr"], record)  # out of place: g may be the gradient or the fp32 buffer


class PureBf16AdamW(PureBf16Optimizer):
    """torch.optim.AdamW's rule (decoupled weight decay, bias correction; no amsgrad) computed in fp32."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, update: str = "nearest", seed: int | None = None):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay},
                         update, seed)

    def _step_params(self, group: dict, p: torch.Tensor, record: list | None) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"].item()
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        g = p.grad.float()
        m = state["exp_avg"].float().lerp_(g, 1 - beta1)
        v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
        step_size = lr / (1 - beta1**t)
        # out of place from here: for fp32 parameters m and v are the state tensors themselves
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        delta = (m / denom).mul_(-step_size)
        if group["weight_decay"] != 0:
            delta.add_(p.float(), alpha=-lr * group["weight_decay"])
        self._apply(p, delta, record)


def build_pure_bf16_optimizer(cfg, params, update: str, seed: int | None = None) -> PureBf16Optimizer:
    """The `optimizer=` group's SGD or AdamW for precision=bf16_pure."""
    if cfg.name == "sgd":
        return PureBf16SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, update=update, seed=seed)
    return PureBf16AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                         update=update, seed=seed)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_per_param(model_params: list[torch.Tensor], optimizer: torch.optim.Optimizer, precision=None) -> dict:
    """Bytes per model parameter of weights, gradients, optimizer state, fp32 master copies and Kahan
    compensation (call after the first step: optimizer state is created lazily).

    Gradients are counted in the dtype the optimizer reads them (fp32 on the masters in `master` mode).
    Scalar step counters are left out."""
    n = sum(p.numel() for p in model_params) or 1
    master = getattr(precision, "master", None)
    masters = master.masters if master is not None else []
    opts = list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else [optimizer]  # MultiOptimizer
    opt_params = [p for o in opts for g in o.param_groups for p in g["params"]]
    state = comp = 0
    for s in (s for o in opts for s in o.state.values()):
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if k == "compensation":
                    comp += _nbytes([v])
                else:
                    state += _nbytes([v])
    out = {
        "weights": _nbytes(model_params) / n,
        "grads": _nbytes(opt_params) / n,
        "optimizer_state": state / n,
        "master": _nbytes(masters) / n,
        "compensation": comp / n,
    }
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}
