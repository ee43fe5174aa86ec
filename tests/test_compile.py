"""torch.compile per Transformer block: same losses and gradients as eager."""

import torch

from lit_moe.model import ModelConfig, Transformer


def test_compiled_blocks_match_eager_loss_and_gradients():
    import torch._dynamo

    torch._dynamo.reset()
    cfg = ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2, num_experts=4, expert_hidden=32)
    torch.manual_seed(0)
    compiled, eager = Transformer(cfg), Transformer(cfg)
    eager.load_state_dict(compiled.state_dict())
    for block in compiled.blocks:
        block.compile()
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiled in place
    idx = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    loss = compiled(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    # Both blocks ran as compiled graphs (fp32: the grouped matmul itself stays eager).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before
    ref = eager(idx[:, :-1], targets=idx[:, 1:])
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rope_real_form_equals_complex_form():
    """The compiled path rotates with cos/sin (no complex numbers): same values."""
    from lit_moe.model import RotaryEmbedding

    rope = RotaryEmbedding(8, 16, 10000.0)
    x = torch.randn(2, 3, 16, 8)
    real = torch.compile(rope, backend="eager", fullgraph=True)(x)  # traced: takes the real form
    torch.testing.assert_close(real, rope(x), atol=1e-6, rtol=1e-6)


def test_bf16_block_compiles_whole_with_the_grouped_kernel_inside():
    """bf16 (what GPUs run): `_grouped_mm` and the routing counters trace inside the block,
    with no graph break anywhere and no recompile on the second step."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg = ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2, num_experts=4, expert_hidden=32,
                      router={"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"k": 1.5}},
                      budget={"total": 3.0, "learnable": True})
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16)
    eager = Transformer(cfg).to(torch.bfloat16)
    eager.load_state_dict(model.state_dict())
    for block in model.blocks:
        block.compile()
    counters = torch._dynamo.utils.counters
    breaks_before = sum(counters["graph_break"].values())
    idx = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    graphs = []
    for _ in range(2):
        loss = model(idx[:, :-1], targets=idx[:, 1:]) + model.weighted_aux_loss()
        loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert sum(counters["graph_break"].values()) == breaks_before, dict(counters["graph_break"])
    assert graphs[1] == graphs[0]  # the second step reuses the first step's graphs
    ref = eager(idx[:, :-1], targets=idx[:, 1:]) + eager.weighted_aux_loss()
    torch.testing.assert_close(loss.float(), ref.float(), atol=5e-2, rtol=2e-2)
