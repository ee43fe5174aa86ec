"""Read saved models and check that a checkpoint fits (plain torch; `lit_moe.module.load_checkpoint`
builds the LightningModule from what this reads).

A checkpoint is either one `.ckpt` file (single device, DDP) or a sharded directory written
under FSDP2 (`torch.distributed.checkpoint` shards plus Lightning's `meta.pt` holding
everything that is not a tensor: hyperparameters with the model config, tokenizer JSON, loop
and callback states). Both load in a single process: a sharded one is consolidated on the fly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_moe.errors import ConfigError
from lit_moe.model import ModelConfig

# Lightning's name for the non-tensor part of a sharded checkpoint directory.
SHARDED_METADATA = "meta.pt"


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, SHARDED_METADATA))


def _missing(path: str) -> ConfigError:
    return ConfigError(f"checkpoint '{path}' does not exist; pass a .ckpt file or a sharded checkpoint "
                       f"directory written by `fit`.")


def read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint as one dict on the CPU. A sharded directory is consolidated: its metadata
    plus the full `state_dict` (the model weights; optimizer shards are not read)."""
    if os.path.isdir(path):
        return _consolidate(path)
    if not os.path.isfile(path):
        raise _missing(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {err}).") from err


def _consolidate(path: str) -> dict[str, Any]:
    # torch's own DCP-to-torch.save conversion (format_utils.dcp_to_torch_save) reads a sharded
    # checkpoint in one process this way; the key filter skips the optimizer shards.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    checkpoint = read_metadata(path)
    checkpoint.pop("tensor_shapes")
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(path),
                         planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
    except Exception as err:
        raise ConfigError(f"sharded checkpoint '{path}' cannot be read ({type(err).__name__}: {err}).") from err
    checkpoint["state_dict"] = state["state_dict"]
    return checkpoint


def read_metadata(path: str) -> dict[str, Any]:
    """A sharded checkpoint's metadata without reading its shards: `meta.pt` (everything but
    model and optimizer tensors) plus `tensor_shapes`, the stored shape of each weight."""
    if not os.path.isdir(path):
        raise _missing(path)
    if not is_sharded_checkpoint(path):
        raise ConfigError(f"checkpoint directory '{path}' has no {SHARDED_METADATA}; it is not a sharded "
                          f"checkpoint written by `fit` (or its save was interrupted).")
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = torch.load(os.path.join(path, SHARDED_METADATA), map_location="cpu", weights_only=True)
        stored = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as err:
        raise ConfigError(f"sharded checkpoint '{path}' cannot be read ({type(err).__name__}: {err}).") from err
    prefix = "state_dict."
    meta["tensor_shapes"] = {key[len(prefix):]: tuple(value.size) for key, value in stored.items()
                             if key.startswith(prefix) and isinstance(value, TensorStorageMetadata)}
    return meta


def _checkpoint_shapes(checkpoint: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    if "tensor_shapes" in checkpoint:
        return checkpoint["tensor_shapes"]
    if "state_dict" in checkpoint:
        return {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
    return None


# Model settings the CLI takes from the data module rather than from the model config.
_SOURCE = {"vocab_size": " (from the data module's tokenizer: data.vocab_size / data.tokenizer_path)",
           "seq_len": " (from data.seq_len)"}


def _likely_fields(shape_a: tuple[int, ...], shape_b: tuple[int, ...], config: ModelConfig) -> list[str]:
    """Model-config fields whose current value is a dimension that differs between the shapes."""
    sizes = {name: getattr(config, name) for name in ("vocab_size", "d_model", "num_experts", "expert_hidden",
                                                       "dense_hidden", "n_layers", "seq_len")}
    fields = []
    for a, b in zip(shape_a, shape_b):
        if a != b:
            fields += [f"model.config.{name}" for name, value in sizes.items() if value == b]
    return list(dict.fromkeys(fields)) or ["the model config"]


def check_compatible(checkpoint: dict[str, Any], module: nn.Module, path: str) -> None:
    """Raise ConfigError naming the mismatch when `checkpoint` was written for a model of another
    shape than `module` (a different config): the first differing parameter with both shapes,
    and the config fields that differ (or, without a stored config, the likely ones)."""
    theirs = _checkpoint_shapes(checkpoint)
    if theirs is None:
        return
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    mismatched = [(k, theirs[k], mine[k]) for k in mine if k in theirs and theirs[k] != mine[k]]
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    if not (mismatched or missing or unexpected):
        return
    saved = (checkpoint.get("hyper_parameters") or {}).get("config")
    current = dataclasses.asdict(module.config)
    differing = [f"{name}: {saved[name]!r} in the checkpoint, {current[name]!r} here{_SOURCE.get(name, '')}"
                 for name in current if isinstance(saved, dict) and name in saved and saved[name] != current[name]]
    if mismatched:
        name, shape_ckpt, shape_here = mismatched[0]
        problem = (f"parameter {name} has shape {list(shape_ckpt)} in the checkpoint but {list(shape_here)} in "
                   f"this model")
        likely = _likely_fields(shape_ckpt, shape_here, module.config)
    else:
        names = missing[:3] if missing else unexpected[:3]
        problem = (f"{len(missing)} parameters of this model are missing from the checkpoint (e.g. {names})" if missing
                   else f"the checkpoint has {len(unexpected)} parameters this model lacks (e.g. {names})")
        likely = ["model.config.n_layers", "model.config.n_dense_layers", "model.config.router/experts/budget"]
    cause = ("; model config differs: " + "; ".join(differing)) if differing else \
        f"; likely cause: {', '.join(likely)}"
    raise ConfigError(f"checkpoint '{path}' does not fit this model: {problem}{cause}. Use the config the "
                      f"checkpoint was trained with (`evaluate` reads it from the checkpoint itself).")


# -- `export --format safetensors` directories ------------------------------------------------
EXPORT_CONFIG = "lit_moe_config.json"  # marks a `--format safetensors` directory
WEIGHTS = "model.safetensors"


def safetensors_io():  # noqa: ANN201
    """(save_file, load_file) of safetensors, or one clear message when it is missing."""
    try:
        from safetensors.torch import load_file, save_file
    except ImportError as err:  # pragma: no cover - safetensors is a dependency
        raise ConfigError("exporting needs the safetensors package: pip install 'lit-moe[hf]'.") from err
    return save_file, load_file


def is_export_directory(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, EXPORT_CONFIG))


def load_export(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any], str]:
    """(model config, state dict with extra state, tokenizer JSON) of a `--format safetensors` directory."""
    _, load_file = safetensors_io()
    try:
        meta = json.loads(Path(path, EXPORT_CONFIG).read_text())
        state: dict[str, Any] = load_file(str(Path(path, WEIGHTS)))
        tokenizer_json = Path(path, "tokenizer.json").read_text(encoding="utf-8")
        config = ModelConfig(**meta["model_config"])
    except Exception as err:
        raise ConfigError(f"exported model '{path}' cannot be read ({type(err).__name__}: {err}).") from err
    state.update(meta.get("extra_state") or {})
    return config, state, tokenizer_json
