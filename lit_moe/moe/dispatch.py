"""Dispatch: route tokens to experts given a sparse weight tensor, and combine the outputs.

`weights` [T, E] has zeros for unused experts; any number of experts per token is allowed
(top-k uses exactly k, SoftMoE 1..m), so one representation serves every router.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_moe.moe.experts import Experts


class Dispatch(nn.Module):
    """Base class: forward(x [T, d], weights [T, E], experts, confidence=None) → y [T, d].

    confidence [T, E] (optional): per-(token, expert) routing confidence for experts with a
    `confidence_mode`; the dispatch hands each pair's value to the experts with its input.
    """

    def forward(self, x: Tensor, weights: Tensor, experts: Experts, confidence: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class SortedDispatch(Dispatch):
    """Dropless grouped dispatch (the fast path).

    1. the non-zero (token, expert) pairs, taken from weightsᵀ so they come out already
       grouped by expert (no separate sort);
    2. `Experts.combine`: gather their inputs, run each expert's group as one matmul chain
       (`torch._grouped_mm` on CUDA/bf16; on CPU in fp32 SwiGLU experts use
       `moe.grouped_matmul`, with the gather fused in), scale by the pair's weight and
       scatter-add back to tokens.
    """

    def forward(self, x: Tensor, weights: Tensor, experts: Experts, confidence: Tensor | None = None) -> Tensor:
        expert_idx, token_idx = weights.t().nonzero(as_tuple=True)
        counts = torch.bincount(expert_idx, minlength=weights.shape[1])
        pair_weight = weights[token_idx, expert_idx]
        pair_confidence = None if confidence is None else confidence[token_idx, expert_idx]
        return experts.combine(x, token_idx, counts, pair_weight, pair_confidence)


class LoopDispatch(Dispatch):
    """Plain reference: for each expert, mask its tokens and add its weighted output.

    Written independently of `SortedDispatch` (no pair list, no grouped call) so that tests
    can check the fast path against it.
    """

    def forward(self, x: Tensor, weights: Tensor, experts: Experts, confidence: Tensor | None = None) -> Tensor:
        out = torch.zeros_like(x)
        for e in range(weights.shape[1]):
            rows = (weights[:, e] != 0).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if confidence is None:
                y = experts.expert_forward(e, x[rows])
            else:
                y = experts.expert_forward(e, x[rows], confidence[rows, e])
            contribution = weights[rows, e].unsqueeze(1) * y.float()
            out = out.index_add(0, rows, contribution.to(x.dtype))
        return out
