"""Training FLOPs per token of a lit-moe Transformer and the peak bf16 FLOP/s of current GPUs,
for model-FLOPs utilisation (MFU = achieved model FLOP/s ÷ peak). Plain torch, no Lightning.

FLOPs per token (forward + backward = 3 × forward, each multiply-add 2 FLOPs):
    6 · (matmul parameters every token uses + Σ_l a_l · P_l / E) + 12 · n_layers · d · seq_len
where P_l are the expert weight matrices of MoE layer l, E the number of experts and a_l the
experts a token *actually* used there (realised, from the routers' counters; SoftMoE routes a
varying number, and a capacity factor drops assignments), falling back to the router's design
value. The last term is attention's scores and weighted sum (QKᵀ and AV over the full window).
The input embedding is a lookup, not a matmul: counted only when tied (as the output head).
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_moe.model import Transformer

# Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, per GPU. Lightning's
# table (lightning.fabric.utilities.throughput) knows "H200 SXM1"/"H100 ..." names only, so a
# plain "NVIDIA H200" gets no MFU; its H200/H100 NVL entries also count sparsity (2×).
# Matched in order (a name must contain every part): more specific names first.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gb200",), 2.5e15),         # GB200 NVL72, per Blackwell GPU
    (("b200",), 2.25e15),         # HGX B200
    (("gh200",), 989.4e12),       # Grace Hopper: H100/H200-class GPU
    (("h200", "nvl"), 835.5e12),  # H200 NVL (PCIe card, lower power)
    (("h200",), 989.4e12),        # H200 SXM ("NVIDIA H200"): H100 SXM's tensor cores and clocks
    (("h100", "nvl"), 835.5e12),
    (("h100", "pcie"), 756.5e12),
    (("h100",), 989.4e12),        # H100 SXM ("NVIDIA H100 80GB HBM3")
    (("a100",), 312e12),          # SXM and PCIe alike
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named like `torch.cuda.get_device_name()` ("NVIDIA
    H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"), or None when unknown."""
    name = device_name.lower()
    return next((flops for parts, flops in PEAK_BF16_FLOPS if all(part in name for part in parts)), None)


def expert_matmul_params(model: Transformer) -> list[int]:
    """Per MoE layer: parameters of its expert weight matrices (the 3-D [E, ·, ·] tensors)."""
    return [sum(p.numel() for p in layer.experts.parameters() if p.dim() == 3) for _, layer in model.moe_layers()]


def design_active_experts(model: Transformer) -> list[float]:
    """Experts per token by design: the budget's k_l (SoftMoE with a budget) or the router's k."""
    return model.target_active_experts().tolist()


def realised_active_experts(model: Transformer, split: str = "train") -> list[float | None]:
    """Per MoE layer: experts a token used on average over the routers' current counter window
    (assignments with nonzero weight ÷ tokens), or None where nothing was counted yet.
    Reads device counters: one host sync per call."""
    out: list[float | None] = []
    for _, layer in model.moe_layers():
        counters = layer.router.metrics(split)
        tokens = int(counters["active_hist"].sum())
        out.append(int(counters["tokens"].sum()) / tokens if tokens else None)
    return out


def flops_per_token(model: Transformer, active_experts: Sequence[float | None] | None = None) -> float:
    """Training FLOPs per token (module docstring); active_experts[l] per MoE layer (None
    entries, or None altogether: the design value)."""
    cfg = model.cfg
    expert_params = expert_matmul_params(model)
    design = design_active_experts(model)
    if active_experts is None:
        active_experts = design
    if len(active_experts) != len(expert_params):
        raise ValueError(f"active_experts has {len(active_experts)} entries for {len(expert_params)} MoE layers.")
    total = sum(p.numel() for p in model.parameters())
    shared = total - sum(expert_params) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    experts = sum((a if a is not None else d) * p / cfg.num_experts
                  for a, d, p in zip(active_experts, design, expert_params))
    return 6.0 * (shared + experts) + attention_flops_per_token(model)


def attention_flops_per_token(model: Transformer) -> float:
    """Attention's scores and weighted sum per token, over the full window: 12 · L · d · S."""
    cfg = model.cfg
    return 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len
