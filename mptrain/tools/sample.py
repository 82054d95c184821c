"""`mptrain-sample RUN_DIR [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S]`: text from a
trained language model, or (a GAN run) a grid of generated images.

The model is rebuilt from the run's config by the recipe's builder and takes the checkpoint's weights (best.pt,
else last.pt, or `--checkpoint NAME`); no training data are read. Text is encoded and decoded with the run's
own vocabulary (RUN_DIR/vocab.json, written by dataset=text). Sampling draws from a generator seeded with
--seed, so the same command gives the same text. `--temperature 0` is greedy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from mptrain.errors import ConfigError
from mptrain.library.data.text import Vocab
from mptrain.precision import Precision, resolve_device
from mptrain.run.layout import SAMPLES, VOCAB
from mptrain.tools.trained import checkpoint_path, load_checkpoint, load_weights, run_config, tool_main
from mptrain.train.recipe import build_model, build_task, model_target


def read_vocab(run_dir: Path) -> Vocab:
    path = Path(run_dir) / VOCAB
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {VOCAB}: only dataset=text runs save a vocabulary (runs trained before "
                          "mptrain wrote it, and synthetic tokens, have none to decode with)")
    try:
        return Vocab.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is damaged ({e}); it holds {{\"level\": ..., \"tokens\": [...]}}") from None


def load_model(run_dir: Path, overrides: list[str], checkpoint: str | None, facts: dict):
    """(model in eval mode, its task, its precision) of a trained run, built without its data."""
    cfg = run_config(run_dir, overrides)
    path = checkpoint_path(run_dir, checkpoint)
    ckpt = load_checkpoint(path)
    device = resolve_device(cfg.trainer.device)
    precision = Precision(cfg.precision, device)
    task = build_task(cfg, model_target(cfg), None)
    model = build_model(cfg, task, device, precision, facts)
    load_weights(model, ckpt, path)
    return model.eval(), task, precision


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0, precision: Precision | None = None) -> list[int]:
    """`tokens` new ids after `prompt`, each drawn from the softmax of the last position's logits / temperature
    (the top_k most likely only, when given; the most likely at temperature 0). The draws come from a CPU
    generator seeded with `seed`: the same arguments give the same ids."""
    if not prompt:
        raise ConfigError("the prompt encodes to no tokens; give --prompt with text of the training vocabulary")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    context = getattr(model, "seq_len", None)  # a GPT's positions end there; a recurrent model takes any length
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    for _ in range(tokens):
        window = ids[:, -context:] if context else ids
        if precision is not None:
            with precision.autocast():
                logits = model(window)[:, -1, :].float().cpu()
        else:
            logits = model(window)[:, -1, :].float().cpu()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)
        ids = torch.cat([ids, nxt.to(device)], dim=1)
    return ids[0, len(prompt):].tolist()


def sample_text(run_dir: Path, prompt: str, tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
                seed: int = 0, checkpoint: str | None = None, overrides: list[str] | None = None) -> str:
    """The prompt's continuation, decoded with the run's vocab.json."""
    if tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ConfigError("--tokens and --temperature must be >= 0 and --top-k >= 1")
    vocab = read_vocab(run_dir)
    prompt_ids = vocab.encode(prompt)  # a prompt outside the vocabulary fails before any building
    model, task, precision = load_model(run_dir, list(overrides or []), checkpoint, {"vocab_size": len(vocab.tokens)})
    if task.name != "language_modeling":
        raise ConfigError(f"{run_dir} trained a {task.name} task; text sampling needs a language model")
    ids = generate(model, prompt_ids, tokens, temperature, top_k, seed, precision)
    return vocab.decode(ids)


def sample_images(run_dir: Path, seed: int = 0, count: int = 64, checkpoint: str | None = None,
                  overrides: list[str] | None = None) -> Path:
    """A GAN run's grid of `count` generated images from the noise of `seed`: RUN_DIR/samples/seed_<S>.png."""
    from mptrain.library.models.gan import sample_grid

    model, task, precision = load_model(run_dir, list(overrides or []), checkpoint, {})
    if task.name != "gan":
        raise ConfigError(f"{run_dir} trained a {task.name} task; image samples need a GAN run (model=dcgan)")
    with precision.autocast():
        return sample_grid(model, Path(run_dir) / SAMPLES / f"seed_{seed}.png", count=count, seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mptrain-sample", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a language-model or GAN run directory")
    parser.add_argument("overrides", nargs="*", help="config changes, e.g. precision=fp32 trainer.device=cpu")
    parser.add_argument("--prompt", default="", help="text to continue (in the training file's vocabulary)")
    parser.add_argument("--tokens", type=int, default=200, help="how many tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="draw only from the K most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    parser.add_argument("--count", type=int, default=64, help="GAN: images in the grid (default 64)")
    parser.add_argument("--checkpoint", help="checkpoints/<NAME> (default best.pt, else last.pt)")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = run_config(args.run_dir, args.overrides)
        if build_task(cfg, model_target(cfg), None).name == "gan":
            print(f"written: {sample_images(args.run_dir, args.seed, args.count, args.checkpoint, args.overrides)}")
            return
        text = sample_text(args.run_dir, args.prompt, args.tokens, args.temperature, args.top_k, args.seed,
                           args.checkpoint, args.overrides)
        print(args.prompt + text)

    tool_main("mptrain-sample", body)


if __name__ == "__main__":
    main()
