"""Expert banks: E SwiGLU MLPs stored as 3-D weights so they run as one grouped matmul.

One path for every device and precision: the (token, expert) pairs' rows arrive grouped by
expert with device-side group ends (`ExpertGroups`), and each of the three expert products is
one `torch._grouped_mm` call in the compute dtype (the autocast dtype under `bf16-mixed`, else
the input's). The per-expert loop is only the fallback for torch builds or shapes the grouped
kernel does not take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from lit_moe.moe.confidence import RouterOutputs


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: the autocast dtype when autocast is on for x's device
    (bf16 under Lightning's `bf16-mixed`), else x's own dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *dims: int) -> bool:
    """Whether `torch._grouped_mm` takes this dtype on this device with these row widths.

    CUDA: bf16 on compute capability ≥ 9.0 (Hopper and later). CPU: fp32 and bf16 (torch's
    own grouped fallback), so CPU tests run the code GPUs run. The kernel needs 16-byte
    aligned row strides (d and h multiples of 16 / itemsize).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(dim * dtype.itemsize % 16 for dim in dims):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


@dataclass
class ExpertGroups:
    """Where each expert's rows sit in a batch of (token, expert) pairs sorted by expert.

    ends: int32 [E], exclusive end row of each expert's group (what `torch._grouped_mm` takes
        as `offs`); rows from ends[-1] on belong to no expert (dropped or zero-weight pairs).
    expert: long [N], each row's expert id (clamped to E − 1 on rows past ends[-1]).
    valid: bool [N, 1] marking the rows before ends[-1]; None when every row is valid.
    """

    ends: Tensor
    expert: Tensor
    valid: Tensor | None = None

    def sizes(self) -> list[int]:
        """Rows per expert as host ints (a device sync: the loop fallback only)."""
        return torch.diff(self.ends, prepend=self.ends.new_zeros(1)).tolist()


class _GroupedMM(torch.autograd.Function):
    """`torch._grouped_mm(a [N, k], b [E, k, n], offs=ends)` whose output rows and input
    gradient rows past ends[-1] are zero.

    The kernel leaves those rows unwritten (whatever memory held: possibly NaN), in forward
    and in the input gradient of backward. Zeroing them here keeps every later product, the
    κ parameters' gradients and the router's gradient clean, without computing them.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, ends: Tensor, valid: Tensor | None) -> Tensor:
        ctx.save_for_backward(a, b, ends, valid)
        out = torch._grouped_mm(a, b, offs=ends)
        return out if valid is None else out.masked_fill_(~valid, 0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b, ends, valid = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch._grouped_mm(grad, b.transpose(-2, -1), offs=ends)
            if valid is not None:
                grad_a.masked_fill_(~valid, 0)
        if ctx.needs_input_grad[1]:
            # Groups along the reduction dim: [k, N] × [N, n] → [E, k, n], rows past ends[-1] unread.
            grad_b = torch._grouped_mm(a.transpose(0, 1), grad, offs=ends)
        return grad_a, grad_b, None, None


def _grouped_mm_call(a: Tensor, b: Tensor, groups: ExpertGroups) -> Tensor:
    if groups.valid is None:
        return torch._grouped_mm(a, b, offs=groups.ends)
    return _GroupedMM.apply(a, b, groups.ends, groups.valid)


# torch.compile traces `_grouped_mm` only in bf16 (its shape function rejects other dtypes):
# an fp32 call (CPU runs without autocast) stays eager, a graph break at this one op while the
# rest of the block compiles.
_grouped_mm_eager = torch.compiler.disable(_grouped_mm_call)


def grouped_mm(a: Tensor, b: Tensor, groups: ExpertGroups) -> Tensor:
    """Rows of a [N, k] times their expert's matrix of b [E, k, n] → [N, n] (same dtype)."""
    if a.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _grouped_mm_eager(a, b, groups)
    return _grouped_mm_call(a, b, groups)


class Experts(nn.Module):
    """Base class for expert banks.

    `forward(x_sorted, groups, confidence=None)`: x_sorted [N, d] holds the (token, expert)
    pairs' inputs grouped by expert (`ExpertGroups`); returns [N, d] in the compute dtype
    (zero on rows past the last group).
    `expert_forward(e, x)`: one expert on its own, used by the reference dispatch in tests.

    Experts that need each pair's routing confidence (κ-SwiGLU) name their mode in
    `confidence_mode` and derive it in `routing_confidence(routed)` → [T, E] from the router's
    outputs (`lit_moe.moe.confidence.RouterOutputs`); the dispatch then passes `confidence` [N]
    (same order as x_sorted, or the rows of x for `expert_forward`). None: the experts take
    no confidence.
    """

    num_experts: int
    confidence_mode: str | None = None

    def routing_confidence(self, routed: "RouterOutputs") -> Tensor:
        raise NotImplementedError

    def forward(self, x_sorted: Tensor, groups: ExpertGroups, confidence: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def expert_forward(self, e: int, x: Tensor, confidence: Tensor | None = None) -> Tensor:
        raise NotImplementedError


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

    def forward(self, x_sorted: Tensor, groups: ExpertGroups, confidence: Tensor | None = None) -> Tensor:
        # Rows and weight banks in the compute dtype once per forward (a no-op when they are
        # already in it, e.g. bf16 weights under FSDP2's param_dtype).
        dtype = compute_dtype(x_sorted)
        x = x_sorted.to(dtype)
        if grouped_mm_supported(dtype, x.device, x.shape[-1], self.w_gate.shape[-1]):
            gate = grouped_mm(x, self.w_gate.to(dtype), groups)
            up = grouped_mm(x, self.w_up.to(dtype), groups)
            hidden = self.activation(gate, confidence, groups.expert if confidence is not None else None) * up
            return grouped_mm(hidden, self.w_down.to(dtype), groups)
        return self._loop_forward(x, groups, confidence, dtype)

    def _loop_forward(self, x: Tensor, groups: ExpertGroups, confidence: Tensor | None,
                      dtype: torch.dtype) -> Tensor:
        """Fallback: one matmul chain per expert over its contiguous rows (reads the group
        sizes on the host). unbind (not w[e]) so backward stacks the E weight gradients once
        instead of materialising a full-size zero gradient per expert."""
        gates, ups, downs = (w.to(dtype).unbind(0) for w in (self.w_gate, self.w_up, self.w_down))
        sizes = groups.sizes()
        rest = x.shape[0] - sum(sizes)
        outputs = []
        for e, (rows, conf) in enumerate(zip(x.split(sizes + [rest]),
                                             confidence.split(sizes + [rest]) if confidence is not None
                                             else [None] * (len(sizes) + 1))):
            if e == len(sizes):  # rows past the last group: no expert, zero output
                outputs.append(rows.new_zeros(rest, self.w_down.shape[-1]))
            elif rows.shape[0]:
                outputs.append((self.activation(rows @ gates[e], conf, e) * (rows @ ups[e])) @ downs[e])
        if not outputs:
            return x.new_zeros(0, self.w_down.shape[-1])
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


__all__ = ["Experts", "ExpertGroups", "SwiGLUExperts", "DenseSwiGLU", "compute_dtype", "grouped_mm",
           "grouped_mm_supported"]
