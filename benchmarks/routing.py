"""Routing cost: SoftMoE (LapSum soft top-k + truncation) vs top-k + softmax.

1. Selection only, forward + backward, 8192 tokens, E ∈ {8, 32, 64}: `sparse_soft_topk`
   (soft top-k + truncation, as SoftTopKRouter calls it)
   on given logits vs `torch.topk` + softmax over the winners (the ratio the issue targets).
2. The same including each router's gate (d=512 linear, fp32 logits) and aux losses.
3. A tiny-config training step (conf/tiny.yaml sizes) with SoftTopKRouter vs TopKRouter at
   the same realised number of active experts: SoftMoE with k=2, θ=0, cap=1 keeps exactly
   2 experts per token, as top-2 does, so expert FLOPs match and only routing differs.

Prints one JSON line per measurement with the ratio (soft / top-k).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lit_moe.lapsum import sparse_soft_topk
from lit_moe.model import ModelConfig, Transformer
from lit_moe.moe import SoftTopKRouter, TopKRouter


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def interleaved(fn_a, fn_b, repeats: int, rounds: int = 3) -> tuple[float, float]:
    a, b = [], []
    for _ in range(rounds):
        a.append(median_ms(fn_a, repeats))
        b.append(median_ms(fn_b, repeats))
    return min(a), min(b)


def selection(tokens: int, experts: int, repeats: int) -> dict:
    logits = torch.randn(tokens, experts, requires_grad=True)
    upstream = torch.randn(tokens, experts)

    def soft():
        w = sparse_soft_topk(logits, 2.0, 1.0, 1.8, 2.0)  # = truncate(soft_topk(...)), as the router calls it
        (w * upstream).sum().backward()

    def topk():
        vals, idx = logits.topk(2, dim=-1)
        w = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(vals, -1))
        (w * upstream).sum().backward()

    s, t = interleaved(soft, topk, repeats)
    return {"bench": "selection", "tokens": tokens, "E": experts, "soft_ms": round(s, 2), "topk_ms": round(t, 2),
            "ratio": round(s / t, 2), "target": "<= 3 at E=64"}


def router(tokens: int, experts: int, d_model: int, repeats: int) -> dict:
    x = torch.randn(tokens, d_model, requires_grad=True)
    soft_router = SoftTopKRouter(d_model, experts, k=2.0)
    topk_router = TopKRouter(d_model, experts, top_k=2)
    upstream = torch.randn(tokens, experts)

    def run(r):
        def fn():
            w = r(x)
            ((w * upstream).sum() + r.weighted_aux_loss()).backward()
        return fn

    s, t = interleaved(run(soft_router), run(topk_router), repeats)
    return {"bench": "router_with_gate", "tokens": tokens, "E": experts, "d": d_model, "soft_ms": round(s, 2),
            "topk_ms": round(t, 2), "ratio": round(s / t, 2)}


def training_step(repeats: int) -> dict:
    base = dict(vocab_size=4096, seq_len=256, d_model=128, n_layers=4, n_heads=4, num_experts=8, expert_hidden=256)
    soft_cfg = ModelConfig(**base, router={"class_path": "lit_moe.moe.SoftTopKRouter",
                                           "init_args": {"k": 2.0, "theta": 0.0, "cap": 1.0}})
    topk_cfg = ModelConfig(**base, router={"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 2}})
    batch = torch.randint(0, 4096, (16, 257))

    def run(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def fn():
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 4096), batch[:, 1:].reshape(-1)) + model.weighted_aux_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    torch.manual_seed(0)
    soft_model, topk_model = Transformer(soft_cfg), Transformer(topk_cfg)
    s, t = interleaved(run(soft_model), run(topk_model), repeats)
    active = [r.last_active.item() for _, r in soft_model.routers()]
    return {"bench": "tiny_training_step", "soft_active_per_layer": active, "topk_active_per_layer": 2,
            "soft_ms": round(s, 1), "topk_ms": round(t, 1), "ratio": round(s / t, 3), "target": "<= 1.10"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip_step", action="store_true")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    for experts in (8, 32, 64):
        print(json.dumps(selection(args.tokens, experts, args.repeats)), flush=True)
    for experts in (8, 32, 64):
        print(json.dumps(router(args.tokens, experts, 512, args.repeats)), flush=True)
    if not args.skip_step:
        print(json.dumps(training_step(max(3, args.repeats // 3))), flush=True)


if __name__ == "__main__":
    main()
