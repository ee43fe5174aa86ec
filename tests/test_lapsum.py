"""LapSum soft top-k and truncation (METHODS §2.1, §2.2), checked against an independent
float64 bisection solver and against the spec's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lit_moe import lapsum
from lit_moe.lapsum import soft_topk, sparse_soft_topk, truncate

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- reference
def laplace_cdf(t: np.ndarray) -> np.ndarray:
    h = 0.5 * np.exp(-np.abs(t))
    return np.where(t > 0, 1.0 - h, h)


def reference(r, k, alpha):
    """Solve Σ F((r − b)/α) = k by bisection on b in float64 (no closed form involved).

    Returns (p, t) with t = (r − b)/α, both float64, shaped like r.
    """
    r = np.asarray(r, dtype=np.float64)
    E = r.shape[-1]
    rows = r.reshape(-1, E)
    k = np.broadcast_to(np.asarray(k, dtype=np.float64), r.shape[:-1]).reshape(-1)
    # 100α beyond the extreme scores the sum is within E·e^(−100) of E (resp. 0).
    lo = rows.min(-1) - 100 * alpha
    hi = rows.max(-1) + 100 * alpha
    for _ in range(200):  # far past float64 resolution of b
        mid = 0.5 * (lo + hi)
        t = (rows - mid[:, None]) / alpha
        # Σ F(t) > k, written as Σ_{t≤0} h − Σ_{t>0} h > k − #{t>0} with h = ½e^(−|t|):
        # summing 1 − h directly would round the tiny tails away near p ≈ 1.
        h = 0.5 * np.exp(-np.abs(t))
        excess = np.where(t > 0, -h, h).sum(-1) - (k - (t > 0).sum(-1))
        too_big = excess > 0  # b must go up
        lo = np.where(too_big, mid, lo)
        hi = np.where(too_big, hi, mid)
    t = (rows - (0.5 * (lo + hi))[:, None]) / alpha
    return laplace_cdf(t).reshape(r.shape), t.reshape(r.shape)


def assert_matches_reference(p: torch.Tensor, scores: torch.Tensor, k, alpha: float, rtol=1e-5):
    """Relative error ≤ rtol·(1 + |t|/10): p = ½e^(−|t|) in its tail inherits the fp32
    rounding of t itself (≈ 6e-8·|t|), which no fp32 method avoids."""
    k_np = k.detach().numpy() if isinstance(k, torch.Tensor) else k
    # The kernel sees k in fp32 (as it would from fp32 model code); near k ≈ E one ulp of k
    # moves a small p by a relative 1e-5, so the reference gets the same rounded k.
    k_np = np.asarray(k_np, dtype=np.float32).astype(np.float64)
    ref, t = reference(scores.detach().double().numpy(), k_np, alpha)
    got = p.detach().double().numpy()
    bound = rtol * ref * (1 + np.abs(t) / 10) + 1e-37  # 1e-37: fp32 subnormals
    err = np.abs(got - ref)
    bad = err > bound
    assert not bad.any(), (
        f"{bad.sum()} entries off; worst rel err {(err / np.maximum(ref, 1e-300)).max():.3g}, "
        f"got {got[bad][:5]}, want {ref[bad][:5]}"
    )


# ----------------------------------------------------------------------------- strategies
@st.composite
def problems(draw):
    """(scores [N, E] fp32, k float or [N] tensor) covering ties, big magnitudes, k extremes."""
    E = draw(st.integers(1, 70))
    N = draw(st.integers(1, 6))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.randn(N, E, generator=gen) * scale
    if draw(st.booleans()):  # ties: few distinct values
        scores = (scores / scale * 2).round() * scale / 2
    kind = draw(st.sampled_from(["float", "rows", "near0", "nearE", "int"]))
    if kind == "float":
        k = draw(st.floats(0.01, E - 0.01)) if E > 1 else 0.5
    elif kind == "rows":
        k = 0.01 + torch.rand(N, generator=gen) * (E - 0.02)
    elif kind == "near0":
        k = 1e-4
    elif kind == "nearE":
        k = E * (1 - 1e-4)
    else:
        k = float(draw(st.integers(1, E - 1))) if E > 1 else 0.5
    return scores, k


ALPHAS = st.sampled_from([1e-2, 0.3, 1.0, 4.0])


# ----------------------------------------------------------------------------- accuracy
@SETTINGS
@given(problems(), ALPHAS)
def test_matches_bisection_reference(problem, alpha):
    scores, k = problem
    p = soft_topk(scores, k, alpha)
    assert p.shape == scores.shape and p.dtype == scores.dtype
    assert torch.isfinite(p).all()
    assert_matches_reference(p, scores, k, alpha)


@SETTINGS
@given(
    st.lists(st.integers(-3, 3), min_size=2, max_size=12),
    st.floats(0.05, 0.95),
    st.sampled_from([1e-3, 0.5, 1.0, 1e3]),
    ALPHAS,
)
def test_matches_reference_with_ties(values, frac, mult, alpha):
    scores = torch.tensor([values], dtype=torch.float32) * mult
    k = frac * len(values)
    assert_matches_reference(soft_topk(scores, k, alpha), scores, k, alpha)


def test_integer_k_with_wide_gap():
    # k = 2 exactly and the solution in a 2e4-wide interval (A·B underflows): b at the midpoint.
    scores = torch.tensor([[1e4, -1e4, 0.0, 0.0, 1e4]])
    p = soft_topk(scores, 2.0)
    assert torch.equal(p, torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0]]))
    assert_matches_reference(p, scores, 2.0, 1.0)


def test_tied_groups_far_apart():
    # s = r/α ≈ 2e6: the knot log-sums are rounded to 0.125, enough to pick an interval
    # inside the tied group; the root must still be accurate (0.4875 each for the 5 ties).
    scores = torch.tensor([[20000.0] * 3 + [15000.0] * 5 + [10000.0] * 4 + [-5000.0] * 3])
    p = soft_topk(scores, 5.4375, alpha=0.01)
    assert_matches_reference(p, scores, 5.4375, 0.01)
    torch.testing.assert_close(p[0, 3:8], torch.full((5,), 0.4875), rtol=1e-5, atol=0)


def test_float64_stays_float64():
    scores = torch.randn(5, 9, dtype=torch.float64)
    p = soft_topk(scores, 3.3, 0.7)
    assert p.dtype == torch.float64
    ref, _ = reference(scores.numpy(), 3.3, 0.7)
    np.testing.assert_allclose(p.numpy(), ref, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- gradients
def _gradcheck(scores, k, alpha):
    assert torch.autograd.gradcheck(lambda r, k_, a: soft_topk(r, k_, a), (scores, k, alpha))


def test_gradcheck_per_row_k():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 7, generator=g, dtype=torch.float64).requires_grad_()
    k = (0.3 + torch.rand(4, generator=g, dtype=torch.float64) * 6.4).requires_grad_()
    alpha = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    _gradcheck(scores, k, alpha)


def test_gradcheck_scalar_k_ties_and_integer_k():
    scores = torch.tensor(
        [[0.5, 0.5, -1.0, 2.0, 2.0, 0.0], [3.0, -3.0, 0.1, 0.2, 0.2, 0.2], [0.0] * 6],
        dtype=torch.float64,
        requires_grad=True,
    )
    alpha = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    for kv in (2.0, 0.37, 5.9):
        _gradcheck(scores, torch.tensor(kv, dtype=torch.float64, requires_grad=True), alpha)


def test_gradcheck_broadcast_layer_k():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.tensor([[1.5], [2.2]], dtype=torch.float64, requires_grad=True)
    _gradcheck(scores, k, torch.tensor(0.6, dtype=torch.float64, requires_grad=True))


def test_grad_matches_spec_formulas():
    # Same formulas as METHODS §2.1, evaluated here from the float64 reference solution.
    g = torch.Generator().manual_seed(2)
    r = torch.randn(3, 8, generator=g, dtype=torch.float64) * 2
    up = torch.randn(3, 8, generator=g, dtype=torch.float64)
    alpha, kv = 0.7, 2.6
    rr = r.clone().requires_grad_()
    kk = torch.tensor(kv, dtype=torch.float64, requires_grad=True)
    aa = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    (soft_topk(rr, kk, aa) * up).sum().backward()

    _, t = reference(r.numpy(), kv, alpha)
    d = 0.5 * np.exp(-np.abs(t))
    q = d / d.sum(-1, keepdims=True)
    gn, rn = up.numpy(), r.numpy()
    qg = (q * gn).sum(-1, keepdims=True)
    np.testing.assert_allclose(rr.grad.numpy(), d / alpha * (gn - qg), atol=1e-10)
    np.testing.assert_allclose(kk.grad.item(), qg.sum(), atol=1e-10)
    qr = (q * rn).sum(-1, keepdims=True)
    np.testing.assert_allclose(aa.grad.item(), -(gn * d * (rn - qr)).sum() / alpha**2, atol=1e-10)


@pytest.mark.parametrize("kv", [1e-6, 1.0, 2.0, 2.5, 5 - 1e-5])
@pytest.mark.parametrize(
    "row",
    [
        [1e4, -1e4, 0.0, 0.0, 1e4],
        [0.0] * 5,
        [1e4, 1e4, 1e4, -1e4, -1e4],
        [-1e4, 3.0, 3.0, 2.0, 1e4],
    ],
)
def test_extremes_finite(row, kv):
    scores = torch.tensor([row], requires_grad=True)
    k = torch.tensor(kv, requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    p = soft_topk(scores, k, alpha)
    (p * torch.arange(5.0)).sum().backward()
    assert torch.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert math.isclose(p.sum().item(), kv, rel_tol=1e-5)
    for grad in (scores.grad, k.grad, alpha.grad):
        assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- properties
@SETTINGS
@given(problems(), ALPHAS)
def test_row_sums_bounds_and_order(problem, alpha):
    scores, k = problem
    p = soft_topk(scores, k, alpha)
    k_rows = torch.as_tensor(k, dtype=torch.float32).expand(scores.shape[0])
    torch.testing.assert_close(p.sum(-1), k_rows, rtol=1e-5, atol=1e-5)
    assert ((p >= 0) & (p <= 1)).all()
    # order preserving: sorting by score sorts p; equal scores get identical weights
    order = scores.argsort(-1)
    ps = p.gather(-1, order)
    assert (ps[:, 1:] >= ps[:, :-1]).all()
    same = scores[:, :, None] == scores[:, None, :]
    assert (p[:, :, None] == p[:, None, :])[same].all()


@SETTINGS
@given(st.integers(2, 40), st.integers(0, 2**31 - 1), st.floats(0.02, 0.98), ALPHAS)
def test_strictly_inside_unit_interval_for_moderate_scores(E, seed, frac, alpha):
    scores = torch.randn(3, E, generator=torch.Generator().manual_seed(seed)) * alpha
    p = soft_topk(scores, frac * E, alpha)
    assert ((p > 0) & (p < 1)).all()


@SETTINGS
@given(st.integers(2, 32), st.data())
def test_small_alpha_gives_hard_topk(E, data):
    k = data.draw(st.integers(1, E - 1))
    perm = torch.tensor(data.draw(st.permutations(range(E))), dtype=torch.float32)
    scores = (perm * 0.1).unsqueeze(0)  # gaps of 0.1 = 100 α
    p = soft_topk(scores, float(k), alpha=1e-3)
    hard = torch.zeros_like(scores).scatter(-1, scores.topk(k, -1).indices, 1.0)
    torch.testing.assert_close(p, hard, rtol=0, atol=1e-6)


def test_layer_k_broadcast_against_layer_batches():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 5, 8, generator=g)
    k = torch.tensor([[1.2], [2.0], [6.5]], requires_grad=True)
    p = soft_topk(scores, k)
    assert p.shape == scores.shape
    up = torch.randn(3, 5, 8, generator=g)
    (p * up).sum().backward()
    for layer in range(3):
        kl = k[layer, 0].detach().clone().requires_grad_()
        pl = soft_topk(scores[layer], kl)
        torch.testing.assert_close(p[layer], pl)
        (pl * up[layer]).sum().backward()
        torch.testing.assert_close(k.grad[layer, 0], kl.grad)
    assert k.grad.shape == k.shape


def test_bf16_in_bf16_out():
    g = torch.Generator().manual_seed(4)
    scores = (torch.randn(16, 32, generator=g) * 2).bfloat16().requires_grad_()
    p = soft_topk(scores, 4.0)
    assert p.dtype == torch.bfloat16
    p32 = soft_topk(scores.detach().float(), 4.0)
    torch.testing.assert_close(p.float(), p32, rtol=0, atol=1e-2)
    p.float().pow(2).sum().backward()
    assert scores.grad.dtype == torch.bfloat16 and torch.isfinite(scores.grad.float()).all()


def test_empty_batch():
    scores = torch.zeros(0, 8, requires_grad=True)
    k = torch.zeros(0, requires_grad=True)  # no rows, so nothing to validate
    alpha = torch.tensor(1.0, requires_grad=True)
    p = soft_topk(scores, k, alpha)
    assert p.shape == (0, 8)
    p.sum().backward()
    assert scores.grad.shape == (0, 8) and k.grad.shape == (0,) and alpha.grad.item() == 0.0
    assert soft_topk(torch.zeros(2, 0, 8), torch.tensor([[1.0], [2.0]])).shape == (2, 0, 8)


@pytest.mark.parametrize("bad_k", [0.0, -1.0, 8.0, 9.5, float("nan")])
def test_invalid_k_raises(bad_k):
    scores = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"k.*E.*8"):
        soft_topk(scores, bad_k)
    with pytest.raises(ValueError, match=r"k.*E.*8"):
        soft_topk(scores, torch.tensor([1.0, bad_k, 2.0]))


@pytest.mark.parametrize("bad_alpha", [0.0, -0.5])
def test_invalid_alpha_raises(bad_alpha):
    with pytest.raises(ValueError, match="alpha"):
        soft_topk(torch.randn(3, 8), 2.0, bad_alpha)
    with pytest.raises(ValueError, match="alpha"):
        soft_topk(torch.randn(3, 8), 2.0, torch.tensor(bad_alpha))


# ----------------------------------------------------------------------------- truncate
def test_truncate_tau_hand_computed():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    E = 4
    # k=1, θ=1.8: τ = 0.45 ∈ [p_(2), p_(1)] = [0.3, 0.5] → only 0.5 survives
    assert torch.equal(truncate(p, 1.0, theta=1.8, cap=2.0), torch.tensor([[0.5, 0, 0, 0]]))
    # θ=0.4: τ = 0.1 < p_(m)=0.3 → clamped up to 0.3 → two survive (= m)
    assert torch.equal(truncate(p, 1.0, theta=0.4), torch.tensor([[0.5, 0.3, 0, 0]]))
    # θ=3: τ = 0.75 > p_(1) → clamped down to 0.5 → the top one survives
    assert torch.equal(truncate(p, 1.0, theta=3.0), torch.tensor([[0.5, 0, 0, 0]]))
    # k=1.5, θ=0.6: τ = 0.6·1.5/4 = 0.225, m = 3, p_(3) = 0.15 → τ stays 0.225
    assert 0.6 * 1.5 / E == pytest.approx(0.225)
    assert torch.equal(truncate(p, 1.5, theta=0.6), torch.tensor([[0.5, 0.3, 0, 0]]))
    # θ=0: τ = 0 → clamped to p_(m), m = ⌈1.5·2⌉ = 3
    assert torch.equal(truncate(p, 1.5, theta=0.0), torch.tensor([[0.5, 0.3, 0.15, 0]]))


def test_truncate_ties_respect_m():
    p = torch.full((2, 4), 0.25)  # all tied: every entry passes p ≥ τ
    w = truncate(p, 1.0, theta=1.8, cap=2.0)  # m = 2
    assert ((w > 0).sum(-1) == 2).all()
    w = truncate(p, torch.tensor([0.5, 1.5]), theta=0.0, cap=2.0)  # m = 1, 3
    assert (w > 0).sum(-1).tolist() == [1, 3]


@SETTINGS
@given(problems(), st.floats(0.0, 5.0), st.floats(1.0, 3.0), st.booleans())
def test_truncate_bounds(problem, theta, cap, tensor_k):
    scores, k = problem
    p = soft_topk(scores, k, 1.0)
    E = scores.shape[-1]
    k_arg = torch.as_tensor(k, dtype=torch.float32).expand(scores.shape[0]) if tensor_k else k
    w = truncate(p, k_arg, theta=theta, cap=cap)
    active = (w != 0).sum(-1)
    m = torch.ceil(torch.as_tensor(k_arg, dtype=torch.float64) * cap).clamp(max=E)
    assert (active >= 1).all() and (active <= m).all()
    kept = w != 0
    assert torch.equal(w[kept], p[kept])  # kept values are p itself, not renormalised
    # everything kept is at least everything dropped (mask follows the ranking)
    lowest_kept = torch.where(kept, p, torch.inf).amin(-1)
    highest_dropped = torch.where(kept, -torch.inf, p).amax(-1)
    assert (lowest_kept >= highest_dropped).all()


def test_truncate_gradient_is_upstream_on_kept():
    g = torch.Generator().manual_seed(5)
    p = torch.rand(6, 10, generator=g).requires_grad_()
    up = torch.randn(6, 10, generator=g)
    w = truncate(p, 2.0)
    (w * up).sum().backward()
    kept = w.detach() != 0
    assert torch.equal(p.grad, torch.where(kept, up, torch.zeros(())))


def test_truncate_keeps_dtype_and_validates():
    p = soft_topk(torch.randn(4, 8), 2.0).bfloat16()
    assert truncate(p, 2.0).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="theta"):
        truncate(p, 2.0, theta=-0.1)
    with pytest.raises(ValueError, match="cap"):
        truncate(p, 2.0, cap=0.9)
    assert truncate(torch.zeros(0, 8), 2.0).shape == (0, 8)


# ----------------------------------------------------------------------------- partial sort
@SETTINGS
@given(problems(), ALPHAS)
def test_partial_sort_path_matches_full_sort(problem, alpha):
    """The top-⌊2k⌋+1 threshold (topk) equals the full-sort one, in values and gradients."""
    scores, k = problem
    E = scores.shape[-1]
    k_max = float(torch.as_tensor(k).max())
    m = lapsum._top_count(E, k_max)
    if m >= E:  # k ≥ (E − 1)/2: both paths are the full sort
        return
    k_rows = torch.broadcast_to(torch.as_tensor(k, dtype=torch.float32), scores.shape[:-1]).reshape(-1)
    outs = []
    for count in (E, m):
        r = scores.clone().requires_grad_()
        kr = k_rows.clone().requires_grad_()
        a = torch.tensor(alpha).requires_grad_()
        p, order = lapsum._SoftTopK.apply(r, kr, a, count)
        assert order.shape[-1] == count
        (p * torch.linspace(-1, 1, E)).sum().backward()
        outs.append((p.detach(), r.grad, kr.grad, a.grad))
    (p_full, *g_full), (p_top, *g_top) = outs
    torch.testing.assert_close(p_top, p_full, rtol=2e-5, atol=1e-7)
    for got, want in zip(g_top, g_full):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@SETTINGS
@given(problems(), st.floats(0.0, 5.0), st.floats(1.0, 3.0), st.booleans())
def test_sparse_soft_topk_equals_truncate_of_soft_topk(problem, theta, cap, tensor_k):
    scores, k = problem
    k_arg = torch.as_tensor(k, dtype=torch.float32).expand(scores.shape[0]).clone() if tensor_k else k
    up = torch.randn(scores.shape)
    results = []
    for fused in (True, False):
        r = scores.clone().requires_grad_()
        w = sparse_soft_topk(r, k_arg, 1.0, theta, cap) if fused else truncate(soft_topk(r, k_arg, 1.0), k_arg,
                                                                                  theta, cap)
        (w * up).sum().backward()
        results.append((w.detach(), r.grad))
    (w_fused, g_fused), (w_two, g_two) = results
    # Same kept set (up to ties, where the pick among equals may differ) and the same values.
    assert torch.equal((w_fused != 0).sum(-1), (w_two != 0).sum(-1))
    torch.testing.assert_close(w_fused.sort(-1).values, w_two.sort(-1).values, rtol=1e-6, atol=0)
    if not (scores[:, None, :] == scores[:, :, None]).sum((-1, -2)).gt(scores.shape[-1]).any():  # no ties
        torch.testing.assert_close(w_fused, w_two, rtol=1e-6, atol=0)
        torch.testing.assert_close(g_fused, g_two, rtol=1e-5, atol=1e-7)


def test_sparse_soft_topk_hand_checked_row():
    """One row through both steps by hand: p from the bisection reference, τ = θ·k/E."""
    scores = torch.tensor([[3.0, 1.0, 0.5, -1.0, -2.0, -4.0]])
    p_ref, _ = reference(scores.numpy(), 1.0, 1.0)
    w = sparse_soft_topk(scores, 1.0, 1.0, theta=0.6, cap=2.0)  # τ = 0.1, at most 2 kept
    kept = [i for i in range(6) if p_ref[0, i] >= 0.1][:2]
    assert len(kept) == 2
    expected = torch.zeros(1, 6, dtype=torch.float64)
    expected[0, kept] = torch.from_numpy(p_ref[0, kept])
    torch.testing.assert_close(w.double(), expected, rtol=1e-5, atol=0)
