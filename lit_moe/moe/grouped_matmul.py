"""CPU grouped matmul for expert banks, with its backward: the CPU counterpart of
`torch._grouped_mm` that the SwiGLU experts use in fp32.

Why a loop of our own rather than the CPU fallback of `torch._grouped_mm`: the input gather
is fused in (each expert's rows are read from the token matrix directly, so no [N, d] copy
of the gathered inputs is made in forward or kept for backward, and backward scatters the
input gradient with one index_add instead of an accumulating index_put); weights that share
an input (SwiGLU's gate and up) share that gather; and every expert's weight gradient is
written straight into its slice of one [E, k, n] tensor.

Weight-gradient memory is reused from step to step (`_GradientStorage`). An expert bank's
gradient is large (E=64, d=512, h=256: 32 MiB per weight), and glibc serves blocks of that
size with a fresh mmap every time, so each step paid the page faults of first touch again
(~17 ms per 32 MiB on this VM, a fifth of a dense layer's whole step).

Rows are grouped by expert: expert e owns rows bounds[e]:bounds[e+1] of every output.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _GradientStorage:
    """Per weight, the storage of the gradient tensor handed out last time.

    Once nothing but this cache holds that storage (the optimizer's `zero_grad` set the
    gradient to None, and no one kept a reference), the next backward writes into it
    instead of allocating: same memory, no page faults. While the gradient is still held
    (accumulation over micro-batches, a user's reference) a fresh tensor is made, so nothing
    visible is ever overwritten. The handed-out tensor is new each time (only the storage is
    shared with the cache), so autograd adopts it as `.grad` without a copy.
    """

    def __init__(self) -> None:
        # Keyed by the weight's identity (tensors compare elementwise), dropped with it.
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def empty_like(self, weight: Tensor) -> Tensor:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Sharded training (FSDP2 gathers, then frees, each block's full weights and
            # gradients) must not have full-size gradients kept alive here.
            return torch.empty_like(weight, memory_format=torch.contiguous_format)
        storage = self._storages.get(weight)
        if (_storage_use_count is not None and storage is not None and _storage_use_count(storage._cdata) == 1
                and storage.nbytes() == weight.numel() * weight.element_size()):
            return weight.new_empty(0).set_(storage, 0, weight.shape, weight.stride())
        grad = torch.empty_like(weight, memory_format=torch.contiguous_format)
        if _storage_use_count is not None:
            self._storages[weight] = grad.untyped_storage()
        return grad


_GRADIENT_STORAGE = _GradientStorage()


def _expert_rows(x: Tensor, index: Tensor | None, r0: int, r1: int) -> Tensor:
    return x[r0:r1] if index is None else x.index_select(0, index[r0:r1])


class GroupedMatmul(torch.autograd.Function):
    """outs[i][rows of e] = x_e @ weights[i][e] for every expert e, x_e = x[index[rows of e]]
    (or x's own rows of e when index is None); backward gives x and every weight its gradient.

    Several weights that share an input (SwiGLU's gate and up) take one gather of x_e and one
    gradient matmul pass per expert. Only x and index are saved: x_e is gathered again in
    backward rather than kept as an [N, d] copy.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor | None, bounds: list[int], *weights: Tensor):
        outs = [x.new_empty(bounds[-1], w.shape[-1]) for w in weights]
        for e in range(len(bounds) - 1):
            r0, r1 = bounds[e], bounds[e + 1]
            if r0 < r1:
                xe = _expert_rows(x, index, r0, r1)
                for w, out in zip(weights, outs):
                    torch.mm(xe, w[e], out=out[r0:r1])
        ctx.save_for_backward(x, index, *weights)
        ctx.bounds = bounds
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs: Tensor):
        x, index, *weights = ctx.saved_tensors
        bounds = ctx.bounds
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        grad_outs = [g.contiguous() for g in grad_outs]
        d_x_rows = x.new_empty(bounds[-1], x.shape[1]) if need_x else None
        d_weights = [_GRADIENT_STORAGE.empty_like(w) if need else None for w, need in zip(weights, need_w)]

        for e in range(len(bounds) - 1):
            r0, r1 = bounds[e], bounds[e + 1]
            if r0 == r1:  # no rows: this expert's weight gradients are zero
                for d_w in d_weights:
                    if d_w is not None:
                        d_w[e].zero_()
                continue
            if any(d_w is not None for d_w in d_weights):
                xe = _expert_rows(x, index, r0, r1)
                for d_w, grad in zip(d_weights, grad_outs):
                    if d_w is not None:
                        torch.mm(xe.t(), grad[r0:r1], out=d_w[e])
            if d_x_rows is not None:
                rows = torch.mm(grad_outs[0][r0:r1], weights[0][e].t(), out=d_x_rows[r0:r1])
                for w, grad in zip(weights[1:], grad_outs[1:]):
                    rows.addmm_(grad[r0:r1], w[e].t())
        d_x = None
        if need_x:
            d_x = d_x_rows if index is None else torch.zeros_like(x).index_add_(0, index, d_x_rows)
        return d_x, None, None, *d_weights


def grouped_matmul(x: Tensor, weights: tuple[Tensor, ...], counts: Tensor | list[int],
                   index: Tensor | None = None) -> tuple[Tensor, ...]:
    """For each weight w [E, k, n]: out [N, n] whose rows of expert e are x_e @ w[e].

    counts [E]: rows per expert, in order (a tensor, or its `tolist()` when the caller makes
    several calls: one host read instead of one per call); x_e = x[index[rows of e]] when
    `index` [N] is given (gather fused in), else x's own rows of e. Differentiable in x and
    the weights."""
    bounds = [0]
    for count in counts.tolist() if isinstance(counts, Tensor) else counts:
        bounds.append(bounds[-1] + count)
    return GroupedMatmul.apply(x, index, bounds, *weights)


def supports_grouped_matmul(x: Tensor, *weights: Tensor) -> bool:
    """fp32/fp64 on CPU outside autocast, with plain tensors (not DTensor shards)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return all(type(w) in (torch.Tensor, torch.nn.Parameter) and w.dtype == x.dtype for w in weights)


__all__ = ["GroupedMatmul", "grouped_matmul", "supports_grouped_matmul"]
