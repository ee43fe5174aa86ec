"""Per-layer expert counts under a global budget (METHODS §2.3).

k_l = softmax(η)_l · (K − L) + 1 with learnable η ∈ R^L: Σ_l k_l = K and k_l ≥ 1 hold by
construction for any η, so the optimiser can move budget between layers but never break
it.  The "fixed" variant (SoftMoE*) uses k_l = K/L.  Gradients reach η through ∂p/∂k of
the soft top-k that consumes k_l.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_moe.dtensor import full_tensor

__all__ = ["GlobalExpertBudget"]


class GlobalExpertBudget(nn.Module):
    """Splits a global budget of ``total`` (K) experts per token over ``num_layers`` (L) layers.

    ``num_experts`` (E), when given, is used to reject budgets under which some k_l could
    reach E (soft top-k needs k < E): the largest k_l is K − L + 1 when learnable (softmax
    tending to one-hot), K/L when fixed.
    """

    def __init__(
        self,
        num_layers: int,
        total: float,
        num_experts: int | None = None,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        L, K, E = int(num_layers), float(total), num_experts
        if L < 1:
            raise ValueError(f"GlobalExpertBudget: num_layers must be >= 1, got {num_layers}")
        if not math.isfinite(K) or K < L:
            raise ValueError(
                f"GlobalExpertBudget: total K={total} must be >= num_layers L={L} "
                f"(every layer needs k_l >= 1); raise total to at least {L}"
            )
        if E is not None:
            if learnable and K - L + 1 >= E:
                raise ValueError(
                    f"GlobalExpertBudget: with total K={K}, L={L} a learnable k_l can reach "
                    f"K - L + 1 = {K - L + 1} >= num_experts E={E}; need K < E + L - 1 = "
                    f"{E + L - 1} (lower total, or use learnable=False if K/L < E)"
                )
            if not learnable and K / L >= E:
                raise ValueError(
                    f"GlobalExpertBudget: fixed k_l = K/L = {K / L} must be < num_experts "
                    f"E={E}; need total K < {E * L}"
                )
        self.num_layers, self.total, self.num_experts, self.learnable = L, K, E, learnable
        if learnable:
            self.eta = nn.Parameter(torch.zeros(L))  # uniform split K/L at initialisation
        else:
            # Non-persistent buffer: follows .to(device) without entering the state dict.
            self.register_buffer("fixed_k", torch.full((L,), K / L), persistent=False)

    def k(self) -> Tensor:
        """Per-layer expert counts, shape [L], summing to K (differentiable in η)."""
        if self.learnable:
            # full_tensor: outside the model's forward, FSDP2 leaves η sharded across ranks.
            return torch.softmax(full_tensor(self.eta), dim=0) * (self.total - self.num_layers) + 1.0
        return self.fixed_k

    def forward(self) -> Tensor:
        return self.k()

    def max_k(self) -> float:
        """The largest k_l this budget can give a layer, known on the host: K − L + 1 when
        learnable (softmax tending to one-hot), K/L when fixed."""
        return self.total - self.num_layers + 1 if self.learnable else self.total / self.num_layers

    @torch.no_grad()
    def check_invariant(self, atol: float = 1e-4) -> float:
        """Return Σ_l k_l; raise RuntimeError if it is not K within ``atol`` (or not finite)."""
        s = float(self.k().sum())
        if not abs(s - self.total) <= atol:  # `not <=` also catches NaN
            raise RuntimeError(
                f"GlobalExpertBudget: sum of k_l = {s} differs from total K={self.total} "
                f"by more than atol={atol}"
            )
        return s

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, total={self.total}, "
            f"num_experts={self.num_experts}, learnable={self.learnable}"
        )
