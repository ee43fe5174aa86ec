"""κ-SwiGLU activation (METHODS §3): confidence-adaptive gate sharpness.

    act(g) = g · σ(κ·g) = SiLU(κ·g) / κ,    κ = U ^ tanh(b + a·s)

κ = 1 is plain SiLU; κ stays in (1/U, U). This module is plain torch and knows nothing about
experts or routers: `kappa_swiglu` takes the gate pre-activation, a confidence per row and
the two parameters, already laid out to broadcast.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kappa_swiglu"]


def _compute_dtype(gate: Tensor) -> torch.dtype:
    # κ and the activation are computed in fp32 even for bf16/fp16 gates (fp64 stays fp64,
    # which gradcheck needs).
    return torch.promote_types(gate.dtype, torch.float32)


_LOG2E = 1.4426950408889634


def _exp(x: Tensor) -> Tensor:
    """e^x; inside the fused kernel 2^(x·log2 e): a vectorised exp2 is cheaper than exp (three
    exps per element make up most of κ's cost), for ~1e-6 relative error from rounding x·log2 e."""
    return torch.exp2(x * _LOG2E) if torch.compiler.is_compiling() else torch.exp(x)


def _tanh_z(confidence: Tensor, bias: Tensor, scale: Tensor, index: Tensor | None, dtype: torch.dtype) -> Tensor:
    """tanh(b + a·s), with rows of b and a gathered by `index` when given."""
    if index is not None:
        bias, scale = bias[index], scale[index]
    z = torch.addcmul(bias.to(dtype), scale.to(dtype), confidence.to(dtype))
    if torch.compiler.is_compiling():
        # Inside the fused kernel, 1 − 2/(e^{2z} + 1) (one vectorised exp) is cheaper than
        # tanh and agrees to float rounding; it is exactly 0 at z = 0 and ±1 for large |z|.
        return 1 - 2 / (_exp(2 * z) + 1)
    return torch.tanh(z)


def _log_scale(max_scale: float, gate: Tensor) -> Tensor:
    """ln U as a 0-d tensor: a Python float would be baked into the compiled kernel as a
    constant, and U changes every step while KappaScheduleCallback warms it up."""
    return torch.full((), math.log(max_scale), dtype=_compute_dtype(gate), device=gate.device)


def _forward(gate: Tensor, confidence: Tensor, bias: Tensor, scale: Tensor, index: Tensor | None,
             log_scale: Tensor) -> Tensor:
    dtype = _compute_dtype(gate)
    g = gate.to(dtype)
    kappa = _exp(log_scale * _tanh_z(confidence, bias, scale, index, dtype))
    if torch.compiler.is_compiling():
        return (g / (1 + _exp(-kappa * g))).to(gate.dtype)  # g·σ(κg) with one division
    # SiLU(κg)/κ rather than g·σ(κg): bit-identical to F.silu at κ = 1.
    return (F.silu(kappa * g) / kappa).to(gate.dtype)


def _sigmoid(x: Tensor) -> Tensor:
    return 1 / (1 + _exp(-x)) if torch.compiler.is_compiling() else torch.sigmoid(x)


def _per_use(compute: Callable[[], Tensor], rebuild: bool = True) -> Callable[[], Tensor]:
    """A shared intermediate: computed once in eager; rebuilt at each use when compiling
    (unless `rebuild` is False: a small result, e.g. a reduction, is better kept).

    Why: on CPU, inductor stores any exp/sigmoid result that has two users to an [N, h] buffer
    and reads it back in a second loop (four loops and ~11 passes over [N, h] in κ's backward).
    Built once per use, every output stays in one loop over the rows, and the kernel's common
    subexpression elimination still evaluates each exp once: one pass instead of four loops."""
    if rebuild and torch.compiler.is_compiling():
        return compute
    value = compute()
    return lambda: value


def _backward(grad_out: Tensor, gate: Tensor, confidence: Tensor, bias: Tensor, scale: Tensor,
              index: Tensor | None, log_scale: Tensor, param_grads: bool) -> tuple[Tensor, ...]:
    """Gradients for (gate, confidence, bias, scale); the last three only if `param_grads`.
    With `index`, those of bias and scale come per row ([N, w], for `_sum_rows`)."""
    dtype = _compute_dtype(gate)
    g, grad, s = gate.to(dtype), grad_out.to(dtype), confidence.to(dtype)
    t = _per_use(lambda: _tanh_z(confidence, bias, scale, index, dtype))
    u = _per_use(lambda: _exp(log_scale * t()) * g)
    sig = _per_use(lambda: _sigmoid(u()))
    # ∂out/∂g = SiLU'(u) = σ(u)(1 + u(1 − σ(u))); eager takes SiLU's own backward kernel
    # (bit-identical to plain SwiGLU's gradient at κ = 1).
    if torch.compiler.is_compiling():
        d_gate = grad * sig() * (1 + u() * (1 - sig()))
    else:
        d_gate = torch.ops.aten.silu_backward(grad, u())
    d_gate = d_gate.sum_to_size(gate.shape).to(gate.dtype)
    if not param_grads:
        return (d_gate,)
    # ∂out/∂κ = g²·σ(u)(1 − σ(u)) and ∂κ/∂z = κ·ln U·(1 − t²), so with u = κg:
    # ∂L/∂z = grad·g·u·σ(1 − σ)·(1 − t²)·ln U, summed over the units z is shared by.
    d_z_shape = (torch.broadcast_shapes(bias.shape, scale.shape, confidence.shape) if index is None
                 else (index.shape[0], bias.shape[-1]))

    def d_z_value() -> Tensor:
        return (grad * g * u() * sig() * (1 - sig())).sum_to_size(d_z_shape) * (1 - t() * t()) * log_scale

    # Summed over the units that share b and a (per expert / layer), d_z is [N, 1]: kept once.
    d_z = _per_use(d_z_value, rebuild=tuple(d_z_shape) == tuple(g.shape))
    scale_rows = scale if index is None else scale[index]
    d_conf = (d_z() * scale_rows.to(dtype)).sum_to_size(confidence.shape).to(confidence.dtype)
    if index is None:
        d_bias, d_scale = d_z().sum_to_size(bias.shape), (d_z() * s).sum_to_size(scale.shape)
        return d_gate, d_conf, d_bias.to(bias.dtype), d_scale.to(scale.dtype)
    # Rows were gathered from [G, w] tables: the per-row gradients of b and a [N, w] are summed
    # into their table rows by `_sum_rows`, outside this (possibly compiled) function.
    return d_gate, d_conf, d_z(), d_z() * s


def _sum_rows(index: Tensor, rows: int, *row_grads: Tensor, by_matmul: bool | None = None) -> list[Tensor]:
    """For each per-row gradient [N, w]: its sum into a [rows, w] table by `index` [N].
    by_matmul: one-hot matmul instead of index_add (None: on GPUs only)."""
    if by_matmul is None:
        by_matmul = index.device.type != "cpu"
    if not by_matmul:
        # One pass over the rows, where a one-hot matmul would multiply by a [G, N] matrix of zeros.
        return [grad.new_zeros(rows, grad.shape[1]).index_add_(0, index, grad) for grad in row_grads]
    # On GPUs a scatter-add would serialise on atomics (all rows of an expert hit the same
    # addresses): one small matmul instead.
    one_hot = F.one_hot(index, rows).to(row_grads[0].dtype)
    return list((one_hot.t() @ torch.cat(row_grads, dim=1)).split([g.shape[1] for g in row_grads], dim=1))


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # One fused elementwise kernel per direction instead of ~6 (forward) / ~15 (backward)
    # passes over [N, h]. dynamic: the number of rows changes from step to step; ln U comes
    # as a tensor (`_log_scale`), so a changing U never recompiles.
    return torch.compile(fn, dynamic=True)


_compile_failed = False


def _run(fn: Callable, fused: bool, *args: object):
    """fn compiled when `fused` (falling back to eager, with one warning, if compiling fails)."""
    global _compile_failed
    if fused and not _compile_failed:
        try:
            return _compiled(fn)(*args)
        except Exception as err:  # no C++ compiler / Triton, unsupported backend, ...
            _compile_failed = True
            warnings.warn(f"kappa_swiglu: torch.compile failed ({type(err).__name__}: {err}); "
                          f"using the eager implementation.", RuntimeWarning, stacklevel=2)
    return fn(*args)


class _KappaSwiGLU(torch.autograd.Function):
    """Saves only gate, confidence, b, a (and the row index); κ, κ·g and σ are recomputed in
    backward. That keeps the saved activations equal to plain SiLU's (which saves the gate)
    plus one confidence value per row, at the price of re-running a few elementwise ops."""

    @staticmethod
    def forward(ctx, gate: Tensor, confidence: Tensor, bias: Tensor, scale: Tensor, max_scale: float,
                index: Tensor | None, fused: bool) -> Tensor:
        ctx.save_for_backward(gate, confidence, bias, scale, index)
        ctx.max_scale, ctx.fused = max_scale, fused
        return _run(_forward, fused, gate, confidence, bias, scale, index, _log_scale(max_scale, gate))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gate, confidence, bias, scale, index = ctx.saved_tensors
        needs = ctx.needs_input_grad
        param_grads = needs[1] or needs[2] or needs[3]
        grads = _run(_backward, ctx.fused, grad_out, gate, confidence, bias, scale, index,
                     _log_scale(ctx.max_scale, gate), param_grads)
        if param_grads and index is not None:
            d_bias, d_scale = _sum_rows(index, bias.shape[0], *grads[2:])
            grads = (*grads[:2], d_bias.to(bias.dtype), d_scale.to(scale.dtype))
        grads = grads + (None,) * (4 - len(grads))
        return *(grad if need else None for grad, need in zip(grads, needs)), None, None, None


def kappa_swiglu(gate: Tensor, confidence: Tensor, bias: Tensor, scale: Tensor, max_scale: float,
                 index: Tensor | None = None, fused: bool = False) -> Tensor:
    """κ-SwiGLU gate activation `gate · σ(κ·gate)` with `κ = max_scale ** tanh(bias + scale·confidence)`.

    Broadcasting: gate [..., h]; confidence [..., 1] (one value per row, e.g. per
    (token, expert) pair); bias and scale broadcastable to [..., h] — [h] per unit, [1] shared,
    or full rows. With `index` [N] (long), bias and scale are tables [G, h] or [G, 1] and row i
    uses row `index[i]` (per-pair expert parameters in a grouped matmul, without materialising
    the gathered [N, h] copies for backward); then gate is [N, h] and confidence [N, 1].

    κ and the activation are computed in fp32 (fp64 inputs stay fp64); the result has gate's
    dtype. `max_scale` (U ≥ 1; U = 1 gives plain SiLU) is a Python float, not learned.
    Gradients flow to gate, confidence, bias and scale; backward recomputes κ instead of
    saving it (see `_KappaSwiGLU`).

    fused: run the elementwise math through `torch.compile` (one kernel per direction; needs
    a working inductor backend: a C++ compiler on CPU, Triton on CUDA). The first call per
    input layout compiles (tens of seconds on CPU, cached on disk afterwards); eager is the
    reference and the default.
    """
    if not max_scale > 0:
        raise ValueError(f"kappa_swiglu: max_scale must be > 0 (≥ 1 in practice), got {max_scale}.")
    return _KappaSwiGLU.apply(gate, confidence, bias, scale, float(max_scale), index, fused)
