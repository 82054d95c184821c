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

from mptrain.errors import ConfigError
from mptrain.precision import bf16_fused
from mptrain.precision.bf16_fused import LOW16 as _LOW16

UPDATES = ("nearest", "stochastic", "kahan")
BF16_RESOLUTION = 2.0**-8  # an update below |w| * 2^-8 cannot change a bf16 weight


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 -> bfloat16, unbiased: add 16 random bits below bf16's last bit, then truncate.

    A value a fraction f of the way from its lower bf16 neighbour (in magnitude) to the next rounds up
    with probability f. inf and NaN pass through unchanged."""
    x = x.contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((x.view(torch.int32) + noise) & _LOW16).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


class _RoundingTally:
    """Running sums behind `update_rounding_stats`, so a step can add its tensors chunk by chunk."""

    def __init__(self, with_compensation: bool):
        self.lost = self.changed = self.nonzero = self.n = 0
        self.comp_sum = self.upd_sum = 0.0
        self.with_compensation = with_compensation

    def add(self, before, intended, after, compensation=None) -> None:
        for i, (b, d, a) in enumerate(zip(before, intended, after)):
            if b.dtype != torch.bfloat16:
                continue
            b32 = b.float()
            moving = d != 0
            nearest = (b32 + d).to(torch.bfloat16)
            self.lost += int(((nearest == b) & moving).sum())
            self.nonzero += int(moving.sum())
            self.changed += int((a != b).sum())
            self.n += b.numel()
            self.upd_sum += float(d.abs().sum())
            if compensation is not None and compensation[i] is not None:
                self.comp_sum += float(compensation[i].float().abs().sum())

    def result(self) -> dict:
        out = {
            "lost_nearest": self.lost / self.nonzero if self.nonzero else 0.0,
            "changed": self.changed / self.n if self.n else 0.0,
            "bf16_elements": self.n,
        }
        if self.with_compensation:
            out["compensation_ratio"] = self.comp_sum / self.upd_sum if self.upd_sum > 0 else 0.0
        return out


def update_rounding_stats(before: list[torch.Tensor], intended: list[torch.Tensor], after: list[torch.Tensor],
                          compensation: list[torch.Tensor | None] | None = None) -> dict:
    """What bf16 rounding did to one step's updates (bf16 tensors only; fp32 ones lose nothing).

    `before`/`after`: the weights around the step; `intended`: the fp32 updates the optimizer computed.
    Returns the fraction of nonzero intended updates that round-to-nearest would lose (the weight rounds
    back to itself), the fraction of weights that actually changed, and, with `compensation`, the mean
    |compensation| relative to the mean |intended update| (how much the buffer carries)."""
    tally = _RoundingTally(compensation is not None)
    tally.add(before, intended, after, compensation)
    return tally.result()


def _views(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive slices of `flat`, shaped like `tensors`."""
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _chunks(params: list[torch.Tensor], limit: int) -> list[list[int]]:
    """Indices of `params` in order, cut where the running element count would pass `limit`."""
    out, size = [[]], 0
    for i, p in enumerate(params):
        if out[-1] and size + p.numel() > limit:
            out.append([])
            size = 0
        out[-1].append(i)
        size += p.numel()
    return out if out[0] else []


class PureBf16Optimizer(torch.optim.Optimizer):
    """Base: the fp32 update of each subclass is written with the chosen rounding rule.

    The update runs over all parameters of a group at once: grouped by (device, dtype), cut into chunks of
    at most `chunk_numel` elements, each chunk's gradients, state and weights are copied into three flat
    fp32 buffers (one `_foreach_copy_` each), the arithmetic is one op per pass over a whole buffer, and
    the results are copied back (rounded to bf16 by the copy). Every op is the one the per-tensor rule
    would apply, in the same order, so the numbers do not depend on the grouping. Temporary memory is
    3 x 4 bytes x min(chunk_numel, the group's size), or x the largest tensor if that is larger.

    `compile=True` updates each bf16 tensor with one torch.compile'd function instead (bf16_fused.py: one
    pass over memory; needs a working compiler; may differ from the eager update by a bf16 ulp, rarely);
    steps that compute `last_stats`, and fp32 tensors, still take the eager path.

    `seed` (default: the run seed, ``torch.initial_seed()``) seeds the stochastic-rounding generator;
    all data-parallel ranks then draw the same noise, so replicated weights stay identical."""

    # elements per chunk (None: by device). On a CPU 512K keeps the buffers (6 MB) cache-sized and cheap to
    # allocate: a 16M chunk was 4x slower, and with mptrain's huge-page allocator a 1M one 2-10x slower on a
    # busy machine; on a GPU 16M (192 MB) keeps the launches per step few.
    chunk_numel: int | None = None

    def __init__(self, params, defaults: dict, update: str = "nearest", seed: int | None = None,
                 compile: bool = False):
        if update not in UPDATES:
            raise ConfigError(f"precision.update={update!r} is invalid: choose one of {', '.join(UPDATES)}")
        super().__init__(params, defaults)
        self.update = update
        self.compile = compile
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
        self._cpu_work: torch.Tensor | None = None  # see _workspace

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
    def _write(self, params: list[torch.Tensor], p32: torch.Tensor, delta: torch.Tensor, spare: torch.Tensor,
               tally: _RoundingTally | None) -> None:
        """params += delta, rounded to their dtype by the update rule. `p32` holds the weights in fp32,
        `delta` the fp32 update (flat, in the order of `params`); `spare` is a free buffer of the same size.
        All three are overwritten."""
        record = None
        if tally is not None:
            record = ([p.detach().clone() for p in params], _views(delta.clone(), params))
        comps = None
        if params[0].dtype == torch.float32 or self.update == "nearest":
            p32.add_(delta)
            torch._foreach_copy_(params, _views(p32, params))  # copy_ rounds to nearest even (exact for fp32)
        elif self.update == "stochastic":
            p32.add_(delta)
            noise = spare.view(torch.int32)
            for v in _views(noise, params):  # one draw per tensor, in parameter order: the seed fixes the stream
                v.random_(0, 1 << 16, generator=self.generator)
            # add 16 random bits below bf16's last bit and truncate (as stochastic_round_bf16; inf, NaN kept)
            rounded = noise.add_(p32.view(torch.int32)).bitwise_and_(_LOW16).view(torch.float32)
            torch.where(torch.isfinite(p32), rounded, p32, out=rounded)
            torch._foreach_copy_(params, _views(rounded, params))
        else:
            comps = []
            for p in params:
                state = self.state[p]
                if "compensation" not in state:
                    state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                comps.append(state["compensation"])
            torch._foreach_copy_(_views(spare, params), comps)
            delta.add_(spare)  # y: this step's update plus what earlier roundings dropped
            spare.copy_(p32).add_(delta)
            torch._foreach_copy_(params, _views(spare, params))
            torch._foreach_copy_(_views(spare, params), params)
            delta.sub_(spare.sub_(p32))  # new - old is exact in fp32: y minus it is the part not applied
            torch._foreach_copy_(comps, _views(delta, params))
        if record is not None:
            tally.add(record[0], record[1], [p.detach() for p in params], comps)

    def _extra(self, p: torch.Tensor) -> torch.Tensor | None:
        """The compiled write's extra input: fresh noise (stochastic) or the compensation buffer (kahan)."""
        if self.update == "stochastic":
            return torch.randint(0, 1 << 16, p.shape, dtype=torch.int32, device=p.device, generator=self.generator)
        if self.update == "kahan":
            state = self.state[p]
            if "compensation" not in state:
                state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return state["compensation"]
        return None

    def _workspace(self, device: torch.device, size: int, chunk: int) -> torch.Tensor:
        """Three fp32 rows of at least `size`. On a CPU the buffer (at most a chunk: 6 MB) is kept between
        steps: a fresh one is freshly page-faulted memory every step, which cost 2-5x on small models."""
        if device.type != "cpu":
            return torch.empty(3, size, dtype=torch.float32, device=device)  # the caching allocator reuses it
        work = self._cpu_work
        if work is None or work.shape[1] < size:
            work = torch.empty(3, size, dtype=torch.float32)
            if size <= chunk:
                self._cpu_work = work
        return work

    def _step_chunk(self, group: dict, params: list[torch.Tensor], bufs: tuple, tally) -> None:
        raise NotImplementedError

    def _step_compiled(self, group: dict, params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tally = _RoundingTally(self.update == "kahan") if self._want_stats else None
        for group in self.param_groups:
            buckets: dict = {}  # (device, dtype) -> parameters with a gradient, in group order
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for (device, dtype), params in buckets.items():
                if self.compile and tally is None and dtype == torch.bfloat16:
                    self._step_compiled(group, params)
                    continue
                limit = self.chunk_numel or (1 << 19 if device.type == "cpu" else 1 << 24)
                chunks = _chunks(params, limit)
                work = self._workspace(device, max(sum(params[i].numel() for i in c) for c in chunks), limit)
                for c in chunks:
                    n = sum(params[i].numel() for i in c)
                    self._step_chunk(group, [params[i] for i in c], tuple(w[:n] for w in work), tally)
        if tally is not None:
            self.last_stats = tally.result()
            self._want_stats = False
        return loss


class PureBf16SGD(PureBf16Optimizer):
    """torch.optim.SGD's rule (momentum, nesterov, weight decay; dampening 0) computed in fp32."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 update: str = "nearest", seed: int | None = None, compile: bool = False):
        # nesterov without momentum is refused by the schema (OptimizerConfig), before anything is built
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay},
                         update, seed, compile)

    def _step_compiled(self, group: dict, params: list[torch.Tensor]) -> None:
        fn = bf16_fused.compiled("sgd")
        momentum, decay = group["momentum"], group["weight_decay"] != 0
        scalars = {first: _on_device([group["weight_decay"], momentum, -group["lr"], 0.0 if first else momentum],
                                     params[0].device) for first in (False, True)}
        for p in params:
            state = self.state[p]
            first = momentum != 0 and "momentum_buffer" not in state
            if first:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"] if momentum != 0 else None
            p_, g, buf, extra = bf16_fused.flat([p, p.grad, buf, self._extra(p)])
            fn(p_, g, buf, extra, scalars[first], self.update, decay, group["nesterov"])

    def _step_chunk(self, group: dict, params: list[torch.Tensor], bufs: tuple, tally) -> None:
        g, p32, buf = bufs
        torch._foreach_copy_(_views(g, params), [p.grad for p in params])
        torch._foreach_copy_(_views(p32, params), params)
        if group["weight_decay"] != 0:
            g.add_(p32, alpha=group["weight_decay"])
        momentum = group["momentum"]
        delta, spare = g, buf
        if momentum != 0:
            states = [self.state[p] for p in params]
            fresh = {i for i, s in enumerate(states) if "momentum_buffer" not in s}
            for i in fresh:  # a parameter's first step: its buffer is its gradient
                states[i]["momentum_buffer"] = torch.empty_like(params[i], memory_format=torch.preserve_format)
            buffers = [s["momentum_buffer"] for s in states]
            if not fresh:
                torch._foreach_copy_(_views(buf, params), buffers)
                buf.mul_(momentum).add_(g)
            elif len(fresh) == len(params):
                buf.copy_(g)
            else:  # some parameters got their first gradient later than others
                for i, (b, gi, old) in enumerate(zip(_views(buf, params), _views(g, params), buffers)):
                    if i in fresh:
                        b.copy_(gi)
                    else:
                        b.copy_(old).mul_(momentum).add_(gi)
            torch._foreach_copy_(buffers, _views(buf, params))
            if group["nesterov"]:
                g.add_(buf, alpha=momentum)
            else:
                delta, spare = buf, g
        delta.mul_(-group["lr"])
        self._write(params, p32, delta, spare, tally)


def _on_device(values: list[float], device: torch.device) -> torch.Tensor:
    """The compiled update's scalars as a device tensor. torch.tensor(..., device=cuda) copies from pageable
    memory, which waits for the device; a pinned copy goes asynchronously (the host allocator keeps the page
    until the copy has run)."""
    t = torch.tensor(values, dtype=torch.float32)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class PureBf16AdamW(PureBf16Optimizer):
    """torch.optim.AdamW's rule (decoupled weight decay, bias correction; no amsgrad) computed in fp32."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, update: str = "nearest", seed: int | None = None, compile: bool = False):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay},
                         update, seed, compile)

    def _states(self, params: list[torch.Tensor]) -> tuple[list[dict], list[float]]:
        """Each parameter's state (created on its first step) and its step count after this step."""
        states = [self.state[p] for p in params]
        for s, p in zip(states, params):
            if "step" not in s:
                s["step"] = torch.tensor(0.0)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        return states, [t.item() for t in steps]  # CPU tensors: no device sync

    def _step_compiled(self, group: dict, params: list[torch.Tensor]) -> None:
        fn = bf16_fused.compiled("adamw")
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states, ts = self._states(params)
        scalars = {}  # one tensor per distinct step count (usually one per step)
        for p, state, t in zip(params, states, ts):
            if t not in scalars:
                scalars[t] = _on_device([1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), eps,
                                         -lr / (1 - beta1**t), -lr * wd], p.device)
            p_, g, m, v, extra = bf16_fused.flat([p, p.grad, state["exp_avg"], state["exp_avg_sq"], self._extra(p)])
            fn(p_, g, m, v, extra, scalars[t], self.update, wd != 0)

    def _step_chunk(self, group: dict, params: list[torch.Tensor], bufs: tuple, tally) -> None:
        g, m, v = bufs
        states, ts = self._states(params)
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_copy_(_views(g, params), [p.grad for p in params])
        torch._foreach_copy_(_views(m, params), exp_avgs)
        m.lerp_(g, 1 - beta1)
        torch._foreach_copy_(_views(v, params), exp_avg_sqs)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        torch._foreach_copy_(exp_avgs, _views(m, params))
        torch._foreach_copy_(exp_avg_sqs, _views(v, params))
        denom = v.sqrt_()
        step_sizes = [lr / (1 - beta1**t) for t in ts]
        corrections = [math.sqrt(1 - beta2**t) for t in ts]
        if len(set(ts)) == 1:  # the usual case: one op per pass over the chunk
            denom.div_(corrections[0]).add_(eps)
            delta = m.div_(denom).mul_(-step_sizes[0])
        else:  # parameters that missed steps (no gradient) have their own bias correction
            torch._foreach_div_(_views(denom, params), corrections)
            denom.add_(eps)
            delta = m.div_(denom)
            torch._foreach_mul_(_views(delta, params), [-s for s in step_sizes])
        p32 = g  # the gradient is no longer needed
        torch._foreach_copy_(_views(p32, params), params)
        if group["weight_decay"] != 0:
            delta.add_(p32, alpha=-lr * group["weight_decay"])
        self._write(params, p32, delta, v, tally)


def build_pure_bf16_optimizer(cfg, params, update: str, seed: int | None = None,
                              compile: bool = False) -> PureBf16Optimizer:
    """The `optimizer=` group's SGD or AdamW for precision=bf16_pure."""
    if cfg.name == "sgd":
        return PureBf16SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, update=update, seed=seed, compile=compile)
    return PureBf16AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                         update=update, seed=seed, compile=compile)


def _nbytes(tensors) -> int:
    """Bytes held; a tensor subclass (torchao's low-bit optimizer state) counts its inner tensors."""
    total = 0
    for t in tensors:
        if hasattr(t, "to_local"):  # FSDP2's DTensor: this rank's shard
            t = t.to_local()
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
            inner = (getattr(t, name) for name in t.__tensor_flatten__()[0])
            total += _nbytes(x for x in inner if isinstance(x, torch.Tensor))
        else:
            total += t.numel() * t.element_size()
    return total


def memory_per_param(model_params: list[torch.Tensor], optimizer: torch.optim.Optimizer, precision=None,
                     ema: dict[str, torch.Tensor] | None = None) -> dict:
    """Bytes per model parameter of weights, gradients, optimizer state, fp32 master copies and Kahan
    compensation (call after the first step: optimizer state is created lazily); with `ema` (trainer.ema's
    fp32 average, a state_dict), its bytes too.

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
    if ema is not None:
        out["ema"] = _nbytes(v for v in ema.values() if v.is_floating_point()) / n
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}
