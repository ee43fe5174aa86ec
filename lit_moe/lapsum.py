"""LapSum soft top-k (METHODS §2.1) and its truncation to a sparse routing (§2.2).

Soft top-k
----------
For one row of scores r ∈ R^E, scale α > 0 and target k ∈ (0, E)::

    p_i = F((r_i − b)/α),   Σ_i p_i = k,

with the Laplace CDF F(t) = ½e^t (t ≤ 0), 1 − ½e^(−t) (t > 0) and density f(t) = ½e^(−|t|).

Closed-form threshold.  Write s = r/α, c = b/α and sort s ascending: u_1 ≤ … ≤ u_E.
For c in the interval [u_j, u_{j+1}] (u_0 = −∞, u_{E+1} = +∞) the scores at or below c
contribute ½e^(u_i − c) and those above contribute 1 − ½e^(c − u_i), so with
A_j = Σ_{i>j} e^(−u_i), B_j = Σ_{i≤j} e^(u_i) and x = e^c::

    S(c) = (E − j) − ½·A_j·x + ½·B_j/x = k   ⇔   A_j x² − 2·m·x − B_j = 0,   m = E − j − k.

Its positive root is x = (m + √(m² + A_j B_j))/A_j = B_j/(√(m² + A_j B_j) − m); we use the
first form when m ≥ 0 and the second when m < 0, so both read (|m| + √(m² + A_j B_j)) and
nothing cancels; that factor is evaluated in log space (log-add-exp).  S is decreasing
in c, so the right j is the number of knots u_p with S(u_p) ≥ k; the knot values come from
prefix log-sum-exps.  A_j, B_j overflow for large scores, but after anchoring them at the
interval ends, A_j = e^(a − u_{j+1}) and B_j = e^(b + u_j) with a, b ∈ [0, log E] (logs of
sums of e^(score differences ≤ 0), one term exactly 1), the product
A_j B_j = e^(a + b + u_j − u_{j+1}) is ≤ E², and the threshold is returned as an offset from a score (c = u_{j+1} − a + log(…)
or c = u_j + b − log(…)), so p never sees the absolute magnitude of the scores.

The knot values are absolute log-sums, rounded to ≈ ulp(max|s|); if that picks a wrong
interval, the root lies within some small δ of a knot, and the wrong interval's quadratic
differs from S there only by O(δ²) (F is C¹).  One fixed second pass re-picks the interval
by comparing the scores with that root (precise) and solves again: error at rounding level.

Gradients.  With t_i = s_i − c, d_i = f(t_i), q = d/Σd and upstream g, differentiating
Σ F(r_i/α − c) = k implicitly gives::

    ∂L/∂k   = ⟨q, g⟩
    ∂L/∂r_i = (d_i/α)(g_i − ⟨q, g⟩)
    ∂L/∂α   = −(1/α²) Σ_i g_i d_i (r_i − ⟨q, r⟩) = −(1/α) Σ_i g_i d_i (t_i − ⟨q, t⟩).

Only t ([N, E]) is saved; q = softmax(−|t|) stays finite even where every d_i underflows
(hard limit), which Σd in the denominator would not.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["soft_topk", "truncate"]


def _root_in_interval(u: Tensor, j: Tensor, k: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Solve S(c) = k with the quadratic of interval j ([N, 1], 1-based: c ∈ [u_j, u_{j+1}]).

    u: ascending scores [N, E].  Returns (anchor, delta) [N, 1] with c = anchor/α + delta,
    anchor being one of the scores, so that t = (r − anchor)/α − delta keeps full precision.
    """
    E = u.shape[-1]
    pos = torch.arange(E, device=u.device)
    # Interval ends as raw scores (u_{j+1} = hi, u_j = lo; clamped where they don't exist,
    # which is exactly where the branch below doesn't use them).
    hi = u.gather(-1, j.clamp(max=E - 1))
    lo = u.gather(-1, (j - 1).clamp(min=0))
    above = pos >= j  # 0-based positions ≥ j are the 1-based i > j
    # a = log Σ_{i>j} e^(u_{j+1}−u_i), b = log Σ_{i≤j} e^(u_i−u_j): every exponent is ≤ 0
    # and the anchor's own term is 1, so plain sums neither overflow nor lose the anchor.
    e = torch.exp(torch.where(above, hi - u, u - lo) / alpha)
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    a = torch.where(above, e, zero).sum(-1, keepdim=True).log()  # −inf when j = E
    b = torch.where(above, zero, e).sum(-1, keepdim=True).log()  # −inf when j = 0

    m = (E - j) - k[:, None]
    # log(|m| + √(m² + A_j B_j)) in log space: A_j B_j = e^(a + b + u_j − u_{j+1}) can
    # underflow when the interval is wide, and with m = 0 (integer k) the root is all of it.
    log_ab = a + b + (lo - hi) / alpha  # −inf at the two outer intervals
    log_m = torch.log(m.abs())
    log_root = torch.logaddexp(log_m, 0.5 * torch.logaddexp(2 * log_m, log_ab))
    upper = m >= 0  # j < E here; j > 0 in the other branch (k ∈ (0, E))
    # The unused branch may be inf/nan; torch.where discards it and nothing backprops here.
    delta = torch.where(upper, log_root - a, b - log_root)
    anchor = torch.where(upper, hi, lo)
    return anchor, delta


def _threshold_offsets(r: Tensor, k: Tensor, alpha: Tensor) -> Tensor:
    """t = (r − b)/α for rows r [N, E], k [N], 0-d α (all in the compute dtype)."""
    E = r.shape[-1]
    u, _ = r.sort(dim=-1)  # ascending
    s = u / alpha
    pos = torch.arange(E, device=r.device)

    # S at each knot c = s_p (0-based p), from the interval form with j = p + 1:
    #   (E−1−p) − ½Σ_{i>p} e^(s_p−s_i) + ½Σ_{i≤p} e^(s_i−s_p);  Σ_{i>p} = Σ_{i≥p} − 1.
    # These log-sums are absolute (rounded to ≈ ulp(|s|)), so the pick can be off by one
    # or more knots when the root sits next to a knot; the re-pick below repairs that.
    log_below = torch.logcumsumexp(s, dim=-1)  # log Σ_{i≤p} e^(s_i)
    log_above = torch.logcumsumexp((-s).flip(-1), dim=-1).flip(-1)  # log Σ_{i≥p} e^(−s_i)
    knot = (E - 0.5 - pos) - 0.5 * torch.exp(s + log_above) + 0.5 * torch.exp(log_below - s)
    j = (knot >= k[:, None]).sum(-1, keepdim=True)  # solution lies in [u_j, u_{j+1}], 1-based
    anchor, delta = _root_in_interval(u, j, k, alpha)

    # Re-pick the interval from precise comparisons of the scores with that root and solve
    # once more (a fixed second pass, not an iteration). The first root is within a small δ
    # of the true one, and a quadratic from the wrong side of a knot is off only by O(δ²)
    # (F is C¹), so after this pass the error is at rounding level.
    j = ((u - anchor) / alpha <= delta).sum(-1, keepdim=True)
    anchor, delta = _root_in_interval(u, j, k, alpha)
    return (r - anchor) / alpha - delta


class _SoftTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r: Tensor, k: Tensor, alpha: Tensor) -> Tensor:
        t = _threshold_offsets(r, k, alpha)
        h = 0.5 * torch.exp(-t.abs())  # = f(t); F(t) = h or 1 − h
        ctx.save_for_backward(t, alpha)
        return torch.where(t > 0, 1.0 - h, h)

    @staticmethod
    def backward(ctx, g: Tensor):
        t, alpha = ctx.saved_tensors
        need_r, need_k, need_alpha = ctx.needs_input_grad
        d = 0.5 * torch.exp(-t.abs())
        q = torch.softmax(-t.abs(), dim=-1)  # d / Σd without the 0/0 of the hard limit
        qg = (q * g).sum(-1, keepdim=True)
        grad_r = d / alpha * (g - qg) if need_r else None
        grad_k = qg.squeeze(-1) if need_k else None
        grad_alpha = None
        if need_alpha:
            qt = (q * t).sum(-1, keepdim=True)
            grad_alpha = -(g * d * (t - qt)).sum() / alpha
        return grad_r, grad_k, grad_alpha


def _cheap_checks_allowed() -> bool:
    # Reading a tensor's value forces a host sync and breaks torch.compile graphs.
    return not torch.compiler.is_compiling()


def soft_topk(scores: Tensor, k: float | Tensor, alpha: float | Tensor = 1.0) -> Tensor:
    """LapSum soft top-k along the last dim: p = F((scores − b)/α) with Σ p = k per row.

    scores: [..., E], any float dtype (computed in fp32, or fp64 for fp64 input; the result
    has the dtype of ``scores``).  k: float, or tensor broadcastable to ``scores[..., 0]``
    (e.g. [] or [N] for [N, E], [L, 1] for [L, N, E]); may require grad.  alpha: float or
    0-d tensor > 0; may require grad.

    Raises ValueError for k outside (0, E) or alpha ≤ 0.  Python floats are always
    checked; tensor k / alpha are checked with one min/max read, skipped under
    torch.compile (out-of-range values then give meaningless weights, not an error).
    """
    if scores.dim() < 1 or scores.shape[-1] < 1:
        raise ValueError(
            f"soft_topk: scores need a non-empty last dim, got shape {tuple(scores.shape)}"
        )
    E = scores.shape[-1]
    batch = scores.shape[:-1]
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    check = _cheap_checks_allowed()

    if isinstance(k, Tensor):
        if check and k.numel() > 0:
            kmin, kmax = (v.item() for v in torch.aminmax(k.detach().float()))
            if not (kmin > 0 and kmax < E):
                raise ValueError(
                    f"soft_topk: k must lie in (0, E) = (0, {E}); got k in [{kmin}, {kmax}]"
                )
        k_rows = torch.broadcast_to(k.to(device=scores.device, dtype=dtype), batch).reshape(-1)
    else:
        if not 0 < k < E:
            raise ValueError(f"soft_topk: k must lie in (0, E) = (0, {E}); got k={k}")
        k_rows = torch.full((math.prod(batch),), float(k), dtype=dtype, device=scores.device)

    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"soft_topk: alpha must be a scalar, got shape {tuple(alpha.shape)}")
        if check and not alpha.item() > 0:
            raise ValueError(f"soft_topk: alpha must be > 0, got {alpha.item()}")
        alpha_t = alpha.to(device=scores.device, dtype=dtype).reshape(())
    else:
        if not alpha > 0:
            raise ValueError(f"soft_topk: alpha must be > 0, got {alpha}")
        alpha_t = torch.tensor(float(alpha), dtype=dtype, device=scores.device)

    r = scores.to(dtype).reshape(-1, E)
    p = _SoftTopK.apply(r, k_rows, alpha_t)
    return p.reshape(scores.shape).to(scores.dtype)


def truncate(p: Tensor, k: float | Tensor, theta: float = 1.8, cap: float = 2.0) -> Tensor:
    """Sparse routing weights w = p·1[p ≥ τ] (METHODS §2.2), not renormalised.

    τ = θ·k/E clamped into [p_(m), p_(1)] per row, m = min(⌈k·cap⌉, E).  k: float or tensor
    broadcastable to ``p[..., 0]``.  Between 1 and m entries survive per row, also with ties
    (entries tied at p_(m) beyond rank m are dropped; which of the tied ones is up to topk).
    Gradients flow to the kept entries unchanged; the mask itself is not differentiated.
    """
    if not theta >= 0:
        raise ValueError(f"truncate: theta must be >= 0, got {theta}")
    if not cap >= 1:
        raise ValueError(f"truncate: cap must be >= 1, got {cap}")
    if not isinstance(k, Tensor) and not k > 0:
        raise ValueError(f"truncate: k must be > 0, got {k}")
    E = p.shape[-1]
    batch = p.shape[:-1]
    # Compare in fp32 (fp64 for fp64 p): exact for bf16/fp16 weights, no rounding of τ to bf16.
    pd = p.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32)

    # fp64 for ⌈k·cap⌉ so that e.g. 1.5·2 is not rounded up to 4.
    k64 = torch.broadcast_to(torch.as_tensor(k, device=p.device).detach().to(torch.float64), batch)
    m = torch.ceil(k64 * cap).clamp(1, E).long()
    # Only the m largest can survive. A Python k gives m on the host (partial top-m); a
    # tensor k would need a host sync for that, so it sorts the whole row instead.
    m_max = E if isinstance(k, Tensor) else min(math.ceil(k * cap), E)

    top, order = pd.topk(m_max, dim=-1, sorted=True)  # descending
    p_m = top.gather(-1, (m - 1).unsqueeze(-1))
    tau = (theta * k64 / E).to(pd.dtype).unsqueeze(-1)  # after ⌈·⌉, fp32 is enough
    tau = torch.minimum(torch.maximum(tau, p_m), top[..., :1])

    # Keep by rank, not just by value, so ties at p_(m) cannot push the count past m;
    # rank 0 always passes (τ ≤ p_(1)), so at least one survives.
    rank = torch.arange(m_max, device=p.device)
    keep_sorted = (top >= tau) & (rank < m.unsqueeze(-1))
    keep = torch.zeros(pd.shape, dtype=torch.bool, device=p.device).scatter_(-1, order, keep_sorted)
    return torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))
