"""Byte-level BPE tokenizer: train, save, load.

A thin layer over Hugging Face ``tokenizers``. Byte-level means every string, in any script,
encodes without unknown tokens and decodes back to exactly the same string.

The one special token, ``<|endoftext|>`` (id 0), separates documents in the token stream.
Its literal text inside a document is encoded as ordinary bytes (``encode_special_tokens``),
so data can never forge a document boundary and the round trip stays exact for any text.
That switch is a runtime setting the tokenizer JSON does not store: build tokenizers with
:func:`load_tokenizer` or :func:`tokenizer_from_json` to get it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lit_moe.atomic import atomic_path
from lit_moe.errors import ConfigError  # a ValueError the CLI prints as one clear message

EOT_TOKEN = "<|endoftext|>"

__all__ = [
    "EOT_TOKEN",
    "eot_id",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_from_json",
    "train_bpe",
]


def _configure(tok: Tokenizer) -> Tokenizer:
    # Treat "<|endoftext|>" inside text as plain bytes; only the data pipeline inserts EOT ids.
    tok.encode_special_tokens = True
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` with at most ``vocab_size`` tokens.

    The vocabulary holds ``<|endoftext|>`` (id 0), the 256 byte symbols, then merges. It can
    come out smaller than ``vocab_size`` when the text is too small to yield that many merges.
    """
    if vocab_size < 257:  # EOT + 256 byte symbols is the smallest useful vocabulary
        raise ConfigError(f"vocab_size must be at least 257 (EOT + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        # Seed all 256 byte symbols so that text unseen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # A progress bar in a log file is just noise.
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _configure(tok)


def tokenizer_from_json(text: str) -> Tokenizer:
    """Build a tokenizer from its JSON string (e.g. one stored in a checkpoint)."""
    return _configure(Tokenizer.from_str(text))


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer saved with :func:`save_tokenizer` (a ``tokenizer.json`` file)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file not found: {path!r}. Pass the path of an existing tokenizer.json, "
            "or leave tokenizer_path unset to train a new tokenizer on the training data."
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        json.loads(text)  # a clearer failure than the Rust parser's for non-JSON files
        tok = tokenizer_from_json(text)
    except Exception as e:  # json/UTF-8 errors, and tokenizers raises a bare Exception
        raise ConfigError(
            f"{path!r} is not a Hugging Face tokenizers JSON file ({e}). Pass a tokenizer.json "
            "written by lit_moe.tokenizer.save_tokenizer or tokenizers.Tokenizer.save."
        ) from e
    if tok.token_to_id(EOT_TOKEN) is None:
        raise ConfigError(
            f"tokenizer {path!r} has no {EOT_TOKEN!r} token, which the data pipeline needs as "
            "document separator. Train one with lit_moe.tokenizer.train_bpe."
        )
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike[str]) -> None:
    """Write ``tok`` to ``path`` atomically: readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tok.save(str(tmp))


def eot_id(tok: Tokenizer) -> int:
    """Id of the ``<|endoftext|>`` document separator."""
    i = tok.token_to_id(EOT_TOKEN)
    if i is None:
        raise ValueError(f"tokenizer has no {EOT_TOKEN!r} token")
    return i
