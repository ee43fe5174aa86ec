"""CPU grouped matmul for expert banks, with its backward: the CPU counterpart of
`torch._grouped_mm` that the SwiGLU experts use in fp32.

Why our own rather than the CPU fallback of `torch._grouped_mm`: the input gather is fused
in (the gathered [N, d] rows are made once and kept for backward, and the input gradient is
scattered with one index_add instead of an accumulating index_put); weights that share an
input (SwiGLU's gate and up) share that gather; and every expert's weight gradient is written
straight into its slice of one [E, k, n] tensor.

Weight-gradient memory is reused from step to step (`_GradientStorage`). An expert bank's
gradient is large (E=64, d=512, h=256: 32 MiB per weight), and glibc serves blocks of that
size with a fresh mmap every time, so each step paid the page faults of first touch again
(~17 ms per 32 MiB on this VM, a fifth of a dense layer's whole step).

Three backends, the first that applies:
1. fp32 on x86 CPUs with AVX-512: `expert_gemm.c`, our blocked GEMM for expert groups, compiled
   with the system C compiler on first use and cached (`_expert_gemm`). It runs on torch's own
   OpenMP threads, writes weight gradients with non-temporal stores and sums the input gradient
   of gate and up expert by expert. Measured on 2 cores (T=4096, d=512, E=64, h=256, the six
   products of a SwiGLU layer's forward and backward): 0.99x the time of a dense layer's
   matmuls of the same FLOPs, where MKL's grouped GEMM takes 1.21x.
2. Small expert blocks otherwise go to MKL's grouped GEMM (`cblas_?gemm_batch`: one call for all
   experts, spread over the cores) when the torch build exports it, as the x86 wheels do. E=64
   (~128 rows per expert) takes 17% less time in its matmuls than the loop, E=32 (~256 rows) 5%
   less, E=16 (~512 rows) the same, E=8 (~1024 rows) 6% more; hence `_BATCH_MAX_ROWS`.
3. A loop of multi-threaded `torch.mm` calls does the same work.

Rows are grouped by expert: expert e owns rows bounds[e]:bounds[e+1] of every output.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger(__name__)

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
            return weight.new_empty(0).set_(storage, 0, weight.shape)  # contiguous, as the first one
        grad = torch.empty_like(weight, memory_format=torch.contiguous_format)
        if _storage_use_count is not None:
            self._storages[weight] = grad.untyped_storage()
        return grad


_GRADIENT_STORAGE = _GradientStorage()


# CBLAS enums (cblas.h).
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# The grouped GEMM is used while experts average fewer rows than this (see the module doc).
_BATCH_MAX_ROWS = 512


def _backend(x: Tensor, bounds: list[int]) -> tuple[str, object] | None:
    """(kind, function) of the grouped backend for this call, or None for the loop.

    kind "expert": `expert_gemm.c` (fp32); "mkl": MKL's grouped GEMM, while experts average
    fewer than `_BATCH_MAX_ROWS` rows."""
    if not bounds[-1]:  # no rows at all
        return None
    if x.dtype == torch.float32 and (function := _expert_gemm()) is not None:
        return "expert", function
    active = sum(1 for e in range(len(bounds) - 1) if bounds[e] < bounds[e + 1])
    if bounds[-1] >= _BATCH_MAX_ROWS * active or (function := _gemm_batch(x.dtype)) is None:
        return None
    return "mkl", function


_EXPERT_GEMM_FLAGS = ("-O3", "-mavx512f", "-mfma", "-fPIC", "-shared", "-fopenmp")


def _cache_dir() -> Path:
    """Where the compiled kernel is kept: LIT_MOE_CACHE_DIR, else ~/.cache/lit_moe."""
    if os.environ.get("LIT_MOE_CACHE_DIR"):
        return Path(os.environ["LIT_MOE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lit_moe"


def _build_expert_gemm(source: Path, cache: Path, compiler: str) -> Path:
    """The compiled library for this source, flags and compiler: reused if present, else built
    into a temporary file next to it and renamed, so no reader ever sees half a library."""
    key = hashlib.sha256(source.read_bytes() + " ".join((compiler, *_EXPERT_GEMM_FLAGS)).encode()).hexdigest()[:16]
    target = cache / f"expert_gemm-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".expert_gemm-", suffix=".so", dir=cache)
    os.close(handle)
    try:
        subprocess.run([compiler, *_EXPERT_GEMM_FLAGS, "-o", temporary, str(source)], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _cpu_may_have_avx512() -> bool:
    """False where /proc/cpuinfo says the CPU lacks AVX-512F; True where it has it or where
    there is no /proc/cpuinfo (the library's own CPUID check decides then)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return " avx512f" in cpuinfo.read()
    except OSError:
        return True


@functools.cache
def _expert_gemm():
    """`lm_expert_gemm` from expert_gemm.c, or None where it cannot run.

    Needs Linux on an x86-64 CPU with AVX-512F and a C compiler with OpenMP (`CC`, else cc / gcc). The
    library is linked against libgomp.so.1, which resolves to the copy torch has already loaded,
    so its parallel regions use torch's worker threads. Checked once on small products of every
    layout against torch before use. LIT_MOE_NO_EXPERT_GEMM=1 turns it off."""
    if os.environ.get("LIT_MOE_NO_EXPERT_GEMM"):
        return None
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return None
    if not _cpu_may_have_avx512():  # before loading: the library is compiled for AVX-512 throughout
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    source = Path(__file__).with_name("expert_gemm.c")
    if compiler is None or not source.exists():
        return None
    library = None
    for cache in (_cache_dir(), Path(tempfile.gettempdir()) / f"lit_moe-{os.getuid()}"):
        try:
            library = ctypes.CDLL(str(_build_expert_gemm(source, cache, compiler)))
            break
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", None) or error
            log.debug("expert_gemm.c not built in %s: %s", cache, detail)
    if library is None:
        log.info("expert_gemm.c could not be built; the CPU expert matmuls use MKL or torch.mm instead")
        return None
    if not library.lm_expert_gemm_supported():
        return None
    function = library.lm_expert_gemm
    function.restype = ctypes.c_int
    # layout, stream, accumulate, groups, segments, m, n, k, a, lda, b, ldb, c, ldc, threads
    function.argtypes = ([ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
                         + [ctypes.c_void_p, ctypes.c_long] * 3 + [ctypes.c_int])
    return function if _expert_gemm_self_check(function) else None


def _expert_call(function, layout: int, stream: bool, m: Tensor, n: int, k: list[Tensor], a: list[Tensor], lda: int,
                 b: list[Tensor], ldb: int, c: Tensor, ldc: int, accumulate: bool = False) -> None:
    """One `lm_expert_gemm` call: groups G = len(m); per segment s, k[s], a[s], b[s] [G] (the
    matrices' addresses, `_pointers`); C_g = Σ_s op(A_sg) @ op(B_sg), overwritten (added to C_g
    with `accumulate`)."""
    ints = torch.cat([m.to(torch.int32), *(v.to(torch.int32) for v in k)]).contiguous()
    addresses = torch.cat([*a, *b, c]).to(torch.int64).contiguous()
    groups, segments = m.shape[0], len(k)
    status = function(layout, int(stream), int(accumulate), groups, segments, ints.data_ptr(), n,
                      ints.data_ptr() + 4 * groups, addresses.data_ptr(), lda,
                      addresses.data_ptr() + 8 * groups * segments, ldb, addresses.data_ptr() + 16 * groups * segments,
                      ldc, torch.get_num_threads())
    if status != 0:
        raise MemoryError("expert_gemm: out of memory for its work list or packing buffers")


def _expert_gemm_self_check(function) -> bool:
    """All three layouts, two segments, remainder tiles and more than one depth block, against
    float64 torch products."""
    generator = torch.Generator().manual_seed(0)
    a, b2 = torch.randn(2, 21, 300, generator=generator), torch.randn(2, 300, 37, generator=generator)
    bt = torch.randn(2, 37, 300, generator=generator)
    counts = torch.tensor([13, 8])
    first = torch.tensor([0, 13])
    rows = torch.cat([a[0, :13], a[1, 13:21]])  # [21, 300]: group 0 rows 0..12, group 1 rows 13..20
    checks = []
    out = torch.full((21, 37), float("nan"))
    _expert_call(function, 0, False, counts, 37, [torch.full_like(counts, 300)], [_pointers(rows, first * 300)], 300,
                 [_pointers(b2, torch.tensor([0, 1]) * 300 * 37)], 37, _pointers(out, first * 37), 37)
    checks.append((out, torch.cat([rows[:13].double() @ b2[0].double(), rows[13:].double() @ b2[1].double()])))
    out = torch.full((21, 37), float("nan"))
    _expert_call(function, 2, False, counts, 37, [torch.full_like(counts, 300)] * 2,
                 [_pointers(rows, first * 300)] * 2, 300, [_pointers(bt, torch.tensor([0, 1]) * 300 * 37),
                                                          _pointers(bt, torch.tensor([1, 0]) * 300 * 37)], 300,
                 _pointers(out, first * 37), 37)
    summed = [bt[0] + bt[1], bt[1] + bt[0]]
    checks.append((out, torch.cat([rows[:13].double() @ summed[0].double().t(),
                                   rows[13:].double() @ summed[1].double().t()])))
    grad = torch.randn(21, 37, generator=generator)
    out = torch.full((2, 300, 37), float("nan"))
    _expert_call(function, 1, True, torch.full_like(counts, 300), 37, [counts], [_pointers(rows, first * 300)], 300,
                 [_pointers(grad, first * 37)], 37, _pointers(out, torch.tensor([0, 1]) * 300 * 37), 37)
    checks.append((out, torch.stack([rows[:13].double().t() @ grad[:13].double(),
                                     rows[13:].double().t() @ grad[13:].double()])))
    ok = all(torch.allclose(got.double(), want, rtol=1e-4, atol=1e-3) for got, want in checks)
    if not ok:
        log.warning("expert_gemm.c failed its self-check; the CPU expert matmuls use MKL or torch.mm instead")
    return ok


@functools.cache
def _gemm_batch(dtype: torch.dtype):
    """MKL's `cblas_sgemm_batch` / `cblas_dgemm_batch` from torch's own library, or None.

    Checked once per dtype on a small product against `torch.mm` (this also confirms 32-bit
    MKL_INT, the LP64 interface torch links), so a build without MKL or with another integer
    size takes the loop instead of computing garbage. LIT_MOE_NO_MKL_BATCH=1 turns it off."""
    name = {torch.float32: "cblas_sgemm_batch", torch.float64: "cblas_dgemm_batch"}.get(dtype)
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if name is None or os.environ.get("LIT_MOE_NO_MKL_BATCH") or not os.path.exists(library):
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    function.restype = None
    function.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [ctypes.c_int, ctypes.c_void_p]
    a, b = torch.randn(5, 3, dtype=dtype), torch.randn(2, 3, 4, dtype=dtype)
    out = torch.full((5, 4), float("nan"), dtype=dtype)
    rows, mats = torch.tensor([0, 3]), torch.tensor([0, 1])
    _gemm_groups(function, False, False, torch.tensor([3, 2]), 4, 3, _pointers(a, rows * 3), 3,
                 _pointers(b, mats * 12), 4, _pointers(out, rows * 4), 4, 0.0, dtype)
    expected = torch.cat([a[:3] @ b[0], a[3:] @ b[1]])
    return function if torch.allclose(out, expected) else None


def _pointers(t: Tensor, offsets: Tensor) -> Tensor:
    """Addresses [G] (int64) of elements `offsets` of contiguous t."""
    return t.data_ptr() + offsets.to(torch.int64) * t.element_size()


def _gemm_groups(function, trans_a: bool, trans_b: bool, m: Tensor | int, n: Tensor | int, k: Tensor | int,
                 a: Tensor, lda: Tensor | int, b: Tensor, ldb: Tensor | int, c: Tensor, ldc: Tensor | int,
                 beta: float, dtype: torch.dtype) -> None:
    """C_g = op(A_g) @ op(B_g) + beta·C_g for every group g in one MKL call (row-major).

    a, b, c: the groups' matrix addresses (`_pointers`); m, n, k and the leading dimensions
    per group (tensors) or shared (ints). The matrices must stay alive during the call."""
    groups = a.shape[0]

    def ints(v: Tensor | int) -> Tensor:
        return (v.to(torch.int32) if isinstance(v, Tensor) else torch.full((groups,), v, dtype=torch.int32)).contiguous()

    args = [ints(_TRANS if trans_a else _NO_TRANS), ints(_TRANS if trans_b else _NO_TRANS), ints(m), ints(n), ints(k),
            torch.ones(groups, dtype=dtype), a.contiguous(), ints(lda), b.contiguous(), ints(ldb),
            torch.full((groups,), beta, dtype=dtype), c.contiguous(), ints(ldc)]
    group_size = ints(1)  # one matrix per group; named so it outlives the call
    function(_ROW_MAJOR, *(t.data_ptr() for t in args), groups, group_size.data_ptr())


def _gathered_rows(x: Tensor, index: Tensor | None) -> Tensor:
    """x's rows in pair order ([N, d], contiguous): gathered by `index`, or x itself."""
    return x.contiguous() if index is None else x.index_select(0, index)


def _mkl_forward(function, groups: tuple[Tensor, Tensor, Tensor], rows: Tensor, weights: tuple[Tensor, ...],
                 outs: list[Tensor]) -> None:
    first, count, experts = groups
    d = rows.shape[1]
    n = torch.cat([torch.full_like(count, w.shape[-1]) for w in weights])  # also B's and C's row length
    _gemm_groups(function, False, False, count.repeat(len(weights)), n, d,
                 _pointers(rows, first * d).repeat(len(weights)), d,
                 torch.cat([_pointers(w, experts * w[0].numel()) for w in weights]), n,
                 torch.cat([_pointers(out, first * out.shape[1]) for out in outs]), n, 0.0, rows.dtype)


def _mkl_backward(function, groups: tuple[Tensor, Tensor, Tensor], rows: Tensor, weights: list[Tensor],
                  grad_outs: list[Tensor], d_weights: list[Tensor | None], d_x_rows: Tensor | None) -> None:
    first, count, experts = groups
    d = rows.shape[1]
    pairs = [(w, g, d_w) for w, g, d_w in zip(weights, grad_outs, d_weights) if d_w is not None]
    if pairs:  # dW[e] = x_e^T @ grad_e: M = d, N = n, K = rows of e
        n = torch.cat([torch.full_like(count, g.shape[1]) for _, g, _ in pairs])
        _gemm_groups(function, True, False, d, n, count.repeat(len(pairs)),
                     _pointers(rows, first * d).repeat(len(pairs)), d,
                     torch.cat([_pointers(g, first * g.shape[1]) for _, g, _ in pairs]), n,
                     torch.cat([_pointers(d_w, experts * d_w[0].numel()) for _, _, d_w in pairs]), n, 0.0, rows.dtype)
    if d_x_rows is not None:  # dx_e = Σ_i grad_i,e @ W_i[e]^T, one call per weight (they add up)
        for i, (w, g) in enumerate(zip(weights, grad_outs)):
            n = g.shape[1]
            _gemm_groups(function, False, True, count, d, n, _pointers(g, first * n), n,
                         _pointers(w, experts * w[0].numel()), n, _pointers(d_x_rows, first * d), d,
                         0.0 if i == 0 else 1.0, rows.dtype)


def _expert_forward(function, groups: tuple[Tensor, Tensor, Tensor], rows: Tensor, weights: tuple[Tensor, ...],
                    outs: list[Tensor]) -> None:
    first, count, experts = groups
    d = rows.shape[1]
    for w, out in zip(weights, outs):  # out_e = x_e @ W[e]: M = rows of e, K = d
        n = w.shape[-1]
        _expert_call(function, 0, False, count, n, [torch.full_like(count, d)], [_pointers(rows, first * d)], d,
                     [_pointers(w, experts * w[0].numel())], n, _pointers(out, first * n), n)


def _expert_backward(function, groups: tuple[Tensor, Tensor, Tensor], rows: Tensor, weights: list[Tensor],
                     grad_outs: list[Tensor], d_weights: list[Tensor | None], d_x_rows: Tensor | None) -> None:
    first, count, experts = groups
    d = rows.shape[1]
    for g, d_w in zip(grad_outs, d_weights):  # dW[e] = x_e^T @ grad_e, streamed out (not read again soon)
        if d_w is not None:
            n = g.shape[1]
            _expert_call(function, 1, True, torch.full_like(count, d), n, [count], [_pointers(rows, first * d)], d,
                         [_pointers(g, first * n)], n, _pointers(d_w, experts * d_w[0].numel()), n)
    if d_x_rows is None:
        return
    # dx_e = Σ_i grad_i,e @ W_i[e]^T: one call sums the weights' terms while the expert's rows
    # are in cache (one segment per weight), where they share a width; else one call per
    # weight, each after the first adding to dx.
    widths = {g.shape[1] for g in grad_outs}
    parts = [list(zip(weights, grad_outs))] if len(widths) == 1 else [[pair] for pair in zip(weights, grad_outs)]
    for i, part in enumerate(parts):
        n = part[0][1].shape[1]
        _expert_call(function, 2, False, count, d, [torch.full_like(count, n)] * len(part),
                     [_pointers(g, first * n) for _, g in part], n,
                     [_pointers(w, experts * w[0].numel()) for w, _ in part], n, _pointers(d_x_rows, first * d), d,
                     accumulate=i > 0)


def _groups(bounds: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """First row, row count and expert id of every expert that has rows."""
    edges = torch.tensor(bounds, dtype=torch.int64)
    count = edges[1:] - edges[:-1]
    experts = torch.nonzero(count).flatten()
    return edges[experts], count[experts], experts


def _loop_forward(rows: Tensor, bounds: list[int], weights: tuple[Tensor, ...], outs: list[Tensor]) -> None:
    for e in range(len(bounds) - 1):
        r0, r1 = bounds[e], bounds[e + 1]
        if r0 < r1:
            for w, out in zip(weights, outs):
                torch.mm(rows[r0:r1], w[e], out=out[r0:r1])


def _loop_backward(rows: Tensor, bounds: list[int], weights: list[Tensor], grad_outs: list[Tensor],
                   d_weights: list[Tensor | None], d_x_rows: Tensor | None) -> None:
    for e in range(len(bounds) - 1):
        r0, r1 = bounds[e], bounds[e + 1]
        if r0 == r1:
            continue
        for d_w, grad in zip(d_weights, grad_outs):
            if d_w is not None:
                torch.mm(rows[r0:r1].t(), grad[r0:r1], out=d_w[e])
        if d_x_rows is not None:
            d_x = torch.mm(grad_outs[0][r0:r1], weights[0][e].t(), out=d_x_rows[r0:r1])
            for w, grad in zip(weights[1:], grad_outs[1:]):
                d_x.addmm_(grad[r0:r1], w[e].t())


class GroupedMatmul(torch.autograd.Function):
    """outs[i][rows of e] = x_e @ weights[i][e] for every expert e, x_e = x[index[rows of e]]
    (or x's own rows of e when index is None); backward gives x and every weight its gradient.

    Several weights that share an input (SwiGLU's gate and up) share its gather and go in
    one grouped call. The gathered rows are kept for the weight gradients: gathering them
    again in backward cost ~1.5 ms of a ~180 ms E=64 layer step (T=4096, d=512), for the
    memory of one [N, d] activation.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor | None, bounds: list[int], *weights: Tensor):
        rows = _gathered_rows(x, index)
        outs = [x.new_empty(bounds[-1], w.shape[-1]) for w in weights]
        # Backend and expert groups are decided once; backward reuses them.
        backend = _backend(x, bounds)
        groups = _groups(bounds) if backend is not None else None
        if backend is None:
            _loop_forward(rows, bounds, weights, outs)
        else:
            kind, function = backend
            forward = _expert_forward if kind == "expert" else _mkl_forward
            forward(function, groups, rows, tuple(w.contiguous() for w in weights), outs)
        ctx.save_for_backward(rows, index, *weights)
        ctx.bounds, ctx.backend, ctx.groups, ctx.x_shape = bounds, backend, groups, x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs: Tensor):
        rows, index, *weights = ctx.saved_tensors
        bounds = ctx.bounds
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        grad_outs = [g.contiguous() for g in grad_outs]
        d_x_rows = rows.new_empty(bounds[-1], rows.shape[1]) if need_x else None
        d_weights = [_GRADIENT_STORAGE.empty_like(w) if need else None for w, need in zip(weights, need_w)]
        for e in range(len(bounds) - 1):
            if bounds[e] == bounds[e + 1]:  # no rows: this expert's weight gradients are zero
                for d_w in d_weights:
                    if d_w is not None:
                        d_w[e].zero_()
        if ctx.backend is None:
            _loop_backward(rows, bounds, weights, grad_outs, d_weights, d_x_rows)
        else:
            kind, function = ctx.backend
            backward = _expert_backward if kind == "expert" else _mkl_backward
            backward(function, ctx.groups, rows, [w.contiguous() for w in weights], grad_outs, d_weights, d_x_rows)
        d_x = None
        if need_x:
            d_x = d_x_rows if index is None else rows.new_zeros(ctx.x_shape).index_add_(0, index, d_x_rows)
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
