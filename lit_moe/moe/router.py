"""Routers: map token hidden states to a sparse routing-weight tensor [tokens, E].

Every router returns the same representation — a dense [T, E] tensor whose zeros mark
experts a token does not use — so dispatch and experts never branch on the router type.
Each router owns its auxiliary losses (`aux_losses`, unweighted, from the last forward) and
their weights; the model sums `weighted_aux_loss()` over layers. It also accumulates routing
counters on its device (`metrics()` / `reset_metrics()`, see `routing_metrics`). No global state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_moe.dtensor import full_tensor
from lit_moe.errors import ConfigError
from lit_moe.lapsum import sparse_soft_topk
from lit_moe.moe.routing_metrics import SPLITS, RoutingCounters


def switch_load_balance_loss(logits: Tensor, assigned: Tensor, probs: Tensor | None = None) -> Tensor:
    """Switch Transformer balance loss E · Σ_e f_e · P_e (METHODS §1).

    f_e: fraction of (token, expert) assignments that went to e (non-differentiable);
    P_e: mean router probability softmax(z)_e over tokens (carries the gradient).
    probs: softmax(logits) when the caller has it already.
    """
    num_experts = logits.shape[-1]
    counts = assigned.sum(dim=0, dtype=torch.float32)
    f = counts / counts.sum().clamp_min(1.0)
    p = (torch.softmax(logits, dim=-1) if probs is None else probs).mean(dim=0)
    return num_experts * torch.dot(f, p)


def nonfinite(t: Tensor) -> Tensor:
    """Whether t has a NaN or ±Inf (a 0-d bool device tensor, no host sync). One min/max pass
    (NaN propagates into both) instead of isfinite's [T, E] mask and its reduction."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return (torch.isfinite(low) & torch.isfinite(high)).logical_not()


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's k largest logits and their expert indices [T, k], largest first.

    k ≤ 2 by one or two argmax passes (on 2 CPU cores about half of `torch.topk`'s time for
    [4096, 64]); ties go to the lower index. Gradients reach the logits through the gather.
    """
    if k > 2:
        return logits.topk(k, dim=-1)
    with torch.no_grad():
        index = logits.argmax(dim=-1, keepdim=True)
        if k == 2:
            second = logits.scatter(-1, index, float("-inf")).argmax(dim=-1, keepdim=True)
            # A row whose other logits are all −inf would repeat the first: any other expert will do.
            second = torch.where(second == index, (index + 1) % logits.shape[-1], second)
            index = torch.cat([index, second], dim=-1)
    return logits.gather(-1, index), index


@contextlib.contextmanager
def routing_statistics_off(model: nn.Module) -> Iterator[None]:
    """Inside the block no router of `model` records statistics or computes aux losses without
    gradients (scoring and generation are not validation: they must not count in the eval
    window, and the counters cost time); each router's setting is restored after."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    recording = [router.record_metrics for router in routers]
    for router in routers:
        router.record_metrics = False
    try:
        yield
    finally:
        for router, record in zip(routers, recording):
            router.record_metrics = record


class Router(nn.Module):
    """Base class: a linear gate (no bias, fp32 logits) plus the two standard aux losses.

    Subclasses implement `route(logits) -> (weights, assigned)`, where `assigned` is the
    boolean [T, E] mask of the assignments the router *chose* (before any capacity drop),
    which is what the load-balancing loss counts.
    """

    def __init__(self, d_model: int, num_experts: int, lb_weight: float = 1e-2, z_weight: float = 1e-3):
        super().__init__()
        if num_experts < 1:
            raise ConfigError(f"num_experts must be ≥ 1, got {num_experts}.")
        if lb_weight < 0 or z_weight < 0:
            raise ConfigError(f"aux-loss weights must be ≥ 0 (lb_weight={lb_weight}, z_weight={z_weight}).")
        self.num_experts = num_experts
        self.lb_weight = lb_weight
        self.z_weight = z_weight
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.aux_losses: dict[str, Tensor] = {}
        # Routing counters per split ("train" / "eval"), created on first use on the logits'
        # device. Plain attributes, not buffers: DDP broadcasts buffers from rank 0 at every
        # forward (which would overwrite each rank's counts), and checkpoints stay unchanged.
        self.record_metrics = True
        # Created here and rebuilt when the module moves (`_apply`), never inside a forward: a
        # compiled block then updates existing objects instead of breaking its graph.
        self._counters: dict[str, RoutingCounters] = {}
        self._new_counters()

    def compute_logits(self, x: Tensor) -> Tensor:
        # fp32 logits even under bf16 autocast: top-k/softmax decisions are sensitive to rounding.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.gate.weight.float())

    # Routers that take a per-layer expert count k from the model's GlobalExpertBudget.
    uses_budget_k: bool = False
    # Set by the Transformer so messages can name the layer.
    layer_name: str = "router"
    # NaN/Inf anywhere in the last forward's logits (a 0-d bool device tensor), see above.
    nonfinite_logits: Tensor | None = None

    def route(self, logits: Tensor, k: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def expected_active_experts(self) -> float:
        """Experts a token uses on average by design (for active-parameter and FLOP counts)."""
        raise NotImplementedError

    @property
    def slots(self) -> int:
        """The most experts one token can use (a host int): the dispatch's static pair count
        per token."""
        return self.num_experts

    @property
    def zero_slots(self) -> bool:
        """Whether some of a token's `slots` largest weights can be exactly 0 (dropped or
        truncated pairs, which the dispatch then skips)."""
        return True

    def forward(self, x: Tensor, k: Tensor | None = None) -> Tensor:
        """x: [T, d] → routing weights [T, E] (fp32; zeros = expert unused)."""
        return self.logits_and_weights(x, k)[1]

    def logits_and_weights(self, x: Tensor, k: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [T, d] → (fp32 logits [T, E], routing weights [T, E]); sets `aux_losses`.

        k: this layer's expert count from the global budget (0-d tensor), for routers with
        `uses_budget_k`; ignored by the others.
        """
        logits = self.compute_logits(x)
        # Device flag, no host sync: `Transformer.first_nonfinite()` reads it when a training
        # loss is non-finite, to name the first layer whose router logits went NaN/Inf.
        self.nonfinite_logits = nonfinite(logits) if self.training else None
        weights, assigned = self.route(logits, k)
        # Scoring without gradients and without statistics (lm-eval requests) needs neither.
        probs = log_normalizer = None
        if torch.is_grad_enabled() or self.record_metrics:
            # One softmax and one logsumexp serve both losses and the entropy statistic.
            probs = torch.softmax(logits, dim=-1)
            log_normalizer = torch.logsumexp(logits, dim=-1)
            self.aux_losses = {
                "load_balance": switch_load_balance_loss(logits, assigned, probs),
                # Router z-loss: mean over tokens of (logsumexp z)², keeps the logits from drifting large.
                "z_loss": log_normalizer.square().mean(),
            }
        else:
            self.aux_losses = {}
        # Activation checkpointing re-runs this forward inside backward (the autograd engine then
        # has a current graph task): count each routing once. A compiled block recomputes inside
        # its compiled backward, never through this Python, and the check would break its graph.
        if self.record_metrics and (torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1):
            self._split_counters("train" if self.training else "eval", logits.device).update(
                logits, weights, assigned, self.aux_losses, probs=probs, log_normalizer=log_normalizer)
        return logits, weights

    # -- routing statistics (read by callbacks.RoutingStatsCallback) --------------------------
    def _new_counters(self) -> None:
        device = self.gate.weight.device
        self._counters = {split: RoutingCounters(self.num_experts, device) for split in SPLITS}

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 — nn.Module's hook for .to()/.cuda()
        module = super()._apply(fn, *args, **kwargs)
        if self._counters and next(iter(self._counters.values())).device != self.gate.weight.device:
            self._new_counters()  # moved to another device: counting starts afresh there
        return module

    def _split_counters(self, split: str, device: torch.device) -> RoutingCounters:
        counters = self._counters[split]
        if counters.device != device:  # parameters swapped behind .to() (e.g. by a strategy)
            counters = self._counters[split] = RoutingCounters(self.num_experts, device)
        return counters

    def metrics(self, split: str = "train") -> dict[str, Tensor]:
        """The routing counters accumulated since the last `reset_metrics` by training ("train")
        or evaluation ("eval") forwards: device tensors, live (copy them to keep a snapshot)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        return self._split_counters(split, self.gate.weight.device).as_dict()

    def reset_metrics(self, split: str | None = None) -> None:
        """Zero the counters of `split` (both splits when None)."""
        for name in SPLITS if split is None else (split,):
            self._split_counters(name, self.gate.weight.device).zero_()

    def weighted_aux_loss(self) -> Tensor:
        if not self.aux_losses:  # last forward ran with neither gradients nor statistics
            return self.gate.weight.new_zeros(())
        return self.lb_weight * self.aux_losses["load_balance"] + self.z_weight * self.aux_losses["z_loss"]


class TopKRouter(Router):
    """Baseline router: top-k logits, softmax over the k winners (Mixtral style).

    capacity_factor=None is dropless. With a capacity factor c each expert takes at most
    ceil(c · T · k / E) tokens, in token order (as in Switch); overflow assignments are
    dropped (weight 0, the token passes through the residual only for that expert) and
    counted in `dropped` (a device tensor; no host sync).

    Args:
        top_k: experts per token, 1..num_experts.
        capacity_factor: c > 0, each expert's capacity as a multiple of its even share
            T·k/E of the assignments; null: dropless.
        lb_weight: weight of the load-balancing loss (≥ 0).
        z_weight: weight of the router z-loss (≥ 0).
        normalize: weights = softmax over the k winners' logits (Mixtral). False: each winner
            weighs its probability under the softmax over all E logits (Switch Transformer).
            Use False for k = 1: a renormalised single winner always weighs exactly 1, so the
            language-model loss never reaches the router (only the aux losses train it).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, capacity_factor: float | None = None,
                 lb_weight: float = 1e-2, z_weight: float = 1e-3, normalize: bool = True):
        super().__init__(d_model, num_experts, lb_weight=lb_weight, z_weight=z_weight)
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts}); "
                              f"lower router.init_args.top_k or raise model.config.num_experts.")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ConfigError(f"capacity_factor must be > 0 or null (dropless), got {capacity_factor}.")
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.normalize = bool(normalize)
        self.register_buffer("dropped", torch.zeros((), dtype=torch.long), persistent=False)

    def expected_active_experts(self) -> float:
        return float(self.top_k)

    @property
    def slots(self) -> int:
        return self.top_k

    @property
    def zero_slots(self) -> bool:
        return self.capacity_factor is not None

    def route(self, logits: Tensor, k: Tensor | None = None) -> tuple[Tensor, Tensor]:
        top_vals, top_idx = top_k(logits, self.top_k)
        if self.normalize:
            top_weights = torch.softmax(top_vals, dim=-1)
        else:  # the winners' probabilities under the full softmax: exp(z_i − logsumexp z)
            top_weights = torch.exp(top_vals - torch.logsumexp(logits, dim=-1, keepdim=True))
        weights = torch.zeros_like(logits).scatter_(-1, top_idx, top_weights)
        assigned = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top_idx, True)
        if self.capacity_factor is not None:
            tokens = logits.shape[0]
            capacity = math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)
            # Position of each token in its expert's queue (token order = priority).
            position = torch.cumsum(assigned, dim=0) - 1
            keep = assigned & (position < capacity)
            self.dropped = (assigned & ~keep).sum()
            weights = weights * keep
        return weights, assigned


class SoftTopKRouter(Router):
    """SoftMoE router (METHODS §2): LapSum soft top-k on the raw logits, then truncation.

    p = soft_topk(z, k, α) (rows sum to k), w = p·1[p ≥ τ] with τ = θ·k/E clamped so that
    1..⌈k·cap⌉ experts stay active per token; w is not renormalised. Zero weights are skipped
    by the dispatch. k comes from the model's `GlobalExpertBudget` when the config has one
    (learned or fixed per-layer counts), else from `k` here.

    `alpha` and `theta` are plain floats (a schedule or the budget controller may change them
    during training) saved in the state dict through `get_extra_state`, so they resume. With
    `learn_alpha` α is a parameter instead, α = exp(log_alpha) (positive for any value), trained
    through LapSum's ∂L/∂α (METHODS §2.1); it starts at `alpha` and is read as `router.alpha`.
    Non-finite logits are flagged on the device like every router's (`nonfinite_logits`) and
    reported by LitMoE's `nan_policy`.

    Args:
        k: expected experts per token, in (0, num_experts); the budget's per-layer k replaces it.
        alpha: α > 0, the Laplace scale of the soft top-k (smaller: closer to hard top-k).
        theta: θ ≥ 0, the truncation threshold τ = θ·k/E.
        cap: at most ⌈k·cap⌉ experts per token (≥ 1).
        lb_weight: weight of the load-balancing loss (≥ 0).
        z_weight: weight of the router z-loss (≥ 0).
        learn_alpha: learn α (per layer, from `alpha`) instead of holding it fixed.
    """

    uses_budget_k = True

    def __init__(self, d_model: int, num_experts: int, k: float = 2.0, alpha: float = 1.0, theta: float = 1.8,
                 cap: float = 2.0, lb_weight: float = 1e-2, z_weight: float = 0.0, learn_alpha: bool = False):
        super().__init__(d_model, num_experts, lb_weight=lb_weight, z_weight=z_weight)
        if not 0 < k < num_experts:
            raise ConfigError(f"SoftTopKRouter: k={k} must lie in (0, num_experts={num_experts}).")
        if not alpha > 0:
            raise ConfigError(f"SoftTopKRouter: alpha={alpha} must be > 0 (the Laplace scale).")
        if not theta >= 0:
            raise ConfigError(f"SoftTopKRouter: theta={theta} must be ≥ 0 (τ = θ·k/E).")
        if not cap >= 1:
            raise ConfigError(f"SoftTopKRouter: cap={cap} must be ≥ 1 (at most ⌈k·cap⌉ experts per token).")
        self.k = float(k)
        self.learn_alpha = bool(learn_alpha)
        if self.learn_alpha:
            # Log-parametrised: any value is a valid α > 0, and steps are relative (a scale).
            self.log_alpha = nn.Parameter(torch.full((1,), math.log(alpha)))  # 1-D: FSDP2 shards dim 0
        else:
            self._alpha = float(alpha)
        self.theta = float(theta)
        self.cap = float(cap)
        # Realised mean number of active experts per token in the last forward (device tensor).
        self.register_buffer("last_active", torch.zeros(()), persistent=False)

    def expected_active_experts(self) -> float:
        return self.k

    @property
    def alpha(self) -> float:
        """The Laplace scale α as a float (a host read of the parameter when learnt)."""
        return float(full_tensor(self.log_alpha).detach().exp()) if self.learn_alpha else self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if self.learn_alpha:
            raise ConfigError("SoftTopKRouter: α is learnt (learn_alpha: true); an α schedule cannot set it. "
                              "Drop alpha_start/alpha_end or set learn_alpha: false.")
        self._alpha = float(value)

    # The largest k this layer can be given: its own k, or the budget's bound (K − L + 1 for a
    # learnable split, K/L fixed), set by the Transformer. Sizes the soft top-k's partial sort
    # and the dispatch's pairs per token without reading k on the host.
    k_max: float | None = None

    @property
    def slots(self) -> int:
        k_max = self.k if self.k_max is None else self.k_max
        return min(self.num_experts, math.ceil(k_max * self.cap))

    def route(self, logits: Tensor, k: Tensor | None = None) -> tuple[Tensor, Tensor]:
        k_layer = self.k if k is None else k
        k_max = None if k is None else self.k_max
        alpha = self.log_alpha.exp() if self.learn_alpha else self._alpha
        weights = sparse_soft_topk(logits, k_layer, alpha, self.theta, self.cap, k_max=k_max,
                                   alpha_positive=self.learn_alpha)
        assigned = weights != 0
        self.last_active = assigned.sum(dim=-1, dtype=torch.float32).mean().detach()
        return weights, assigned

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        module = super()._apply(fn, *args, **kwargs)
        # A statistic, not a weight: it stays fp32 when the model is cast (e.g. to bf16), so a
        # compiled forward does not see its dtype change at the first assignment.
        self.last_active = self.last_active.float()
        return module

    def get_extra_state(self) -> dict[str, float]:
        # A learnt α is in the state dict as `log_alpha`.
        return {"theta": self.theta} if self.learn_alpha else {"alpha": self._alpha, "theta": self.theta}

    def set_extra_state(self, state: dict[str, float]) -> None:
        if not self.learn_alpha and "alpha" in state:
            self._alpha = float(state["alpha"])
        self.theta = float(state["theta"])
