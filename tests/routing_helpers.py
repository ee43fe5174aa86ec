"""Helpers for tests/test_routing_stats.py, in a light module (torch + lit_moe only) so the
processes spawned for the two-rank test start quickly."""

import torch
import torch.distributed as dist

from lit_moe.moe import TopKRouter
from callbacks.routing_stats import reduced_counters


def one_hot_router(num_experts: int, top_k: int = 1, **kwargs) -> TopKRouter:
    """A router over d = E inputs whose gate is 10·I: the token e_j goes to expert j."""
    router = TopKRouter(num_experts, num_experts, top_k=top_k, **kwargs)
    with torch.no_grad():
        router.gate.weight.copy_(10 * torch.eye(num_experts))
    return router


def tokens_to(experts: list[int], num_experts: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(experts), num_experts).float()


# Rank 0 routes 6 tokens, all to expert 0 (peak imbalance 4); rank 1 routes 4 tokens, one per
# expert (peak 1). Combined: tokens [7, 1, 1, 1], 10 tokens with one expert each, peak 4.
RANK_EXPERTS = {0: [0] * 6, 1: [0, 1, 2, 3]}


def reduce_on_two_ranks(rank: int, store: str, out: str) -> None:
    """torch.multiprocessing.spawn target: route this rank's tokens, reduce, save the result."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        router = one_hot_router(4)
        router(tokens_to(RANK_EXPERTS[rank], 4))
        (reduced,) = reduced_counters([router], "train")
        after_reset = router.metrics()["forwards"].item()
        torch.save({"reduced": {k: v.clone() for k, v in reduced.items()}, "after_reset": after_reset},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
