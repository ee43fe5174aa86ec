"""CPU grouped matmul (`lit_moe.moe.grouped_matmul`) against a per-expert masked loop and
finite differences."""

from __future__ import annotations

import platform

import pytest
import torch

from lit_moe.moe import grouped_matmul as grouped_matmul_module
from lit_moe.moe.grouped_matmul import (_GRADIENT_STORAGE, _expert_gemm, _gemm_batch, grouped_matmul,
                                        supports_grouped_matmul)


@pytest.fixture(params=["expert_gemm", "mkl_batch", "loop"], autouse=True)
def backend(request, monkeypatch):
    """Every test runs on all three: our expert GEMM (expert_gemm.c, fp32), MKL's grouped GEMM
    (one call for all experts) and the loop of torch.mm calls that builds without either take."""
    if request.param == "expert_gemm":
        if _expert_gemm() is None:
            pytest.skip("expert_gemm.c cannot run here (needs x86-64 with AVX-512F and a C compiler)")
        return request.param
    monkeypatch.setattr(grouped_matmul_module, "_expert_gemm", lambda: None)
    if request.param == "loop":
        monkeypatch.setattr(grouped_matmul_module, "_gemm_batch", lambda dtype: None)
    elif _gemm_batch(torch.float32) is None or _gemm_batch(torch.float64) is None:
        pytest.skip("this torch build exports no MKL cblas_?gemm_batch")
    return request.param


@pytest.mark.skipif(platform.machine() != "x86_64" or not torch.backends.mkl.is_available(),
                    reason="MKL's grouped GEMM comes with torch's x86 MKL builds")
def test_mkl_grouped_gemm_is_found_on_x86_builds_with_mkl():
    assert _gemm_batch(torch.float32) is not None and _gemm_batch(torch.float64) is not None
    assert _gemm_batch(torch.bfloat16) is None  # other dtypes take the loop


def _reference(x, weights, counts, index):
    """Each output row r belongs to the expert whose block holds r; computed row by row."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    rows = x[index] if index is not None else x
    return [torch.stack([rows[r] @ w[expert_of_row[r]] for r in range(len(expert_of_row))])
            if len(expert_of_row) else rows.new_zeros(0, w.shape[-1]) for w in weights]


@pytest.mark.parametrize("gathered", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_row_by_row_reference_with_idle_experts(gathered, dtype):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0])  # experts 1 and 4 get no rows
    pairs = int(counts.sum())
    x = torch.randn(7 if gathered else pairs, 6, dtype=dtype, requires_grad=True)
    index = torch.randint(0, 7, (pairs,)) if gathered else None
    weights = [torch.randn(5, 6, n, dtype=dtype, requires_grad=True) for n in (4, 3)]
    outs = grouped_matmul(x, tuple(weights), counts, index=index)
    refs = _reference(x, weights, counts, index)
    upstream = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, [x, *weights], upstream)
    ref_grads = torch.autograd.grad(refs, [x, *weights], upstream)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)
    # Idle experts: their weight gradients are exactly zero, not left uninitialised.
    for grad in grads[1:]:
        assert torch.equal(grad[1], torch.zeros_like(grad[1])) and torch.equal(grad[4], torch.zeros_like(grad[4]))


def test_gradcheck_in_x_and_both_weights():
    torch.manual_seed(1)
    counts = torch.tensor([2, 3, 0, 2])
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 0, 0, 2, 1, 3, 4])  # a token may appear in several experts' blocks
    w1 = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: grouped_matmul(x, (a, b), counts, index=index), (x, w1, w2))


def test_fast_path_is_only_taken_for_plain_cpu_float_tensors():
    x = torch.randn(4, 8)
    w = torch.nn.Parameter(torch.randn(2, 8, 4))
    assert supports_grouped_matmul(x, w)
    assert not supports_grouped_matmul(x.bfloat16(), w.bfloat16())
    assert not supports_grouped_matmul(x, w.double())  # mixed dtypes go the generic way
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not supports_grouped_matmul(x, w)


def test_weight_gradient_memory_is_reused_only_once_nothing_holds_it():
    torch.manual_seed(2)
    counts = torch.tensor([3, 2])
    x = torch.randn(5, 4)
    w = torch.nn.Parameter(torch.randn(2, 4, 3))

    def backward():
        (out,) = grouped_matmul(x, (w,), counts)
        (out * torch.arange(3.0)).sum().backward()

    backward()
    first = w.grad.data_ptr()
    expected = w.grad.clone()
    w.grad = None  # what optimizer.zero_grad(set_to_none=True) does
    backward()
    assert w.grad.data_ptr() == first  # same memory, handed out again
    torch.testing.assert_close(w.grad, expected)
    kept = w.grad  # a reference someone keeps: its values must not be overwritten
    w.grad = None
    backward()
    assert w.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, expected)
    backward()  # accumulation into an existing .grad (micro-batches) stays correct
    torch.testing.assert_close(w.grad, 2 * expected)


def test_no_gradient_memory_is_kept_under_torch_distributed(tmp_path):
    """Sharded ranks free each block's full gradients after reducing them: nothing is cached."""
    import torch.distributed as dist

    counts = torch.tensor([2, 1])
    x = torch.randn(3, 4)
    w = torch.nn.Parameter(torch.randn(2, 4, 2))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for _ in range(2):
            w.grad = None
            grouped_matmul(x, (w,), counts)[0].sum().backward()
        assert w not in _GRADIENT_STORAGE._storages
        torch.testing.assert_close(w.grad, torch.stack([x[:2].sum(0), x[2]])[:, :, None].expand(2, 4, 2))
    finally:
        dist.destroy_process_group()


def test_non_contiguous_inputs_and_weights():
    """A transposed x and a weight bank viewed through a permute give the contiguous answer."""
    torch.manual_seed(3)
    counts = torch.tensor([2, 3])
    x = torch.randn(4, 5).t().requires_grad_()  # [5, 4], not contiguous
    w = torch.randn(2, 3, 4).permute(0, 2, 1).requires_grad_()  # [2, 4, 3], not contiguous
    (out,) = grouped_matmul(x, (w,), counts)
    torch.testing.assert_close(out, torch.cat([x[:2] @ w[0], x[2:] @ w[1]]))
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.cat([x_ref[:2] @ w_ref[0], x_ref[2:] @ w_ref[1]]).square().sum().backward()
    for _ in range(2):  # the second backward writes into the first one's reused gradient memory
        x.grad = w.grad = None
        grouped_matmul(x, (w,), counts)[0].square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(w.grad, w_ref.grad)


def test_backend_choice(backend):
    """fp32 takes expert_gemm.c for every block size where it runs. Otherwise MKL's grouped GEMM
    takes small blocks (< 512 rows per active expert on average; idle experts do not count) and
    large blocks take the loop of multi-threaded matmuls, which measured faster there."""
    from lit_moe.moe.grouped_matmul import _backend

    x = torch.randn(1, 4)
    assert _backend(x, [0, 0]) is None
    if backend == "expert_gemm":
        assert _backend(x, [0, 300, 300, 800]) == ("expert", _expert_gemm())
        assert _backend(x, [0, 600, 600, 1200]) == ("expert", _expert_gemm())
        x = x.double()  # fp64 is not in expert_gemm.c: MKL's grouped GEMM for small blocks
    mkl = grouped_matmul_module._gemm_batch(x.dtype)
    assert _backend(x, [0, 300, 300, 800]) == (None if mkl is None else ("mkl", mkl))  # 400 rows per active expert
    assert _backend(x, [0, 600, 600, 1200]) is None


# Shapes around expert_gemm.c's blocking: 8-row tiles, 32-column panels, depth blocks of 256,
# column blocks of 256, groups split in row ranges of at most 256.
_AWKWARD_SHAPES = [
    # (rows per expert, d, n)
    ([1, 7, 0, 9], 5, 3),
    ([8, 16, 33], 32, 32),  # whole 32-column panels: the weight gradient is streamed out
    ([300, 13, 0, 257], 24, 17),
    ([40, 3], 520, 70),  # d > 256: more than one depth block in forward and input gradient
    ([5, 600], 48, 300),  # n > 256: more than one column block; 600 rows: split over threads
    ([130, 127], 64, 64),  # streamed weight gradient, and 130 rows: two 128-row blocks
]


@pytest.mark.parametrize("counts, d, n", _AWKWARD_SHAPES)
def test_awkward_shapes_against_float64(counts, d, n, backend):
    """Forward and all gradients in fp32 against the same products in float64 (an independent
    computation: torch's own float64 matmuls on the gathered rows, expert by expert)."""
    torch.manual_seed(sum(counts) + d + n)
    counts = torch.tensor(counts)
    pairs = int(counts.sum())
    x = torch.randn(pairs + 3, d, requires_grad=True)
    index = torch.randint(0, pairs + 3, (pairs,))
    weights = [torch.randn(len(counts), d, n, requires_grad=True) for _ in range(2)]
    outs = grouped_matmul(x, tuple(weights), counts, index=index)
    upstream = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, [x, *weights], upstream)

    x64, w64 = x.detach().double().requires_grad_(), [w.detach().double().requires_grad_() for w in weights]
    rows = x64[index].split(counts.tolist())
    refs = [torch.cat([r @ w[e] for e, r in enumerate(rows)]) for w in w64]
    ref_grads = torch.autograd.grad(refs, [x64, *w64], [u.double() for u in upstream])
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-4)
