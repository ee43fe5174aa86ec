"""MoE building blocks: routers, expert banks, dispatch and the MoE layer combining them."""

from lit_moe.moe.dispatch import Dispatch, LoopDispatch, SortedDispatch
from lit_moe.moe.experts import DenseSwiGLU, Experts, SwiGLUExperts
from lit_moe.moe.kappa_experts import KappaDenseSwiGLU, KappaSwiGLUExperts
from lit_moe.moe.router import Router, SoftTopKRouter, TopKRouter

__all__ = ["Dispatch", "LoopDispatch", "SortedDispatch", "DenseSwiGLU", "Experts", "SwiGLUExperts",
           "Router", "SoftTopKRouter", "TopKRouter", "KappaDenseSwiGLU", "KappaSwiGLUExperts"]
