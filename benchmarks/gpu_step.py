"""Training-step time of lit-moe's models at paper scale on one GPU, in both precision modes.

Models (paper shape by default: d=768, 12 layers, 12 heads, vocab 32768, seq 2048, batch 8):
  dense   every block a dense SwiGLU of hidden top_k·h (the MoE's active parameters)
  topk    64 experts (h=512), top-2
  softmoe SoftTopKRouter on the same 64 experts, learnable budget K = top_k·L (realised
          active experts per token are measured and printed)
  kappa   top-2 with κ-SwiGLU experts (per_gate, fused)
  hf_mixtral  transformers' MixtralForCausalLM of the same shape with
          experts_implementation="grouped_mm", as an outside reference (when installed)
Modes:
  bf16-mixed  fp32 weights, bf16 autocast (Lightning's `precision: bf16-mixed`, single GPU/DDP)
  bf16        bf16 weights, no autocast (what FSDP2's param_dtype=bf16 computes with)
A step is forward, loss (+ aux losses), backward and an AdamW step (fused on CUDA); the
median of `--steps` steps after `--warmup`. FLOPs per token: 6 × active matmul parameters
(experts counted at the realised active count) + 12·L·d·S for attention scores.

Prints one JSON line per (model, mode) with step_ms, tokens_per_s, model_tflops, mfu (against
--peak_tflops), peak_mem_gib and the ratios vs dense and vs top-k in the same mode, then a
summary line. `--small` runs the same code on CPU in seconds (tests use it):

    python benchmarks/gpu_step.py [--compile] [--peak_tflops 989] [--models dense,topk,...]
    python benchmarks/gpu_step.py --small
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_moe.flops import attention_flops_per_token, flops_per_token  # noqa: E402
from lit_moe.model import ModelConfig, Transformer  # noqa: E402
from lit_moe.module import adamw_implementation  # noqa: E402

MODES = ("bf16-mixed", "bf16")
MODELS = ("dense", "topk", "softmoe", "kappa", "hf_mixtral")


@dataclasses.dataclass
class Shape:
    vocab: int = 32768
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    num_experts: int = 64
    expert_hidden: int = 512
    top_k: int = 2
    seq_len: int = 2048
    batch: int = 8


SMALL = Shape(vocab=256, d_model=64, n_layers=2, n_heads=2, num_experts=8, expert_hidden=64, seq_len=32, batch=2)


def lit_config(name: str, shape: Shape, fused_kappa: bool = True) -> ModelConfig:
    common = dict(vocab_size=shape.vocab, seq_len=shape.seq_len, d_model=shape.d_model, n_layers=shape.n_layers,
                  n_heads=shape.n_heads, num_experts=shape.num_experts, expert_hidden=shape.expert_hidden)
    topk = {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": shape.top_k}}
    if name == "dense":
        return ModelConfig(**common, n_dense_layers=shape.n_layers, dense_hidden=shape.top_k * shape.expert_hidden)
    if name == "topk":
        return ModelConfig(**common, router=topk)
    if name == "softmoe":
        return ModelConfig(**common, router={"class_path": "lit_moe.moe.SoftTopKRouter",
                                             "init_args": {"k": float(shape.top_k)}},
                           budget={"total": float(shape.top_k * shape.n_layers), "learnable": True})
    if name == "kappa":
        return ModelConfig(**common, router=topk, experts={"class_path": "lit_moe.moe.KappaSwiGLUExperts",
                                                           "init_args": {"fused": fused_kappa}})
    raise ValueError(name)


def hf_mixtral(shape: Shape) -> torch.nn.Module | None:
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        print(json.dumps({"model": "hf_mixtral", "skipped": "transformers is not installed"}), flush=True)
        return None
    config = MixtralConfig(vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.expert_hidden,
                           num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                           num_key_value_heads=shape.n_heads, num_local_experts=shape.num_experts,
                           num_experts_per_tok=shape.top_k, max_position_embeddings=shape.seq_len,
                           tie_word_embeddings=True)
    try:
        return MixtralForCausalLM._from_config(config, experts_implementation="grouped_mm")
    except (TypeError, ValueError) as err:  # a transformers without grouped experts
        print(json.dumps({"model": "hf_mixtral", "skipped": f"grouped_mm experts unavailable: {err}"}), flush=True)
        return None


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def run(name: str, mode: str, shape: Shape, device: torch.device, args: argparse.Namespace) -> dict | None:
    torch.manual_seed(0)
    # --small keeps κ eager: compiling its kernel on a CPU takes longer than the check itself.
    model = hf_mixtral(shape) if name == "hf_mixtral" else Transformer(lit_config(name, shape, not args.small))
    if model is None:
        return None
    model = model.to(device)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    if args.compile and name != "hf_mixtral":
        for block in model.blocks:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_implementation(model))
    gen = torch.Generator(device="cpu").manual_seed(1)
    batch = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len + 1), generator=gen).to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    autocast = torch.autocast(device.type, torch.bfloat16) if mode == "bf16-mixed" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    realised: list[list[float]] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if name == "hf_mixtral":
                out = model(input_ids=inputs, labels=targets, output_router_logits=False)
                loss = out.loss
            else:
                loss = model(inputs, targets=targets) + model.weighted_aux_loss()
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        if name == "softmoe":
            realised.append([float(layer.router.last_active) for _, layer in model.moe_layers()])
    step_s = statistics.median(times)
    tokens = shape.batch * shape.seq_len
    attention = 12 * shape.n_layers * shape.d_model * shape.seq_len
    if name == "hf_mixtral":
        params = sum(p.numel() for n, p in model.named_parameters() if "experts" not in n)
        experts = sum(p.numel() for n, p in model.named_parameters() if "experts" in n)
        active = params + experts * shape.top_k / shape.num_experts
        per_layer = None
    else:  # lit_moe.flops, with SoftMoE's experts at their realised count
        per_layer = [statistics.mean(col) for col in zip(*realised)] if realised else None
        active = (flops_per_token(model, per_layer) - attention_flops_per_token(model)) / 6
    flops = (6 * active + attention) * tokens
    row = {"model": name, "mode": mode, "step_ms": round(step_s * 1e3, 2), "tokens_per_s": round(tokens / step_s),
           "model_tflops": _sig(flops / step_s / 1e12),
           "mfu": _sig(flops / step_s / (args.peak_tflops * 1e12)) if args.peak_tflops else None,
           "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
           "active_params": round(active)}
    if per_layer is not None:
        row["realised_active_experts"] = [round(k, 3) for k in per_layer]
        row["realised_active_mean"] = round(statistics.mean(per_layer), 3)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes on CPU: checks that the code runs")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each lit-moe block")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's dense bf16 peak in TFLOP/s for MFU (H100/H200 SXM: 989)")
    args = parser.parse_args(argv)
    shape = SMALL if args.small else Shape()
    if args.small:
        device = torch.device("cpu")
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: run with --small for the CPU check")
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {MODES}")
        by_model = {}
        for name in args.models.split(","):
            if name not in MODELS:
                parser.error(f"unknown model {name!r}; choose from {MODELS}")
            row = run(name, mode, shape, device, args)
            if device.type == "cuda":  # the last model's memory back before the next one
                torch.cuda.empty_cache()
            if row is None:
                continue
            by_model[name] = row
        for row in by_model.values():
            for base in ("dense", "topk"):
                if base in by_model:
                    row[f"vs_{base}"] = round(row["step_ms"] / by_model[base]["step_ms"], 3)
            row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            row["compile"] = args.compile
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
