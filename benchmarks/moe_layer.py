"""Forward+backward time of one MoE layer vs a dense SwiGLU with the same active parameters.

Dense baseline: hidden = top_k · h, so both compute the same FLOPs per token in the experts.
The MoE time includes the router, dispatch (pair list, gather, scatter-add) and aux losses.
Prints one JSON line per config: {"config", "moe_ms", "dense_ms", "ratio"} (ratio = moe/dense).

    python benchmarks/moe_layer.py [--tokens 4096] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lit_moe.moe.experts import DenseSwiGLU
from lit_moe.moe.layer import MoELayer


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of forward + backward (+ aux loss for MoE layers)."""
    samples = []
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        y = module(x)
        loss = y.float().square().mean()
        if isinstance(module, MoELayer):
            loss = loss + module.router.weighted_aux_loss()
        loss.backward()
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
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
        # Interleave the two measurements so machine noise hits both alike.
        moe_ms, dense_ms = [], []
        for _ in range(3):
            moe_ms.append(time_fwd_bwd(moe, x, args.repeats))
            dense_ms.append(time_fwd_bwd(dense, x, args.repeats))
        m, d = min(moe_ms), min(dense_ms)
        print(json.dumps({"config": f"T={args.tokens},d={args.d_model},E={num_experts},h={hidden},top{top_k}",
                          "moe_ms": round(m, 2), "dense_ms": round(d, 2), "ratio": round(m / d, 3),
                          "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
