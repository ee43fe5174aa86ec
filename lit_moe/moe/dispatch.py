"""Dispatch: route tokens to experts given a sparse weight tensor, and combine the outputs.

`weights` [T, E] has zeros for unused experts; any number of experts per token up to the
router's `slots` is allowed (top-k uses exactly k, SoftMoE 1..m), so one representation
serves every router.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_moe.moe.experts import ExpertGroups, Experts, compute_dtype


class Dispatch(nn.Module):
    """Base class: forward(x [T, d], weights [T, E], experts, confidence=None, slots=None) → y [T, d].

    confidence [T, E] (optional): per-(token, expert) routing confidence for experts with a
    `confidence_mode`; the dispatch hands each pair's value to the experts with its input.
    slots: the most experts a token can use (host int, from the router); None: E.
    skip_zero: whether zero weights can occur among a token's `slots` largest (the router's
    `zero_slots`); pairs of weight 0 are then not computed.
    """

    def forward(self, x: Tensor, weights: Tensor, experts: Experts, confidence: Tensor | None = None,
                slots: int | None = None, skip_zero: bool = True) -> Tensor:
        raise NotImplementedError


def sort_pairs(weights: Tensor, slots: int, skip_zero: bool = True
               ) -> tuple[Tensor, Tensor, Tensor, ExpertGroups]:
    """The T·slots (token, slot) pairs sorted by expert, with static shapes and no host read.

    Each token's `slots` largest weights give its pairs. With `skip_zero`, pairs of weight 0
    (a SoftMoE token using fewer experts, a capacity drop) get expert id E, so the sort puts
    them after every expert's group, where the grouped kernel does not compute them; without,
    every pair keeps its expert (a dropless top-k router fills every slot).
    Returns (pair_weight [T, slots], pair_expert [T, slots], order [N]: flat pair index of
    each sorted row, groups).
    """
    num_experts = weights.shape[1]
    pair_weight, pair_expert = weights.topk(slots, dim=-1, sorted=False)
    key = pair_expert.flatten()
    if skip_zero:
        key = torch.where(pair_weight.flatten() != 0, key, num_experts)
    sorted_key, order = torch.sort(key, stable=True)
    ends = torch.searchsorted(sorted_key, torch.arange(num_experts, device=key.device), right=True, out_int32=True)
    valid = (sorted_key < num_experts).unsqueeze(1) if skip_zero else None
    groups = ExpertGroups(ends, sorted_key.clamp_max(num_experts - 1), valid)
    return pair_weight, pair_expert, order, groups


class SortedDispatch(Dispatch):
    """Dropless grouped dispatch with static shapes (the fast path, no host sync).

    1. `sort_pairs`: T·slots pairs sorted by expert on the device, group ends for the
       grouped kernel;
    2. gather the pairs' rows (in the compute dtype), run the experts (`torch._grouped_mm`);
    3. put the outputs back in (token, slot) order and sum each token's slots weighted by
       their routing weight (one batched matmul: no scatter-add, deterministic).
    """

    def forward(self, x: Tensor, weights: Tensor, experts: Experts, confidence: Tensor | None = None,
                slots: int | None = None, skip_zero: bool = True) -> Tensor:
        tokens, num_experts = weights.shape
        slots = num_experts if slots is None else min(slots, num_experts)
        pair_weight, pair_expert, order, groups = sort_pairs(weights, slots, skip_zero)
        # Rows in the compute dtype before the gather: the copy moves half the bytes in bf16.
        # index_select, whose backward is an index_add (advanced indexing's would sort).
        x_sorted = x.to(compute_dtype(x)).index_select(0, order // slots)
        if confidence is None:
            y_sorted = experts(x_sorted, groups)
        else:
            pair_confidence = confidence.gather(1, pair_expert).flatten()[order]
            y_sorted = experts(x_sorted, groups, confidence=pair_confidence)
        # Back to (token, slot) order: row i goes to pair order[i], a permutation (its backward
        # is a gather), then each token's weighted sum over its slots as one batched matmul:
        # no scatter-add.
        y_pairs = y_sorted.new_empty(y_sorted.shape).index_copy(0, order, y_sorted)
        y_pairs = y_pairs.view(tokens, slots, y_sorted.shape[-1])
        return torch.bmm(pair_weight.to(y_pairs.dtype).unsqueeze(1), y_pairs).squeeze(1)


class LoopDispatch(Dispatch):
    """Plain reference: for each expert, mask its tokens and add its weighted output.

    Written independently of `SortedDispatch` (no pair list, no grouped call) so that tests
    can check the fast path against it.
    """

    def forward(self, x: Tensor, weights: Tensor, experts: Experts, confidence: Tensor | None = None,
                slots: int | None = None, skip_zero: bool = True) -> Tensor:
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
