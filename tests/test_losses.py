"""Chunked output head + cross-entropy against F.cross_entropy on the full logits."""

import pytest
import torch
import torch.nn.functional as F

from lit_moe.losses import linear_cross_entropy


@pytest.mark.parametrize("rows,chunk", [(50, 7), (64, 64), (33, 100), (1, 4)])
def test_equals_cross_entropy_on_full_logits(rows, chunk):
    torch.manual_seed(rows)
    hidden = torch.randn(rows, 12, requires_grad=True)
    weight = torch.randn(40, 12, requires_grad=True)
    targets = torch.randint(0, 40, (rows,))
    loss = linear_cross_entropy(hidden, weight, targets, chunk)
    gh, gw = torch.autograd.grad(loss * 3.0, (hidden, weight))
    ref = F.cross_entropy(hidden @ weight.t(), targets)
    rh, rw = torch.autograd.grad(ref * 3.0, (hidden, weight))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)


def test_gradients_by_finite_differences():
    hidden = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (9,))
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, 4), (hidden, weight))


def test_bf16_autocast_runs_the_products_in_bf16_and_stays_close():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(100, 32, requires_grad=True) * 0.1
    targets = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, 16)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(hidden @ weight.t(), targets)
    torch.testing.assert_close(loss, ref, atol=3e-2, rtol=3e-2)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and torch.isfinite(hidden.grad).all()


def test_model_loss_equals_cross_entropy_of_its_logits():
    from lit_moe.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=2, num_experts=4,
                                    expert_hidden=16))
    model.loss_chunk = 10  # several chunks, the last one partial
    idx = torch.randint(0, 50, (3, 17))
    loss = model(idx[:, :-1], targets=idx[:, 1:])
    logits = model(idx[:, :-1])
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()), atol=1e-5, rtol=1e-5)
