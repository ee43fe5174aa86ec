"""Transformer: causality, RoPE, init, parameter counts, config validation."""

import math

import pytest
import torch

from lit_moe.errors import ConfigError
from lit_moe.model import ModelConfig, RotaryEmbedding, Transformer


def small_config(**overrides):
    base = dict(vocab_size=64, seq_len=16, d_model=32, n_layers=3, n_heads=4, n_dense_layers=1,
                dense_hidden=48, num_experts=4, expert_hidden=16)
    base.update(overrides)
    return ModelConfig(**base)


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    torch.manual_seed(0)
    model = Transformer(small_config()).eval()
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4  # the change is visible from position 9 on


def test_rope_rotates_each_pair_by_position_times_frequency():
    """Hand-written rotation: pair i = (x[2i], x[2i+1]) at position p turns by p·θ^(−2i/Dh)."""
    torch.manual_seed(0)
    head_dim, theta = 8, 10000.0
    rope = RotaryEmbedding(head_dim, 16, theta)
    x = torch.randn(2, 3, 5, 16, head_dim, dtype=torch.float64)  # [extra, B, H, S, Dh]
    positions = torch.randint(0, 16, (3, 16))
    out = rope(x.float(), positions).double()
    expected = torch.empty_like(x)
    for b in range(3):
        for s in range(16):
            for i in range(head_dim // 2):
                angle = positions[b, s].item() * theta ** (-2 * i / head_dim)
                c, si = math.cos(angle), math.sin(angle)
                x1, x2 = x[:, b, :, s, 2 * i], x[:, b, :, s, 2 * i + 1]
                expected[:, b, :, s, 2 * i] = x1 * c - x2 * si
                expected[:, b, :, s, 2 * i + 1] = x1 * si + x2 * c
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # default positions are 0..S−1
    torch.testing.assert_close(rope(x[0, :1].float()), rope(x[0, :1].float(), torch.arange(16)[None]))


def test_rope_scores_depend_only_on_relative_position():
    """<R(m)q, R(n)k> = <R(m+s)q, R(n+s)k>: rotary attention sees offsets, not positions."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 32, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def at(vec, pos):
        seq = torch.zeros(1, 1, 32, 8)
        seq[0, 0, pos] = vec
        return rope(seq)[0, 0, pos]

    base = at(q, 5) @ at(k, 2)
    shifted = at(q, 20) @ at(k, 17)
    assert base.item() == pytest.approx(shifted.item(), rel=1e-5)
    assert at(q, 7).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)  # rotation keeps norms
    assert (at(q, 0) == q).all()  # position 0 is the identity


def test_tied_head_shares_the_embedding_and_untied_does_not():
    tied = Transformer(small_config())
    untied = Transformer(small_config(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params()["total"] - tied.num_params()["total"] == 64 * 32


def test_parameter_counts_by_hand():
    cfg = small_config()
    model = Transformer(cfg)
    d, h, E, L = 32, 16, 4, 3
    attn = 4 * d * d + 2 * d  # qkv + proj, two RMSNorm gains per block
    dense = 3 * d * 48
    moe_experts = 3 * E * d * h
    router = E * d
    total = 64 * d + L * attn + dense + (L - 1) * (moe_experts + router) + d
    assert model.num_params()["total"] == total
    assert model.num_params()["active"] == total - (L - 1) * (moe_experts - 3 * 2 * d * h)


def test_residual_output_projections_use_scaled_init():
    torch.manual_seed(0)
    cfg = small_config(d_model=64, n_layers=8, n_dense_layers=0, expert_hidden=64, num_experts=8)
    model = Transformer(cfg)
    expected = 0.02 / math.sqrt(2 * 8)
    downs = torch.cat([layer.experts.w_down.flatten() for _, layer in model.moe_layers()])
    assert downs.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_aux_losses_are_averaged_over_moe_layers():
    torch.manual_seed(0)
    model = Transformer(small_config())
    model(torch.randint(0, 64, (2, 16)))
    routers = [r for _, r in model.routers()]
    assert len(routers) == 2
    expected = sum(r.aux_losses["load_balance"] for r in routers) / 2
    torch.testing.assert_close(model.aux_losses()["load_balance"], expected)
    torch.testing.assert_close(model.weighted_aux_loss(), sum(r.weighted_aux_loss() for r in routers) / 2)


@pytest.mark.parametrize("overrides,match", [
    (dict(d_model=30, n_heads=4), "heads of even size"),
    (dict(n_dense_layers=5), "n_dense_layers"),
    (dict(num_experts=0), "num_experts"),
])
def test_invalid_configs_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        Transformer(small_config(**overrides))


def test_too_long_input_is_refused():
    model = Transformer(small_config())
    with pytest.raises(ValueError, match="exceeds the model's seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_packed_row_equals_separate_rows():
    """Context + two continuations in one row (positions restart after the context, each
    continuation masked from the other) gives the logits of the two separate sequences."""
    torch.manual_seed(0)
    model = Transformer(small_config()).eval()
    context, first, second = torch.randint(0, 64, (7,)), torch.randint(0, 64, (3,)), torch.randint(0, 64, (5,))
    row = torch.cat([context, first, second])[None]  # 15 tokens
    positions = torch.cat([torch.arange(7), torch.arange(7, 10), torch.arange(7, 12)])[None]
    segment = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)
    order = torch.arange(15)
    mask = (order[None, :] <= order[:, None]) & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    with torch.no_grad():
        packed = model(row, positions, mask[None])[0]
        alone_first = model(torch.cat([context, first])[None])[0]
        alone_second = model(torch.cat([context, second])[None])[0]
    torch.testing.assert_close(packed[:10], alone_first, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[10:], alone_second[7:], atol=1e-5, rtol=0)
    # with only a causal mask the second continuation would see the first: the test can tell
    with torch.no_grad():
        causal = model(row, positions, (order[None, :] <= order[:, None])[None])[0]
    assert (causal[10:] - alone_second[7:]).abs().max() > 1e-4


@pytest.mark.parametrize("router", ["top2", "soft"])
@pytest.mark.parametrize("packed", [False, True])
def test_selected_positions_equal_the_full_forward(router, packed):
    """`select=(rows, index)` (last block and head only at those pairs) returns the full
    forward's logits there, in the order asked, with repeats, for causal and packed rows."""
    torch.manual_seed(0)
    overrides = {} if router == "top2" else {"router": {"class_path": "lit_moe.moe.SoftTopKRouter",
                                                        "init_args": {"k": 1.5}}}
    model = Transformer(small_config(n_dense_layers=0, **overrides)).eval()
    batch, seq = 3, 12
    idx = torch.randint(0, 64, (batch, seq))
    positions = mask = None
    if packed:  # rows: context of 5, then two continuations, each restarting at position 5
        segment = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
        order = torch.arange(seq)
        one = (order[None, :] <= order[:, None]) & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
        mask = one.repeat(batch, 1, 1)
        positions = torch.cat([torch.arange(5), torch.arange(5, 8), torch.arange(5, 9)]).repeat(batch, 1)
    rows = torch.tensor([2, 0, 0, 2, 1, 0, 2])
    index = torch.tensor([11, 0, 7, 3, 5, 7, 11])  # unsorted, a repeat, row 1 has one pair
    with torch.no_grad():
        full = model(idx, positions, mask)
        picked = model(idx, positions, mask, select=(rows, index))
    assert picked.shape == (len(rows), 64)
    torch.testing.assert_close(picked, full[rows, index], atol=1e-5, rtol=1e-5)
