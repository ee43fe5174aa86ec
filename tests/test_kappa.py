"""κ-SwiGLU (METHODS §3): the function against an independent formula, gradients, layer
equivalences, granularities, confidence inputs (the reference's gains and partial logit
normalisation, re-derived), the κ learning-rate schedule at chosen steps, regularisers (λ_a,
EMA-RMS floor), layer options (constant b only, start layer, global sharing with dense
layers), the schedule callback and its exact resume."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from callbacks.kappa_schedule import KappaScheduleCallback
from lit_moe.errors import ConfigError
from lit_moe.kappa import kappa_swiglu
from lit_moe.model import ModelConfig, Transformer
from lit_moe.module import LitMoE, parameter_groups
from lit_moe.moe import KappaDenseSwiGLU, KappaSwiGLUExperts
from lit_moe.moe.confidence import RouterOutputs
from lit_moe.moe.experts import DenseSwiGLU
from lit_moe.moe.layer import MoELayer

TOPK = {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 2}}
SOFT = {"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"k": 2.0}}
ROUTERS = pytest.mark.parametrize("router", [TOPK, SOFT], ids=["topk", "soft"])
pytestmark = pytest.mark.usefixtures("one_thread")




def kappa_spec(**init_args):
    return {"class_path": "lit_moe.moe.KappaSwiGLUExperts", "init_args": init_args}


def reference(gate, s, b, a, u):
    """g·σ(κg) with κ = exp(ln U · tanh(b + a·s)), in float64."""
    gate, s, b, a = (t.double() for t in (gate, s, b, a))
    kappa = torch.exp(math.log(u) * torch.tanh(b + a * s))
    return gate * torch.sigmoid(kappa * gate)


def randomise_kappa(module, std=0.7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if getattr(p, "optim_group", None) == "kappa":
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# -- the function ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 9), hidden=st.integers(1, 7), u=st.floats(1.0, 8.0), layout=st.sampled_from(["unit", "one", "full"]),
       seed=st.integers(0, 2**16))
def test_function_matches_independent_reference(rows, hidden, u, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(rows, hidden, generator=gen) * 4
    s = torch.randn(rows, 1, generator=gen) * 3
    shape = {"unit": (hidden,), "one": (1,), "full": (rows, hidden)}[layout]
    b, a = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    out = kappa_swiglu(gate, s, b, a, u)
    assert out.shape == gate.shape and out.dtype == gate.dtype
    torch.testing.assert_close(out.double(), reference(gate, s, b, a, u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("by_matmul", [False, True])
def test_per_row_parameter_gradients_sum_into_their_table_rows(by_matmul):
    """`_sum_rows` (index_add on CPU, one-hot matmul on GPUs; both run here) against a loop,
    including a table row no index points at."""
    from lit_moe.kappa import _sum_rows

    torch.manual_seed(0)
    index = torch.tensor([0, 2, 2, 0, 2, 3, 0])
    grads = torch.randn(7, 5), torch.randn(7, 1)
    sums = _sum_rows(index, 4, *grads, by_matmul=by_matmul)
    for grad, total in zip(grads, sums):
        expected = torch.stack([sum((grad[i] for i in range(7) if index[i] == r), torch.zeros(grad.shape[1]))
                                for r in range(4)])
        torch.testing.assert_close(total, expected)


def test_index_rows_equal_gathered_parameters_and_bf16_keeps_dtype():
    torch.manual_seed(0)
    gate, s, index = torch.randn(12, 6), torch.randn(12, 1), torch.randint(0, 3, (12,))
    b, a = torch.randn(3, 6), torch.randn(3, 6)
    torch.testing.assert_close(kappa_swiglu(gate, s, b, a, 3.0, index).double(),
                               reference(gate, s, b[index], a[index], 3.0))
    out = kappa_swiglu(gate.bfloat16(), s, b, a, 3.0, index)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(gate.bfloat16(), s, b[index], a[index], 3.0), atol=2e-2, rtol=1e-2)
    # κ = 1 is SiLU exactly; U = 1 too.
    assert torch.equal(kappa_swiglu(gate, s, torch.zeros(6), torch.zeros(6), 3.0), F.silu(gate))
    assert torch.equal(kappa_swiglu(gate, s, b[0], a[0], 1.0), F.silu(gate))


@pytest.mark.parametrize("layout", ["unit", "one", "full", "scalar", "index_unit", "index_one"])
def test_gradcheck_float64(layout):
    torch.manual_seed(1)
    n, h, e = 6, 5, 3
    gate = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    s = torch.randn(n, 1, dtype=torch.float64, requires_grad=True)
    shape = {"unit": (h,), "one": (1,), "full": (n, h), "scalar": (), "index_unit": (e, h), "index_one": (e, 1)}[layout]
    b = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    a = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, e, (n,)) if layout.startswith("index") else None
    assert torch.autograd.gradcheck(lambda *t: kappa_swiglu(*t, 2.5, index), (gate, s, b, a))


def test_backward_saves_no_more_than_silu_plus_one_value_per_row():
    """Saved activations: gate (as SiLU saves it), the confidence column and the parameters."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    gate = torch.randn(64, 32, requires_grad=True)
    s, b, a = torch.randn(64, 1), torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kappa_swiglu(gate, s, b, a, 3.0)
    assert sum(t.numel() for t in saved) == 64 * 32 + 64 + 32 + 32


def test_invalid_max_scale_in_function():
    with pytest.raises(ValueError, match="max_scale"):
        kappa_swiglu(torch.randn(2, 2), torch.randn(2, 1), torch.zeros(2), torch.zeros(2), 0.0)


# -- the experts / MoE layer ---------------------------------------------------------------------

def twin_layers(router, experts_spec, d=16, h=8, e=4, dispatch="lit_moe.moe.SortedDispatch", seed=0):
    torch.manual_seed(seed)
    plain = MoELayer(d, h, e, router, {"class_path": "lit_moe.moe.SwiGLUExperts"}, {"class_path": dispatch})
    kappa = MoELayer(d, h, e, router, experts_spec, {"class_path": dispatch})
    missing, unexpected = kappa.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all("kappa" in k or k.endswith("_extra_state") for k in missing)
    return plain, kappa


def run_layer(layer, x):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@ROUTERS
@pytest.mark.parametrize("granularity", ["per_gate", "per_expert", "per_layer", "global"])
def test_zero_init_layer_equals_swiglu(router, granularity):
    plain, kappa = twin_layers(router, kappa_spec(granularity=granularity, confidence_grad_scale=1.0))
    x = torch.randn(40, 16)
    y0, gx0, g0 = run_layer(plain, x)
    y1, gx1, g1 = run_layer(kappa, x)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, atol=0, rtol=0)
    # b and a learn from the start (∂κ/∂b = κ·ln U ≠ 0) even though the output is unchanged.
    assert g1["experts.kappa.bias"].abs().sum() > 0


@ROUTERS
@pytest.mark.parametrize("mode", ["top_logit", "logit_norm", "router_weight", "constant"])
@pytest.mark.parametrize("path", ["grouped_mm", "split"])
def test_fast_dispatch_matches_loop_reference(router, mode, path, monkeypatch):
    """Forward and every gradient (router included, through s) agree with LoopDispatch, for
    the grouped kernel (the path GPUs run; SoftMoE's zero-weight pairs sit past the last
    group) and the per-expert fallback."""
    if path == "split":
        import lit_moe.moe.experts as experts_module
        monkeypatch.setattr(experts_module, "grouped_mm_supported", lambda *args: False)
    spec = kappa_spec(confidence=mode, confidence_grad_scale=0.5)
    _, fast = twin_layers(router, spec, dispatch="lit_moe.moe.SortedDispatch")
    _, loop = twin_layers(router, spec, dispatch="lit_moe.moe.LoopDispatch")
    randomise_kappa(fast)
    loop.load_state_dict(fast.state_dict())
    x = torch.randn(50, 16) * 2
    y0, gx0, g0 = run_layer(fast, x)
    y1, gx1, g1 = run_layer(loop, x)
    torch.testing.assert_close(y0, y1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx0, gx1, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-5, rtol=1e-5, msg=name)


def top2_by_token(layer, x, act):
    """Each token's Σ_e w_te · W_down,e(act(W_gate,e x, z_te, e) ⊙ W_up,e x) over its top-2
    logits z, one token and one expert at a time (the reference the grouped path must equal)."""
    ex = layer.experts
    logits = x @ layer.router.gate.weight.T
    rows = []
    for t in range(x.shape[0]):
        vals, idx = logits[t].topk(2)
        w = torch.softmax(vals, 0)
        out = 0
        for j, e in enumerate(idx.tolist()):
            gate = act(x[t] @ ex.w_gate[e], logits[t, e], e).float()
            out = out + w[j] * (gate * (x[t] @ ex.w_up[e])) @ ex.w_down[e]
        rows.append(out)
    return rows


def test_layer_output_equals_token_by_token_formula():
    """y_t = Σ_e w_te · W_down,e(act(W_gate,e x) ⊙ W_up,e x), act = g·σ(κg), κ from the pair's logit."""
    _, layer = twin_layers(TOPK, kappa_spec(), seed=3)
    randomise_kappa(layer, seed=3)
    ex = layer.experts
    x = torch.randn(10, 16)
    y = layer(x)
    expected = top2_by_token(layer, x, lambda g, z, e: reference(g, 0.3 * z, ex.kappa.bias[e], ex.kappa.scale[e], 3.0))
    for t in range(10):
        torch.testing.assert_close(y[t], expected[t], atol=1e-5, rtol=1e-5)


def test_logit_norm_hand_values():
    """x = (3, 4), W_r rows (1, 0) and (0, 2), ε = 0, α = ½: ŵ = (1, 2), C = (1 + √2)/2,
    s_e = 6·z_e / (‖x‖·ŵ_e^½·C) with z = (3, 8)."""
    experts = KappaSwiGLUExperts(2, 4, 2, confidence="logit_norm", confidence_norm_eps=0.0)
    routed = RouterOutputs(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 8.0]]), torch.tensor([[0.4, 0.6]]),
                           torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    c = (1 + math.sqrt(2)) / 2
    s = experts.pair_confidence(experts.routing_confidence(routed)[0]).squeeze(1)
    torch.testing.assert_close(s, torch.tensor([6 * 3 / (5 * 1 * c), 6 * 8 / (5 * math.sqrt(2) * c)]))
    # α = 1, ε = 0 is the cosine mode: C = 1, s = 6·z/(‖x‖·‖W_r,e‖).
    full = KappaSwiGLUExperts(2, 4, 2, confidence="logit_norm", confidence_norm_exponent=1.0, confidence_norm_eps=0.0)
    cosine = KappaSwiGLUExperts(2, 4, 2, confidence="cosine")
    expected = torch.tensor([6 * 3 / 5, 6 * 8 / 10])
    for ex in (full, cosine):
        torch.testing.assert_close(ex.pair_confidence(ex.routing_confidence(routed)[0]).squeeze(1), expected)


@ROUTERS
def test_confidence_modes_give_the_reference_inputs(router):
    """Each mode against the reference's formulas, written out here (MOELayer._select_gate_confidence):
    0.3·z, 6·z/(√d_eff · (‖w‖²+ε)^(α/2) · mean((‖w‖²+ε)^((1−α)/2))), 6·cos, 2·p, 1."""
    torch.manual_seed(0)
    x = torch.randn(30, 16) * 1.7
    eps, alpha = 1e-4, 0.5
    gains = {"top_logit": 0.3, "logit_norm": 6.0, "cosine": 6.0, "router_weight": 2.0, "constant": 1.0}
    for mode, gain in gains.items():
        layer = MoELayer(16, 8, 4, router, kappa_spec(confidence=mode), {"class_path": "lit_moe.moe.SortedDispatch"})
        logits, weights = layer.router.logits_and_weights(x)
        w_r = layer.router.gate.weight.detach()
        z = (x @ w_r.T).double()
        row_sq = w_r.double().square().sum(1)
        token = x.double().square().sum(1, keepdim=True).sqrt()
        expected = {"top_logit": 0.3 * z,
                    "logit_norm": 6 * z / (token * (row_sq + eps) ** (alpha / 2)
                                           * ((row_sq + eps) ** ((1 - alpha) / 2)).mean()),
                    "cosine": 6 * z / (token * row_sq.sqrt()),
                    "router_weight": 2 * weights.double(),
                    "constant": torch.ones(30, 4, dtype=torch.float64)}[mode]
        experts = layer.experts
        assert experts.confidence_scale == gain
        conf = experts.routing_confidence(RouterOutputs(x, logits, weights, layer.router.gate.weight))
        got = experts.pair_confidence(conf.flatten()).view(30, 4).double()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The router exposes no confidence of its own: the experts derive it.
    assert not hasattr(layer.router, "confidence")
    # Gradient into the router scaled by g; g = 0 detaches; logit_norm's normaliser is detached.
    conf = torch.randn(7, requires_grad=True)
    for g in (1.0, 0.1):
        s = KappaSwiGLUExperts(16, 8, 4, confidence_grad_scale=g).pair_confidence(conf)
        (grad,) = torch.autograd.grad(s.sum(), conf)
        torch.testing.assert_close(grad, torch.full((7,), 0.3 * g))
    assert not KappaSwiGLUExperts(16, 8, 4, confidence_grad_scale=0.0).pair_confidence(conf).requires_grad
    w = torch.randn(4, 16, requires_grad=True)
    xr = torch.randn(5, 16, requires_grad=True)
    z = xr @ w.T
    norm_experts = KappaSwiGLUExperts(16, 8, 4, confidence="logit_norm")
    s = norm_experts.routing_confidence(RouterOutputs(xr, z, torch.softmax(z, -1), w))
    gw, gx = torch.autograd.grad(s.sum(), (w, xr), retain_graph=True)
    with torch.no_grad():
        norm = s / z  # the normaliser's reciprocal, a constant for the gradient
    ew, ex = torch.autograd.grad((z * norm).sum(), (w, xr))
    torch.testing.assert_close(gw, ew)
    torch.testing.assert_close(gx, ex)


def test_router_gradient_through_confidence_is_scaled_and_detached_at_zero():
    """Router grad = (through the weights) + g · (through s): linear in g, and at g = 0 it equals
    the gradient with the confidence cut off by hand."""

    def router_grad(g, cut=False):
        _, layer = twin_layers(TOPK, kappa_spec(confidence_grad_scale=g), seed=5)
        randomise_kappa(layer, seed=5)
        if cut:
            original = layer.experts.routing_confidence
            layer.experts.routing_confidence = lambda routed: original(routed).detach()
        x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
        return run_layer(layer, x)[2]["router.gate.weight"]

    g0, g_tenth, g1, cut = router_grad(0.0), router_grad(0.1), router_grad(1.0), router_grad(1.0, cut=True)
    torch.testing.assert_close(g0, cut)
    torch.testing.assert_close(g_tenth - g0, 0.1 * (g1 - g0), atol=1e-7, rtol=1e-4)
    assert (g1 - g0).abs().max() > 1e-3 * g1.abs().max()  # the s-path is really there


def small_config(granularity="per_gate", **overrides):
    base = dict(vocab_size=64, seq_len=16, d_model=32, n_layers=3, n_heads=4, num_experts=4, expert_hidden=16,
                router=TOPK, experts=kappa_spec(granularity=granularity))
    base.update(overrides)
    return ModelConfig(**base)


@pytest.mark.parametrize("granularity,per_model", [("per_gate", 3 * 2 * 4 * 16), ("per_expert", 3 * 2 * 4),
                                                    ("per_layer", 3 * 2), ("global", 2)])
def test_parameter_count_by_granularity(granularity, per_model):
    plain = Transformer(small_config(experts={"class_path": "lit_moe.moe.SwiGLUExperts"}))
    model = Transformer(small_config(granularity))
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert total(model) - total(plain) == per_model
    groups = {g["name"]: g for g in parameter_groups(model, 0.1)}
    assert sum(p.numel() for p in groups["kappa"]["params"]) == per_model
    assert groups["kappa"]["weight_decay"] == 0.0
    if granularity == "global":  # one module, seen by every layer
        kappas = {id(layer.experts.kappa) for _, layer in model.moe_layers()}
        assert len(kappas) == 1


@pytest.mark.parametrize("granularity", ["per_gate", "global"])
def test_regulariser_is_summed_over_layers_added_and_logged(granularity):
    torch.manual_seed(0)
    spec = kappa_spec(granularity=granularity, reg_weight=0.5, scale_reg_weight=0.25)
    module = LitMoE(small_config(granularity, experts=spec))
    randomise_kappa(module.model)
    logged = {}
    module.log = lambda name, value, **k: logged.__setitem__(name, value)
    unique = {id(layer.experts.kappa): layer.experts.kappa for _, layer in module.model.moe_layers()}
    expected = sum(0.5 * k.bias.square().mean() + 0.25 * k.scale.square().mean() for k in unique.values())
    torch.testing.assert_close(module.model.regularization_losses()["kappa/reg"], expected)
    batch = torch.randint(0, 64, (2, 17))
    loss = module.training_step(batch, 0)
    torch.testing.assert_close(logged["kappa/reg"], expected)
    ce = F.cross_entropy(module.model(batch[:, :-1]).reshape(-1, 64), batch[:, 1:].reshape(-1))
    routers = torch.stack([r.weighted_aux_loss() for _, r in module.model.routers()]).mean()
    torch.testing.assert_close(loss, ce + routers + expected)
    # λ_a defaults to λ_b (the reference's multiplier 1).
    assert KappaSwiGLUExperts(16, 8, 4, reg_weight=0.3).kappa.scale_reg_weight == 0.3


def test_rms_floor_follows_the_reference_keeper_by_hand():
    """EMA of rms(b) every step, target copied inside [⌈0.4·T⌉, ⌈0.5·T⌉], penalty
    relu(0.9·target − rms(b))², 0 before the window; weighted by λ_b (b) and λ_a (a)."""
    experts = KappaSwiGLUExperts(4, 2, 1, granularity="per_gate", reg_weight=2.0, scale_reg_weight=3.0,
                                 rms_floor={"beta": 0.5})
    params = experts.kappa
    total = 10  # window: steps 4 and 5
    ema = None
    for step, value in enumerate([1.0, 3.0, 2.0, 2.0, 4.0, 6.0, 1.0]):
        with torch.no_grad():
            params.bias.fill_(value)
            params.scale.fill_(-value / 2)
        before_window = step < 4
        losses = params.regularization_losses()
        if before_window:
            assert losses["kappa/rms_floor"].item() == 0.0
        params.update_floors(step, total)
        ema = value if ema is None else 0.5 * ema + 0.5 * value  # rms of a constant table = |value|
        if step == 5:
            target = ema
    assert params.floors[0].target_rms.item() == pytest.approx(target, rel=1e-6)
    # After the window the target stays; b = a = 0.5 is below 0.9·target.
    with torch.no_grad():
        params.bias.fill_(0.5)
        params.scale.fill_(0.5)
    gap_b = 0.9 * target - 0.5
    gap_a = 0.9 * target / 2 - 0.5
    assert params.floors[1].target_rms.item() == pytest.approx(target / 2, rel=1e-6)
    assert params.regularization_losses()["kappa/rms_floor"].item() == pytest.approx(
        2.0 * gap_b ** 2 + 3.0 * gap_a ** 2, rel=1e-5)
    # d penalty / d b by finite differences (the table has 2 entries of equal value).
    with torch.no_grad():
        params.bias.fill_(0.5)
    params.bias.grad = None
    params.regularization_losses()["kappa/rms_floor"].backward()
    h = 1e-3
    def floor_b(v):
        with torch.no_grad():
            params.bias.fill_(v)
            return params.regularization_losses()["kappa/rms_floor"].item()
    numeric = (floor_b(0.5 + h) - floor_b(0.5 - h)) / (2 * h)
    assert params.bias.grad.sum().item() == pytest.approx(numeric, rel=1e-3)
    # The floors' state is in the state dict (resumes with the model).
    assert {"kappa.floors.0.target_rms", "kappa.floors.0.ema_rms"} <= set(experts.state_dict())


def test_kappa_statistics_on_all_pairs():
    """≤ 256 pairs: the sample is every pair, so the stats equal a direct computation."""
    _, layer = twin_layers(TOPK, kappa_spec(granularity="per_layer", confidence_grad_scale=1.0), seed=2)
    with torch.no_grad():
        layer.experts.kappa.scale.fill_(1.0)  # κ increases with s
    x = torch.randn(60, 16)
    logits, weights = layer.router.logits_and_weights(x)
    layer(x)
    s = 0.3 * logits[weights > 0]
    kappa = 3.0 ** torch.tanh(s)
    mean, std, lo, hi, corr = layer.experts.kappa_statistics().tolist()
    assert mean == pytest.approx(kappa.mean().item(), rel=1e-5)
    assert std == pytest.approx(kappa.std(correction=0).item(), rel=1e-4)
    assert (lo, hi) == pytest.approx((kappa.min().item(), kappa.max().item()), rel=1e-5)
    assert corr == pytest.approx(torch.corrcoef(torch.stack([s, kappa]))[0, 1].item(), rel=1e-4)
    # Constant confidence: κ does not vary with it; the correlation is reported as 0, not NaN.
    _, const = twin_layers(TOPK, kappa_spec(confidence="constant"), seed=2)
    const(x)
    assert const.experts.kappa_statistics()[4].item() == 0.0


def test_dense_variant_zero_init_and_constant_input_formula():
    torch.manual_seed(0)
    plain, kappa = DenseSwiGLU(16, 24), KappaDenseSwiGLU(16, 24, constant=0.5)
    assert kappa.max_scale == 2.0  # the reference's dense U
    kappa.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(3, 5, 16)
    assert torch.equal(plain(x), kappa(x))
    with torch.no_grad():
        kappa.kappa.bias.normal_()
    assert [n for n, _ in kappa.named_parameters() if "kappa" in n] == ["kappa.bias"]  # b only
    g = kappa.gate(x)
    act = reference(g, torch.tensor(0.5), torch.tensor(0.0), kappa.kappa.bias[0], 2.0).float()  # κ = U^tanh(b·c)
    torch.testing.assert_close(kappa(x), kappa.down(act * kappa.up(x)), atol=1e-6, rtol=1e-5)
    # Selected through the model config; its parameter joins the kappa group and the regulariser.
    model = Transformer(small_config(n_dense_layers=1, dense_hidden=24,
                                     dense_mlp={"class_path": "lit_moe.moe.KappaDenseSwiGLU",
                                                "init_args": {"reg_weight": 0.0}}))
    assert isinstance(model.blocks[0].mlp, KappaDenseSwiGLU)
    assert model.blocks[0].mlp.kappa.bias.optim_group == "kappa"


def test_constant_mode_learns_b_only_with_the_reference_formula():
    """κ = U^tanh(b·c): no a, and the layer equals the token-by-token formula with c = 0.7."""
    _, layer = twin_layers(TOPK, kappa_spec(confidence="constant", confidence_scale=0.7), seed=4)
    assert [n for n, _ in layer.named_parameters() if "kappa" in n] == ["experts.kappa.bias"]
    randomise_kappa(layer, seed=4)
    ex = layer.experts
    x = torch.randn(12, 16)
    y = layer(x)
    expected = top2_by_token(layer, x, lambda g, z, e: reference(g, torch.tensor(0.7), torch.zeros(()),
                                                                 ex.kappa.bias[e], 3.0))
    for t in range(12):
        torch.testing.assert_close(y[t], expected[t], atol=1e-5, rtol=1e-5)


def test_start_layer_leaves_earlier_layers_plain():
    torch.manual_seed(0)
    model = Transformer(small_config(experts=kappa_spec(start_layer=2)))
    active = [layer.experts.kappa_active for _, layer in model.moe_layers()]
    assert active == [False, False, True]
    assert [n for n, _ in model.named_parameters() if "kappa" in n] == ["blocks.2.mlp.experts.kappa.bias",
                                                                        "blocks.2.mlp.experts.kappa.scale"]
    # An inactive layer is a plain SwiGLU expert bank: same output as SwiGLUExperts with its weights.
    plain = Transformer(small_config(experts={"class_path": "lit_moe.moe.SwiGLUExperts"}))
    plain.load_state_dict(model.state_dict(), strict=False)
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(idx), plain(idx))  # b = a = 0 in layer 2 too
    randomise_kappa(model)
    assert not torch.allclose(model(idx), plain(idx))


def test_global_b_is_shared_by_dense_and_moe_layers():
    """granularity global in the experts and the dense MLP: one b (and the experts' a) for the
    whole model, counted and optimised once; the dense layer uses b·c, the experts b + a·s."""
    config = small_config("global", n_dense_layers=1, dense_hidden=24,
                          dense_mlp={"class_path": "lit_moe.moe.KappaDenseSwiGLU",
                                     "init_args": {"granularity": "global"}})
    model = Transformer(config)
    dense = model.blocks[0].mlp
    kappas = {id(layer.experts.kappa) for _, layer in model.moe_layers()} | {id(dense.kappa)}
    assert len(kappas) == 1 and dense.kappa.scale is not None
    groups = {g["name"]: g for g in parameter_groups(model, 0.1)}
    assert sum(p.numel() for p in groups["kappa"]["params"]) == 2
    with torch.no_grad():
        dense.kappa.bias.fill_(0.8)
    x = torch.randn(2, 3, 32)
    g = dense.gate(x)
    act = reference(g, torch.tensor(1.0), torch.tensor(0.0), torch.tensor([0.8]), 2.0).float()
    torch.testing.assert_close(dense(x), dense.down(act * dense.up(x)), atol=1e-6, rtol=1e-5)


def test_current_scale_is_saved_in_the_state_dict():
    experts = KappaSwiGLUExperts(16, 8, 4, max_scale=4.0)
    assert experts.current_scale == 4.0
    experts.current_scale = 1.75
    fresh = KappaSwiGLUExperts(16, 8, 4, max_scale=4.0)
    fresh.load_state_dict(experts.state_dict())
    assert fresh.current_scale == 1.75


@pytest.mark.parametrize("kwargs,match", [
    (dict(granularity="per_unit"), "unknown granularity"),
    (dict(confidence="entropy"), "unknown confidence"),
    (dict(max_scale=1.0), "max_scale"),
    (dict(max_scale=0.5), "max_scale"),
    (dict(reg_weight=-0.1), "reg_weight"),
    (dict(confidence_grad_scale=2.0), "confidence_grad_scale"),
    (dict(scale_reg_weight=-1.0), "scale_reg_weight"),
    (dict(confidence_norm_exponent=1.5), "confidence_norm_exponent"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(lr_peak_scale=-0.1), "lr_peak_scale"),
    (dict(lr_delay_fraction=2.0), "lr_delay_fraction"),
    (dict(lr_warmup_steps=-1), "lr_warmup_steps"),
    (dict(start_layer=-1), "start_layer"),
    (dict(rms_floor={"beta": 1.0}), "rms_floor"),
])
def test_bad_options_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MoELayer(16, 8, 4, TOPK, kappa_spec(**kwargs), {"class_path": "lit_moe.moe.SortedDispatch"})


def test_bad_dense_and_callback_options():
    with pytest.raises(ConfigError, match="max_scale"):
        Transformer(small_config(n_dense_layers=1, dense_mlp={"class_path": "lit_moe.moe.KappaDenseSwiGLU",
                                                              "init_args": {"max_scale": 1.0}}))
    with pytest.raises(ConfigError, match="max_scale"):
        KappaScheduleCallback(max_scale=0.9)
    with pytest.raises(ConfigError, match="warmup_fraction"):
        KappaScheduleCallback(warmup_fraction=1.5)
    with pytest.raises(ConfigError, match="delay_steps"):
        KappaScheduleCallback(delay_steps=-1)
    with pytest.raises(ConfigError, match="unknown granularity"):
        KappaDenseSwiGLU(16, 8, granularity="per_expert")


# -- schedule callback -----------------------------------------------------------------------------

def test_lr_schedule_values_at_chosen_steps():
    """The reference's get_linear_lr_scale, by hand: T = 20000, D = max(200, ⌈0.05·T⌉) = 1000,
    W = 1000, peak 0.4, final 0.2."""
    from lit_moe.moe.kappa_experts import KappaLRSchedule

    ref = KappaLRSchedule()
    assert ref.delay(20_000) == 1000 and ref.delay(1000) == 200
    steps = (0, 999, 1000, 1500, 1999, 2000, 11_000, 20_000, 25_000)
    assert [ref.factor(t, 20_000) for t in steps] == pytest.approx(
        [0, 0, 0, 0.2, 0.4 * 999 / 1000, 0.4, 0.3, 0.2, 0.2])
    # A run shorter than delay + warm-up: T = 300, D = 200, W clipped to 100, no anneal left.
    assert [ref.factor(t, 300) for t in (199, 200, 250, 299, 300)] == pytest.approx([0, 0, 0.2, 0.396, 0.4])
    # Base lr 0.3·(d/768)^−½: 0.3 at 768, 0.6 at 192; an explicit lr wins.
    assert ref.base_lr(768) == pytest.approx(0.3) and ref.base_lr(192) == pytest.approx(0.6)
    assert KappaLRSchedule(lr=0.05).base_lr(192) == 0.05


def test_u_warmup_waits_for_the_kappa_lr_delay():
    from lit_moe.moe.kappa_experts import KappaLRSchedule

    schedule = KappaLRSchedule(delay_steps=10, delay_fraction=0.0)
    cb = KappaScheduleCallback(warmup_fraction=0.15)
    # total 1000: warm-up ⌈150⌉ steps after the κ-lr delay of 10, to U = 3.
    assert [cb.max_scale_at(s, 1000, 3.0, schedule) for s in (0, 9, 10, 85, 160, 999)] == pytest.approx(
        [1, 1, 1, 2, 3, 3])
    # An explicit delay_steps overrides the tie.
    assert KappaScheduleCallback(delay_steps=0).max_scale_at(75, 1000, 3.0, schedule) == pytest.approx(2.0)
    assert KappaScheduleCallback(warmup_fraction=0.0).max_scale_at(10, 1000, 3.0, schedule) == 3.0


def _loader(n=48, seq=16):
    gen = torch.Generator().manual_seed(0)
    return DataLoader(list(torch.randint(0, 64, (n, seq + 1), generator=gen)), batch_size=8)


def _trainer(steps, tmp_path, callbacks):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path,
                     enable_checkpointing=False, limit_val_batches=0, log_every_n_steps=1)


class Recorder(L.Callback):
    """Per optimizer step: the kappa group's lr and the experts' U; optional early stop."""

    def __init__(self, stop_at=None):
        self.lrs, self.scales, self.stop_at = [], [], stop_at

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        group = next(g for g in optimizer.param_groups if g["name"] == "kappa")
        self.lrs.append(group["lr"])
        self.scales.append(next(pl_module.model.moe_layers())[1].experts.current_scale)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


class MemoryLogger(L.pytorch.loggers.Logger):
    """Keeps every logged metric per step."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = {}

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.metrics.setdefault(key, {})[step] = float(value)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


SCHEDULE = dict(lr=0.5, lr_peak_scale=0.4, lr_final_scale=0.1, lr_delay_steps=2, lr_delay_fraction=0.0,
                lr_warmup_steps=2)


def schedule_lrs(steps, total=6, multiplier=lambda s: 1.0):
    """κ lr per step, by hand: 0.5 · m · f, f = 0, 0, 0, 0.2, 0.4, then 0.4 → 0.1 over the last 2 steps."""
    factor = {0: 0, 1: 0, 2: 0, 3: 0.2, 4: 0.4, 5: 0.25, 6: 0.1}
    return [0.5 * multiplier(s) * factor[s] for s in steps]


def test_callback_drives_u_and_the_kappa_lr_in_a_fit(tmp_path):
    torch.manual_seed(0)
    module = LitMoE(small_config(experts=kappa_spec(**SCHEDULE)), lr=1e-2, warmup_steps=2, schedule="constant")
    cb, rec, logger = KappaScheduleCallback(warmup_fraction=0.5), Recorder(), MemoryLogger()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb, rec],
                        default_root_dir=tmp_path, enable_checkpointing=False, limit_val_batches=0,
                        log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=_loader())
    # m: the model's warm-up (s + 1)/2 for s < 2, then 1.
    expected = schedule_lrs(range(6), multiplier=lambda s: min(1.0, (s + 1) / 2))
    assert rec.lrs == pytest.approx(expected)
    # U: 1 until the κ-lr delay (2 steps), then over ⌈0.5·6⌉ = 3 steps to 3.
    assert rec.scales == pytest.approx([1, 1, 1, 1 + 2 / 3, 1 + 4 / 3, 3])
    # The callback logs the lr each step used, as lr-AdamW/kappa.
    logged = logger.metrics["lr-AdamW/kappa"]
    assert [logged[s] for s in sorted(logged)] == pytest.approx(expected)
    metrics = trainer.callback_metrics
    for i, _ in module.model.moe_layers():
        for name in ("mean", "std", "min", "max", "corr"):
            assert torch.isfinite(metrics[f"kappa/layer_{i:02d}/{name}"])
    assert metrics["kappa/max_scale"] == 3.0 and metrics["kappa/lr_factor"] == pytest.approx(0.25)


def test_resume_mid_schedule_is_exact(tmp_path):
    """Stop inside the κ warm-up, resume (with a longer max_steps): the κ lr and U continue
    as in one uninterrupted 6-step run."""
    config = small_config(experts=kappa_spec(**SCHEDULE))

    def fresh():
        torch.manual_seed(0)
        return LitMoE(config, lr=1e-2, warmup_steps=0, schedule="constant")

    def callback():
        return KappaScheduleCallback(warmup_fraction=0.5)

    straight, rec_straight = fresh(), Recorder()
    _trainer(6, tmp_path / "a", [callback(), rec_straight]).fit(straight, train_dataloaders=_loader())

    module, cb, first = fresh(), callback(), Recorder(stop_at=4)
    trainer = _trainer(6, tmp_path / "b", [cb, first])
    trainer.fit(module, train_dataloaders=_loader())
    assert len(first.lrs) == 4 and cb.total_steps == 6
    path = tmp_path / "kappa.ckpt"
    trainer.save_checkpoint(path)

    resumed, new_cb, second = fresh(), callback(), Recorder()
    _trainer(7, tmp_path / "b", [new_cb, second]).fit(resumed, train_dataloaders=_loader(), ckpt_path=str(path))
    assert new_cb.total_steps == 6  # the schedule keeps the length it started with
    assert first.lrs + second.lrs[:2] == pytest.approx(schedule_lrs(range(6)))
    assert first.lrs + second.lrs[:2] == pytest.approx(rec_straight.lrs)
    assert first.scales + second.scales[:2] == pytest.approx(rec_straight.scales)
    # Steps past the saved length keep the final values.
    assert second.lrs[2] == pytest.approx(0.5 * 0.1)


def test_callback_refuses_kappa_layers_with_different_lr_schedules(tmp_path):
    """One "kappa" group has one schedule: experts and dense MLP must agree."""
    config = small_config(n_dense_layers=1, dense_hidden=24,
                          dense_mlp={"class_path": "lit_moe.moe.KappaDenseSwiGLU", "init_args": {"lr_peak_scale": 0.3}})
    with pytest.raises(ConfigError, match="disagree on the kappa group's lr schedule"):
        _trainer(1, tmp_path, [KappaScheduleCallback()]).fit(LitMoE(config), train_dataloaders=_loader())


def test_callback_refuses_a_model_without_kappa_layers(tmp_path):
    module = LitMoE(small_config(experts={"class_path": "lit_moe.moe.SwiGLUExperts"}))
    with pytest.raises(ConfigError, match="needs κ-SwiGLU layers"):
        _trainer(1, tmp_path, [KappaScheduleCallback()]).fit(module, train_dataloaders=_loader())


def test_fused_path_matches_eager():
    """`fused: true` (torch.compile of the same math) gives the eager values and gradients."""
    spec = kappa_spec(confidence_grad_scale=0.5)
    _, eager = twin_layers(TOPK, spec)
    _, fused = twin_layers(TOPK, kappa_spec(confidence_grad_scale=0.5, fused=True))
    randomise_kappa(eager)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(50, 16)
    y0, gx0, g0 = run_layer(eager, x)
    y1, gx1, g1 = run_layer(fused, x)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)


def test_fused_path_does_not_recompile_when_u_changes():
    """U warms up every step; the compiled kernels take ln U as a tensor, so a new U reuses
    them (a float would be a compile-time constant: one recompile per step, then eager)."""
    torch._dynamo.reset()
    gate = torch.randn(40, 8, requires_grad=True)
    s = torch.randn(40, 1, requires_grad=True)
    b, a = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    kappa_swiglu(gate, s, b, a, 1.5, fused=True).sum().backward()  # compiles both directions
    with torch._dynamo.config.patch(error_on_recompile=True):
        for u in (1.7, 2.2, 3.0):
            fused = kappa_swiglu(gate, s, b, a, u, fused=True)
            eager = kappa_swiglu(gate, s, b, a, u)
            torch.testing.assert_close(fused, eager, atol=1e-6, rtol=1e-5)
            fused.sum().backward()
    import lit_moe.kappa as kappa_module

    assert not kappa_module._compile_failed  # a recompile error would have switched to eager
