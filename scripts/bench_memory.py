"""The other half of a run's memory: optimizer state per parameter and activations kept for backward.

Part 1, optimizer state: one step of each optimizer on the same GPT, then `memory_per_param` (the figure
summary.json records): bytes per parameter of weights, gradients and optimizer state. torchao's low-bit
AdamW stores both moments in 8 bits, 4 bits or fp8 with one fp32 scale per block of 256 (tensors under 4096
elements stay fp32).

Part 2, activations: the bytes autograd keeps for backward in one training forward (each storage once,
weights excluded) plus the inputs the checkpointed regions hold for their recomputation, for
trainer.activation_checkpointing=none|blocks|all, fp32 and bf16 autocast; the gradients are checked equal.

    python scripts/bench_memory.py     # GPT dim 256, 6 layers, seq 256, batch 8 (CPU: compiling torchao takes minutes)
    python scripts/bench_memory.py --dim 512 --layers 12 --device cuda
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import mptrain  # noqa: F401
from mptrain.config import OptimizerConfig
from mptrain.library.models import checkpointing
from mptrain.library.models.language import GPT
from mptrain.library.optim import build_optimizer
from mptrain.precision.bf16_pure import memory_per_param

OPTIMIZERS = ["sgd", "adamw", "adamw8bit", "adamw4bit", "adamwfp8"]


def optimizer_rows(model_fn, tokens, device) -> list[tuple[str, dict]]:
    rows = []
    for name in OPTIMIZERS:
        model = model_fn().to(device)
        cfg = OmegaConf.structured(OptimizerConfig(name=name, lr=1e-3, weight_decay=0.01))
        opt = build_optimizer(cfg, model.parameters())
        loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        rows.append((name, memory_per_param(list(model.parameters()), opt)))
    return rows


def activation_bytes(model, tokens, dtype) -> tuple[int, dict]:
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()

    def pack(t):
        keep(t)
        return t

    def hold(module, args) -> None:  # what a checkpointed region keeps to recompute from
        for a in args:
            if isinstance(a, torch.Tensor):
                keep(a)

    handles = [m.register_forward_pre_hook(hold) for m in model.modules() if getattr(m, "_mptrain_checkpointed", False)]
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = F.cross_entropy(model(tokens).float().flatten(0, 1), tokens.roll(-1, 1).flatten())
    for h in handles:
        h.remove()
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params), {n: p.grad for n, p in model.named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=["optimizers", "activations"], help="one of the two tables")
    args = ap.parse_args()
    device = torch.device(args.device)
    vocab = 4096

    def model_fn():
        torch.manual_seed(0)
        return GPT(vocab, args.seq_len, args.dim, args.layers, heads=max(1, args.dim // 64), dropout=0.0)

    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len), device=device)
    n = sum(p.numel() for p in model_fn().parameters())
    print(
        f"GPT dim {args.dim}, {args.layers} layers, seq {args.seq_len}, batch {args.batch_size}: {n / 1e6:.2f}M "
        "params\n"
    )
    if args.only != "activations":
        print("| optimizer | weights | grads | optimizer state | total (B/param) |\n|---|---|---|---|---|")
        for name, m in optimizer_rows(model_fn, tokens, device):
            print(
                f"| `{name}` | {m['weights']:.2f} | {m['grads']:.2f} | {m['optimizer_state']:.3f} | {m['total']:.2f} |"
            )
    if args.only == "optimizers":
        return
    print(
        "\n| activation_checkpointing | compute | kept for backward (MB) | vs none | max grad difference "
        "|\n|---|---|---|---|---|"
    )
    for dtype in (torch.float32, torch.bfloat16):
        base, ref = None, None
        for mode in checkpointing.MODES:
            model = copy.deepcopy(model_fn()).to(device).train()
            checkpointing.apply(model, mode)
            kept, grads = activation_bytes(model, tokens, dtype)
            if base is None:
                base, ref = kept, grads
            diff = max(float((grads[k] - ref[k]).abs().max()) for k in ref)
            print(
                f"| `{mode}` | {str(dtype).removeprefix('torch.')} | {kept / 2**20:.1f} | {kept / base:.2f} | "
                f"{diff:.1e} |"
            )


if __name__ == "__main__":
    main()
