"""MoE layer = router + experts + dispatch, each built from a spec or factory (`lit_moe.components`)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from lit_moe.components import ComponentSpec, build_component
from lit_moe.errors import ConfigError
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
        mode = self.experts.confidence_mode
        if mode is not None and mode not in self.router.confidence_modes:
            raise ConfigError(f"experts: {type(self.experts).__name__} needs confidence {mode!r}, which "
                              f"{type(self.router).__name__} does not give (it gives "
                              f"{list(self.router.confidence_modes)}); choose one of those.")

    def forward(self, x: Tensor, k: Tensor | None = None) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits, weights = self.router.logits_and_weights(tokens, k)
        mode = self.experts.confidence_mode
        confidence = None if mode is None else self.router.confidence(mode, tokens, logits, weights)
        out = self.dispatch(tokens, weights, self.experts, confidence=confidence, slots=self.router.slots,
                            skip_zero=self.router.zero_slots)
        return out.reshape(shape)
