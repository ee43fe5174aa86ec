"""MoE layer = router + experts + dispatch, each built from a `class_path` spec."""

from __future__ import annotations

from torch import Tensor, nn

from lit_moe.components import ComponentSpec, build_component
from lit_moe.moe.dispatch import Dispatch
from lit_moe.moe.experts import Experts
from lit_moe.moe.router import Router


class MoELayer(nn.Module):
    def __init__(self, d_model: int, hidden: int, num_experts: int, router: ComponentSpec,
                 experts: ComponentSpec, dispatch: ComponentSpec):
        super().__init__()
        self.router: Router = build_component(router, Router, "router", d_model, num_experts)
        self.experts: Experts = build_component(experts, Experts, "experts", d_model, hidden, num_experts)
        self.dispatch: Dispatch = build_component(dispatch, Dispatch, "dispatch")

    def forward(self, x: Tensor, k: Tensor | None = None) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights = self.router(tokens, k)
        return self.dispatch(tokens, weights, self.experts).reshape(shape)
