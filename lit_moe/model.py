"""Decoder-only MoE Transformer in plain PyTorch (no Lightning, MLflow or lm-eval here).

Block: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x)), where MLP is a dense SwiGLU for the
first `n_dense_layers` blocks and an MoE layer (router + experts + dispatch) after that.
Attention is causal multi-head self-attention with rotary position embeddings (RoPE) through
`F.scaled_dot_product_attention`.

Initialisation (documented because it matters for reproducing runs): every weight matrix and
the embedding are N(0, init_std); the two residual-branch output projections (attention
`proj`, MLP/expert `down`) use init_std / sqrt(2 · n_layers) so the residual stream's variance
does not grow with depth (GPT-2); router gates use init_std too; RMSNorm gains start at 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_moe.budget import GlobalExpertBudget
from lit_moe.components import build_component, component_spec
from lit_moe.errors import ConfigError
from lit_moe.losses import linear_cross_entropy
from lit_moe.moe.dispatch import Dispatch
from lit_moe.moe.experts import DenseSwiGLU, Experts, SwiGLUExperts
from lit_moe.moe.layer import MoELayer
from lit_moe.moe.router import Router, nonfinite


# Component types: a callable that builds the component from the arguments the model owns,
# given on the command line or in YAML as a class (short name or class_path) plus its options;
# jsonargparse checks them at parse time. Each field is held as its {class_path, init_args} spec.
RouterFactory = Callable[[int, int], Router]  # (d_model, num_experts) -> Router
ExpertsFactory = Callable[[int, int, int], Experts]  # (d_model, expert_hidden, num_experts) -> Experts
DispatchFactory = Callable[[], Dispatch]
DenseMLPFactory = Callable[[int, int], DenseSwiGLU]  # (d_model, dense_hidden) -> DenseSwiGLU
COMPONENTS = ("router", "experts", "dispatch", "dense_mlp")


def _default_router() -> dict[str, Any]:
    return {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 2}}


@dataclass
class ModelConfig:
    """Model hyperparameters; LightningCLI fills this from YAML (`model.config.*`).

    Components (`router`, `experts`, `dispatch`, `dense_mlp`) are given as a class with its
    options: a `{class_path, init_args}` mapping, a class, or a factory
    `functools.partial(cls, **options)` (what the CLI passes); the model supplies the
    structural arguments (d_model, num_experts, hidden sizes). After construction each is held
    as its plain `{class_path, init_args}` spec (`lit_moe.components.component_spec`).
    `vocab_size` is linked from the data module's tokenizer by the CLI.
    """

    vocab_size: int = 8192
    seq_len: int = 256
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    n_dense_layers: int = 0
    dense_hidden: int = 512
    num_experts: int = 8
    expert_hidden: int = 256
    router: RouterFactory = field(default_factory=_default_router)
    experts: ExpertsFactory = field(default_factory=lambda: {"class_path": "lit_moe.moe.SwiGLUExperts"})
    dispatch: DispatchFactory = field(default_factory=lambda: {"class_path": "lit_moe.moe.SortedDispatch"})
    # MLP of the first `n_dense_layers` blocks (a DenseSwiGLU subclass, e.g. KappaDenseSwiGLU).
    dense_mlp: DenseMLPFactory = field(default_factory=lambda: {"class_path": "lit_moe.moe.DenseSwiGLU"})
    # SoftMoE global expert budget: {"total": K, "learnable": true|false}. None: no budget
    # (each router uses its own k). K is the sum of per-layer expert counts over MoE layers.
    budget: dict[str, Any] | None = None
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in COMPONENTS:
            setattr(self, name, component_spec(getattr(self, name), f"model.config.{name}"))

    def validate(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "num_experts", "expert_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.config.{name} must be ≥ 1, got {getattr(self, name)}.")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size "
                              f"(RoPE rotates pairs of dimensions).")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ConfigError(f"n_dense_layers={self.n_dense_layers} must be between 0 and n_layers={self.n_layers}.")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        # (cos, sin) per position and pair: [max_len, head_dim/2, 2], read as complex numbers.
        # Non-persistent: recomputed from the config, so checkpoints hold only learned weights.
        self.register_buffer("rotation", torch.stack((angles.cos(), angles.sin()), dim=-1), persistent=False)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x: [..., B, H, S, Dh] (e.g. q and k stacked in front); rotates each (even, odd) pair
        by a position-dependent angle.

        positions: [B, S] position of each token (default 0..S−1), e.g. for packed rows.
        The pairs are rotated as complex numbers, one multiply in fp32: a single pass over x
        where the real-valued form needs four products, a sum, a difference and a stack.
        """
        if positions is None:
            rotation = self.rotation[:x.shape[-2]]
        else:  # [B, S, Dh/2, 2] → [B, 1, S, Dh/2, 2], broadcast over heads
            rotation = self.rotation[positions].unsqueeze(1)
        if torch.compiler.is_compiling():
            # Inductor generates no code for complex numbers: the real form, which it fuses
            # into one kernel with its neighbours.
            cos, sin = rotation.float().unbind(-1)
            even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
            return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)
        rotation = torch.view_as_complex(rotation.float())
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


class KVCache:
    """Keys and values of every layer for incremental decoding (`Transformer.forward(idx, cache=)`).

    Holds [B, H, max_len, Dh] keys and values per attention layer, the number of slots filled
    (`length`, the same for every row) and which slots are real tokens (`valid` [B, max_len]):
    prompts of different lengths are left-padded, and padding is never attended to (except by
    itself). Row b's token in slot j sits at position j − pad[b] (its position without padding).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int | None = None, pad: Tensor | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        max_len = cfg.seq_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.seq_len:
            raise ValueError(f"KV cache length {max_len} must be between 1 and the model's seq_len {cfg.seq_len}.")
        head_dim = cfg.d_model // cfg.n_heads
        shape = (batch, cfg.n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0
        self.pad = (torch.zeros(batch, dtype=torch.long, device=device) if pad is None
                    else pad.to(device=device, dtype=torch.long))
        slots = torch.arange(max_len, device=device)
        self.valid = slots[None, :] >= self.pad[:, None]

    def positions(self, seq: int) -> Tensor:
        """[B, seq] positions of the next `seq` slots (padding slots get 0)."""
        slots = torch.arange(self.length, self.length + seq, device=self.pad.device)
        return (slots[None, :] - self.pad[:, None]).clamp_min(0)

    def mask(self, seq: int, dtype: torch.dtype) -> Tensor:
        """Additive [B, 1, seq, length + seq] mask of the next `seq` queries: a query sees the
        real tokens up to its own slot, and itself (so padding rows stay finite)."""
        end = self.length + seq
        query = torch.arange(self.length, end, device=self.pad.device)[:, None]
        key = torch.arange(end, device=self.pad.device)[None, :]
        allowed = (self.valid[:, None, :end] & (key <= query)[None]) | (key == query)[None]
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            allowed.logical_not(), float("-inf")).unsqueeze(1)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store layer `layer`'s keys/values [B, H, seq, Dh] of the next slots; all filled ones back."""
        end = self.length + k.shape[2]
        if self.keys[layer].dtype != k.dtype and self.length == 0:  # e.g. bf16 compute (autocast, FSDP2)
            self.keys[layer] = self.keys[layer].to(k.dtype)
            self.values[layer] = self.values[layer].to(v.dtype)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rope = RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.seq_len, cfg.rope_theta)

    def forward(self, x: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None,
                query_index: Tensor | None = None, cache: tuple[KVCache, int] | None = None) -> Tensor:
        """x: [B, S, d]. positions [B, S] and attn_mask [B, S, S] (True = may attend) replace
        0..S−1 and the causal mask, e.g. for several continuations packed after one context.

        query_index [B, m]: compute the output only at these positions of each row (keys and
        values still come from all of them) → [B, m, d] instead of [B, S, d].

        cache (KVCache, layer index): x holds the next tokens only; their keys and values are
        appended to the cache and the queries attend to every cached slot (attn_mask: the
        cache's [B, 1, S, length + S] mask, positions: the cache's positions).
        """
        batch, seq, dim = x.shape
        head_dim = dim // self.n_heads
        if query_index is None:
            qkv = self.qkv(x).view(batch, seq, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k = self.rope(qkv[:2], positions)  # q and k in one pass
            v = qkv[2]
            if cache is not None:
                k, v = cache[0].update(cache[1], k, v)
        else:  # keys and values everywhere, queries only at query_index
            w_q, w_kv = self.qkv.weight.split([dim, 2 * dim])
            k, v = F.linear(x, w_kv).view(batch, seq, 2, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
            x_q = x.gather(1, query_index[..., None].expand(-1, -1, dim))
            q = F.linear(x_q, w_q).view(batch, -1, self.n_heads, head_dim).transpose(1, 2)
            q = self.rope(q, query_index if positions is None else positions.gather(1, query_index))
            k = self.rope(k, positions)
        if attn_mask is not None:  # [B, S, S] or [B, 1, S, S]; bool (True = may attend) or additive float
            if attn_mask.dim() == 3:
                attn_mask = attn_mask[:, None]
            if attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:  # e.g. under autocast
                attn_mask = attn_mask.to(q.dtype)
        if query_index is not None:
            if attn_mask is None:  # causal: query i sees keys 0..i
                attn_mask = (torch.arange(seq, device=x.device) <= query_index[..., None]).unsqueeze(1)
            else:
                attn_mask = attn_mask.gather(2, query_index[:, None, :, None].expand(-1, 1, -1, seq))
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(batch, q.shape[2], dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp: nn.Module
        if moe:
            self.mlp = MoELayer(cfg.d_model, cfg.expert_hidden, cfg.num_experts, cfg.router, cfg.experts, cfg.dispatch)
        else:
            self.mlp = build_component(cfg.dense_mlp, DenseSwiGLU, "model.config.dense_mlp", cfg.d_model,
                                       cfg.dense_hidden)

    # Recompute this block's activations in backward instead of keeping them (set by
    # LitMoE(activation_checkpointing=True); a plain attribute, not part of the state dict).
    activation_checkpointing: bool = False
    # Device flag from the last forward: did the block's output hold NaN/Inf? Read only
    # through `Transformer.first_nonfinite()`, so forward never waits on the host.
    nonfinite_output: Tensor | None = None

    def forward(self, x: Tensor, k: Tensor | None = None, positions: Tensor | None = None,
                attn_mask: Tensor | None = None, cache: tuple[KVCache, int] | None = None) -> Tensor:
        if cache is not None:  # incremental decoding: no checkpointing, no flags
            return self._forward(x, k, positions, attn_mask, cache=cache)
        if self.activation_checkpointing and torch.is_grad_enabled():
            out = checkpoint(self._forward, x, k, positions, attn_mask, use_reentrant=False)
        else:
            out = self._forward(x, k, positions, attn_mask)
        # Only training steps read it (nan_policy); evaluation forwards skip the reduction.
        self.nonfinite_output = nonfinite(out) if self.training else None
        return out

    def _forward(self, x: Tensor, k: Tensor | None, positions: Tensor | None = None,
                 attn_mask: Tensor | None = None, query_index: Tensor | None = None,
                 cache: tuple[KVCache, int] | None = None) -> Tensor:
        attn_out = self.attn(self.attn_norm(x), positions, attn_mask, query_index, cache)
        if query_index is not None:  # continue with the queried positions only
            x = x.gather(1, query_index[..., None].expand(-1, -1, x.shape[-1]))
        x = x + attn_out
        mlp_in = self.mlp_norm(x)
        return x + (self.mlp(mlp_in, k) if isinstance(self.mlp, MoELayer) else self.mlp(mlp_in))

    def forward_at(self, x: Tensor, query_index: Tensor, k: Tensor | None = None, positions: Tensor | None = None,
                   attn_mask: Tensor | None = None) -> Tensor:
        """The block's output [B, m, d] at positions query_index [B, m] only (see
        `Transformer.forward`'s `select`): attention reads every position, but queries, the
        projection and the MLP run only where asked."""
        return self._forward(x, k, positions, attn_mask, query_index)


def _query_slots(rows: Tensor, index: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """(row, position) pairs → query_index [batch, m] holding each row's positions (padded
    with position 0, which every mask lets see itself; padded outputs are dropped), and
    slot [n]: where pair j sits in its row's list."""
    rows, index = rows.long(), index.long()
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(len(rows), device=rows.device) - starts[rows[order]]
    width = max(int(counts.max()), 1)  # counts has `batch` ≥ 1 entries even for no pairs
    query_index = torch.zeros(batch, width, dtype=torch.long, device=rows.device)
    query_index[rows, slot] = index
    return query_index, slot


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        for i, router in self.routers():
            router.layer_name = f"layer {i:02d} router"
        for i, block in enumerate(self.blocks):  # e.g. κ-SwiGLU's start layer
            for module in block.mlp.modules():
                if hasattr(module, "set_layer_index"):
                    module.set_layer_index(i)
        self._tie_shared_expert_modules()
        self.budget: GlobalExpertBudget | None = self._build_budget(cfg)
        if self.budget is not None:
            for _, router in self.routers():
                router.k_max = self.budget.max_k()
        self.reset_parameters()

    def _build_budget(self, cfg: ModelConfig) -> GlobalExpertBudget | None:
        if cfg.budget is None:
            return None
        options = dict(cfg.budget)
        unknown = set(options) - {"total", "learnable"}
        if "total" not in options or unknown:
            raise ConfigError(f"model.config.budget must be {{total: K, learnable: true|false}}, got {cfg.budget}.")
        routers = [r for _, r in self.routers()]
        if not routers:
            raise ConfigError("model.config.budget needs MoE layers (n_dense_layers < n_layers).")
        if not all(r.uses_budget_k for r in routers):
            raise ConfigError(f"model.config.budget needs a router that takes per-layer k (e.g. "
                              f"lit_moe.moe.SoftTopKRouter); {type(routers[0]).__name__} does not.")
        try:
            return GlobalExpertBudget(len(routers), float(options["total"]), cfg.num_experts,
                                      learnable=bool(options.get("learnable", True)))
        except ValueError as err:
            raise ConfigError(f"model.config.budget: {err}") from err

    def _tie_shared_expert_modules(self) -> None:
        """Submodules marked `shared_across_layers` (κ-SwiGLU's `global` b, a) of the experts
        and dense MLPs are tied to one instance, the first MoE layer's if any (it may hold a,
        which dense layers do not use), like tied embeddings: `parameters()` and `modules()`
        then yield them once, so they are counted, optimised and regularised once."""
        owners = [layer.experts for _, layer in self.moe_layers()]
        owners += [block.mlp for block in self.blocks if not isinstance(block.mlp, MoELayer)]
        first: dict[str, nn.Module] = {}
        for owner in owners:
            for name, child in list(owner.named_children()):
                if getattr(child, "shared_across_layers", False):
                    setattr(owner, name, first.setdefault(name, child))

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, SwiGLUExperts):
                module.reset_parameters(std, out_std)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=out_std)
            if isinstance(block.mlp, DenseSwiGLU):
                nn.init.normal_(block.mlp.down.weight, std=out_std)

    def forward(self, idx: Tensor, positions: Tensor | None = None, attn_mask: Tensor | None = None,
                select: tuple[Tensor, Tensor] | None = None, cache: KVCache | None = None,
                targets: Tensor | None = None) -> Tensor:
        """idx: [B, S] token ids → logits [B, S, vocab] (fp32 for a stable cross-entropy).

        targets [B, S]: return the mean cross-entropy against them instead (fp32 scalar),
        computed chunk by chunk with the output head (`losses.linear_cross_entropy`), so the
        [B·S, vocab] logits never exist whole: what training and validation use.

        positions [B, S] and attn_mask [B, S, S] (bool, True = may attend) are for packed
        rows, e.g. evaluation scoring several continuations after one shared context: each
        continuation token sees the context and its own earlier tokens, at the positions it
        would have alone. Positions must stay below seq_len; the row itself may be longer.

        select: (rows [n], index [n]) → logits [n, vocab] at those (row, position) pairs only,
        equal to the full forward's there. Scoring wants a few positions per row: the last
        block then runs queries, projection and MLP only there (its keys and values still
        cover every position), and the output head only at the n positions.

        cache: incremental decoding (`KVCache`): idx [B, S] are the next S tokens after those
        already cached (the prompt first, then one token per step); logits [B, S, vocab] equal
        a full forward's over the whole sequence at these positions. positions, attn_mask and
        select are taken from the cache (must be None). Each MoE layer routes the new tokens
        on their own, which per-token routing makes exact.
        """
        if cache is not None:
            if positions is not None or attn_mask is not None or select is not None:
                raise ValueError("forward(cache=...) takes positions and mask from the cache; pass no positions, "
                                 "attn_mask or select.")
            return self._decode(idx, cache)
        if positions is None and idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's seq_len {self.cfg.seq_len}.")
        x = self.tok_emb(idx)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # Once per forward, as SDPA's additive float mask: a bool mask would be converted
            # again in every layer.
            attn_mask = torch.zeros(attn_mask.shape, dtype=x.dtype, device=x.device).masked_fill_(
                attn_mask.logical_not(), float("-inf")).unsqueeze(1)
        last = len(self.blocks) - 1
        for i, (block, k) in enumerate(zip(self.blocks, self._block_k())):
            if select is not None and i == last:
                query_index, slot = _query_slots(*select, batch=idx.shape[0])
                x = block.forward_at(x, query_index, k, positions, attn_mask)
                x = x[select[0], slot]  # [n, d] in the order asked
            else:
                x = block(x, k, positions, attn_mask)
        x = self.norm(x)
        if targets is not None:
            return linear_cross_entropy(x.flatten(0, -2), self.lm_head.weight, targets.flatten(), self.loss_chunk)
        return self.lm_head(x).float()

    # Positions per chunk of the output head in the training loss: [chunk, vocab] fp32 logits
    # at a time (4096 × 32768 × 4 B = 512 MiB at paper scale).
    loss_chunk: int = 4096

    def _block_k(self) -> list[Tensor | None]:
        """Each block's expert count from the budget (MoE blocks in depth order get k_j; dense
        blocks and models without a budget None). One budget evaluation per forward; the
        gradient reaches η through it."""
        layer_k = iter(self.budget.k()) if self.budget is not None else None
        return [next(layer_k) if layer_k is not None and isinstance(block.mlp, MoELayer) else None
                for block in self.blocks]

    def _decode(self, idx: Tensor, cache: KVCache) -> Tensor:
        seq = idx.shape[1]
        if cache.length + seq > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {cache.length} cached + {seq} new do not fit.")
        x = self.tok_emb(idx)
        positions = cache.positions(seq)
        attn_mask = cache.mask(seq, x.dtype)
        for i, (block, k) in enumerate(zip(self.blocks, self._block_k())):
            x = block(x, k, positions, attn_mask, cache=(cache, i))
        cache.length += seq
        return self.lm_head(self.norm(x)).float()

    # -- interface for the LightningModule and callbacks ---------------------------------
    def moe_layers(self) -> Iterator[tuple[int, MoELayer]]:
        """(block index, MoE layer) pairs, in depth order."""
        for i, block in enumerate(self.blocks):
            if isinstance(block.mlp, MoELayer):
                yield i, block.mlp

    def routers(self) -> Iterator[tuple[int, Router]]:
        for i, layer in self.moe_layers():
            yield i, layer.router

    def target_active_experts(self) -> Tensor:
        """Per MoE layer [L], the experts a token is meant to use: the budget's k_l when the
        model has one, else each router's design value (top-k's k, SoftMoE's own k). Detached,
        on the model's device; what the realised counts are compared with."""
        if self.budget is not None:
            return self.budget.k().detach().float()
        return torch.tensor([router.expected_active_experts() for _, router in self.routers()],
                            device=self.tok_emb.weight.device)

    def first_nonfinite(self) -> str | None:
        """Where the last forward first went non-finite, in depth order ("layer 02 router
        logits", "layer 03 output"), or None when every layer stayed finite.

        Reads the flags each router and block recorded on the device during forward: one host
        sync, so callers ask only once something already looks wrong (a non-finite loss).
        """
        names: list[str] = []
        flags: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            router = block.mlp.router if isinstance(block.mlp, MoELayer) else None
            if router is not None and router.nonfinite_logits is not None:
                names.append(f"{router.layer_name} logits")
                flags.append(router.nonfinite_logits)
            if block.nonfinite_output is not None:
                names.append(f"layer {i:02d} output")
                flags.append(block.nonfinite_output)
        if not flags:
            return None
        hits = torch.stack([f.to(flags[0].device) for f in flags]).nonzero().flatten().tolist()
        return names[hits[0]] if hits else None

    def aux_losses(self) -> dict[str, Tensor]:
        """Each aux loss from the last forward, averaged over MoE layers (unweighted)."""
        sums: dict[str, Tensor] = {}
        count = 0
        for _, router in self.routers():
            count += 1
            for name, value in router.aux_losses.items():
                sums[name] = sums.get(name, 0.0) + value
        return {name: value / count for name, value in sums.items()}

    def regularization_losses(self) -> dict[str, Tensor]:
        """Weighted parameter penalties (e.g. κ-SwiGLU's `kappa/reg`, METHODS §3), each summed over
        the submodules that define `regularization_losses()`; a shared module counts once."""
        sums: dict[str, Tensor] = {}
        for module in self.modules():
            if module is not self and hasattr(module, "regularization_losses"):
                for name, value in module.regularization_losses().items():
                    sums[name] = sums[name] + value if name in sums else value
        return sums

    def weighted_aux_loss(self) -> Tensor | float:
        """Routers' weighted aux losses averaged over MoE layers (METHODS §1), plus the
        parameter penalties of `regularization_losses()`."""
        losses = [router.weighted_aux_loss() for _, router in self.routers()]
        aux = torch.stack(losses).mean() if losses else 0.0
        return aux + sum(self.regularization_losses().values())

    def num_params(self, active_experts: Sequence[float | None] | None = None) -> dict[str, int]:
        """Total parameters and the parameters one token activates (embedding counted once).

        active_experts: experts per token of each MoE layer, e.g. the realised counts of
        `lit_moe.flops.realised_active_experts` (SoftMoE's truncation keeps a varying number);
        None, or a None entry: the design value (the budget's k_l or the router's k)."""
        design = self.target_active_experts().tolist()
        if active_experts is None:
            active_experts = design
        if len(active_experts) != len(design):
            raise ValueError(f"active_experts has {len(active_experts)} entries for {len(design)} MoE layers.")
        total = sum(p.numel() for p in self.parameters())
        active = total
        for k, k_design, (_, layer) in zip(active_experts, design, self.moe_layers()):
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            share = (k_design if k is None else k) / layer.experts.num_experts
            active -= expert_params - int(expert_params * share)
        return {"total": total, "active": active}
