"""Rebuild a trained model and its tokenizer from a single checkpoint file."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from tokenizers import Tokenizer

from lit_moe.tokenizer import tokenizer_from_json

from lit_moe.errors import ConfigError
from lit_moe.module import LitMoE


def read_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint '{path}' does not exist; pass the path of a .ckpt file written by `fit`.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {err}).") from err


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> tuple[LitMoE, Tokenizer]:
    """(LitMoE in eval mode, tokenizer) from a checkpoint written by `fit`."""
    checkpoint = read_checkpoint(path)
    if "hyper_parameters" not in checkpoint or "config" not in checkpoint["hyper_parameters"]:
        raise ConfigError(f"checkpoint '{path}' has no lit-moe model config; was it written by lit-moe's `fit`?")
    tokenizer_json = checkpoint.get("tokenizer_json")
    if not tokenizer_json:
        raise ConfigError(f"checkpoint '{path}' carries no tokenizer; re-save it from a run that used "
                          f"lit_moe.data.LMDataModule (which stores tokenizer.json in the checkpoint).")
    # LightningCLI adds bookkeeping keys (e.g. `_instantiator`); keep only LitMoE's own arguments.
    accepted = inspect.signature(LitMoE.__init__).parameters
    module = LitMoE(**{k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted})
    module.load_state_dict(checkpoint["state_dict"])
    module.tokenizer_json = tokenizer_json
    module.to(map_location).eval()
    return module, tokenizer_from_json(tokenizer_json)
