"""What a GPU step runs, checked on CPU with a dispatch-level op counter.

- Under `torch.autocast(bf16)` with fp32 weights (Lightning's `bf16-mixed`), every expert
  product is one `torch._grouped_mm` call on bf16 inputs; plain `aten.mm` calls do not grow
  with the number of experts (no per-expert loop).
- A training step (forward + backward) makes no host read and creates no data-dependent
  shape: no `.item()` (`_local_scalar_dense`), `nonzero`, `bincount`, `unique`,
  `masked_select`, or `repeat_interleave` without `output_size`.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lit_moe.model import ModelConfig, Transformer

TOPK = {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 2}}
SOFT = {"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"k": 1.5}}
KAPPA = {"class_path": "lit_moe.moe.KappaSwiGLUExperts"}
SYNC_OPS = ("_local_scalar_dense", "nonzero", "bincount", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "masked_select")


HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name (overload packet), and records `_grouped_mm` input dtypes.

    `Tensor.tolist` and friends read memory without dispatching an op, so they are counted by
    wrapping the methods while the mode is active (`host_reads`)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.grouped_dtypes: list[tuple[torch.dtype, torch.dtype]] = []
        self.unbounded_repeat_interleave = 0
        self.host_reads: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, object] = {}

    def __enter__(self):
        for name in HOST_READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.host_reads[_name] += 1
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        if name == "_grouped_mm":
            self.grouped_dtypes.append((args[0].dtype, args[1].dtype))
        if name == "repeat_interleave" and kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
            self.unbounded_repeat_interleave += 1
        return func(*args, **kwargs)


def tiny(num_experts: int = 8, router=TOPK, experts=None, budget=None, **overrides) -> Transformer:
    cfg = ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2, num_experts=num_experts,
                      expert_hidden=32, router=router,
                      experts=experts or {"class_path": "lit_moe.moe.SwiGLUExperts"}, budget=budget, **overrides)
    torch.manual_seed(0)
    return Transformer(cfg)


def train_step(model: Transformer, idx: Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten())
    loss = loss + model.weighted_aux_loss()
    loss.backward()
    return loss.detach()


Tensor = torch.Tensor


def counted_step(model: Transformer, autocast: bool) -> OpCounter:
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    counter = OpCounter()
    with counter, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        train_step(model, idx)
    return counter


@pytest.mark.parametrize("experts", [None, KAPPA], ids=["swiglu", "kappa"])
def test_bf16_autocast_reaches_the_grouped_kernel_with_bf16_inputs(experts):
    small, large = tiny(8, experts=experts), tiny(32, experts=experts)
    for model in (small, large):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    counts = {}
    for name, model in (("small", small), ("large", large)):
        counter = counted_step(model, autocast=True)
        # 2 MoE layers × (3 forward + 2 input-grad + 3 weight-grad... ) calls, all in bf16.
        assert counter.counts["_grouped_mm"] >= 2 * 3 * 2, counter.counts["_grouped_mm"]
        assert set(counter.grouped_dtypes) == {(torch.bfloat16, torch.bfloat16)}
        counts[name] = counter.counts["mm"]
    # 4× the experts, the same number of plain matmuls: nothing loops over experts.
    assert counts["small"] == counts["large"]


def _loop_reference(model: Transformer) -> Transformer:
    """The same model with the plain per-expert LoopDispatch (no pair list, no grouped call)."""
    cfg = model.cfg
    reference = Transformer(ModelConfig(**{**cfg.__dict__, "dispatch": {"class_path": "lit_moe.moe.LoopDispatch"}}))
    reference.load_state_dict(model.state_dict())
    return reference


@pytest.mark.parametrize("router,experts", [(TOPK, None), (TOPK, KAPPA), (SOFT, None)], ids=["topk", "kappa", "soft"])
def test_bf16_autocast_step_matches_the_loop_reference(router, experts):
    model = tiny(8, router=router, experts=experts)
    if experts is KAPPA:  # κ away from 1, so its path matters
        with torch.no_grad():
            for _, layer in model.moe_layers():
                layer.experts.kappa.bias.normal_(0, 0.5)
                layer.experts.kappa.scale.normal_(0, 0.5)
    reference = _loop_reference(model)
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", torch.bfloat16):
        loss = train_step(model, idx)
        loss_ref = train_step(reference, idx)
    torch.testing.assert_close(loss, loss_ref, atol=2e-2, rtol=2e-2)
    grads = dict(model.named_parameters())
    for name, p_ref in reference.named_parameters():
        g, g_ref = grads[name].grad, p_ref.grad
        assert g is not None and g_ref is not None, name
        # bf16 products: compare relative to the gradient's scale.
        err = (g - g_ref).norm() / g_ref.norm().clamp_min(1e-8)
        assert err < 5e-2, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("case", ["topk", "softmoe_budget", "kappa", "topk_capacity"])
def test_training_step_makes_no_host_read(case):
    """Forward and backward of tiny models with bf16 weights: zero host syncs and zero
    data-dependent shapes (the grouped path; the loop fallback may read counts)."""
    model = {
        "topk": lambda: tiny(8),
        "softmoe_budget": lambda: tiny(8, router=SOFT, budget={"total": 3.0, "learnable": True}),
        "kappa": lambda: tiny(8, experts=KAPPA),
        "topk_capacity": lambda: tiny(8, router={"class_path": "lit_moe.moe.TopKRouter",
                                                 "init_args": {"top_k": 2, "capacity_factor": 1.0}}),
    }[case]().to(torch.bfloat16)
    model.train()
    counter = counted_step(model, autocast=False)
    assert counter.counts["_grouped_mm"] > 0
    found = {name: counter.counts[name] for name in SYNC_OPS if counter.counts[name]}
    assert found == {}, found
    assert dict(counter.host_reads) == {}
    assert counter.unbounded_repeat_interleave == 0


def test_the_counter_sees_the_loop_fallbacks_host_read(monkeypatch):
    """The same count on the per-expert fallback finds its read of the group sizes, so the
    zero above is a measurement, not a blind spot."""
    import lit_moe.moe.experts as experts_module

    monkeypatch.setattr(experts_module, "grouped_mm_supported", lambda *args: False)
    counter = counted_step(tiny(8).to(torch.bfloat16), autocast=False)
    assert counter.counts["_grouped_mm"] == 0
    assert counter.host_reads["tolist"] >= 2
