"""SoftMoE end to end: SoftTopKRouter in the model, global budget, ExpertBudgetCallback."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from callbacks.expert_budget import ExpertBudgetCallback
from lit_moe.errors import ConfigError
from lit_moe.model import ModelConfig, Transformer
from lit_moe.moe import SoftTopKRouter
from lit_moe.module import LitMoE

SOFT = {"class_path": "lit_moe.moe.SoftTopKRouter"}


def soft_config(**overrides):
    base = dict(vocab_size=64, seq_len=16, d_model=32, n_layers=4, n_heads=4, num_experts=8, expert_hidden=16,
                router=SOFT, budget={"total": 6.0, "learnable": True})
    base.update(overrides)
    return ModelConfig(**base)


@settings(max_examples=30, deadline=None)
@given(k=st.floats(0.3, 3.5), scale=st.sampled_from([0.01, 1.0, 30.0]), theta=st.floats(0.0, 5.0),
       seed=st.integers(0, 1000))
def test_router_keeps_between_one_and_ceil_k_cap_experts(k, scale, theta, seed):
    torch.manual_seed(seed)
    router = SoftTopKRouter(8, 8, k=k, theta=theta, cap=2.0)
    logits = torch.randn(64, 8) * scale
    weights, assigned = router.route(logits)
    active = assigned.sum(1)
    assert active.min() >= 1 and active.max() <= min(math.ceil(k * 2.0), 8)
    # Survivors are the largest soft weights, kept unnormalised: a kept weight is never below
    # a dropped one, and the soft weights of a row sum to k before truncation.
    kept_min = torch.where(assigned, weights, torch.full_like(weights, 2.0)).min(1).values
    from lit_moe.lapsum import soft_topk
    p = soft_topk(logits, k, 1.0)
    dropped_max = torch.where(assigned, torch.zeros_like(p), p).max(1).values
    assert (kept_min >= dropped_max - 1e-6).all()
    torch.testing.assert_close(weights[assigned], p[assigned])
    torch.testing.assert_close(p.sum(1), torch.full((64,), k), atol=1e-4, rtol=1e-4)


def test_reference_threshold_on_hand_made_logits():
    """k=1.5, E=8, θ=1.8 → τ = 0.3375, clamped into [p_(3), p_(1)] (m = ⌈1.5·2⌉ = 3)."""
    router = SoftTopKRouter(4, 8, k=1.5)
    # All tied: p_i = k/E = 0.1875 = p_(1) = p_(3), so τ = 0.1875 and the rank rule keeps m = 3.
    weights, assigned = router.route(torch.zeros(2, 8))
    assert assigned.sum(1).tolist() == [3, 3]
    assert weights.sum(1).tolist() == pytest.approx([3 * 0.1875] * 2)
    # One clear winner: p_(1) > τ > the rest → exactly one expert survives.
    logits = torch.tensor([[4.0, 0, 0, 0, 0, 0, 0, 0]])
    weights, assigned = router.route(logits)
    assert assigned.sum().item() == 1 and assigned[0, 0]
    # Two strong experts: both above τ.
    weights, assigned = router.route(torch.tensor([[4.0, 4.0, 0, 0, 0, 0, 0, 0]]))
    assert assigned[0].tolist() == [True, True] + [False] * 6
    # θ = 0 → τ clamped up to p_(3): three experts.
    router.theta = 0.0
    assert router.route(logits)[1].sum().item() == 3


def test_budget_gradient_reaches_eta_through_a_full_model_step():
    torch.manual_seed(0)
    module = LitMoE(soft_config(), lr=1e-2, warmup_steps=0)
    module.log = lambda *a, **k: None
    batch = torch.randint(0, 64, (4, 17))
    # Sharper router logits so several experts survive truncation and k matters.
    for _, router in module.model.routers():
        router.gate.weight.data *= 50
    loss = module.training_step(batch, 0)
    loss.backward()
    eta = module.model.budget.eta
    assert eta.grad is not None and torch.isfinite(eta.grad).all() and eta.grad.abs().sum() > 0
    before = eta.detach().clone()
    torch.optim.SGD([eta], lr=10.0).step()
    assert not torch.equal(before, eta.detach())
    torch.testing.assert_close(module.model.budget.k().sum(), torch.tensor(6.0))


def test_fixed_budget_gives_k_over_l_to_every_layer_and_counts_active_params():
    model = Transformer(soft_config(budget={"total": 6.0, "learnable": False}))
    assert model.budget.k().tolist() == [1.5] * 4
    assert not any(p is getattr(model.budget, "eta", None) for p in model.parameters() if p is not None)
    expert = 3 * 32 * 16
    assert model.num_params()["total"] - model.num_params()["active"] == 4 * (8 - 1.5) * expert


@pytest.mark.parametrize("overrides,match", [
    (dict(router={"class_path": "lit_moe.moe.TopKRouter"}), "SoftTopKRouter"),
    (dict(budget={"total": 3.0}), "budget"),              # K < L
    (dict(budget={"total": 40.0}), "budget"),             # k_l could reach E
    (dict(budget={"totl": 6.0}), "total"),
    (dict(router={"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"alpha": 0.0}}, budget=None), "alpha"),
    (dict(router={"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"theta": -1.0}}, budget=None), "theta"),
    (dict(router={"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"k": 8.0}}, budget=None), "k=8.0"),
])
def test_invalid_softmoe_settings_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        Transformer(soft_config(**overrides))


def test_non_finite_router_logits_name_the_layer():
    model = Transformer(soft_config())
    tokens = torch.randint(0, 64, (1, 16))
    model(tokens)
    assert model.first_nonfinite() is None
    with torch.no_grad():
        model.blocks[2].mlp.router.gate.weight[0, 0] = float("nan")
    model(tokens)  # no host sync, no raise in forward: flags only
    assert model.first_nonfinite() == "layer 02 router logits"


def test_alpha_schedule_values():
    cb = ExpertBudgetCallback(alpha_start=2.0, alpha_end=0.5, alpha_steps=100)
    assert cb.alpha_at(0, 1000) == pytest.approx(2.0)
    assert cb.alpha_at(50, 1000) == pytest.approx(1.25)
    assert cb.alpha_at(100, 1000) == pytest.approx(0.5)
    assert cb.alpha_at(500, 1000) == pytest.approx(0.5)


def test_broken_budget_invariant_stops_with_a_message():
    module = LitMoE(soft_config())
    with torch.no_grad():
        module.model.budget.eta[1] = float("nan")
    cb = ExpertBudgetCallback(mode="monitor")
    # Checked at logging steps (a host read): step 7 with logging every 7 steps.
    trainer = SimpleNamespace(global_step=7, log_every_n_steps=7)
    with pytest.raises(RuntimeError, match="invariant broken at step 7"):
        cb.on_train_batch_end(trainer, module, None, None, 0)


# -- the callback inside a real (tiny) fit ----------------------------------------------------

def _loader(n=64, seq=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(list(torch.randint(0, 64, (n, seq + 1), generator=gen)), batch_size=8)


def _fit(module, callback, steps, tmp_path, ckpt_path=None):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path,
                        enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=_loader(), ckpt_path=ckpt_path)
    return trainer


def _total_active(module, batch):
    with torch.no_grad():
        module.model(batch)
    return sum(r.last_active.item() for _, r in module.model.routers())


def test_enforce_mode_brings_the_realised_total_toward_the_budget(tmp_path):
    torch.manual_seed(0)
    # lr≈0 freezes the network, so only the controller changes routing.
    module = LitMoE(soft_config(budget={"total": 6.0, "learnable": False}), lr=1e-9, warmup_steps=0)
    for _, router in module.model.routers():  # spread the logits as a trained router would
        router.gate.weight.data *= 30
    probe = torch.randint(0, 64, (8, 16))
    before = _total_active(module, probe)
    callback = ExpertBudgetCallback(mode="enforce", control_every=2, gain=1.0, tolerance=0.05)
    _fit(module, callback, 60, tmp_path)
    after = _total_active(module, probe)
    assert abs(after - 6.0) < 0.25 * abs(before - 6.0), (before, after)
    assert any(r.theta != 1.8 for _, r in module.model.routers())

    # Monitor mode measures but never touches θ.
    monitor = LitMoE(soft_config(budget={"total": 6.0, "learnable": False}), lr=1e-9, warmup_steps=0)
    _fit(monitor, ExpertBudgetCallback(mode="monitor"), 4, tmp_path)
    assert all(r.theta == 1.8 for _, r in monitor.model.routers())


def test_controller_state_survives_checkpoint_and_resume(tmp_path):
    torch.manual_seed(0)
    module = LitMoE(soft_config(budget={"total": 6.0, "learnable": False}), lr=1e-9, warmup_steps=0)
    callback = ExpertBudgetCallback(mode="enforce", control_every=4, gain=1.0)
    trainer = _fit(module, callback, 10, tmp_path)  # 2 controller updates + 2 pending steps
    thetas = [r.theta for _, r in module.model.routers()]
    assert callback._active_steps == 2
    path = tmp_path / "budget.ckpt"
    trainer.save_checkpoint(path)

    resumed = LitMoE(soft_config(budget={"total": 6.0, "learnable": False}), lr=1e-9, warmup_steps=0)
    assert [r.theta for _, r in resumed.model.routers()] == [1.8] * 4
    new_callback = ExpertBudgetCallback(mode="enforce", control_every=4, gain=1.0)
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["theta"] = [r.theta for _, r in pl_module.model.routers()]
            seen["pending"] = new_callback._active_steps

    trainer = L.Trainer(max_steps=11, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[new_callback, Probe()], default_root_dir=tmp_path,
                        enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(resumed, train_dataloaders=_loader(), ckpt_path=str(path))
    assert seen["theta"] == thetas
    assert seen["pending"] == 2


def test_learnt_alpha_matches_fixed_alpha_and_its_gradient_matches_finite_differences():
    torch.manual_seed(3)
    fixed = SoftTopKRouter(8, 8, k=1.5, alpha=0.4, theta=0.5)
    learnt = SoftTopKRouter(8, 8, k=1.5, alpha=0.4, theta=0.5, learn_alpha=True)
    logits = torch.randn(32, 8, dtype=torch.float64) * 2
    weights_fixed, assigned_fixed = fixed.route(logits)
    weights, assigned = learnt.route(logits)
    torch.testing.assert_close(weights, weights_fixed)
    assert torch.equal(assigned, assigned_fixed) and learnt.alpha == pytest.approx(0.4)
    # A loss on the kept weights; the truncation mask does not move for a small step in log α,
    # so central differences of the same function are an independent check of ∂L/∂log α.
    probe = torch.randn(32, 8, dtype=torch.float64)
    (weights * probe).sum().backward()
    analytic = learnt.log_alpha.grad.item()

    def loss_at(log_alpha):
        router = SoftTopKRouter(8, 8, k=1.5, alpha=math.exp(log_alpha), theta=0.5)
        w, a = router.route(logits)
        assert torch.equal(a, assigned)
        return (w * probe).sum().item()

    eps, base = 1e-5, math.log(0.4)
    numeric = (loss_at(base + eps) - loss_at(base - eps)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_learnt_alpha_is_a_parameter_that_resumes_and_refuses_a_schedule():
    model = Transformer(soft_config(router={"class_path": "lit_moe.moe.SoftTopKRouter",
                                            "init_args": {"alpha": 0.5, "learn_alpha": True}}))
    routers = [router for _, router in model.routers()]
    assert all(any(p is r.log_alpha for p in model.parameters()) for r in routers)
    with torch.no_grad():
        routers[2].log_alpha.fill_(math.log(0.25))
    restored = Transformer(soft_config(router={"class_path": "lit_moe.moe.SoftTopKRouter",
                                               "init_args": {"alpha": 0.5, "learn_alpha": True}}))
    restored.load_state_dict(model.state_dict())
    assert [r.alpha for _, r in restored.routers()] == pytest.approx([0.5, 0.5, 0.25, 0.5])
    with pytest.raises(ConfigError, match="learn_alpha"):
        routers[0].alpha = 0.3
    module = SimpleNamespace(model=model)
    with pytest.raises(ConfigError, match="learn_alpha"):
        ExpertBudgetCallback(alpha_start=1.0, alpha_end=0.5).on_fit_start(None, module)


def test_active_params_follow_the_realised_expert_counts():
    model = Transformer(soft_config(budget={"total": 6.0, "learnable": False}))
    expert = 3 * 32 * 16  # gate, up, down of one expert (d=32, h=16)
    total = model.num_params()["total"]
    # Realised 1, 2, design (None → 1.5), 3.25 experts per token in the four layers.
    counts = model.num_params([1.0, 2.0, None, 3.25])
    assert counts["total"] == total
    assert counts["active"] == total - sum(int((8 - a) * expert) for a in (1.0, 2.0, 1.5, 3.25))
    with pytest.raises(ValueError, match="4 MoE layers"):
        model.num_params([1.0])
