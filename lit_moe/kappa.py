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


def _tanh_z(confidence: Tensor, bias: Tensor, scale: Tensor, index: Tensor | None, dtype: torch.dtype) -> Tensor:
    """tanh(b + a·s), with rows of b and a gathered by `index` when given."""
    if index is not None:
        bias, scale = bias[index], scale[index]
    z = torch.addcmul(bias.to(dtype), scale.to(dtype), confidence.to(dtype))
    if torch.compiler.is_compiling():
        # Inside the fused kernel, 1 − 2/(e^{2z} + 1) (one vectorised exp) is ~20% faster than
        # tanh and agrees to float rounding; it is exactly 0 at z = 0 and ±1 for large |z|.
        return 1 - 2 / (torch.exp(2 * z) + 1)
    return torch.tanh(z)


def _log_scale(max_scale: float, gate: Tensor) -> Tensor:
    """ln U as a 0-d tensor: a Python float would be baked into the compiled kernel as a
    constant, and U changes every step while KappaScheduleCallback warms it up."""
    return torch.full((), math.log(max_scale), dtype=_compute_dtype(gate), device=gate.device)


def _forward(gate: Tensor, confidence: Tensor, bias: Tensor, scale: Tensor, index: Tensor | None,
             log_scale: Tensor) -> Tensor:
    dtype = _compute_dtype(gate)
    kappa = torch.exp(log_scale * _tanh_z(confidence, bias, scale, index, dtype))
    # SiLU(κg)/κ rather than g·σ(κg): same cost, and bit-identical to F.silu at κ = 1.
    return (F.silu(kappa * gate.to(dtype)) / kappa).to(gate.dtype)


def _backward(grad_out: Tensor, gate: Tensor, confidence: Tensor, bias: Tensor, scale: Tensor,
              index: Tensor | None, log_scale: Tensor, param_grads: bool) -> tuple[Tensor, ...]:
    """Gradients for (gate, confidence, bias, scale); the last three only if `param_grads`."""
    dtype = _compute_dtype(gate)
    g, grad = gate.to(dtype), grad_out.to(dtype)
    t = _tanh_z(confidence, bias, scale, index, dtype)
    kappa = torch.exp(log_scale * t)
    u = kappa * g
    # ∂out/∂g = SiLU'(κg) (the fused SiLU backward kernel computes grad·SiLU'(u) in one pass).
    d_gate = torch.ops.aten.silu_backward(grad, u)
    if not param_grads:
        return (d_gate.sum_to_size(gate.shape).to(gate.dtype),)
    # ∂out/∂κ = g²·σ(u)(1 − σ(u)) and ∂κ/∂z = κ·ln U·(1 − t²), so with u = κg:
    # ∂L/∂z = grad·g·u·σ(1 − σ)·(1 − t²)·ln U, summed over the units z is shared by.
    # (σ(u) as in SiLU's backward, so the compiled kernel evaluates it once.)
    sig = torch.sigmoid(u)
    d_z = (grad * g * u * sig * (1 - sig)).sum_to_size(t.shape) * (1 - t * t) * log_scale
    s = confidence.to(dtype)
    d_conf = (d_z * (scale if index is None else scale[index]).to(dtype)).sum_to_size(confidence.shape)
    if index is None:
        d_bias, d_scale = d_z.sum_to_size(bias.shape), (d_z * s).sum_to_size(scale.shape)
    else:
        # Rows were gathered from [G, w] tables: sum each table row's gradient with one small
        # matmul [2G, N] @ [N, w] (a scatter-add would serialise on atomics).
        d_z = d_z.sum_to_size(index.shape[0], bias.shape[-1])
        one_hot = F.one_hot(index, bias.shape[0]).to(dtype)
        d_bias, d_scale = (torch.cat([one_hot, one_hot * s], dim=1).t() @ d_z).chunk(2)
    return (d_gate.sum_to_size(gate.shape).to(gate.dtype), d_conf.to(confidence.dtype), d_bias.to(bias.dtype),
            d_scale.to(scale.dtype))


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
