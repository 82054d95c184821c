"""Hugging Face transformers models (`model=hf_causal_lm`, `model=hf_image_classification`), built offline
from a config (`model.config={model_type: llama, ...}`) or a local directory holding config.json and weights
(`model.path`). Never the hub: a hub name is refused with how to download it first. transformers is an
extra: pip install mptrain[hf].

The models return a ModelOutput; the tasks read its `logits` (mptrain.library.tasks.output_logits)."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from mptrain.config import HFCausalLMConfig as HFLM
from mptrain.errors import ConfigError
from mptrain.library.extras import require

log = logging.getLogger("mptrain")


def _hf_config(config: dict | None, path: str | None, overrides: dict):
    transformers = require("transformers", "hf", "model=hf_*")
    if (config is None) == (path is None):
        raise ConfigError("give exactly one of model.config={model_type: ..., ...} (random weights) or "
                          "model.path=<local directory with config.json>")
    if path is not None:
        p = Path(path)
        if not (p / "config.json").is_file():
            hint = (f"{path} looks like a hub name: mptrain never downloads; fetch it first "
                    f"(hf download {path} --local-dir DIR) and pass model.path=DIR") if not p.exists() \
                else f"{path} has no config.json"
            raise ConfigError(f"model.path={path} is not a local model directory: {hint}")
        cfg = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    else:
        kwargs = dict(config)
        model_type = kwargs.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.config needs model_type (e.g. llama, gpt2, vit, convnext)")
        try:
            cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
        except ValueError as e:
            raise ConfigError(f"model.config.model_type={model_type!r}: {str(e).splitlines()[0]}") from None
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    return transformers, cfg


def _build(auto_class: str, config: dict | None, path: str | None, overrides: dict, vocab_size: int | None = None):
    transformers, cfg = _hf_config(config, path, overrides)
    if vocab_size is not None:  # special ids of the model's own tokenizer mean nothing for this data's ids
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token = getattr(cfg, key, None)
            if isinstance(token, int) and not 0 <= token < vocab_size:
                setattr(cfg, key, None)
    auto = getattr(transformers, auto_class)
    try:
        if path is not None:
            return auto.from_pretrained(str(path), config=cfg, local_files_only=True)
        return auto.from_config(cfg)
    except ValueError as e:  # a config type the auto class does not cover
        raise ConfigError(f"{auto_class} cannot build a {cfg.model_type} model: {str(e).splitlines()[0]}") from None


def hf_causal_lm(config: dict | None = None, path: str | None = None, vocab_size: int | None = None,
                 attn_implementation: str = HFLM.attn_implementation) -> nn.Module:
    """AutoModelForCausalLM. `vocab_size` (from the data when null) overrides the config's; the KV cache is
    off (training never reuses it)."""
    overrides = {"vocab_size": vocab_size, "use_cache": False, "_attn_implementation": attn_implementation}
    return _build("AutoModelForCausalLM", config, path, overrides, vocab_size)


hf_causal_lm.task = "language_modeling"  # what trains it when no task= is given


def hf_image_classification(config: dict | None = None, path: str | None = None, num_classes: int | None = None,
                            in_channels: int | None = None) -> nn.Module:
    """AutoModelForImageClassification; `num_classes` and `in_channels` (from the dataset) override the
    config's num_labels and num_channels."""
    overrides = {"num_labels": num_classes, "num_channels": in_channels}
    return _build("AutoModelForImageClassification", config, path, overrides)
