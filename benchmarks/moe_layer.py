"""Forward+backward time of one MoE layer vs a dense SwiGLU with the same active parameters.

Dense baseline: hidden = top_k · h, so both compute the same FLOPs per token in the experts.
The MoE time includes the router, dispatch (pair list, gather, scatter-add) and aux losses.
Each step is forward + backward with gradients set to None first, as an optimizer's zero_grad
does, so the gradients' allocation is part of it.

The two sides alternate step by step (MoE, dense, dense, MoE, ...): this host's speed drifts
by ±30% within seconds, and neighbouring steps see the same machine. `ratio` is the median of
the per-pair ratios; `ratio_of_minima` (fastest MoE step / fastest dense step) is printed too.
Prints one JSON line per config: {"config", "moe_ms", "dense_ms" (medians), "ratio", ...}.

    python benchmarks/moe_layer.py [--tokens 4096] [--pairs 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lit_moe.moe.experts import DenseSwiGLU
from lit_moe.moe.layer import MoELayer


def step_ms(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Milliseconds of one forward + backward (+ aux loss for MoE layers)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    y = module(x)
    loss = y.float().square().mean()
    if isinstance(module, MoELayer):
        loss = loss + module.router.weighted_aux_loss()
    loss.backward()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=30, help="alternating (MoE, dense) step pairs")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as LitMoE does on CPU
    torch.manual_seed(0)
    for num_experts, hidden, top_k in [(8, 1024, 2), (64, 256, 2)]:
        moe = MoELayer(args.d_model, hidden, num_experts,
                       router={"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": top_k}},
                       experts={"class_path": "lit_moe.moe.SwiGLUExperts"},
                       dispatch={"class_path": "lit_moe.moe.SortedDispatch"})
        dense = DenseSwiGLU(args.d_model, top_k * hidden)
        x = torch.randn(args.tokens, args.d_model, requires_grad=True)
        for _ in range(args.warmup):
            step_ms(moe, x), step_ms(dense, x)
        moe_ms, dense_ms = [], []
        for i in range(args.pairs):
            order = ((moe, moe_ms), (dense, dense_ms)) if i % 2 == 0 else ((dense, dense_ms), (moe, moe_ms))
            for module, samples in order:
                samples.append(step_ms(module, x))
        ratios = [m / d for m, d in zip(moe_ms, dense_ms)]
        print(json.dumps({"config": f"T={args.tokens},d={args.d_model},E={num_experts},h={hidden},top{top_k}",
                          "moe_ms": round(statistics.median(moe_ms), 2),
                          "dense_ms": round(statistics.median(dense_ms), 2),
                          "ratio": round(statistics.median(ratios), 3),
                          "ratio_of_minima": round(min(moe_ms) / min(dense_ms), 3),
                          "pairs": args.pairs, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
