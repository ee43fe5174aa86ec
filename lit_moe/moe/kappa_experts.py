"""κ-SwiGLU expert banks and dense MLP (METHODS §3).

Inside expert e, for a pair with routing confidence s: act(g) = g·σ(κg), κ = U^tanh(b + a·s).
b and a start at zero, so a fresh layer is exactly the SwiGLU layer with the same weights.

    experts:
      class_path: lit_moe.moe.KappaSwiGLUExperts
      init_args: {granularity: per_gate, confidence: top_logit, confidence_scale: 0.15,
                  confidence_grad_scale: 0.1, max_scale: 3.0, reg_weight: 0.01}
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_moe.dtensor import full_tensor
from lit_moe.errors import ConfigError
from lit_moe.kappa import kappa_swiglu
from lit_moe.moe.experts import DenseSwiGLU, ExpertGroups, SwiGLUExperts
from lit_moe.moe.router import CONFIDENCE_MODES

GRANULARITIES = ("per_gate", "per_expert", "per_layer", "global")
# Multiplier of the router's raw confidence when `confidence_scale` is not set: 0.15 on the
# raw logit and 6 on the cosine-like logit_norm are the paper's values (METHODS §3).
DEFAULT_CONFIDENCE_SCALE = {"top_logit": 0.15, "logit_norm": 6.0, "router_weight": 1.0, "constant": 1.0}
# Pairs (of T·k) sampled per forward for the κ statistics.
STATS_SAMPLE = 256
STATS_NAMES = ("mean", "std", "min", "max", "corr")


def _check_common(max_scale: float, reg_weight: float, owner: str) -> None:
    if not max_scale > 1:
        raise ConfigError(f"{owner}: max_scale (U) must be > 1, got {max_scale} (κ stays in (1/U, U); "
                          f"U = 1 is plain SwiGLU).")
    if not reg_weight >= 0:
        raise ConfigError(f"{owner}: reg_weight (λ) must be ≥ 0, got {reg_weight}.")


def _kappa_group(*params: nn.Parameter) -> None:
    # Own AdamW group "kappa" (no weight decay; its lr is delayed by KappaScheduleCallback).
    for param in params:
        param.optim_group = "kappa"


class KappaParams(nn.Module):
    """b and a of κ = U^tanh(b + a·s): zero-initialised tables [rows, width], group "kappa".

    `shared_across_layers` (granularity `global`): the Transformer ties every MoE layer's
    instance to the first layer's, like tied embeddings, so the pair is counted, optimised
    and regularised once.
    """

    def __init__(self, rows: int, width: int, reg_weight: float, shared_across_layers: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(rows, width))
        self.scale = nn.Parameter(torch.zeros(rows, width))
        _kappa_group(self.bias, self.scale)
        self.reg_weight = reg_weight
        self.shared_across_layers = shared_across_layers

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.scale)

    def regularization_losses(self) -> dict[str, Tensor]:
        """λ·(mean b² + mean a²); the Transformer sums it over layers and adds it to the loss."""
        # full_tensor: called after forward, when FSDP2 has resharded b and a.
        bias, scale = full_tensor(self.bias), full_tensor(self.scale)
        return {"kappa/reg": self.reg_weight * (bias.square().mean() + scale.square().mean())}


class KappaSwiGLUExperts(SwiGLUExperts):
    """SwiGLU experts whose gate sharpness κ follows each pair's routing confidence.

    Args:
        granularity: shape of b and a: per_gate [E, h], per_expert [E], per_layer [1], or
            global (one pair shared by all MoE layers of the model).
        confidence: the router's confidence mode (`Router.confidence`): top_logit,
            logit_norm, router_weight or constant.
        confidence_scale: multiplier of that confidence; None: the mode's default
            (top_logit 0.15, logit_norm 6, router_weight 1, constant 1).
        confidence_grad_scale: factor on the gradient from s back into the router,
            s = s̄ + g·(s − s̄) with s̄ detached (1: full gradient, 0: detached).
        max_scale: final U (κ ∈ (1/U, U)). `current_scale` is the U in use, a plain float
            that KappaScheduleCallback warms up from 1; saved in the state dict.
        reg_weight: λ of the regulariser λ·(mean b² + mean a²).
        fused: compile the κ elementwise math into one kernel per direction (`kappa_swiglu`'s
            `fused`): several times faster than eager, at a one-off compile per process.

    `kappa_statistics()`: κ mean/std/min/max over the (pair, unit) entries of up to 256
    evenly spaced pairs of the last forward, and the correlation between the pairs'
    confidence and their mean κ. The forward only keeps the sample (two small gathers, no
    host sync); the statistics are computed when asked, i.e. when they are logged.
    """

    def __init__(self, d_model: int, hidden: int, num_experts: int, granularity: str = "per_gate",
                 confidence: str = "top_logit", confidence_scale: float | None = None,
                 confidence_grad_scale: float = 0.1, max_scale: float = 3.0, reg_weight: float = 0.01,
                 fused: bool = False):
        name = type(self).__name__
        if granularity not in GRANULARITIES:
            raise ConfigError(f"{name}: unknown granularity {granularity!r}; choose one of {list(GRANULARITIES)}.")
        if confidence not in CONFIDENCE_MODES:
            raise ConfigError(f"{name}: unknown confidence {confidence!r}; choose one of {list(CONFIDENCE_MODES)}.")
        if not 0 <= confidence_grad_scale <= 1:
            raise ConfigError(f"{name}: confidence_grad_scale must lie in [0, 1], got {confidence_grad_scale}.")
        if confidence_scale is not None and not math.isfinite(confidence_scale):
            raise ConfigError(f"{name}: confidence_scale must be finite, got {confidence_scale}.")
        _check_common(max_scale, reg_weight, name)
        super().__init__(d_model, hidden, num_experts)
        self.granularity = granularity
        self.confidence_mode = confidence
        self.confidence_scale = DEFAULT_CONFIDENCE_SCALE[confidence] if confidence_scale is None else confidence_scale
        self.confidence_grad_scale = float(confidence_grad_scale)
        self.max_scale = float(max_scale)
        self.current_scale = float(max_scale)
        self.fused = fused
        rows = num_experts if granularity in ("per_gate", "per_expert") else 1
        self.kappa = KappaParams(rows, hidden if granularity == "per_gate" else 1, reg_weight,
                                 shared_across_layers=granularity == "global")
        self._stats_sample: tuple[Tensor, Tensor, Tensor] | None = None

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        super().reset_parameters(std, out_std)
        if hasattr(self, "kappa"):  # the base constructor calls this before `kappa` exists
            self.kappa.reset_parameters()

    def pair_confidence(self, confidence: Tensor) -> Tensor:
        """Router confidence per pair [N] → s [N, 1] fp32: scaled, its router gradient scaled."""
        s = confidence.float().unsqueeze(-1) * self.confidence_scale
        if self.confidence_grad_scale == 0:
            return s.detach()
        if self.confidence_grad_scale < 1:
            # Same value, gradient × g: the router learns from κ only gently.
            s = s.detach() + self.confidence_grad_scale * (s - s.detach())
        return s

    def activation(self, gate: Tensor, confidence: Tensor | None = None, expert: int | Tensor | None = None) -> Tensor:
        if confidence is None:
            raise ValueError(f"{type(self).__name__} needs each pair's confidence (the MoE layer passes it).")
        bias, scale, index = self.kappa.bias, self.kappa.scale, None
        if bias.shape[0] == 1:
            bias, scale = bias[0], scale[0]
        elif isinstance(expert, int):
            bias, scale = bias[expert], scale[expert]
        else:
            index = expert  # grouped path: per-row expert ids, gathered inside the autograd function
        return kappa_swiglu(gate, confidence, bias, scale, self.current_scale, index, fused=self.fused)

    def expert_forward(self, e: int, x: Tensor, confidence: Tensor | None = None) -> Tensor:
        return super().expert_forward(e, x, None if confidence is None else self.pair_confidence(confidence))

    def forward(self, x_sorted: Tensor, groups: ExpertGroups, confidence: Tensor | None = None) -> Tensor:
        if confidence is None:
            raise ValueError(f"{type(self).__name__} needs each pair's confidence (the MoE layer passes it).")
        s = self.pair_confidence(confidence)
        self._record_stats(s, groups)
        return super().forward(x_sorted, groups, s)

    @torch.no_grad()
    def _record_stats(self, s: Tensor, groups: ExpertGroups) -> None:
        """Keep up to 256 evenly spaced pairs (their s, expert and validity) for
        `kappa_statistics`. Evenly spaced: pairs are grouped by expert, so the first 256 would
        all be expert 0. Rows past the last group (skipped pairs) are kept but flagged."""
        pairs = s.shape[0]
        if pairs == 0:
            return
        pick = torch.arange(0, pairs, max(1, pairs // STATS_SAMPLE), device=s.device)[:STATS_SAMPLE]
        expert = groups.expert[pick].clamp_max(self.kappa.bias.shape[0] - 1)
        valid = torch.ones_like(pick, dtype=torch.bool) if groups.valid is None else groups.valid[pick, 0]
        self._stats_sample = (s[pick].detach(), expert, valid)

    @torch.no_grad()
    def kappa_sample(self) -> tuple[Tensor, Tensor] | None:
        """(κ [pairs, units], s [pairs]) of the up to 256 pairs sampled in the last forward,
        with the current b, a and U (device tensors); None before the first forward."""
        if self._stats_sample is None:
            return None
        conf, expert, valid = self._stats_sample
        # Skipped pairs (SoftMoE's zero weights) are no κ anybody used: the static-shape
        # sample drops them here, when the statistics are read.
        conf, expert = conf[valid], expert[valid]
        z = torch.addcmul(full_tensor(self.kappa.bias)[expert], full_tensor(self.kappa.scale)[expert], conf)
        return torch.exp(math.log(self.current_scale) * torch.tanh(z)), conf.squeeze(-1)

    @torch.no_grad()
    def kappa_statistics(self) -> Tensor:
        """[mean, std, min, max, corr] of κ over the (pair, unit) entries of `kappa_sample()`,
        corr = Pearson correlation of the pairs' s with their mean κ (0 when s is constant).
        A device tensor (no host sync); NaN before the first forward."""
        sample = self.kappa_sample()
        if sample is None:
            return torch.full((len(STATS_NAMES),), math.nan)
        kappa, conf = sample
        pair_kappa = kappa.mean(-1)
        pk, pc = pair_kappa - pair_kappa.mean(), conf - conf.mean()
        corr = (pk * pc).sum() / (pk.square().sum() * pc.square().sum()).sqrt().clamp_min(1e-12)
        return torch.stack([kappa.mean(), kappa.std(correction=0), kappa.min(), kappa.max(), corr])

    def get_extra_state(self) -> dict[str, float]:
        return {"current_scale": self.current_scale}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.current_scale = float(state["current_scale"])


class KappaDenseSwiGLU(DenseSwiGLU):
    """Dense SwiGLU with the constant-input κ of METHODS §3: κ = U_d^tanh(b·c), b [h] zero-init.

    Chosen with `model.config.dense_mlp: {class_path: lit_moe.moe.KappaDenseSwiGLU}`.
    METHODS gives no dense U_d, so the default is the MoE value 3. `current_scale` is warmed
    up by KappaScheduleCallback like the experts' and saved in the state dict; `fused` as
    for `KappaSwiGLUExperts`.
    """

    def __init__(self, d_model: int, hidden: int, max_scale: float = 3.0, constant: float = 1.0,
                 reg_weight: float = 0.01, fused: bool = False):
        _check_common(max_scale, reg_weight, type(self).__name__)
        super().__init__(d_model, hidden)
        self.kappa_scale = nn.Parameter(torch.zeros(hidden))
        _kappa_group(self.kappa_scale)
        self.constant = float(constant)
        self.reg_weight = reg_weight
        self.fused = fused
        self.max_scale = float(max_scale)
        self.current_scale = float(max_scale)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate(x)
        # κ = U^tanh(0 + b·c): the generic function with bias 0 and confidence c.
        act = kappa_swiglu(gate, gate.new_full((1,), self.constant, dtype=torch.float32),
                           gate.new_zeros((), dtype=torch.float32), self.kappa_scale, self.current_scale,
                           fused=self.fused)
        return self.down(act * self.up(x))

    def regularization_losses(self) -> dict[str, Tensor]:
        return {"kappa/reg": self.reg_weight * full_tensor(self.kappa_scale).square().mean()}

    def get_extra_state(self) -> dict[str, float]:
        return {"current_scale": self.current_scale}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.current_scale = float(state["current_scale"])


__all__ = ["KappaParams", "KappaSwiGLUExperts", "KappaDenseSwiGLU", "GRANULARITIES", "STATS_NAMES"]
