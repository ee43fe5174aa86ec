"""Expert banks: E SwiGLU MLPs stored as 3-D weights so they can run as one grouped matmul."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_moe.moe.grouped_matmul import grouped_matmul, supports_grouped_matmul


def _use_grouped_mm(x: Tensor, hidden: int) -> bool:
    """Whether `torch._grouped_mm` can run this input.

    CUDA: the fused kernel needs bf16 on compute capability ≥ 9.0 (Hopper and later).
    CPU: recent torch ships a grouped fallback that, measured on 2 cores, runs about twice as
    fast as a Python loop of per-expert matmuls (E=64), so it is used when present (on CPU
    `combine` takes `grouped_matmul` for fp32 instead; this serves bf16 and the generic path).
    The kernel also needs 16-byte-aligned row strides (d and h multiples of 16 / itemsize).
    Anything else takes the split loop, which supports every dtype and device.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(dim * x.element_size() % 16 for dim in (x.shape[-1], hidden)):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def _row_experts(counts: Tensor, rows: int) -> Tensor:
    """Expert id [rows] of each row of pairs grouped by expert (counts [E] per expert)."""
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=rows)


class Experts(nn.Module):
    """Base class for expert banks.

    `forward(x_sorted, counts)`: x_sorted [N, d] holds the (token, expert) pairs' inputs
    grouped by expert in expert order; counts [E] (long) gives each group's size.
    `expert_forward(e, x)`: one expert on its own, used by the reference dispatch in tests.

    Experts that need each pair's routing confidence (κ-SwiGLU) name the router's mode in
    `confidence_mode`; the dispatch then passes `confidence` [N] (same order as x_sorted, or
    the rows of x for `expert_forward`). None: the experts take no confidence.
    """

    num_experts: int
    confidence_mode: str | None = None

    def forward(self, x_sorted: Tensor, counts: Tensor, confidence: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def expert_forward(self, e: int, x: Tensor, confidence: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def combine(self, x: Tensor, token_idx: Tensor, counts: Tensor, pair_weight: Tensor,
                confidence: Tensor | None = None) -> Tensor:
        """y [T, d]: each token's sum of pair_weight · expert(x[token]) over its pairs.

        token_idx [N] and pair_weight [N]: the (token, expert) pairs grouped by expert (counts
        [E] per expert); confidence [N] in the same order for experts that take one. This
        generic path gathers, runs `forward` and scatter-adds; banks may fuse it.
        """
        x_sorted = x[token_idx]
        y = self(x_sorted, counts) if confidence is None else self(x_sorted, counts, confidence=confidence)
        y = y * pair_weight.unsqueeze(1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token_idx, y.to(x.dtype))


class SwiGLUExperts(Experts):
    """Expert_e(x) = W_down,e (SiLU(W_gate,e x) ⊙ W_up,e x), weights [E, d, h] and [E, h, d].

    Init: N(0, init_std) for gate/up; W_down gets init_std / sqrt(2 · n_layers) (GPT-2's
    residual-branch scaling), set by the Transformer through `reset_parameters(std, out_std)`.
    """

    def __init__(self, d_model: int, hidden: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=std if out_std is None else out_std)

    def activation(self, gate: Tensor, confidence: Tensor | None = None, expert: int | Tensor | None = None) -> Tensor:
        """Gate activation. Subclasses may use the rows' `confidence` and their `expert`: an int
        for one expert's rows, or a per-row expert index [N] in the grouped path."""
        return F.silu(gate)

    def expert_forward(self, e: int, x: Tensor, confidence: Tensor | None = None) -> Tensor:
        return (self.activation(x @ self.w_gate[e], confidence, e) * (x @ self.w_up[e])) @ self.w_down[e]

    # CPU fp32/fp64 fast path of `combine` (`grouped_matmul`: gather fused into the gate/up
    # matmuls, per-expert weight gradients written in place). False: the generic path.
    cpu_grouped_matmul: bool = True

    def pair_activation_input(self, confidence: Tensor, counts: Tensor) -> Tensor:
        """The pairs' confidence [N] as `activation` takes it (subclasses rescale it)."""
        return confidence

    def combine(self, x: Tensor, token_idx: Tensor, counts: Tensor, pair_weight: Tensor,
                confidence: Tensor | None = None) -> Tensor:
        if not (self.cpu_grouped_matmul and supports_grouped_matmul(x, self.w_gate, self.w_up, self.w_down)):
            return super().combine(x, token_idx, counts, pair_weight, confidence)
        expert = None
        if confidence is not None:
            confidence = self.pair_activation_input(confidence, counts)
            expert = _row_experts(counts, token_idx.shape[0])
        sizes = counts.tolist()
        gate, up = grouped_matmul(x, (self.w_gate, self.w_up), sizes, index=token_idx)
        hidden = self.activation(gate, confidence, expert) * up
        weight = pair_weight.unsqueeze(1).to(up.dtype)
        # The pair weight scales whichever of the [N, h] product and the [N, d] output is smaller.
        if hidden.shape[1] <= x.shape[1]:
            (y,) = grouped_matmul(hidden * weight, (self.w_down,), sizes)
        else:
            (y,) = grouped_matmul(hidden, (self.w_down,), sizes)
            y = y * weight
        return torch.zeros_like(x).index_add_(0, token_idx, y)

    def forward(self, x_sorted: Tensor, counts: Tensor, confidence: Tensor | None = None) -> Tensor:
        if _use_grouped_mm(x_sorted, self.w_gate.shape[-1]):
            # offs: exclusive end row of each expert's group in x_sorted.
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            dtype = x_sorted.dtype
            gate = torch._grouped_mm(x_sorted, self.w_gate.to(dtype), offs=offsets)
            up = torch._grouped_mm(x_sorted, self.w_up.to(dtype), offs=offsets)
            expert = None
            if confidence is not None:  # rows' expert ids, only for activations that use them
                expert = _row_experts(counts, x_sorted.shape[0])
            act = self.activation(gate, confidence, expert)
            return torch._grouped_mm(act * up, self.w_down.to(dtype), offs=offsets)
        # Sort-and-split: one matmul chain per expert over its contiguous block of rows.
        # unbind (not w[e]) so backward stacks the E weight grads once instead of
        # materialising a full-size zero gradient per expert.
        gates, ups, downs = self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0)
        sizes = counts.tolist()
        confs = torch.split(confidence, sizes) if confidence is not None else [None] * len(sizes)
        outputs = []
        for e, (rows, conf) in enumerate(zip(torch.split(x_sorted, sizes), confs)):
            if rows.shape[0]:
                outputs.append((self.activation(rows @ gates[e], conf, e) * (rows @ ups[e])) @ downs[e])
        if not outputs:
            return x_sorted.new_zeros(0, self.w_down.shape[-1])
        return torch.cat(outputs)


class DenseSwiGLU(nn.Module):
    """Dense SwiGLU MLP for the first `n_dense_layers` blocks (and as a dense baseline)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def expert_flops_per_token(d_model: int, hidden: int) -> int:
    """Forward multiply-adds ×2 of one SwiGLU expert application (3 matmuls)."""
    return 2 * 3 * d_model * hidden


__all__ = ["Experts", "SwiGLUExperts", "DenseSwiGLU", "expert_flops_per_token"]
