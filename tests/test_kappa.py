"""κ-SwiGLU (METHODS §3): the function against an independent formula, gradients, layer
equivalences, granularities, confidence inputs, the schedule callback and its resume."""

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
from lit_moe.moe import KappaDenseSwiGLU, KappaSwiGLUExperts, TopKRouter
from lit_moe.moe.experts import DenseSwiGLU
from lit_moe.moe.layer import MoELayer

TOPK = {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 2}}
SOFT = {"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"k": 2.0}}
ROUTERS = pytest.mark.parametrize("router", [TOPK, SOFT], ids=["topk", "soft"])


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and it does not stall when other jobs
    share the CPU (OpenMP workers waiting for a descheduled sibling cost ~ms per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_layer_output_equals_token_by_token_formula():
    """y_t = Σ_e w_te · W_down,e(act(W_gate,e x) ⊙ W_up,e x), act = g·σ(κg), κ from the pair's logit."""
    _, layer = twin_layers(TOPK, kappa_spec(), seed=3)
    randomise_kappa(layer, seed=3)
    ex = layer.experts
    x = torch.randn(10, 16)
    y = layer(x)
    logits = x @ layer.router.gate.weight.T
    for t in range(10):
        vals, idx = logits[t].topk(2)
        w = torch.softmax(vals, 0)
        expected = 0
        for j, e in enumerate(idx.tolist()):
            g = x[t] @ ex.w_gate[e]
            act = reference(g, 0.15 * logits[t, e], ex.kappa.bias[e], ex.kappa.scale[e], 3.0).float()
            expected = expected + w[j] * (act * (x[t] @ ex.w_up[e])) @ ex.w_down[e]
        torch.testing.assert_close(y[t], expected, atol=1e-5, rtol=1e-5)


@ROUTERS
def test_confidence_modes_give_the_documented_input(router):
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 4, router, kappa_spec(), {"class_path": "lit_moe.moe.SortedDispatch"})
    x = torch.randn(30, 16)
    logits_out, weights = layer.router.logits_and_weights(x)
    w_r = layer.router.gate.weight
    logits = x @ w_r.T
    cosine = logits / (x.norm(dim=1, keepdim=True) * w_r.norm(dim=1))
    expected = {"top_logit": logits, "logit_norm": cosine, "router_weight": weights, "constant": torch.ones(30, 4)}
    for mode, value in expected.items():
        torch.testing.assert_close(layer.router.confidence(mode, x, logits_out, weights), value, atol=1e-6, rtol=1e-5)
    # The experts' multiplier defaults per mode: 0.15·z, 6·cos, w, 1.
    defaults = {"top_logit": 0.15, "logit_norm": 6.0, "router_weight": 1.0, "constant": 1.0}
    conf = torch.randn(7, requires_grad=True)
    for mode, scale in defaults.items():
        experts = KappaSwiGLUExperts(16, 8, 4, confidence=mode)
        torch.testing.assert_close(experts.pair_confidence(conf), (conf * scale).unsqueeze(1))
    # Gradient into the router scaled by g; g = 0 detaches.
    for g in (1.0, 0.1):
        s = KappaSwiGLUExperts(16, 8, 4, confidence_grad_scale=g).pair_confidence(conf)
        (grad,) = torch.autograd.grad(s.sum(), conf)
        torch.testing.assert_close(grad, torch.full((7,), 0.15 * g))
    assert not KappaSwiGLUExperts(16, 8, 4, confidence_grad_scale=0.0).pair_confidence(conf).requires_grad


def test_router_gradient_through_confidence_is_scaled_and_detached_at_zero():
    """Router grad = (through the weights) + g · (through s): linear in g, and at g = 0 it equals
    the gradient with the confidence cut off by hand."""

    def router_grad(g, cut=False):
        _, layer = twin_layers(TOPK, kappa_spec(confidence_grad_scale=g), seed=5)
        randomise_kappa(layer, seed=5)
        if cut:
            original = layer.router.confidence
            layer.router.confidence = lambda mode, *routing: original(mode, *routing).detach()
        return run_layer(layer, torch.randn(40, 16, generator=torch.Generator().manual_seed(1)))[2]["router.gate.weight"]

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
    module = LitMoE(small_config(granularity, experts=kappa_spec(granularity=granularity, reg_weight=0.5)))
    randomise_kappa(module.model)
    logged = {}
    module.log = lambda name, value, **k: logged.__setitem__(name, value)
    unique = {id(layer.experts.kappa): layer.experts.kappa for _, layer in module.model.moe_layers()}
    expected = sum(0.5 * (k.bias.square().mean() + k.scale.square().mean()) for k in unique.values())
    torch.testing.assert_close(module.model.regularization_losses()["kappa/reg"], expected)
    batch = torch.randint(0, 64, (2, 17))
    loss = module.training_step(batch, 0)
    torch.testing.assert_close(logged["kappa/reg"], expected)
    ce = F.cross_entropy(module.model(batch[:, :-1]).reshape(-1, 64), batch[:, 1:].reshape(-1))
    routers = torch.stack([r.weighted_aux_loss() for _, r in module.model.routers()]).mean()
    torch.testing.assert_close(loss, ce + routers + expected)


def test_kappa_statistics_on_all_pairs():
    """≤ 256 pairs: the sample is every pair, so the stats equal a direct computation."""
    _, layer = twin_layers(TOPK, kappa_spec(granularity="per_layer", confidence_grad_scale=1.0), seed=2)
    with torch.no_grad():
        layer.experts.kappa.scale.fill_(1.0)  # κ increases with s
    x = torch.randn(60, 16)
    logits, weights = layer.router.logits_and_weights(x)
    layer(x)
    s = 0.15 * layer.router.confidence("top_logit", x, logits, weights)[weights > 0]
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
    plain, kappa = DenseSwiGLU(16, 24), KappaDenseSwiGLU(16, 24, max_scale=2.0, constant=0.5)
    kappa.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(3, 5, 16)
    assert torch.equal(plain(x), kappa(x))
    with torch.no_grad():
        kappa.kappa_scale.normal_()
    g = kappa.gate(x)
    act = reference(g, torch.tensor(0.5), torch.tensor(0.0), kappa.kappa_scale, 2.0).float()  # κ = U^tanh(b·c)
    torch.testing.assert_close(kappa(x), kappa.down(act * kappa.up(x)), atol=1e-6, rtol=1e-5)
    # Selected through the model config; its parameter joins the kappa group and the regulariser.
    model = Transformer(small_config(n_dense_layers=1, dense_hidden=24,
                                     dense_mlp={"class_path": "lit_moe.moe.KappaDenseSwiGLU",
                                                "init_args": {"reg_weight": 0.0}}))
    assert isinstance(model.blocks[0].mlp, KappaDenseSwiGLU)
    assert model.blocks[0].mlp.kappa_scale.optim_group == "kappa"


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
])
def test_bad_options_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MoELayer(16, 8, 4, TOPK, kappa_spec(**kwargs), {"class_path": "lit_moe.moe.SortedDispatch"})


def test_router_without_the_confidence_mode_is_refused(monkeypatch):
    monkeypatch.setattr(TopKRouter, "confidence_modes", ("constant",))
    with pytest.raises(ConfigError, match="needs confidence 'top_logit'.*TopKRouter"):
        MoELayer(16, 8, 4, TOPK, kappa_spec(), {"class_path": "lit_moe.moe.SortedDispatch"})
    MoELayer(16, 8, 4, TOPK, kappa_spec(confidence="constant"), {"class_path": "lit_moe.moe.SortedDispatch"})


def test_bad_dense_and_callback_options():
    with pytest.raises(ConfigError, match="max_scale"):
        Transformer(small_config(n_dense_layers=1, dense_mlp={"class_path": "lit_moe.moe.KappaDenseSwiGLU",
                                                              "init_args": {"max_scale": 1.0}}))
    with pytest.raises(ConfigError, match="max_scale"):
        KappaScheduleCallback(max_scale=0.9)
    with pytest.raises(ConfigError, match="warmup_fraction"):
        KappaScheduleCallback(warmup_fraction=1.5)
    with pytest.raises(ConfigError, match="lr_ramp_steps"):
        KappaScheduleCallback(lr_ramp_steps=-1)


# -- schedule callback -----------------------------------------------------------------------------

def test_schedule_values():
    cb = KappaScheduleCallback(warmup_fraction=0.15, delay_steps=10)
    # total 1000: warmup 150 steps after a 10-step delay, to U = 3.
    assert [cb.max_scale_at(s, 1000, 3.0) for s in (0, 9, 10, 85, 160, 999)] == pytest.approx([1, 1, 1, 2, 3, 3])
    # lr: 0 for max(200, 5%) steps, then linear over 100.
    assert cb.lr_delay(1000) == 200 and cb.lr_delay(10_000) == 500
    assert [cb.lr_factor(s, 1000) for s in (0, 199, 200, 249, 299, 5000)] == pytest.approx([0, 0, 0.01, 0.5, 1, 1])
    assert KappaScheduleCallback(lr_ramp_steps=0).lr_factor(200, 1000) == 1.0
    assert KappaScheduleCallback(warmup_fraction=0.0).max_scale_at(0, 1000, 3.0) == 3.0


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


def test_callback_drives_u_and_the_kappa_lr_in_a_fit(tmp_path):
    torch.manual_seed(0)
    module = LitMoE(small_config(), lr=1e-2, warmup_steps=0, schedule="constant")
    cb = KappaScheduleCallback(warmup_fraction=0.5, lr_delay_steps=2, lr_delay_fraction=0.0, lr_ramp_steps=2)
    rec = Recorder()
    trainer = _trainer(6, tmp_path, [cb, rec])
    trainer.fit(module, train_dataloaders=_loader())
    assert rec.lrs == pytest.approx([0, 0, 5e-3, 1e-2, 1e-2, 1e-2])
    assert rec.scales == pytest.approx([1, 1 + 2 / 3, 1 + 4 / 3, 3, 3, 3])  # warmup 3 of 6 steps
    logged = trainer.callback_metrics
    for i, _ in module.model.moe_layers():
        for name in ("mean", "std", "min", "max", "corr"):
            assert torch.isfinite(logged[f"kappa/layer_{i:02d}/{name}"])
    assert logged["kappa/max_scale"] == 3.0 and logged["kappa/lr_factor"] == 1.0 and "kappa/reg" in logged


def test_resume_restores_the_schedule(tmp_path):
    torch.manual_seed(0)
    config = small_config()

    def callback():
        return KappaScheduleCallback(warmup_fraction=0.5, lr_delay_steps=2, lr_delay_fraction=0.0, lr_ramp_steps=3)

    module = LitMoE(config, lr=1e-2, warmup_steps=0, schedule="constant")
    cb, first = callback(), Recorder(stop_at=3)
    trainer = _trainer(6, tmp_path, [cb, first])
    trainer.fit(module, train_dataloaders=_loader())
    assert len(first.lrs) == 3 and cb.total_steps == 6
    path = tmp_path / "kappa.ckpt"
    trainer.save_checkpoint(path)
    saved_scale = next(module.model.moe_layers())[1].experts.current_scale

    # Resume with a longer max_steps: the schedule keeps the length it started with.
    resumed, new_cb, second = LitMoE(config, lr=1e-2, warmup_steps=0, schedule="constant"), callback(), Recorder()
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["scale"] = next(pl_module.model.moe_layers())[1].experts.current_scale
            seen["total"] = new_cb.total_steps

    _trainer(7, tmp_path, [new_cb, Probe(), second]).fit(resumed, train_dataloaders=_loader(), ckpt_path=str(path))
    assert seen == {"scale": saved_scale, "total": 6}
    # One uninterrupted 6-step schedule: U over 3 steps to 3; κ lr 0 for 2 steps, then a 3-step ramp.
    expected_scales = [min(3.0, 1 + 2 * s / 3) for s in range(7)]
    expected_lrs = [1e-2 * (0 if s < 2 else min(1.0, (s - 1) / 3)) for s in range(7)]
    assert first.scales + second.scales == pytest.approx(expected_scales)
    assert first.lrs + second.lrs == pytest.approx(expected_lrs)


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
