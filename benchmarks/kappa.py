"""Overhead of κ-SwiGLU experts vs plain SwiGLU experts on one MoE layer (forward + backward).

Time: the variants run in turn, step by step, in alternating order (plain, κ, κ, plain, ...):
this host's speed drifts by ±30% within seconds, and neighbouring steps see the same machine.
A ratio is the median of the per-round ratios κ/plain (as in `benchmarks/moe_layer.py`); the
`*_ms` are medians. The layer includes router, dispatch and aux loss, as in `moe_layer.py`.
Memory: bytes of the activations autograd saves for backward, summed through
`torch.autograd.graph.saved_tensors_hooks` (each storage once, parameters excluded). That is
deterministic, unlike allocator peaks on CPU; on CUDA the allocator's peak is printed too.
κ runs both eager and fused (`fused: true`, the elementwise math compiled by torch.compile;
compile time is excluded by the warm-up). Prints one JSON line per config with the ratios
κ/plain (target ≤ 1.05 for time and memory).

    python benchmarks/kappa.py [--tokens 4096] [--repeats 20] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from typing import Callable

import torch

from lit_moe.moe.layer import MoELayer

ROUTER = {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 2}}
DISPATCH = {"class_path": "lit_moe.moe.SortedDispatch"}


def step(layer: MoELayer, x: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    (y.float().square().mean() + layer.router.weighted_aux_loss()).backward()


def saved_activation_bytes(layer: MoELayer, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward, each storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    layer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
        loss = y.float().square().mean() + layer.router.weighted_aux_loss()
    loss.backward()
    return sum(storages.values())


def cuda_peak_bytes(layer: MoELayer, x: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(layer, x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def interleaved_ms(steps: dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None] = lambda: None
                   ) -> dict[str, list[float]]:
    """Milliseconds of each step, run in turn `repeats` times, the order reversed every round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for _ in range(repeats):
        for name in order:
            sync()
            start = time.perf_counter()
            steps[name]()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
        order.reverse()
    return times


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over rounds of times[i] / baseline[i]."""
    return round(statistics.median(t / b for t, b in zip(times, baseline)), 3)


def tiny_training_step(repeats: int) -> dict:
    """The whole tiny-config training step (conf/tiny.yaml sizes, batch 16 × 256, AdamW):
    SwiGLU experts vs fused κ-SwiGLU experts, interleaved medians."""
    import torch.nn.functional as F

    from lit_moe.model import ModelConfig, Transformer

    base = dict(vocab_size=4096, seq_len=256, d_model=128, n_layers=4, n_heads=4, num_experts=8, expert_hidden=256)
    kappa_experts = {"class_path": "lit_moe.moe.KappaSwiGLUExperts", "init_args": {"fused": True}}
    batch = torch.randint(0, 4096, (16, 257))
    steps = {}
    for name, experts in (("plain", None), ("kappa", kappa_experts)):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**base, **({"experts": experts} if experts else {})))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def fn(model=model, opt=opt):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 4096), batch[:, 1:].reshape(-1)) + model.weighted_aux_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(2):
            fn()
        steps[name] = fn
    times = interleaved_ms(steps, repeats)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"config": "tiny training step (16×256 tokens, 4 MoE layers, AdamW)", "plain_ms": round(ms["plain"], 1),
            "fused_ms": round(ms["kappa"], 1), "time_ratio_fused": paired_ratio(times["kappa"], times["plain"]),
            "target": "<= 1.05", "repeats": repeats, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--granularity", default="per_gate")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--tiny_step_only", action="store_true", help="only the whole tiny training step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as LitMoE does on CPU
    # (d, E, h): the two layer shapes of the issue, and the tiny config's layer (d=128, 16×256 tokens).
    shapes = [] if args.tiny_step_only else [(args.d_model, 8, 1024), (args.d_model, 64, 256), (128, 8, 256)]
    for d_model, num_experts, hidden in shapes:
        torch.manual_seed(0)
        plain = MoELayer(d_model, hidden, num_experts, ROUTER, {"class_path": "lit_moe.moe.SwiGLUExperts"}, DISPATCH)
        layers = {"plain": plain}
        for name, fused in (("kappa", False), ("fused", True)):
            spec = {"class_path": "lit_moe.moe.KappaSwiGLUExperts", "init_args": {"granularity": args.granularity, "fused": fused}}
            kappa = MoELayer(d_model, hidden, num_experts, ROUTER, spec, DISPATCH)
            kappa.load_state_dict(plain.state_dict(), strict=False)
            with torch.no_grad():  # trained-looking κ parameters (the cost does not depend on them)
                kappa.experts.kappa.bias.normal_(0, 0.3)
                kappa.experts.kappa.scale.normal_(0, 0.3)
            layers[name] = kappa
        # Parameters stay fp32 (as under autocast); the experts cast them to the input's dtype.
        layers = {name: layer.to(device) for name, layer in layers.items()}
        x = torch.randn(args.tokens, d_model, device=device, dtype=dtype, requires_grad=True)
        for layer in layers.values():  # warm-up
            for scale in (2.0, 3.0, 3.0):  # a U change too: compiles once more, then never
                if hasattr(layer.experts, "current_scale"):
                    layer.experts.current_scale = scale
                step(layer, x)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = interleaved_ms({name: functools.partial(step, layer, x) for name, layer in layers.items()},
                               args.repeats, sync)
        ms = {name: statistics.median(t) for name, t in times.items()}
        saved = {name: saved_activation_bytes(layer, x) for name, layer in layers.items()}
        row = {"config": f"T={args.tokens},d={d_model},E={num_experts},h={hidden},top2,{args.dtype},{device.type}",
               "granularity": args.granularity,
               "plain_ms": round(ms["plain"], 2), "eager_ms": round(ms["kappa"], 2), "fused_ms": round(ms["fused"], 2),
               "time_ratio_eager": paired_ratio(times["kappa"], times["plain"]),
               "time_ratio_fused": paired_ratio(times["fused"], times["plain"]),
               "plain_saved_MiB": round(saved["plain"] / 2**20, 2), "kappa_saved_MiB": round(saved["fused"] / 2**20, 2),
               "memory_ratio_eager": round(saved["kappa"] / saved["plain"], 4),
               "memory_ratio_fused": round(saved["fused"] / saved["plain"], 4),
               "params_ratio": round(sum(p.numel() for p in layers["fused"].parameters())
                                     / sum(p.numel() for p in layers["plain"].parameters()), 5),
               "threads": torch.get_num_threads()}
        if device.type == "cuda":
            peak = {name: cuda_peak_bytes(layer, x) for name, layer in layers.items()}
            row["peak_ratio_fused"] = round(peak["fused"] / peak["plain"], 4)
        print(json.dumps(row), flush=True)
    if device.type == "cpu":
        print(json.dumps({**tiny_training_step(max(5, args.repeats))}), flush=True)


if __name__ == "__main__":
    main()
