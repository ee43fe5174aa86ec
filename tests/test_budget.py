"""Global expert budget (METHODS §2.3): Σ k_l = K and k_l ≥ 1 for any η."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_moe.budget import GlobalExpertBudget
from lit_moe.lapsum import soft_topk

SETTINGS = settings(max_examples=50, deadline=None)


@SETTINGS
@given(
    st.integers(1, 16),
    st.floats(1.0, 3.0),
    st.floats(0.0, 20.0),
    st.integers(0, 2**31 - 1),
)
def test_invariant_for_random_eta(L, ratio, eta_scale, seed):
    K = ratio * L
    budget = GlobalExpertBudget(L, K)
    with torch.no_grad():
        budget.eta.copy_(torch.randn(L, generator=torch.Generator().manual_seed(seed)) * eta_scale)
    k = budget.k()
    assert k.shape == (L,)
    assert abs(k.sum().item() - K) <= 1e-4 * max(1.0, K)
    assert (k >= 1 - 1e-6).all()
    assert budget.check_invariant(atol=1e-4 * max(1.0, K)) == pytest.approx(K, rel=1e-5)


def test_initial_split_is_uniform():
    k = GlobalExpertBudget(4, 6.0, num_experts=8).k()
    torch.testing.assert_close(k, torch.full((4,), 1.5))


def test_fixed_mode():
    budget = GlobalExpertBudget(4, 6.0, num_experts=8, learnable=False)
    assert list(budget.parameters()) == []
    assert "fixed_k" not in budget.state_dict()
    torch.testing.assert_close(budget.k(), torch.full((4,), 1.5))
    assert budget.check_invariant() == pytest.approx(6.0)
    assert budget.to(torch.float64).k().dtype == torch.float64


def test_gradient_reaches_eta_through_soft_topk():
    L, E, N = 3, 8, 5
    budget = GlobalExpertBudget(L, 6.0, num_experts=E)
    with torch.no_grad():
        budget.eta.copy_(torch.tensor([0.3, -0.2, 0.5]))
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(L, N, E, generator=g)
    up = torch.randn(L, N, E, generator=g)
    k = budget.k()
    k.retain_grad()
    (soft_topk(scores, k[:, None]) * up).sum().backward()
    grad = budget.eta.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # chain rule through k_l = softmax(η)_l (K − L) + 1: J = (K − L)(diag π − π πᵀ)
    pi = torch.softmax(budget.eta.detach(), 0)
    jac = (6.0 - L) * (torch.diag(pi) - pi[:, None] * pi[None, :])
    torch.testing.assert_close(grad, jac.T @ k.grad)
    assert abs(grad.sum().item()) < 1e-5  # moving budget around cannot change Σ k


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_layers=0, total=2.0), "num_layers"),
        (dict(num_layers=4, total=3.0), "total"),
        (dict(num_layers=4, total=float("nan")), "total"),
        # learnable: max k_l = K − L + 1 = 8 = E
        (dict(num_layers=4, total=11.0, num_experts=8), "K - L \\+ 1"),
        # fixed: K/L = 8 = E
        (dict(num_layers=2, total=16.0, num_experts=8, learnable=False), "K/L"),
    ],
)
def test_invalid_budgets_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlobalExpertBudget(**kwargs)


def test_valid_edge_budgets():
    GlobalExpertBudget(4, 10.9, num_experts=8)  # max k_l = 7.9 < 8
    GlobalExpertBudget(2, 15.9, num_experts=8, learnable=False)  # 7.95 < 8
    torch.testing.assert_close(GlobalExpertBudget(3, 3.0).k(), torch.ones(3))  # K = L
    torch.testing.assert_close(GlobalExpertBudget(1, 2.5).k(), torch.tensor([2.5]))


def test_check_invariant_raises_on_broken_state():
    budget = GlobalExpertBudget(3, 4.5)
    with torch.no_grad():
        budget.eta.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="4.5"):
        budget.check_invariant()


def test_extra_repr():
    text = repr(GlobalExpertBudget(4, 6.0, num_experts=8))
    assert "num_layers=4" in text and "total=6.0" in text and "num_experts=8" in text
