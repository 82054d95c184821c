"""A training recipe's three GEMMs, emulated: each quantizes its own operands as the format says.

For a Linear y = x W^T (x: N x in after flattening, W: out x in) the three GEMMs reduce over different
dimensions, and a block scale runs along the reduction dimension of the GEMM that reads it:

    output          y  = Q(x) Q_w(W)^T        x: 1 x block along in;  W: as weight_scaling says
    input gradient  dx = Q_g(dy) Q_w'(W)      dy: 1 x block along out (grad_rounding);  W: 2d -> the forward's own
                                                 Q_w(W); 1d -> blocks along out (another quantization of W)
    weight gradient dW = Q_g(H dy)^T Q(H x)   both along the tokens N; H: wgrad_hadamard's random Hadamard
                                                 transform over tiles of n tokens (H^T H = I, so dW is exact
                                                 before quantization); dy rounded as grad_rounding says

The bias gradient is the sum of the unquantized dy (as TransformerEngine computes it). Every GEMM runs in
float32. A plain format (no recipe field set) does not come here: convert.py's one quantization serves all three.

The randomness (stochastic rounding, the Hadamard signs) comes from `RecipeRandom`, never from the run's global
streams (dropout, data order stay as they were). Its generator is re-seeded at each step from (seed, rank, step),
so a resume continues bitwise and each DDP rank rounds with its own stream although only rank 0 writes the
checkpoint; the sign vector is drawn once from the seed (the same on every rank) and saved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mptrain.precision.formats import Format


def sylvester(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix of +-1 (n a power of two), Sylvester's construction: H_2k = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(signs: torch.Tensor) -> torch.Tensor:
    """H diag(signs) / sqrt(n): orthonormal (its transpose is its inverse)."""
    n = signs.numel()
    return sylvester(n).to(signs.device) * signs / math.sqrt(n)


def rotate_tokens(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """`m` (n x n) applied to every tile of n consecutive rows of `t` (N x C; zero rows pad N to whole tiles)."""
    n = m.shape[0]
    padded = F.pad(t, (0, 0, 0, (-t.shape[0]) % n))
    return (m @ padded.reshape(-1, n, t.shape[1])).reshape(-1, t.shape[1])


def round_grad(fmt: Format, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A gradient operand in `fmt`: stochastically rounded from `generator`, or to nearest (None)."""
    return fmt.quantize(x) if generator is None else fmt.quantize_stochastic(x, generator)


def forward_weight(fmt: Format, w: torch.Tensor) -> torch.Tensor:
    """W as the output GEMM reads it: tiles (2d) or blocks along in_features (1d)."""
    return fmt.quantize_tiles(w) if fmt.weight_scaling == "2d" else fmt.quantize(w)


def weight_gradient(fmt: Format, dy: torch.Tensor, x: torch.Tensor, signs: torch.Tensor | None,
                    generator: torch.Generator | None) -> torch.Tensor:
    """dW = Q_g(H dy)^T Q(H x), blocks along the tokens (dy: N x out, x: N x in, float32)."""
    if fmt.wgrad_hadamard:
        m = random_hadamard(signs)
        dy, x = rotate_tokens(dy, m), rotate_tokens(x, m)
    return round_grad(fmt.grad_format, dy.t(), generator) @ fmt.quantize(x.t()).t()


class RecipeLinear(torch.autograd.Function):
    """y = x W^T + b with a recipe format's three GEMMs (the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fmt: Format,
                random: RecipeRandom) -> torch.Tensor:
        xf = x.float()
        wq = forward_weight(fmt, weight.float())
        y = F.linear(fmt.quantize(xf), wq, None if bias is None else bias.float())
        ctx.fmt, ctx.random, ctx.x_dtype = fmt, random, x.dtype
        ctx.save_for_backward(xf, weight, wq if fmt.weight_scaling == "2d" else None)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xf, weight, wq = ctx.saved_tensors
        fmt, random = ctx.fmt, ctx.random
        generator = random.generator if fmt.grad_rounding == "stochastic" else None
        dy2 = dy.float().reshape(-1, dy.shape[-1])
        x2 = xf.reshape(-1, xf.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # the input-gradient GEMM reduces over out_features: W's blocks run along them (2d: the same tiles)
            w = wq if wq is not None else fmt.quantize(weight.float().t()).t()
            dx = (round_grad(fmt.grad_format, dy2, generator) @ w).reshape(xf.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            signs = random.signs(fmt.wgrad_hadamard, dy.device) if fmt.wgrad_hadamard else None
            dw = weight_gradient(fmt, dy2, x2, signs, generator).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None


def _mix(*parts: int) -> int:
    """One 63-bit seed from several integers (splitmix64's finaliser over their sum, step by step)."""
    h = 0
    for p in parts:
        h = (h + (p & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class RecipeRandom:
    """The recipe formats' own random streams: a torch.Generator for stochastic rounding, re-seeded each step
    from (seed, rank, step), and one Hadamard sign vector per transform size, drawn once from the seed."""

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0, rank: int = 0):
        self.device = torch.device(device)
        self.seed, self.rank = int(seed), int(rank)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(_mix(self.seed, self.rank, 0))
        self._signs: dict[int, torch.Tensor] = {}

    def configure(self, seed: int, rank: int) -> None:
        """The run's seed and this process's rank (before the first step)."""
        self.seed, self.rank = int(seed), int(rank)
        self._signs.clear()
        self.begin_step(0)

    def begin_step(self, step: int) -> None:
        self.generator.manual_seed(_mix(self.seed, self.rank, step))

    def signs(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """The random +-1 vector of the n-point transform (the same on every rank, shared by every layer)."""
        if n not in self._signs:
            g = torch.Generator().manual_seed(_mix(self.seed, n))
            self._signs[n] = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        return self._signs[n].to(device or self.device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "generator": self.generator.get_state(),
                "signs": {str(n): s.tolist() for n, s in self._signs.items()}}

    def load_state_dict(self, state: dict) -> None:
        """The saved sign vectors come back as they were; the generator is re-seeded at the next step from the
        seed, the rank (this process's own) and the step."""
        self.seed = int(state["seed"])
        self._signs = {int(n): torch.tensor(s, dtype=torch.float32) for n, s in state.get("signs", {}).items()}
        if int(state.get("rank", 0)) == self.rank:
            self.generator.set_state(state["generator"])
