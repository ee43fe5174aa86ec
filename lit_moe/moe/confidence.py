"""κ-SwiGLU's routing confidence s per (token, expert) (METHODS §3), from what the router computed.

The router only exposes its outputs (`RouterOutputs`: input, logits, weights, gate matrix);
the κ experts turn them into s with their own mode and gain, following the reference code
(askerlee/kappa-swiglu, `MOELayer._select_gate_confidence`):

    top_logit      s = 0.3 · z                          (z: the raw router logit)
    logit_norm     s = 6 · z / (‖x‖ · ŵ_e^α · C),
                   ŵ_e = √(‖W_r,e‖² + ε), C = mean_e ŵ_e^(1−α)
    cosine         s = 6 · z / (‖x‖ · ‖W_r,e‖)          (α = 1, ε = 0, C = 1: lit-moe's earlier form)
    router_weight  s = 2 · p                            (p: the routing weight)
    constant       s = c (1 by default; only b is learned: κ = U^tanh(b·c))

The gains (0.3, 6, 2, 1) are each mode's default `confidence_scale`. In logit_norm the
normaliser is detached (only the logit carries a gradient, as in the reference); C puts the
leftover ‖W_r‖^(1−α) factor back to unit scale with a layer-wide, batch-independent mean.
The reference divides by √d, its token norm after a parameter-free RMSNorm; lit-moe's RMSNorm
has a learnable gain, so the actual ‖x‖ (detached) is used — the same value at unit gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CONFIDENCE_MODES = ("top_logit", "logit_norm", "cosine", "router_weight", "constant")
# Each mode's gain when the experts' `confidence_scale` is not set (the reference's values).
DEFAULT_GAIN = {"top_logit": 0.3, "logit_norm": 6.0, "cosine": 6.0, "router_weight": 2.0, "constant": 1.0}


@dataclass
class RouterOutputs:
    """What a router computed for a batch of tokens: its input x [T, d], fp32 logits [T, E],
    routing weights [T, E] and its gate matrix W_r [E, d]."""

    x: Tensor
    logits: Tensor
    weights: Tensor
    gate_weight: Tensor


def routing_confidence(mode: str, routed: RouterOutputs, norm_exponent: float = 0.5,
                       norm_eps: float = 1e-4) -> Tensor:
    """Unscaled confidence of every (token, expert) pair [T, E] fp32 (the gain is applied by
    the experts). norm_exponent (α) and norm_eps (ε): logit_norm's partial normalisation."""
    logits = routed.logits.float()
    if mode == "top_logit":
        return logits
    if mode in ("logit_norm", "cosine"):
        with torch.no_grad():
            token_norm = routed.x.float().norm(dim=-1, keepdim=True)
            row_norm = routed.gate_weight.float().norm(dim=-1)
            if mode == "cosine":
                normaliser = token_norm * row_norm
            else:
                smoothed = (row_norm.square() + norm_eps).sqrt()
                compensation = smoothed.pow(1.0 - norm_exponent).mean()
                normaliser = token_norm * smoothed.pow(norm_exponent) * compensation
        return logits / normaliser.clamp_min(1e-12)
    if mode == "router_weight":
        return routed.weights.float()
    if mode == "constant":
        return torch.ones_like(logits)
    raise ValueError(f"unknown confidence mode {mode!r}; choose one of {list(CONFIDENCE_MODES)}.")


__all__ = ["CONFIDENCE_MODES", "DEFAULT_GAIN", "RouterOutputs", "routing_confidence"]
