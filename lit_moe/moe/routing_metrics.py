"""Routing counters a router accumulates during forward, and the statistics derived from them.

Every router keeps two sets of `RoutingCounters`, one filled by training forwards and one by
evaluation forwards (chosen by `module.training`), so validation never changes the training
window. The counters stay on the router's device and are updated with a few small tensor ops
per forward: no `.item()`, no data-dependent shapes, hence no host synchronisation.

Counters (E = number of experts):

    tokens [E]          (token, expert) assignments with nonzero weight: tokens routed to e
    weight [E]          total routing weight given to e
    active_hist [E+1]   tokens by their number of active experts (bin a: a experts)
    entropy []          Σ over tokens of the entropy of softmax(logits), in nats
    dropped []          assignments the router chose but sent with zero weight (capacity overflow)
    load_balance []     Σ over forwards of the Switch balance loss (unweighted)
    z_loss []           Σ over forwards of the router z-loss (unweighted)
    forwards []         number of forwards
    peak_imbalance []   max over forwards of max_e tokens_e / mean_e tokens_e   (a maximum)

All counters are sums over steps and ranks except those in `MAX_COUNTERS`, which take the
maximum (`flatten_counters` hands them out tagged that way); the routing-statistics callback
reduces them across ranks (`callbacks.routing_stats.reduced_counters`), and `summarize` /
`model_summary` turn the reduced counters into the logged statistics.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

SPLITS = ("train", "eval")
COUNTER_NAMES = ("tokens", "weight", "active_hist", "entropy", "dropped", "load_balance", "z_loss", "forwards",
                 "peak_imbalance")
MAX_COUNTERS = frozenset({"peak_imbalance"})


class RoutingCounters:
    """One set of on-device routing counters for a router with `num_experts` experts."""

    def __init__(self, num_experts: int, device: torch.device | str):
        def zeros(size: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.zeros(size, dtype=dtype, device=device)

        # Counts are int64 (exact at any scale); sums of real values are fp32.
        self.tokens = zeros((num_experts,), torch.long)
        self.weight = zeros((num_experts,), torch.float32)
        self.active_hist = zeros((num_experts + 1,), torch.long)
        self.entropy = zeros((), torch.float32)
        self.dropped = zeros((), torch.long)
        self.load_balance = zeros((), torch.float32)
        self.z_loss = zeros((), torch.float32)
        self.forwards = zeros((), torch.long)
        self.peak_imbalance = zeros((), torch.float32)

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @torch.no_grad()
    def update(self, logits: Tensor, weights: Tensor, assigned: Tensor, aux_losses: dict[str, Tensor],
               probs: Tensor | None = None, log_normalizer: Tensor | None = None) -> None:
        """Add one forward: logits, weights [T, E] fp32, `assigned` the router's chosen pairs;
        softmax(logits) and logsumexp(logits) [T] when the router has computed them."""
        logits, weights = logits.detach(), weights.detach()
        active = weights != 0
        per_expert = active.sum(dim=0)
        self.tokens += per_expert
        self.weight += weights.sum(dim=0, dtype=torch.float32)
        # A fixed-size histogram by scatter-add: bincount would sync to size its output.
        per_token = active.sum(dim=-1)
        self.active_hist.scatter_add_(0, per_token, torch.ones_like(per_token))
        if probs is None or log_normalizer is None:
            probs, log_normalizer = torch.softmax(logits.float(), dim=-1), torch.logsumexp(logits.float(), dim=-1)
        # −Σ p·log p = Σ_t lse_t − Σ p·z (log p = z − lse): one product instead of a log per element.
        # nansum: a −∞ logit has p = 0 and 0·(−∞) is NaN, where the entropy term is 0.
        self.entropy += log_normalizer.detach().sum() - (probs.detach() * logits).nansum()
        self.dropped += (assigned & ~active).sum()
        self.load_balance += aux_losses["load_balance"].detach().float()
        self.z_loss += aux_losses["z_loss"].detach().float()
        self.forwards += 1
        imbalance = per_expert.max().float() / per_expert.float().mean().clamp_min(1e-12)
        torch.maximum(self.peak_imbalance, imbalance, out=self.peak_imbalance)

    def as_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in COUNTER_NAMES}

    @torch.no_grad()
    def zero_(self) -> None:
        """Start a new window in place: the same object and tensors, so a compiled forward that
        updates them keeps its graph."""
        for name in COUNTER_NAMES:
            getattr(self, name).zero_()


def active_percentile(active_hist: Tensor, q: float) -> float:
    """Nearest-rank q-quantile of the active-expert count: the smallest a such that at least
    ⌈q·T⌉ of the T tokens use ≤ a experts (always an actual count, never interpolated)."""
    hist = active_hist.double()
    rank = max(1.0, math.ceil(q * float(hist.sum())))
    return float(torch.searchsorted(hist.cumsum(0), torch.tensor([rank], dtype=torch.float64)).item())


def summarize(counters: dict[str, Tensor]) -> dict[str, float]:
    """Statistics of one router over a window, from its (rank-reduced) counters; {} for an
    empty window. Host-side: call on CPU tensors after the reduction.

    load_imbalance = max_e tokens_e / mean_e tokens_e (1 = balanced, E = one expert takes
    everything); load_cv = std/mean of tokens_e; dead_experts = experts that got no token;
    entropy = mean router entropy (log E for uniform logits); active_* = experts per token
    (mean, nearest-rank p50/p95, max); dropped = share of chosen assignments dropped;
    load_balance, z_loss = mean aux losses; peak_imbalance = worst single-forward imbalance.
    """
    tokens = counters["tokens"].double()
    hist = counters["active_hist"].double()
    num_tokens = float(hist.sum())
    if num_tokens == 0:
        return {}
    routed = float(tokens.sum())
    mean_load = routed / tokens.numel()
    dropped = float(counters["dropped"])
    forwards = max(1.0, float(counters["forwards"]))
    nonzero_bins = torch.nonzero(hist).flatten()
    return {
        "load_imbalance": float(tokens.max()) / mean_load if routed else math.nan,
        "load_cv": float(tokens.std(correction=0)) / mean_load if routed else math.nan,
        "dead_experts": float((tokens == 0).sum()),
        "entropy": float(counters["entropy"]) / num_tokens,
        "active_mean": float((torch.arange(hist.numel(), dtype=torch.float64) * hist).sum()) / num_tokens,
        "active_p50": active_percentile(hist, 0.50),
        "active_p95": active_percentile(hist, 0.95),
        "active_max": float(nonzero_bins.max()),
        "dropped": dropped / (routed + dropped) if routed + dropped else 0.0,
        "load_balance": float(counters["load_balance"]) / forwards,
        "z_loss": float(counters["z_loss"]) / forwards,
        "peak_imbalance": float(counters["peak_imbalance"]),
    }


# -- reduction across ranks (plain torch.distributed: Lightning's DDP/FSDP set up the group) ------
def flatten_counters(per_layer: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """All layers' counters as one float64 vector, and a mask of the entries reduced by max."""
    parts, is_max = [], []
    for counters in per_layer:
        for name in COUNTER_NAMES:
            value = counters[name].detach().flatten().double()
            parts.append(value)
            is_max.append(torch.full_like(value, name in MAX_COUNTERS, dtype=torch.bool))
    return torch.cat(parts), torch.cat(is_max)


def unflatten_counters(values: Tensor, like: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Inverse of `flatten_counters` (float64 values, the shapes of `like`)."""
    out, offset = [], 0
    for counters in like:
        layer = {}
        for name in COUNTER_NAMES:
            size = counters[name].numel()
            layer[name] = values[offset:offset + size].view(counters[name].shape)
            offset += size
        out.append(layer)
    return out


def model_summary(counters: list[dict[str, Tensor]], layer_stats: list[dict[str, float]]) -> dict[str, float]:
    """Model-wide aggregates of the per-layer statistics."""
    stats = [s for s in layer_stats if s]
    if not stats:
        return {}

    def mean(name: str) -> float:
        return sum(s[name] for s in stats) / len(stats)

    routed = sum(float(c["tokens"].sum()) for c in counters)
    dropped = sum(float(c["dropped"]) for c in counters)
    return {
        "load_imbalance": mean("load_imbalance"),
        "load_imbalance_max": max(s["load_imbalance"] for s in stats),
        "load_cv": mean("load_cv"),
        "dead_experts": sum(s["dead_experts"] for s in stats),
        "entropy": mean("entropy"),
        "active_mean": mean("active_mean"),  # per layer
        "active_total": sum(s["active_mean"] for s in stats),  # per token, over all MoE layers
        "dropped": dropped / (routed + dropped) if routed + dropped else 0.0,
    }


__all__ = ["RoutingCounters", "SPLITS", "COUNTER_NAMES", "MAX_COUNTERS", "active_percentile", "summarize",
           "model_summary", "flatten_counters", "unflatten_counters"]
