"""Output head + cross-entropy in chunks of positions, without the whole logits tensor.

At paper scale the logits of one batch are [B·S, V] = 16k × 32k: 2 GiB in fp32 plus a bf16
copy, and autograd would keep them for backward. `linear_cross_entropy` computes each chunk's
logits, their log-sum-exp and the target logit, and keeps only the per-row log-sum-exp; the
backward recomputes each chunk's logits and turns them into the head's and the hidden states'
gradients at once. Peak extra memory: one chunk of logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_moe.moe.experts import compute_dtype

__all__ = ["linear_cross_entropy"]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        dtype = compute_dtype(hidden)
        h, w = hidden.to(dtype), weight.to(dtype)
        # Products in the compute dtype, the softmax statistics in fp32 (fp64 stays fp64).
        stats = torch.promote_types(dtype, torch.float32)
        lse = torch.empty(h.shape[0], dtype=stats, device=h.device)
        total = torch.zeros((), dtype=stats, device=h.device)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (h[rows] @ w.t()).to(stats)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[rows, None]).squeeze(1)
            total += (lse[rows] - target_logit).sum()
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk = chunk
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / max(h.shape[0], 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, w, targets, lse = ctx.saved_tensors
        scale = grad / max(h.shape[0], 1)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=lse.dtype, device=w.device) if ctx.needs_input_grad[1] else None
        for start in range(0, h.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            # ∂loss/∂logits = (softmax − one_hot(target)) / N, chunk by chunk.
            d_logits = torch.exp((h[rows] @ w.t()).to(lse.dtype) - lse[rows, None])
            d_logits.scatter_add_(1, targets[rows, None], torch.full_like(lse[rows, None], -1.0))
            d_logits = (d_logits * scale).to(h.dtype)
            if grad_h is not None:
                grad_h[rows] = d_logits @ w
            if grad_w is not None:  # accumulated in fp32 across chunks
                grad_w += d_logits.t() @ h[rows]
        hidden_dtype, weight_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h.to(hidden_dtype),
                None if grad_w is None else grad_w.to(weight_dtype), None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 4096) -> Tensor:
    """Mean cross-entropy of `hidden [N, d] @ weight[V, d]ᵀ` against `targets [N]` (fp32),
    equal to `F.cross_entropy(hidden @ weight.T, targets)` without keeping the [N, V] logits:
    `chunk` rows at a time in forward and again in backward. Under autocast the products run
    in the autocast dtype, the log-sum-exp in fp32."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: hidden [N, d] and targets [N], got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, int(chunk))
