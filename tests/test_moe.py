"""Router, experts, dispatch: fast path vs reference, aux losses by hand, capacity dropping."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_moe.components import build_component
from lit_moe.errors import ConfigError
from lit_moe.moe import LoopDispatch, Router, SortedDispatch, SwiGLUExperts, TopKRouter
from lit_moe.moe.layer import MoELayer


def _grads(dispatch, x, weights, experts):
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = dispatch(x, weights, experts)
    # A non-uniform upstream gradient so every output element matters.
    # (The zero term keeps every input in the graph when no pair is routed at all.)
    anchor = x.sum() + weights.sum() + sum(p.sum() for p in experts.parameters())
    ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + 0 * anchor).backward()
    return y.detach(), x.grad, weights.grad, [p.grad.clone() for p in experts.parameters()]


def _assert_same(fast, ref):
    for a, b in zip(fast[:3], ref[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast[3], ref[3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _cpu_path(experts, path, monkeypatch):
    """grouped: `torch._grouped_mm` (the path GPUs run); loop: the per-expert fallback."""
    import lit_moe.moe.experts as experts_module

    if path == "loop":
        monkeypatch.setattr(experts_module, "grouped_mm_supported", lambda *args: False)


CPU_PATHS = pytest.mark.parametrize("path", ["grouped", "loop"])


@CPU_PATHS
@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(0, 40), num_experts=st.integers(1, 9), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_dispatch_matches_reference_on_arbitrary_sparse_weights(path, tokens, num_experts, density, seed):
    """Any number of experts per token (0..E), idle experts, empty batches: fast == loop
    reference, on the grouped kernel and on the per-expert fallback. Zero-weight pairs sit
    past the last group, where the kernel leaves rows unwritten: their outputs and gradients
    must still come out zero."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        gen = torch.Generator().manual_seed(seed)
        # d=8, h=4: 16-byte aligned, so the grouped kernel runs.
        experts = SwiGLUExperts(8, 4, num_experts)
        _cpu_path(experts, path, monkeypatch)
        x = torch.randn(tokens, 8, generator=gen)
        mask = torch.rand(tokens, num_experts, generator=gen) < density
        weights = torch.rand(tokens, num_experts, generator=gen) * mask
        _assert_same(_grads(SortedDispatch(), x, weights, experts), _grads(LoopDispatch(), x, weights, experts))


@CPU_PATHS
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (64, 2), (4, 4), (5, 1)])
def test_dispatch_matches_reference_for_topk_routing(num_experts, top_k, path, monkeypatch):
    """Top-k's static pair list (T·k slots, no zero-weight skipping) against the loop reference."""
    torch.manual_seed(0)
    router = TopKRouter(16, num_experts, top_k=top_k)
    experts = SwiGLUExperts(16, 12, num_experts)
    _cpu_path(experts, path, monkeypatch)
    x = torch.randn(300, 16)
    weights = router(x).detach()
    assert torch.equal((weights > 0).sum(1), torch.full((300,), top_k))
    fast = _grads(lambda *a: SortedDispatch()(*a, slots=router.slots, skip_zero=router.zero_slots),
                  x, weights, experts)
    _assert_same(fast, _grads(LoopDispatch(), x, weights, experts))


def test_grouped_rows_past_the_last_group_are_zero_even_over_garbage():
    """The grouped kernel leaves rows past ends[-1] unwritten; `grouped_mm` zeroes them, in the
    output and in the input gradient, whatever the inputs hold there (here NaN)."""
    from lit_moe.moe.experts import ExpertGroups, grouped_mm

    torch.manual_seed(0)
    # Experts 0, 1, 2 own rows 0–2, none, 3–4; rows 5–7 belong to no expert.
    groups = ExpertGroups(torch.tensor([3, 3, 5], dtype=torch.int32), torch.tensor([0, 0, 0, 2, 2, 2, 2, 2]),
                          (torch.arange(8) < 5).unsqueeze(1))
    a = torch.randn(8, 16)
    a[5:] = float("nan")
    a.requires_grad_()
    b = torch.randn(3, 16, 8, requires_grad=True)
    out = grouped_mm(a, b, groups)
    assert torch.equal(out[5:], torch.zeros(3, 8))
    torch.testing.assert_close(out[:3], a[:3] @ b[0])
    torch.testing.assert_close(out[3:5], a[3:5] @ b[2])
    out.backward(torch.randn(8, 8))
    assert torch.equal(a.grad[5:], torch.zeros(3, 16))
    assert torch.isfinite(b.grad).all() and torch.equal(b.grad[1], torch.zeros(16, 8))


def test_topk_weights_are_softmax_over_winners():
    router = TopKRouter(2, 4, top_k=2)
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    weights, assigned = router.route(logits)
    e = math.exp(1.0)  # softmax over (3, 2)
    torch.testing.assert_close(weights, torch.tensor([[0.0, e / (1 + e), 1 / (1 + e), 0.0]]))
    assert assigned.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_selection_matches_sort_and_passes_gradients(k):
    """The argmax path (k ≤ 2) against a full descending sort: same winners, same order
    (distinct random logits: no ties); gradients land on the winners only."""
    from lit_moe.moe.router import top_k
    logits = torch.randn(300, 7, requires_grad=True)
    values, index = top_k(logits, k)
    order = logits.detach().argsort(dim=-1, descending=True)[:, :k]
    assert torch.equal(index, order)
    torch.testing.assert_close(values, logits.detach().gather(-1, order))
    values.sum().backward()
    assert torch.equal(logits.grad, torch.zeros(300, 7).scatter(-1, order, 1.0))


def test_top_two_never_repeats_an_expert():
    """Ties go to the lower index; a row whose other logits are all −inf still gets two experts."""
    from lit_moe.moe.router import top_k
    inf = float("inf")
    logits = torch.tensor([[1.0, 1.0, 0.0], [2.0, -inf, -inf], [-inf, 3.0, -inf], [0.0, 0.0, 0.0]])
    _, index = top_k(logits, 2)
    assert index.tolist() == [[0, 1], [0, 1], [1, 0], [0, 1]]


def test_nonfinite_flags_nan_and_inf_anywhere():
    from lit_moe.moe.router import nonfinite
    t = torch.randn(5, 4)
    assert not nonfinite(t).item() and not nonfinite(torch.empty(0, 4)).item()
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[3, 2] = bad
        assert nonfinite(u).item(), bad


def test_aux_losses_on_hand_made_logits():
    """E=2, top-1, both tokens pick expert 1: f=(0,1), P=(1/4,3/4) → LB = 2·3/4; z = (log 4)²."""
    router = TopKRouter(2, 2, top_k=1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))
    router(torch.tensor([[1.0, 0.0], [1.0, 5.0]]))
    torch.testing.assert_close(router.aux_losses["load_balance"], torch.tensor(1.5))
    torch.testing.assert_close(router.aux_losses["z_loss"], torch.tensor(math.log(4.0) ** 2))
    assert router.weighted_aux_loss().item() == pytest.approx(0.01 * 1.5 + 0.001 * math.log(4.0) ** 2)


def test_balanced_routing_gives_unit_load_balance_loss():
    """Uniform probabilities and uniform assignment → LB = E · Σ (1/E)(1/E) = 1."""
    router = TopKRouter(4, 4, top_k=1)
    logits = torch.zeros(8, 4)
    assigned = torch.eye(4, dtype=torch.bool).repeat(2, 1)
    from lit_moe.moe.router import switch_load_balance_loss
    assert switch_load_balance_loss(logits, assigned).item() == pytest.approx(1.0)
    assert router.expected_active_experts() == 1.0


def test_capacity_factor_drops_and_counts_overflow():
    """4 tokens all choose expert 0; capacity = ceil(1.0·4·1/2) = 2 → the last 2 are dropped."""
    router = TopKRouter(2, 2, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    weights = router(torch.ones(4, 2))
    assert router.dropped.item() == 2
    assert weights[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    # Dropless default never drops.
    dropless = TopKRouter(2, 2, top_k=1)
    dropless.load_state_dict(router.state_dict())
    assert (dropless(torch.ones(4, 2))[:, 0] == 1.0).all() and dropless.dropped.item() == 0


def test_invalid_router_settings_are_refused():
    with pytest.raises(ConfigError, match="top_k=9"):
        TopKRouter(4, 8, top_k=9)
    with pytest.raises(ConfigError, match="capacity_factor"):
        TopKRouter(4, 8, capacity_factor=0.0)


def test_components_from_class_path_specs():
    router = build_component({"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 3}}, Router, "router", 4, 8)
    assert isinstance(router, TopKRouter) and router.top_k == 3
    with pytest.raises(ConfigError, match="has no class 'TopKRoutr'"):
        build_component({"class_path": "lit_moe.moe.TopKRoutr"}, Router, "router", 4, 8)
    with pytest.raises(ConfigError, match=r"no option\(s\) \['topk'\].*top_k"):
        build_component({"class_path": "lit_moe.moe.TopKRouter", "init_args": {"topk": 2}}, Router, "router", 4, 8)
    with pytest.raises(ConfigError, match="not a Router subclass"):
        build_component("lit_moe.moe.SwiGLUExperts", Router, "router", 4, 8)
    with pytest.raises(ConfigError, match="cannot import module"):
        build_component("nowhere.Router", Router, "router", 4, 8)


def test_moe_layer_equals_manual_weighted_sum_of_experts():
    """y_t = Σ_e w_te · Expert_e(x_t), computed token by token without dispatch."""
    torch.manual_seed(3)
    layer = MoELayer(8, 6, 4, {"class_path": "lit_moe.moe.TopKRouter"}, {"class_path": "lit_moe.moe.SwiGLUExperts"},
                     {"class_path": "lit_moe.moe.SortedDispatch"})
    x = torch.randn(2, 5, 8)
    y = layer(x)
    logits = x.reshape(-1, 8) @ layer.router.gate.weight.T
    ex = layer.experts
    for t, xt in enumerate(x.reshape(-1, 8)):
        vals, idx = logits[t].topk(2)
        w = torch.softmax(vals, 0)
        expected = sum(w[j] * (torch.nn.functional.silu(xt @ ex.w_gate[e]) * (xt @ ex.w_up[e])) @ ex.w_down[e]
                       for j, e in enumerate(idx.tolist()))
        torch.testing.assert_close(y.reshape(-1, 8)[t], expected, atol=1e-6, rtol=1e-5)


def test_switch_weights_train_a_top1_router_through_the_lm_loss():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    for normalize in (True, False):
        router = TopKRouter(8, 4, top_k=1, lb_weight=0.0, z_weight=0.0, normalize=normalize)
        logits, weights = router.logits_and_weights(x)
        chosen = logits.argmax(-1)
        expected = (torch.ones(32) if normalize else torch.softmax(logits, -1)[torch.arange(32), chosen])
        torch.testing.assert_close(weights[torch.arange(32), chosen], expected)
        assert (weights != 0).sum(-1).tolist() == [1] * 32
        # A loss of the weighted outputs: the renormalised single winner weighs 1 whatever the
        # logits, so no gradient reaches the gate; the Switch weight carries one.
        (weights * torch.randn(32, 4)).sum().backward()
        grad = router.gate.weight.grad
        assert (grad is None or grad.abs().max() == 0) if normalize else grad.abs().max() > 0
