"""MoE layer = router + experts + dispatch, each built from a spec or factory (`lit_moe.components`)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from lit_moe.components import ComponentSpec, build_component
from lit_moe.moe.confidence import RouterOutputs
from lit_moe.moe.dispatch import Dispatch
from lit_moe.moe.experts import Experts
from lit_moe.moe.router import Router


class MoELayer(nn.Module):
    def __init__(self, d_model: int, hidden: int, num_experts: int, router: ComponentSpec | Callable[..., Router],
                 experts: ComponentSpec | Callable[..., Experts], dispatch: ComponentSpec | Callable[..., Dispatch]):
        super().__init__()
        self.router: Router = build_component(router, Router, "model.config.router", d_model, num_experts)
        self.experts: Experts = build_component(experts, Experts, "model.config.experts", d_model, hidden,
                                                num_experts)
        self.dispatch: Dispatch = build_component(dispatch, Dispatch, "model.config.dispatch")

    def forward(self, x: Tensor, k: Tensor | None = None) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits, weights = self.router.logits_and_weights(tokens, k)
        # Experts with a `confidence_mode` (κ-SwiGLU) derive each pair's confidence [T, E] from
        # what the router computed; the dispatch hands each pair its value.
        confidence = None
        if self.experts.confidence_mode is not None:
            routed = RouterOutputs(tokens, logits, weights, self.router.gate.weight)
            confidence = self.experts.routing_confidence(routed)
        out = self.dispatch(tokens, weights, self.experts, confidence=confidence, slots=self.router.slots,
                            skip_zero=self.router.zero_slots)
        return out.reshape(shape)
