"""Export a trained lit-moe model: Hugging Face Mixtral format, or lit-moe's own safetensors.

    python cli.py export --ckpt_path checkpoints/tiny/last.ckpt --format hf --output hf_model/
    python cli.py export --ckpt_path last.ckpt --format safetensors --output tiny_st/

`--format hf` writes what `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads as
`MixtralForCausalLM`: config.json, generation_config.json, model.safetensors in the Mixtral
checkpoint layout of the Hub (`model.layers.N.block_sparse_moe.experts.E.w1/w2/w3`, which
transformers 4 reads as is and transformers 5 converts on load), and the tokenizer
(tokenizer.json + tokenizer_config.json: `AutoTokenizer` gives a `PreTrainedTokenizerFast`).

The mapping (lit-moe → Mixtral):
- RoPE: lit-moe rotates adjacent pairs (2i, 2i+1) as complex numbers; Mixtral rotates the
  halves (i, i + Dh/2) (`rotate_half`). Each head's q and k projection rows are permuted
  [0, 2, 4, …, 1, 3, 5, …], which turns one convention into the other (q·k is unchanged,
  as both get the same permutation).
- Multi-head attention = grouped-query attention with num_key_value_heads = num_attention_heads;
  the fused qkv projection splits into q_proj, k_proj, v_proj.
- TopKRouter (softmax over the top-k logits) = Mixtral's softmax over all experts, top-k,
  renormalised; experts: w1 = gate, w3 = up, w2 = down (transposed to nn.Linear layout).
- Tied embeddings → tie_word_embeddings (no lm_head weight); RMSNorm eps, rope_theta,
  seq_len (max_position_embeddings) copied.
- Tokenizer: the same tokenizer.json; `<|endoftext|>` is bos/eos/pad. lit-moe encodes that
  string inside text as plain bytes (a runtime switch the JSON cannot store); transformers
  reads it as the special token, as Hugging Face tokenizers do.

Mixtral cannot express dense first blocks, SoftMoE routing (learned k, budget), a capacity
factor (dropped tokens) or κ-SwiGLU experts: those models are refused with a message naming
why; `--format safetensors` writes any model (weights, lit-moe config, tokenizer.json) and
`generate` / `evaluate` load that directory like a checkpoint.

The output directory is written under a temporary name beside it and renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_moe.atomic import write_directory
from lit_moe.checkpoint import EXPORT_CONFIG, WEIGHTS, safetensors_io
from lit_moe.errors import ConfigError
from lit_moe.model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- Mixtral ---------------------------------------------------------------------------------
def mixtral_obstacles(model: Transformer) -> list[str]:
    """Why `model` cannot be a MixtralForCausalLM (empty: it can)."""
    from lit_moe.moe.experts import SwiGLUExperts
    from lit_moe.moe.router import TopKRouter

    cfg = model.cfg
    reasons = []
    if cfg.n_dense_layers:
        reasons.append(f"its first {cfg.n_dense_layers} block(s) have a dense MLP (n_dense_layers="
                       f"{cfg.n_dense_layers}); every Mixtral block is MoE")
    routers = {type(layer.router) for _, layer in model.moe_layers()}
    if any(r is not TopKRouter for r in routers):
        names = ", ".join(sorted(r.__name__ for r in routers if r is not TopKRouter))
        reasons.append(f"its router ({names}) is not top-k with a softmax over the k winners (SoftMoE routing "
                       f"activates a learned, varying number of experts per token)")
    elif any(layer.router.capacity_factor is not None for _, layer in model.moe_layers()):
        reasons.append("its router drops tokens at a capacity factor; Mixtral is dropless")
    if model.budget is not None:
        reasons.append("it has a global expert budget (learned k per layer)")
    experts = {type(layer.experts) for _, layer in model.moe_layers()}
    if any(e is not SwiGLUExperts for e in experts):
        names = ", ".join(sorted(e.__name__ for e in experts if e is not SwiGLUExperts))
        reasons.append(f"its experts ({names}) are not plain SwiGLU (κ-SwiGLU's gate sharpness has no Mixtral "
                       f"counterpart)")
    return reasons


def rope_permutation(n_heads: int, head_dim: int) -> Tensor:
    """Row order that turns lit-moe's adjacent-pair RoPE layout into Mixtral's halves layout:
    within each head, output row i < Dh/2 takes row 2i, row Dh/2 + i takes row 2i + 1."""
    within = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(n_heads)[:, None] * head_dim + within[None, :]).flatten()


def mixtral_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The model's weights under Mixtral's names (the Hub's per-expert w1/w2/w3 layout)."""
    cfg = model.cfg
    d, heads = cfg.d_model, cfg.n_heads
    perm = rope_permutation(heads, d // heads)
    out: dict[str, Tensor] = {"model.embed_tokens.weight": model.tok_emb.weight,
                              "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([d, d, d])
        out[p + "self_attn.q_proj.weight"] = q[perm]
        out[p + "self_attn.k_proj.weight"] = k[perm]
        out[p + "self_attn.v_proj.weight"] = v
        out[p + "self_attn.o_proj.weight"] = block.attn.proj.weight
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        moe = block.mlp
        out[p + "block_sparse_moe.gate.weight"] = moe.router.gate.weight
        for e in range(cfg.num_experts):
            out[p + f"block_sparse_moe.experts.{e}.w1.weight"] = moe.experts.w_gate[e].t()
            out[p + f"block_sparse_moe.experts.{e}.w3.weight"] = moe.experts.w_up[e].t()
            out[p + f"block_sparse_moe.experts.{e}.w2.weight"] = moe.experts.w_down[e].t()
    # Own contiguous storage per tensor: safetensors refuses views and shared memory.
    return {name: t.detach().to("cpu", dtype).contiguous().clone() for name, t in out.items()}


def mixtral_config(model: Transformer, eot: int, dtype: torch.dtype) -> dict[str, Any]:
    cfg = model.cfg
    top_k = next(layer.router.top_k for _, layer in model.moe_layers())
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.expert_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,  # MHA as GQA with one head per group
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": top_k,
        "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _tokenizer_files(tokenizer, seq_len: int, eot_token: str) -> dict[str, str]:  # noqa: ANN001
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot_token, "eos_token": eot_token, "pad_token": eot_token, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": tokenizer.to_str(), "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps({k: eot_token for k in ("bos_token", "eos_token", "pad_token")})}


def export_hf(model: Transformer, tokenizer, output: str | os.PathLike, dtype: torch.dtype = torch.float32,  # noqa: ANN001
              overwrite: bool = False) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face Mixtral model directory."""
    from lit_moe.tokenizer import EOT_TOKEN, eot_id

    reasons = mixtral_obstacles(model)
    if reasons:
        raise ConfigError("this model cannot be exported as Hugging Face Mixtral: " + "; ".join(reasons) +
                          ". Use --format safetensors (lit-moe's own format, read by `generate` and `evaluate`).")
    save_file, _ = safetensors_io()
    eot = eot_id(tokenizer)
    config = mixtral_config(model, eot, dtype)
    generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "do_sample": False,
                  "max_length": model.cfg.seq_len}

    def write(tmp: Path) -> None:
        save_file(mixtral_state_dict(model, dtype), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name, text in _tokenizer_files(tokenizer, model.cfg.seq_len, EOT_TOKEN).items():
            (tmp / name).write_text(text, encoding="utf-8")

    return write_directory(output, write, overwrite)


# -- lit-moe's own safetensors format ---------------------------------------------------------
def export_safetensors(model: Transformer, tokenizer, output: str | os.PathLike,  # noqa: ANN001
                       dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Any lit-moe model: model.safetensors (the Transformer's state dict), lit_moe_config.json
    (model config and the non-tensor extra state, e.g. SoftMoE's α, θ) and tokenizer.json."""
    save_file, _ = safetensors_io()
    tensors, extra = {}, {}
    for name, value in model.state_dict().items():
        if isinstance(value, Tensor):
            value = value.detach().to("cpu")
            tensors[name] = (value.to(dtype) if value.is_floating_point() else value).contiguous().clone()
        else:
            extra[name] = value
    meta = {"format": "lit-moe-safetensors", "version": 1, "model_config": dataclasses.asdict(model.cfg),
            "extra_state": extra}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")

    return write_directory(output, write, overwrite)


# -- command line: `cli.py export` -----------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-moe export", description="Export a lit-moe checkpoint.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `fit` (.ckpt file or sharded directory)")
    p.add_argument("--format", choices=("hf", "safetensors"), default="hf",
                   help="hf: Hugging Face Mixtral (top-k, all blocks MoE); safetensors: any lit-moe model")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weight dtype (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def main(args: list[str] | None = None) -> Path:
    """`lit-moe export`: bad input raises ConfigError (cli.py prints it, exit 2)."""
    opts = _parser().parse_args(args)
    from lit_moe.module import load_checkpoint  # imports Lightning

    module, tokenizer = load_checkpoint(opts.ckpt_path)
    export = export_hf if opts.format == "hf" else export_safetensors
    path = export(module.model, tokenizer, opts.output, DTYPES[opts.dtype], opts.overwrite)
    print(f"wrote {opts.format} export to {path}")
    return path
