"""Forward+backward time of one MoE layer vs a dense SwiGLU with the same active parameters.

Dense baseline: hidden = top_k · h, so both compute the same FLOPs per token in the experts.
The MoE time includes the router, dispatch (pair list, gather, scatter-add) and aux losses.
Each step is forward + backward with gradients set to None first, as an optimizer's zero_grad
does, so the gradients' allocation is part of it.

The two sides alternate step by step (MoE, dense, dense, MoE, ...): this host's speed drifts
by ±30% within seconds, and neighbouring steps see the same machine. `ratio` is the median of
the per-pair ratios; `ratio_of_minima` (fastest MoE step / fastest dense step) is printed too.
`expert_matmul_ms`: the part of the median MoE step spent inside the experts' grouped matmul
calls (timed around `grouped_matmul`'s backends), and `expert_matmul_vs_dense` that time over
the dense step in the same pair: the share of the ratio the rest of the layer cannot remove.
Prints one JSON line per config: {"config", "moe_ms", "dense_ms" (medians), "ratio", ...}.

    python benchmarks/moe_layer.py [--tokens 4096] [--pairs 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import lit_moe.moe.grouped_matmul as grouped_matmul
from lit_moe.cpu_memory import retain_freed_memory
from lit_moe.moe.experts import DenseSwiGLU
from lit_moe.moe.layer import MoELayer


_matmul_seconds = [0.0]


def _timed(function):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _matmul_seconds[0] += time.perf_counter() - start
    return run


for _name in ("_expert_forward", "_expert_backward", "_mkl_forward", "_mkl_backward", "_loop_forward", "_loop_backward"):
    setattr(grouped_matmul, _name, _timed(getattr(grouped_matmul, _name)))


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
    parser.add_argument("--system_malloc", action="store_true",
                        help="leave glibc malloc as it is (LitMoE on CPU retains freed memory by default)")
    args = parser.parse_args()
    # As LitMoE does for a single-process CPU run unless model.retain_cpu_memory is false (lit_moe.cpu_memory).
    retained = False if args.system_malloc else retain_freed_memory(True)
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
        moe_ms, dense_ms, matmul_ms = [], [], []
        for i in range(args.pairs):
            order = ((moe, moe_ms), (dense, dense_ms)) if i % 2 == 0 else ((dense, dense_ms), (moe, moe_ms))
            for module, samples in order:
                _matmul_seconds[0] = 0.0
                samples.append(step_ms(module, x))
                if module is moe:
                    matmul_ms.append(_matmul_seconds[0] * 1e3)
        ratios = [m / d for m, d in zip(moe_ms, dense_ms)]
        print(json.dumps({"config": f"T={args.tokens},d={args.d_model},E={num_experts},h={hidden},top{top_k}",
                          "moe_ms": round(statistics.median(moe_ms), 2),
                          "dense_ms": round(statistics.median(dense_ms), 2),
                          "ratio": round(statistics.median(ratios), 3),
                          "ratio_of_minima": round(min(moe_ms) / min(dense_ms), 3),
                          "expert_matmul_ms": round(statistics.median(matmul_ms), 2),
                          "expert_matmul_vs_dense": round(statistics.median(
                              [m / d for m, d in zip(matmul_ms, dense_ms)]), 3),
                          "pairs": args.pairs, "threads": torch.get_num_threads(),
                          "malloc": "retained" if retained else "system"}), flush=True)


if __name__ == "__main__":
    main()
