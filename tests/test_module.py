"""LitMoE pieces with known answers: LR schedules and optimiser parameter groups."""

import math

import pytest
import torch

from lit_moe.errors import ConfigError
from lit_moe.model import ModelConfig
from lit_moe.module import LitMoE, lr_multiplier, parameter_groups


def test_cosine_schedule_values():
    # warmup 10 of 110 steps, cosine to 0.1
    assert lr_multiplier(0, 110, 10, "cosine", 0.1, 0.2) == pytest.approx(0.1)
    assert lr_multiplier(9, 110, 10, "cosine", 0.1, 0.2) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, 10, "cosine", 0.1, 0.2) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, 10, "cosine", 0.1, 0.2) == pytest.approx(0.55)  # half way: (1+0.1)/2
    assert lr_multiplier(110, 110, 10, "cosine", 0.1, 0.2) == pytest.approx(0.1)


def test_wsd_and_constant_schedule_values():
    # 100 steps, warmup 10, decay over the last 20% (steps 80..100) linearly to 0
    assert lr_multiplier(50, 100, 10, "wsd", 0.0, 0.2) == 1.0
    assert lr_multiplier(79, 100, 10, "wsd", 0.0, 0.2) == 1.0
    assert lr_multiplier(90, 100, 10, "wsd", 0.0, 0.2) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "wsd", 0.0, 0.2) == pytest.approx(0.0)
    assert lr_multiplier(5, 100, 10, "constant", 0.0, 0.2) == pytest.approx(0.6)
    assert lr_multiplier(99, 100, 10, "constant", 0.0, 0.2) == 1.0


def test_parameter_groups_exclude_norms_and_embeddings_from_decay():
    module = LitMoE(ModelConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=2, n_heads=2, num_experts=4,
                                expert_hidden=8, n_dense_layers=1, dense_hidden=16))
    model = module.model
    model.blocks[0].attn.qkv.weight.optim_group = "special"  # a feature's own group
    groups = {g["name"]: g for g in parameter_groups(model, 0.1)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert id(model.tok_emb.weight) in ids["no_decay"]
    assert id(model.norm.weight) in ids["no_decay"] and id(model.blocks[1].attn_norm.weight) in ids["no_decay"]
    assert id(model.blocks[1].mlp.experts.w_gate) in ids["decay"]
    assert id(model.blocks[1].mlp.router.gate.weight) in ids["decay"]
    assert ids["special"] == {id(model.blocks[0].attn.qkv.weight)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["special"]["weight_decay"] == 0.0
    # every trainable parameter exactly once (the tied head is the embedding)
    all_ids = [i for s in ids.values() for i in s]
    assert len(all_ids) == len(set(all_ids)) == len({id(p) for p in model.parameters()})


def test_invalid_optimiser_settings_are_refused():
    with pytest.raises(ConfigError, match="lr=-1"):
        LitMoE(lr=-1.0)
    with pytest.raises(ConfigError, match="schedule"):
        LitMoE(schedule="linear")


def test_training_step_loss_is_cross_entropy_plus_weighted_aux():
    torch.manual_seed(0)
    module = LitMoE(ModelConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=2, n_heads=2, num_experts=4,
                                expert_hidden=8))
    module.log = lambda *a, **k: None  # no trainer attached
    batch = torch.randint(0, 64, (3, 9))
    loss = module.training_step(batch, 0)
    logits = module.model(batch[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx((ce + module.model.weighted_aux_loss()).item(), rel=1e-6)
    assert ce.item() == pytest.approx(math.log(64), abs=0.1)  # near-uniform at init
