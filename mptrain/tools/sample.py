"""`mptrain-sample RUN_DIR [options] [overrides]`: text from a trained language model, or a GAN run's image grid.

Options: --prompt TEXT, --tokens N, --temperature T, --top-k K, --seed S, --ema, --checkpoint NAME, --count N (GAN).

The model is rebuilt from the run's config by the recipe's builder and takes the checkpoint's weights (best.pt,
else last.pt, or `--checkpoint NAME`; `--ema`: its averaged weights); no training data are read. Text is encoded
and decoded with the tokenizer the run trained with (mptrain.library.data.tokenize.load_saved): RUN_DIR/vocab.json
(byte, char, word) or RUN_DIR/tokenizer.json (bpe:N, a tokenizers JSON), which a run saves when it starts
(dataset=text, dataset=hf, and dataset=tokens copies its DIR's); a dataset=tokens run without one falls back to
the tokenizer in its dataset.path. An empty prompt starts from the tokenizer's newline (its ids for "\n"), or
from token 0 where the tokenizer has no newline (a word vocabulary: <unk>). Sampling draws from a generator
seeded with --seed, so the same command gives the same text. `--temperature 0` is greedy. Only ids the
tokenizer can decode are drawn (a model may have more outputs, e.g. a vocabulary padded to 50304).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from mptrain.errors import ConfigError
from mptrain.library.data.tokenize import HFTokenizer, VocabTokenizer, load_saved
from mptrain.library.data.tokens import read_meta
from mptrain.library.tasks import output_logits
from mptrain.precision import Precision, resolve_device
from mptrain.run.layout import SAMPLES, TOKENIZER, VOCAB
from mptrain.tools.trained import (
    checkpoint_path,
    load_checkpoint,
    load_weights,
    quiet,
    require_ema,
    restore_plan,
    run_config,
    tool_main,
)
from mptrain.train.given import Given, check_passed
from mptrain.train.recipe import build_model, build_task, model_target

log = logging.getLogger("mptrain")

Tokenizer = VocabTokenizer | HFTokenizer


def token_dir(cfg: DictConfig) -> Path | None:
    """A dataset=tokens run's DIR (train.bin, meta.json and the tokenizer mptrain-prepare-text wrote)."""
    if cfg.dataset.get("_target_") == "mptrain.library.data.tokens.tokens" and cfg.dataset.get("path"):
        return Path(cfg.dataset.path)
    return None


def _load(directory: Path) -> Tokenizer | None:
    try:
        return load_saved(directory)
    except (ValueError, KeyError, TypeError) as e:  # a damaged vocab.json (tokenizer.json: ConfigError already)
        raise ConfigError(
            f"{directory / VOCAB} is damaged ({e}); it holds {{\"level\": ..., \"tokens\": [...]}}"
        ) from None


def read_tokenizer(run_dir: Path, cfg: DictConfig | None = None) -> Tokenizer:
    """The run's tokenizer: RUN_DIR's tokenizer.json or vocab.json, else (dataset=tokens) the one in its DIR."""
    run_dir = Path(run_dir)
    tok = _load(run_dir)
    if tok is not None:
        return tok
    data = token_dir(cfg) if cfg is not None else None
    if data is not None:
        tok = _load(data) if data.is_dir() else None
        if tok is not None:
            log.info("decoding with the tokenizer of dataset.path=%s (the run directory has no copy)", data)
            return tok
        raise ConfigError(f"{run_dir} has no {VOCAB} or {TOKENIZER}, nor has its dataset.path={data}: the token files "
                          f"were written without a tokenizer; put the one that made them in {run_dir / TOKENIZER} "
                          "(a Hugging Face tokenizers JSON) to decode them")
    raise ConfigError(f"{run_dir} has no {VOCAB} or {TOKENIZER}: only language-model runs on text (dataset=text, hf, "
                      "tokens with a tokenizer) save one; runs trained before mptrain wrote it, and synthetic tokens, "
                      "have none to decode with")


def start_ids(tok: Tokenizer) -> list[int]:
    """An empty prompt's start: the tokenizer's ids for a newline (a text's lines begin after one), or token 0
    where it has none (a char vocabulary without "\n", a word vocabulary: <unk>)."""
    try:
        ids = [int(i) for i in tok.encode("\n")]
    except ConfigError:
        ids = []
    return ids or [0]


def model_vocab(cfg: DictConfig, tok: Tokenizer) -> int:
    """The vocab_size the run's data gave the model: dataset.vocab_size, else a token DIR's meta.json, else the
    tokenizer's (what dataset=text, hf and tokens give training)."""
    data = token_dir(cfg)
    return int(cfg.dataset.get("vocab_size") or (read_meta(data).get("vocab_size") if data and data.is_dir() else None)
               or tok.vocab_size)


def load_model(run_dir: Path, overrides: list[str], checkpoint: str | None, facts: dict, ema: bool = False,
               given: Given | None = None):
    """(model in eval mode, its task, its precision) of a trained run, built without its data (`given`: the model
    and task objects a run trained from Python was passed)."""
    given = given or Given()
    cfg = run_config(run_dir, overrides)
    check_passed(cfg, given, ("model", "task"))  # no data is needed here
    path = checkpoint_path(run_dir, checkpoint)
    ckpt = load_checkpoint(path)
    if ema:
        require_ema(ckpt, path)
    with quiet():  # what is printed is the sample: the precision's plan would bury it
        device = resolve_device(cfg.trainer.device)
        precision = Precision(cfg.precision, device)
        task = given.task if given.task is not None else build_task(cfg, model_target(cfg, given.model), None)
        model = build_model(cfg, task, device, precision, facts, given.model)
        restore_plan(precision, ckpt)
        load_weights(model, ckpt, path, ema=ema)
    return model.eval(), task, precision


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0, precision: Precision | None = None, vocab: int | None = None) -> list[int]:
    """`tokens` new ids after `prompt`, each drawn from the softmax of the last position's logits / temperature
    (the top_k most likely only, when given; the most likely at temperature 0), among ids < `vocab` when given
    (what the tokenizer decodes). The draws come from a CPU generator seeded with `seed`: the same arguments
    give the same ids."""
    if not prompt:
        raise ConfigError("the prompt encodes to no tokens; give --prompt with text of the training vocabulary, "
                          "or none at all to start from a newline")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    # a GPT's positions end at seq_len, a Hugging Face model's at max_position_embeddings; a recurrent model takes any
    context = getattr(model, "seq_len", None) or getattr(
        getattr(model, "config", None), "max_position_embeddings", None
    )
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    for _ in range(tokens):
        window = ids[:, -context:] if context else ids
        if precision is not None:
            with precision.autocast():
                logits = output_logits(model(window))[:, -1, :].float().cpu()
        else:
            logits = output_logits(model(window))[:, -1, :].float().cpu()
        if vocab is not None:
            if vocab > logits.shape[-1]:
                raise ConfigError(f"the run's tokenizer has {vocab} tokens but the model predicts "
                                  f"{logits.shape[-1]}: it is not the tokenizer this model was trained with")
            logits[:, vocab:] = float("-inf")
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


def continuation(run_dir: Path, prompt: str, tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0, checkpoint: str | None = None, overrides: list[str] | None = None,
                 ema: bool = False, given: Given | None = None) -> tuple[list[int], Tokenizer]:
    """(the generated ids after the prompt, the run's tokenizer that decodes them)."""
    if tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ConfigError("--tokens and --temperature must be >= 0 and --top-k >= 1")
    overrides = list(overrides or [])
    cfg = run_config(run_dir, overrides)
    tok = read_tokenizer(run_dir, cfg)
    # a prompt outside the vocabulary fails before any building
    prompt_ids = [int(i) for i in tok.encode(prompt)] if prompt else start_ids(tok)
    model, task, precision = load_model(run_dir, overrides, checkpoint, {"vocab_size": model_vocab(cfg, tok)}, ema,
                                        given)
    if task.name != "language_modeling":
        raise ConfigError(f"{run_dir} trained a {task.name} task; text sampling needs a language model")
    return generate(model, prompt_ids, tokens, temperature, top_k, seed, precision, vocab=tok.vocab_size), tok


def sample_text(run_dir: Path, prompt: str = "", tokens: int = 200, temperature: float = 1.0,
                top_k: int | None = None, seed: int = 0, checkpoint: str | None = None,
                overrides: list[str] | None = None, ema: bool = False, given: Given | None = None) -> str:
    """The prompt's continuation (of a newline, for an empty prompt), decoded with the run's tokenizer."""
    ids, tok = continuation(run_dir, prompt, tokens, temperature, top_k, seed, checkpoint, overrides, ema, given)
    return tok.decode(ids)


def sample_images(run_dir: Path, seed: int = 0, count: int = 64, checkpoint: str | None = None,
                  overrides: list[str] | None = None, ema: bool = False, given: Given | None = None) -> Path:
    """A GAN run's grid of `count` generated images from the noise of `seed`: RUN_DIR/samples/seed_<S>.png."""
    from mptrain.library.models.gan import sample_grid

    model, task, precision = load_model(run_dir, list(overrides or []), checkpoint, {}, ema, given)
    if task.name != "gan":
        raise ConfigError(f"{run_dir} trained a {task.name} task; image samples need a GAN run (model=dcgan)")
    with precision.autocast():
        return sample_grid(model, Path(run_dir) / SAMPLES / f"seed_{seed}.png", count=count, seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mptrain-sample", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a language-model or GAN run directory")
    parser.add_argument("overrides", nargs="*", help="config changes, e.g. precision=fp32 trainer.device=cpu")
    parser.add_argument("--prompt", default="", help="text to continue, in the run's tokenizer (default: none, "
                        "the text starts after a newline: the tokenizer's ids for \"\\n\", else token 0)")
    parser.add_argument("--tokens", type=int, default=200, help="how many tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="draw only from the K most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    parser.add_argument("--count", type=int, default=64, help="GAN: images in the grid (default 64)")
    parser.add_argument("--checkpoint", help="checkpoints/<NAME> (default best.pt, else last.pt)")
    parser.add_argument("--ema", action="store_true",
                        help="sample from the checkpoint's EMA weights (trainer.ema) instead of the live ones")
    args = parser.parse_intermixed_args(argv)  # options anywhere among the overrides

    def body() -> None:
        cfg = run_config(args.run_dir, args.overrides)
        if build_task(cfg, model_target(cfg), None).name == "gan":
            print(
                "written: "
                f"{sample_images(args.run_dir, args.seed, args.count, args.checkpoint, args.overrides, args.ema)}"
            )
            return
        text = sample_text(args.run_dir, args.prompt, args.tokens, args.temperature, args.top_k, args.seed,
                           args.checkpoint, args.overrides, args.ema)
        print(args.prompt + text)

    tool_main("mptrain-sample", body)


if __name__ == "__main__":
    main()
