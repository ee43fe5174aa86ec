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

Partial sort.  Every score at or above the root c has F ≥ ½, so fewer than 2k of them
reach c: the root lies above the (⌊2k⌋+1)-th largest score v_m.  When m = ⌊2k⌋+1 < E only
the top m scores can be "above" in the quadratic, the others enter through one anchored
sum R = Σ_rest e^((r_i − v_m)/α) ≤ E − m, and a partial sort (topk) replaces the sort;
the knots S(v_q) then come from pairwise differences of the top scores (precise), so one
pass picks the interval.  Routing uses k ≪ E, where this is most of the speed.

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

__all__ = ["soft_topk", "sparse_soft_topk", "truncate"]


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

    return _root_from_sums(a, b, hi, lo, (E - j) - k[:, None], alpha)


def _threshold_offsets(r: Tensor, k: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """t = (r − b)/α for rows r [N, E], k [N], 0-d α (all in the compute dtype), by a full
    sort; also the row's indices in descending score order [N, E]."""
    E = r.shape[-1]
    u, order = r.sort(dim=-1)  # ascending
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
    return torch.addcdiv(-delta, r - anchor, alpha), order.flip(-1)


def _top_threshold_offsets(r: Tensor, k: Tensor, alpha: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The same t as `_threshold_offsets`, from the m largest scores only (m < E, m > 2·max k).

    At the root c every score ≥ c has F ≥ ½, so fewer than 2k scores reach c (Σ F = k): the
    root lies above the m-th largest score v_m, and only the top m scores can be "above" in
    the quadratic. The rest enter through one sum R = Σ_rest e^((r − v_m)/α) ≤ E − m (all
    exponents ≤ 0). A partial sort (topk) replaces the sort; knots S(v_q) are computed from
    pairwise differences of the m top scores (exact, so one pass picks the interval).
    Returns t [N, E] and the indices of the m largest scores in descending order [N, m].
    """
    v, order = r.topk(m, dim=-1)  # descending
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    # In place and the top entries zeroed by index: this [N, E] pass is most of the cost.
    rest_sum = (r - v[:, -1:]).div_(alpha).exp_().scatter_(-1, order, 0.0).sum(-1, keepdim=True)
    log_rest = rest_sum.log()  # −inf when nothing outside the top m carries weight

    # S(v_q) = Σ_{top i} F((v_i − v_q)/α) + ½·R·e^((v_m − v_q)/α), for every top knot q.
    diff = (v[:, None, :] - v[:, :, None]) / alpha  # [N, q, i]
    half = 0.5 * torch.exp(-diff.abs())
    knot = torch.where(diff > 0, 1.0 - half, half).sum(-1) + 0.5 * torch.exp(log_rest + (v[:, -1:] - v) / alpha)
    # S falls as c rises: knots with S < k lie above the root. n = how many top scores are
    # above c; c ∈ [v_n, v_(n−1)] (0-based; no upper end when n = 0). n ≤ m − 1 by the bound.
    n = (knot < k[:, None]).sum(-1, keepdim=True).clamp(max=m - 1)
    pos = torch.arange(m, device=r.device)
    above = pos < n
    hi = v.gather(-1, (n - 1).clamp(min=0))  # smallest score above c (unused when n = 0)
    lo = v.gather(-1, n)  # largest score below c
    # a = log Σ_above e^((hi − v_i)/α), b = log(Σ_{top below} e^((v_i − lo)/α) + R·e^((v_m − lo)/α)):
    # every exponent ≤ 0 and the anchor's own term is 1.
    e = torch.exp(torch.where(above, hi - v, v - lo) / alpha)
    a = torch.where(above, e, zero).sum(-1, keepdim=True).log()  # −inf when n = 0
    b = torch.logaddexp(torch.where(above, zero, e).sum(-1, keepdim=True).log(),
                        log_rest + (v[:, -1:] - lo) / alpha)
    anchor, delta = _root_from_sums(a, b, hi, lo, n - k[:, None], alpha)
    return torch.addcdiv(-delta, r - anchor, alpha), order  # (r − anchor)/α − delta


def _root_from_sums(a: Tensor, b: Tensor, hi: Tensor, lo: Tensor, m: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """(anchor, delta) with c = anchor/α + delta from the anchored log-sums of an interval
    [lo, hi] and m = (#scores above) − k; see the module docstring."""
    # log(|m| + √(m² + A_j B_j)) in log space: A_j B_j = e^(a + b + u_j − u_{j+1}) can
    # underflow when the interval is wide, and with m = 0 (integer k) the root is all of it.
    log_ab = a + b + (lo - hi) / alpha  # −inf at the two outer intervals
    log_m = torch.log(m.abs())
    log_root = torch.logaddexp(log_m, 0.5 * torch.logaddexp(2 * log_m, log_ab))
    upper = m >= 0  # something lies above in this branch; something below in the other
    # The unused branch may be inf/nan; torch.where discards it and nothing backprops here.
    delta = torch.where(upper, log_root - a, b - log_root)
    anchor = torch.where(upper, hi, lo)
    return anchor, delta


def _top_count(E: int, k_max: float, cap: float | None = None) -> int:
    """Top scores the threshold needs (> 2·k_max, see `_top_threshold_offsets`), and at least
    the ⌈k_max·cap⌉ a truncation with `cap` can keep; E means a full sort."""
    m = math.floor(2 * k_max) + 1
    if cap is not None:
        m = max(m, math.ceil(k_max * cap))
    return min(E, m)


class _SoftTopK(torch.autograd.Function):
    """p = F(t) with the threshold offsets t; the backward of METHODS §2.1 from saved e.

    With a = −|t| and its row max a*, e = e^(a − a*) gives both the density
    f(t) = ½e^(a*)·e and q = f/Σf = e/Σe; the shift keeps q finite where every f underflows
    (hard limit: integer k across a wide gap), which Σf in the denominator would not.
    """

    @staticmethod
    def forward(ctx, r: Tensor, k: Tensor, alpha: Tensor, m: int) -> tuple[Tensor, Tensor]:
        if m < r.shape[-1]:
            t, order = _top_threshold_offsets(r, k, alpha, m)
        else:
            t, order = _threshold_offsets(r, k, alpha)
        a = t.abs().neg_()
        a_max = a.amax(-1, keepdim=True)
        e = a.sub_(a_max).exp_()  # reuses a's storage
        h = e * (0.5 * a_max.exp())  # = f(t); F(t) = h or 1 − h
        ctx.save_for_backward(t, e, a_max, alpha)
        ctx.mark_non_differentiable(order)
        return torch.where(t > 0, 1.0 - h, h), order

    @staticmethod
    def backward(ctx, g: Tensor, _order_grad: Tensor | None):
        t, e, a_max, alpha = ctx.saved_tensors
        need_r, need_k, need_alpha, _ = ctx.needs_input_grad
        e_sum = e.sum(-1, keepdim=True)
        qg = (e * g).sum(-1, keepdim=True) / e_sum  # ⟨q, g⟩
        grad_r = (g - qg).mul_(e).mul_(0.5 * a_max.exp() / alpha) if need_r else None  # (d/α)(g − ⟨q,g⟩)
        grad_k = qg.squeeze(-1) if need_k else None
        grad_alpha = None
        if need_alpha:
            qt = (e * t).sum(-1, keepdim=True) / e_sum
            grad_alpha = -(g * e * (0.5 * a_max.exp()) * (t - qt)).sum() / alpha
        return grad_r, grad_k, grad_alpha, None


def _cheap_checks_allowed() -> bool:
    # Reading a tensor's value forces a host sync and breaks torch.compile graphs.
    return not torch.compiler.is_compiling()


def _prepare(scores: Tensor, k: float | Tensor, alpha: float | Tensor, cap: float | None,
             k_max: float | None = None, alpha_positive: bool = False) -> tuple[Tensor, Tensor, Tensor, int]:
    """Validate; return (rows r [N, E], k per row [N], 0-d α, top scores needed m).

    k_max: a host-known upper bound of a tensor k (e.g. a budget's largest k_l): m then comes
    from it and k's value is never read (no host sync). alpha_positive: the caller guarantees
    a tensor α > 0 (e.g. the exp of a learnt log α), so its value is never read either."""
    if scores.dim() < 1 or scores.shape[-1] < 1:
        raise ValueError(
            f"soft_topk: scores need a non-empty last dim, got shape {tuple(scores.shape)}"
        )
    E = scores.shape[-1]
    batch = scores.shape[:-1]
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    check = _cheap_checks_allowed()

    if isinstance(k, Tensor):
        m = E  # without reading k or a bound of it, only a full sort is safe
        if k_max is not None:
            if not 0 < k_max < E:
                raise ValueError(f"soft_topk: k_max must lie in (0, E) = (0, {E}); got k_max={k_max}")
            m = _top_count(E, float(k_max), cap)
        elif check and k.numel() > 0:
            kmin, kmax = (v.item() for v in torch.aminmax(k.detach().double()))
            if not (kmin > 0 and kmax < E):
                raise ValueError(
                    f"soft_topk: k must lie in (0, E) = (0, {E}); got k in [{kmin}, {kmax}]"
                )
            m = _top_count(E, kmax, cap)
        k_rows = torch.broadcast_to(k.to(device=scores.device, dtype=dtype), batch).reshape(-1)
    else:
        if not 0 < k < E:
            raise ValueError(f"soft_topk: k must lie in (0, E) = (0, {E}); got k={k}")
        m = _top_count(E, float(k), cap)
        k_rows = torch.full((math.prod(batch),), float(k), dtype=dtype, device=scores.device)

    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"soft_topk: alpha must be a scalar, got shape {tuple(alpha.shape)}")
        if check and not alpha_positive and not alpha.item() > 0:
            raise ValueError(f"soft_topk: alpha must be > 0, got {alpha.item()}")
        alpha_t = alpha.to(device=scores.device, dtype=dtype).reshape(())
    else:
        if not alpha > 0:
            raise ValueError(f"soft_topk: alpha must be > 0, got {alpha}")
        alpha_t = torch.tensor(float(alpha), dtype=dtype, device=scores.device)
    return scores.to(dtype).reshape(-1, E), k_rows, alpha_t, m


def soft_topk(scores: Tensor, k: float | Tensor, alpha: float | Tensor = 1.0, k_max: float | None = None) -> Tensor:
    """LapSum soft top-k along the last dim: p = F((scores − b)/α) with Σ p = k per row.

    scores: [..., E], any float dtype (computed in fp32, or fp64 for fp64 input; the result
    has the dtype of ``scores``).  k: float, or tensor broadcastable to ``scores[..., 0]``
    (e.g. [] or [N] for [N, E], [L, 1] for [L, N, E]); may require grad.  alpha: float or
    0-d tensor > 0; may require grad.

    Raises ValueError for k outside (0, E) or alpha ≤ 0.  Python floats are always
    checked; tensor k / alpha are checked with one min/max read, skipped under
    torch.compile (out-of-range values then give meaningless weights, not an error).
    When k < (E − 1)/2 is known (a float, or a checked tensor) the threshold comes from the
    top ⌊2k⌋ + 1 scores (a partial sort); otherwise from a full sort. ``k_max``: a host-known
    bound of a tensor k; then k is neither read nor checked, and the partial sort's size comes
    from the bound (what a training step needs: no host sync).
    """
    r, k_rows, alpha_t, m = _prepare(scores, k, alpha, None, k_max)
    p, _ = _SoftTopK.apply(r, k_rows, alpha_t, m)
    return p.reshape(scores.shape).to(scores.dtype)


def sparse_soft_topk(scores: Tensor, k: float | Tensor, alpha: float | Tensor = 1.0, theta: float = 1.8,
                     cap: float = 2.0, k_max: float | None = None, alpha_positive: bool = False) -> Tensor:
    """``truncate(soft_topk(scores, k, alpha), k, theta, cap)`` in one pass: the truncation
    reuses the soft top-k's ranking of the scores (p is increasing in the score), so it
    needs no sort of its own. Same arguments, checks and gradients as the two calls
    (alpha_positive: as `_prepare`'s, skips the host read of a tensor α known to be > 0)."""
    _check_truncation(k, theta, cap)
    r, k_rows, alpha_t, m = _prepare(scores, k, alpha, cap, k_max, alpha_positive)
    p, order = _SoftTopK.apply(r, k_rows, alpha_t, m)
    # k in fp64 as given (not the fp32 copy), so ⌈k·cap⌉ is the same as `truncate`'s.
    k64 = torch.broadcast_to(torch.as_tensor(k, device=r.device).detach().to(torch.float64), scores.shape[:-1])
    w = _truncate_ranked(p, order, p.detach().gather(-1, order), k64.reshape(-1), theta, cap)
    return w.reshape(scores.shape).to(scores.dtype)


def _check_truncation(k: float | Tensor, theta: float, cap: float) -> None:
    if not theta >= 0:
        raise ValueError(f"truncate: theta must be >= 0, got {theta}")
    if not cap >= 1:
        raise ValueError(f"truncate: cap must be >= 1, got {cap}")
    if not isinstance(k, Tensor) and not k > 0:
        raise ValueError(f"truncate: k must be > 0, got {k}")


def truncate(p: Tensor, k: float | Tensor, theta: float = 1.8, cap: float = 2.0) -> Tensor:
    """Sparse routing weights w = p·1[p ≥ τ] (METHODS §2.2), not renormalised.

    τ = θ·k/E clamped into [p_(m), p_(1)] per row, m = min(⌈k·cap⌉, E).  k: float or tensor
    broadcastable to ``p[..., 0]``.  Between 1 and m entries survive per row, also with ties
    (entries tied at p_(m) beyond rank m are dropped; which of the tied ones is up to topk).
    Gradients flow to the kept entries unchanged; the mask itself is not differentiated.
    """
    _check_truncation(k, theta, cap)
    E = p.shape[-1]
    batch = p.shape[:-1]
    # Compare in fp32 (fp64 for fp64 p): exact for bf16/fp16 weights, no rounding of τ to bf16.
    pd = p.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32)
    k64 = torch.broadcast_to(torch.as_tensor(k, device=p.device).detach().to(torch.float64), batch)
    # Only the m largest can survive. A Python k gives m on the host (partial top-m); a
    # tensor k would need a host sync for that, so it sorts the whole row instead.
    m_max = E if isinstance(k, Tensor) else min(math.ceil(k * cap), E)
    top, order = pd.topk(m_max, dim=-1, sorted=True)  # descending
    return _truncate_ranked(p, order, top, k64, theta, cap)


def _truncate_ranked(p: Tensor, order: Tensor, top: Tensor, k64: Tensor, theta: float, cap: float) -> Tensor:
    """The truncation given the row's ranking: `order` [..., M] indices of the M largest p
    (descending, M ≥ ⌈k·cap⌉ or M = E) and `top` their values in fp32/fp64; k64 per row (fp64)."""
    E = p.shape[-1]
    M = order.shape[-1]
    # fp64 for ⌈k·cap⌉ so that e.g. 1.5·2 is not rounded up to 4.
    m = torch.ceil(k64 * cap).clamp(1, min(E, M)).long()
    p_m = top.gather(-1, (m - 1).unsqueeze(-1))
    tau = (theta * k64 / E).to(top.dtype).unsqueeze(-1)  # after ⌈·⌉, fp32 is enough
    tau = torch.minimum(torch.maximum(tau, p_m), top[..., :1])
    # Keep by rank, not just by value, so ties at p_(m) cannot push the count past m;
    # rank 0 always passes (τ ≤ p_(1)), so at least one survives.
    rank = torch.arange(M, device=p.device)
    keep_ranked = (top >= tau) & (rank < m.unsqueeze(-1))
    # Gather the ranked entries, zero the dropped ones, scatter back: only [..., M] work
    # besides the zero fill, and the gradient reaches exactly the kept entries.
    kept = p.gather(-1, order) * keep_ranked
    return torch.zeros_like(p).scatter(-1, order, kept)
