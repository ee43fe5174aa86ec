"""κ-SwiGLU expert banks and dense MLP (METHODS §3), trained with the reference recipe
(askerlee/kappa-swiglu, `nanochat/gpt.py` and `scripts/base_train.py`).

Inside expert e, for a pair with routing confidence s: act(g) = g·σ(κg), κ = U^tanh(b + a·s)
(`constant` confidence: κ = U^tanh(b·c), b only). b and a start at zero, so a fresh layer is
exactly the SwiGLU layer with the same weights.

    experts:
      class_path: lit_moe.moe.KappaSwiGLUExperts
      init_args: {granularity: per_gate, confidence: top_logit, max_scale: 3.0, reg_weight: 0.01,
                  lr_peak_scale: 0.4, lr_final_scale: 0.2, lr_delay_steps: 200, lr_warmup_steps: 1000}

b and a form their own AdamW group "kappa" (no weight decay) whose learning rate
`KappaLRSchedule` defines and `callbacks.KappaScheduleCallback` applies every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lit_moe.dtensor import full_tensor
from lit_moe.errors import ConfigError
from lit_moe.kappa import kappa_swiglu
from lit_moe.moe.confidence import CONFIDENCE_MODES, DEFAULT_GAIN, RouterOutputs, routing_confidence
from lit_moe.moe.experts import DenseSwiGLU, ExpertGroups, SwiGLUExperts

GRANULARITIES = ("per_gate", "per_expert", "per_layer", "global")
DENSE_GRANULARITIES = ("per_gate", "per_layer", "global")
# Pairs (of T·k) sampled per forward for the κ statistics.
STATS_SAMPLE = 256
STATS_NAMES = ("mean", "std", "min", "max", "corr")
# The reference's AdamW lr for b and a before its peak scale: 0.3 at d_model 768, ∝ d^−½.
REFERENCE_LR = 0.3
REFERENCE_WIDTH = 768


@dataclass(frozen=True)
class KappaLRSchedule:
    """Learning rate of the "kappa" group: base · m(step) · f(step), where m is the model's own
    lr multiplier (warmup, cosine/wsd) and f the κ factor of the reference:

        f = 0                                      for the first D = max(delay_steps, ⌈delay_fraction·T⌉) steps
        f = peak · (t − D) / W                     while t − D < W (W = warmup_steps)
        f = peak + (final − peak) · (t − D − W) / (T − D − W)   then, linearly to `final` at step T

    (D and W clipped to the run's T steps.) base: `lr`, or 0.3·(d_model/768)^−½ when None.
    """

    lr: float | None = None
    peak_scale: float = 0.4
    final_scale: float = 0.2
    delay_steps: int = 200
    delay_fraction: float = 0.05
    warmup_steps: int = 1000

    def check(self, owner: str) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"{owner}: lr must be > 0 (or null for 0.3·(d_model/768)^-1/2), got {self.lr}.")
        if not (self.peak_scale >= 0 and self.final_scale >= 0):
            raise ConfigError(f"{owner}: lr_peak_scale ({self.peak_scale}) and lr_final_scale ({self.final_scale}) "
                              f"must be ≥ 0.")
        if min(self.delay_steps, self.warmup_steps) < 0 or not 0 <= self.delay_fraction <= 1:
            raise ConfigError(f"{owner}: lr_delay_steps ({self.delay_steps}) and lr_warmup_steps ({self.warmup_steps}) "
                              f"must be ≥ 0 and lr_delay_fraction ({self.delay_fraction}) in [0, 1].")

    def base_lr(self, d_model: int) -> float:
        return self.lr if self.lr is not None else REFERENCE_LR * (d_model / REFERENCE_WIDTH) ** -0.5

    def delay(self, total: int) -> int:
        """Steps at lr 0 (also the delay of the U warm-up by default)."""
        return min(max(0, total), max(self.delay_steps, math.ceil(self.delay_fraction * total)))

    def factor(self, step: int, total: int) -> float:
        total = max(0, total)
        delay = self.delay(total)
        warmup = min(self.warmup_steps, total - delay)
        step = min(max(step, 0), total)
        if step < delay:
            return 0.0
        since = step - delay
        if warmup > 0 and since < warmup:
            return self.peak_scale * since / warmup
        rest = total - delay - warmup
        if rest <= 0:
            return self.peak_scale
        progress = min(since - warmup, rest) / rest
        return self.peak_scale + (self.final_scale - self.peak_scale) * progress


RMS_FLOOR_DEFAULTS = {"beta": 0.99, "anchor_start": 0.4, "anchor_end": 0.5, "floor_frac": 0.9}


class RmsFloor(nn.Module):
    """The reference's EMA-RMS floor (`GateProjBiasEmaTargetKeeper`) for one parameter tensor v.

    Every training step (`update`): ema ← β·ema + (1 − β)·rms(v) (the first value as is),
    rms(v) = √(mean v² + 1e-12). From ⌈anchor_start·T⌉ to ⌈anchor_end·T⌉ the target follows
    the EMA, then stays. Penalty (`loss`): relu(floor_frac·target − rms(v))², 0 before the
    anchor window starts: it keeps |v| from collapsing back to 0 once κ has moved.
    State is kept in buffers (saved with the model), flags as tensors: no host sync.
    """

    RMS_EPS = 1e-12

    def __init__(self, beta: float = 0.99, anchor_start: float = 0.4, anchor_end: float = 0.5,
                 floor_frac: float = 0.9):
        super().__init__()
        if not (0 <= beta < 1 and 0 <= anchor_start <= anchor_end <= 1 and floor_frac >= 0):
            raise ConfigError(f"rms_floor: need 0 ≤ beta < 1, 0 ≤ anchor_start ≤ anchor_end ≤ 1 and "
                              f"floor_frac ≥ 0; "
                              f"got beta={beta}, anchor_start={anchor_start}, anchor_end={anchor_end}, "
                              f"floor_frac={floor_frac}.")
        self.beta, self.anchor_start, self.anchor_end, self.floor_frac = beta, anchor_start, anchor_end, floor_frac
        self.register_buffer("ema_rms", torch.zeros(()))
        self.register_buffer("target_rms", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("target_ready", torch.zeros((), dtype=torch.bool))

    def _rms(self, value: Tensor) -> Tensor:
        return (value.float().square().mean() + self.RMS_EPS).sqrt()

    @torch.no_grad()
    def update(self, value: Tensor, step: int, total: int) -> None:
        rms = self._rms(value)
        self.ema_rms.copy_(torch.where(self.initialized, self.beta * self.ema_rms + (1 - self.beta) * rms, rms))
        self.initialized.fill_(True)
        total = max(1, total)
        start = min(max(math.ceil(total * self.anchor_start), 0), total)
        end = min(max(math.ceil(total * self.anchor_end), 0), total)
        if start <= step <= end:
            self.target_rms.copy_(self.ema_rms)
            self.target_ready.fill_(True)

    def loss(self, value: Tensor) -> Tensor:
        gap = torch.relu(self.target_rms * self.floor_frac - self._rms(value))
        return gap.square() * self.target_ready


def _kappa_group(*params: nn.Parameter) -> None:
    # Own AdamW group "kappa" (no weight decay; its lr is set by KappaScheduleCallback).
    for param in params:
        param.optim_group = "kappa"


class KappaParams(nn.Module):
    """b (and a) of κ = U^tanh(b + a·s): zero-initialised tables [rows, width], group "kappa".

    learn_scale False (`constant` confidence, dense layers): only b, and z = b·s.
    Regulariser: λ_b·mean b² + λ_a·mean a² (`kappa/reg`), plus with `rms_floor` the EMA-RMS
    floor penalties weighted alike (`kappa/rms_floor`).
    `shared_across_layers` (granularity `global`): the Transformer ties every κ layer's
    instance (MoE and dense) to one, like tied embeddings, so the pair is counted, optimised
    and regularised once.
    """

    def __init__(self, rows: int, width: int, reg_weight: float, scale_reg_weight: float | None = None,
                 learn_scale: bool = True, shared_across_layers: bool = False,
                 rms_floor: dict[str, float] | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(rows, width))
        self.scale = nn.Parameter(torch.zeros(rows, width)) if learn_scale else None
        _kappa_group(*self.tables())
        self.reg_weight = reg_weight
        self.scale_reg_weight = reg_weight if scale_reg_weight is None else scale_reg_weight
        self.shared_across_layers = shared_across_layers
        self.floors = None
        if rms_floor is not None:
            options = {**RMS_FLOOR_DEFAULTS, **rms_floor}
            self.floors = nn.ModuleList(RmsFloor(**options) for _ in self.tables())

    def tables(self) -> list[nn.Parameter]:
        return [self.bias] if self.scale is None else [self.bias, self.scale]

    def reset_parameters(self) -> None:
        for table in self.tables():
            nn.init.zeros_(table)

    def z(self, rows: Tensor, s: Tensor) -> Tensor:
        """b + a·s (b·s without a) for table rows `rows` [N] and confidences s [N, 1]."""
        bias = full_tensor(self.bias)[rows]
        if self.scale is None:
            return bias * s
        return torch.addcmul(bias, full_tensor(self.scale)[rows], s)

    @torch.no_grad()
    def update_floors(self, step: int, total: int) -> None:
        if self.floors is not None:
            for floor, table in zip(self.floors, self.tables()):
                floor.update(full_tensor(table), step, total)

    def regularization_losses(self) -> dict[str, Tensor]:
        """Summed over layers by the Transformer and added to the loss."""
        # full_tensor: called after forward, when FSDP2 has resharded b and a.
        tables = [full_tensor(t) for t in self.tables()]
        weights = [self.reg_weight, self.scale_reg_weight][:len(tables)]
        losses = {"kappa/reg": sum(w * t.square().mean() for w, t in zip(weights, tables))}
        if self.floors is not None:
            losses["kappa/rms_floor"] = sum(w * f.loss(t) for w, f, t in zip(weights, self.floors, tables))
        return losses


def _check_common(max_scale: float, reg_weight: float, scale_reg_weight: float | None, start_layer: int,
                  owner: str) -> None:
    if start_layer < 0:
        raise ConfigError(f"{owner}: start_layer must be ≥ 0, got {start_layer}.")
    if not max_scale > 1:
        raise ConfigError(f"{owner}: max_scale (U) must be > 1, got {max_scale} (κ stays in (1/U, U); "
                          f"U = 1 is plain SwiGLU).")
    if not reg_weight >= 0 or (scale_reg_weight is not None and not scale_reg_weight >= 0):
        raise ConfigError(f"{owner}: reg_weight (λ_b, {reg_weight}) and scale_reg_weight (λ_a, {scale_reg_weight}) "
                          f"must be ≥ 0.")


class _KappaLayerOptions:
    """What κ experts and the κ dense MLP share: U and its warm-up state, the lr schedule of
    the kappa group, and the start layer (κ off in blocks before it)."""

    kappa: KappaParams | None
    max_scale: float
    current_scale: float
    lr_schedule: KappaLRSchedule
    start_layer: int = 0
    d_model: int

    @property
    def kappa_active(self) -> bool:
        return self.kappa is not None

    def set_layer_index(self, index: int) -> None:
        """Called by the Transformer with the block index: before `start_layer` the layer drops
        b and a and runs plain SwiGLU (the reference's `--kappa-start-layer`)."""
        if index < self.start_layer:
            self.kappa = None

    def get_extra_state(self) -> dict[str, float]:
        return {"current_scale": self.current_scale}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.current_scale = float(state["current_scale"])


def _lr_schedule(owner: str, **options: Any) -> KappaLRSchedule:
    schedule = KappaLRSchedule(**options)
    schedule.check(owner)
    return schedule


class KappaSwiGLUExperts(_KappaLayerOptions, SwiGLUExperts):
    """SwiGLU experts whose gate sharpness κ follows each pair's routing confidence.

    Args:
        granularity: shape of b and a: per_gate [E, h], per_expert [E], per_layer [1], or
            global (one pair shared by all κ layers of the model, dense ones included).
        confidence: how s is derived from the router's outputs (`lit_moe.moe.confidence`):
            top_logit, logit_norm, cosine, router_weight or constant.
        confidence_scale: the gain on that confidence; None: the reference's (top_logit 0.3,
            logit_norm 6, cosine 6, router_weight 2, constant 1). For constant it is c.
        confidence_norm_exponent, confidence_norm_eps: logit_norm's α (1: full normalisation
            by ‖W_r,e‖, 0: none) and ε (reference defaults 0.5, 1e-4).
        confidence_grad_scale: factor on the gradient from s back into the router,
            s = s̄ + g·(s − s̄) with s̄ detached (1: full gradient, 0: detached).
        max_scale: final U (κ ∈ (1/U, U)). `current_scale` is the U in use, a plain float
            that KappaScheduleCallback warms up from 1; saved in the state dict.
        reg_weight, scale_reg_weight: λ_b and λ_a of λ_b·mean b² + λ_a·mean a²
            (scale_reg_weight None: = reg_weight, the reference's default multiplier 1).
        rms_floor: None, or the EMA-RMS floor regulariser's options {beta, anchor_start,
            anchor_end, floor_frac} (`{}`: the reference defaults 0.99, 0.4, 0.5, 0.9).
        lr, lr_peak_scale, lr_final_scale, lr_delay_steps, lr_delay_fraction, lr_warmup_steps:
            the kappa group's learning rate (`KappaLRSchedule`; reference defaults). Every κ
            layer of a model must give the same values.
        start_layer: blocks before this index run plain SwiGLU experts (no b, a).
        fused: compile the κ elementwise math into one kernel per direction (`kappa_swiglu`'s
            `fused`): several times faster than eager, at a one-off compile per process.

    `kappa_statistics()`: κ mean/std/min/max over the (pair, unit) entries of up to 256
    evenly spaced pairs of the last forward, and the correlation between the pairs'
    confidence and their mean κ. The forward only keeps the sample (two small gathers, no
    host sync); the statistics are computed when asked, i.e. when they are logged.
    """

    def __init__(self, d_model: int, hidden: int, num_experts: int, granularity: str = "per_gate",
                 confidence: str = "top_logit", confidence_scale: float | None = None,
                 confidence_norm_exponent: float = 0.5, confidence_norm_eps: float = 1e-4,
                 confidence_grad_scale: float = 0.1, max_scale: float = 3.0, reg_weight: float = 0.01,
                 scale_reg_weight: float | None = None, rms_floor: dict[str, float] | None = None,
                 lr: float | None = None, lr_peak_scale: float = 0.4, lr_final_scale: float = 0.2,
                 lr_delay_steps: int = 200, lr_delay_fraction: float = 0.05, lr_warmup_steps: int = 1000,
                 start_layer: int = 0, fused: bool = False):
        name = type(self).__name__
        if granularity not in GRANULARITIES:
            raise ConfigError(f"{name}: unknown granularity {granularity!r}; choose one of {list(GRANULARITIES)}.")
        if confidence not in CONFIDENCE_MODES:
            raise ConfigError(f"{name}: unknown confidence {confidence!r}; choose one of {list(CONFIDENCE_MODES)}.")
        if not 0 <= confidence_grad_scale <= 1:
            raise ConfigError(f"{name}: confidence_grad_scale must lie in [0, 1], got {confidence_grad_scale}.")
        if confidence_scale is not None and not math.isfinite(confidence_scale):
            raise ConfigError(f"{name}: confidence_scale must be finite, got {confidence_scale}.")
        if not (0 <= confidence_norm_exponent <= 1 and confidence_norm_eps >= 0):
            raise ConfigError(f"{name}: confidence_norm_exponent must lie in [0, 1] and confidence_norm_eps be ≥ 0, "
                              f"got {confidence_norm_exponent} and {confidence_norm_eps}.")
        _check_common(max_scale, reg_weight, scale_reg_weight, start_layer, name)
        self.lr_schedule = _lr_schedule(name, lr=lr, peak_scale=lr_peak_scale, final_scale=lr_final_scale,
                                        delay_steps=lr_delay_steps, delay_fraction=lr_delay_fraction,
                                        warmup_steps=lr_warmup_steps)
        super().__init__(d_model, hidden, num_experts)
        self.d_model = d_model
        self.granularity = granularity
        self.confidence_mode = confidence
        self.confidence_scale = DEFAULT_GAIN[confidence] if confidence_scale is None else float(confidence_scale)
        self.confidence_norm_exponent = float(confidence_norm_exponent)
        self.confidence_norm_eps = float(confidence_norm_eps)
        self.confidence_grad_scale = float(confidence_grad_scale)
        self.max_scale = float(max_scale)
        self.current_scale = float(max_scale)
        self.start_layer = start_layer
        self.fused = fused
        rows = num_experts if granularity in ("per_gate", "per_expert") else 1
        # `constant` learns b only (b + a·c would be a redundant pair): κ = U^tanh(b·c).
        self.kappa = KappaParams(rows, hidden if granularity == "per_gate" else 1, reg_weight, scale_reg_weight,
                                 learn_scale=confidence != "constant", shared_across_layers=granularity == "global",
                                 rms_floor=rms_floor)
        self._stats_sample: tuple[Tensor, Tensor, Tensor] | None = None

    def set_layer_index(self, index: int) -> None:
        super().set_layer_index(index)
        if not self.kappa_active:
            self.confidence_mode = None  # the MoE layer then computes no confidence

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        super().reset_parameters(std, out_std)
        if getattr(self, "kappa", None) is not None:  # the base constructor calls this before `kappa` exists
            self.kappa.reset_parameters()

    def routing_confidence(self, routed: RouterOutputs) -> Tensor:
        """Unscaled confidence [T, E] of this layer's mode (the gain comes in `pair_confidence`)."""
        return routing_confidence(self.confidence_mode, routed, self.confidence_norm_exponent, self.confidence_norm_eps)

    def pair_confidence(self, confidence: Tensor) -> Tensor:
        """Unscaled confidence per pair [N] → s [N, 1] fp32: times the gain, its router
        gradient scaled."""
        s = confidence.float().unsqueeze(-1) * self.confidence_scale
        if self.confidence_grad_scale == 0:
            return s.detach()
        if self.confidence_grad_scale < 1:
            # Same value, gradient × g: the router learns from κ only gently.
            s = s.detach() + self.confidence_grad_scale * (s - s.detach())
        return s

    def activation(self, gate: Tensor, confidence: Tensor | None = None, expert: int | Tensor | None = None) -> Tensor:
        if not self.kappa_active:
            return super().activation(gate)
        if confidence is None:
            raise ValueError(f"{type(self).__name__} needs each pair's confidence (the MoE layer passes it).")
        bias, scale, index = self.kappa.bias, self.kappa.scale, None
        if scale is None:
            # b only: z = b·c as b·c + 0·s (the confidence is the constant c everywhere).
            bias, scale = bias * self.confidence_scale, bias.new_zeros(bias.shape[0], 1)
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
        if not self.kappa_active:
            return super().forward(x_sorted, groups)
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
        if self._stats_sample is None or not self.kappa_active:
            return None
        conf, expert, valid = self._stats_sample
        # Skipped pairs (SoftMoE's zero weights) are no κ anybody used: the static-shape
        # sample drops them here, when the statistics are read.
        conf, expert = conf[valid], expert[valid]
        z = self.kappa.z(expert, conf)
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


class KappaDenseSwiGLU(_KappaLayerOptions, DenseSwiGLU):
    """Dense SwiGLU with the constant-input κ of METHODS §3: κ = U_d^tanh(b·c), b zero-init.

    Chosen with `model.config.dense_mlp: {class_path: lit_moe.moe.KappaDenseSwiGLU}` (the
    reference's `--constant-kappa-dense-layers`). granularity: per_gate (b [h]), per_layer
    (b [1]) or global (one b shared with every κ layer of the model, the MoE experts' `global`
    b included). U_d defaults to the reference's dense value 2; `current_scale` is warmed up
    by KappaScheduleCallback like the experts' and saved in the state dict. reg_weight,
    rms_floor, the lr options, start_layer and fused: as for `KappaSwiGLUExperts`.
    """

    def __init__(self, d_model: int, hidden: int, granularity: str = "per_gate", max_scale: float = 2.0,
                 constant: float = 1.0, reg_weight: float = 0.01, rms_floor: dict[str, float] | None = None,
                 lr: float | None = None, lr_peak_scale: float = 0.4, lr_final_scale: float = 0.2,
                 lr_delay_steps: int = 200, lr_delay_fraction: float = 0.05, lr_warmup_steps: int = 1000,
                 start_layer: int = 0, fused: bool = False):
        name = type(self).__name__
        if granularity not in DENSE_GRANULARITIES:
            raise ConfigError(f"{name}: unknown granularity {granularity!r}; choose one of "
                              f"{list(DENSE_GRANULARITIES)}.")
        if not math.isfinite(constant):
            raise ConfigError(f"{name}: constant must be finite, got {constant}.")
        _check_common(max_scale, reg_weight, None, start_layer, name)
        self.lr_schedule = _lr_schedule(name, lr=lr, peak_scale=lr_peak_scale, final_scale=lr_final_scale,
                                        delay_steps=lr_delay_steps, delay_fraction=lr_delay_fraction,
                                        warmup_steps=lr_warmup_steps)
        super().__init__(d_model, hidden)
        self.d_model = d_model
        self.granularity = granularity
        self.kappa = KappaParams(1, hidden if granularity == "per_gate" else 1, reg_weight, learn_scale=False,
                                 shared_across_layers=granularity == "global", rms_floor=rms_floor)
        self.constant = float(constant)
        self.fused = fused
        self.start_layer = start_layer
        self.max_scale = float(max_scale)
        self.current_scale = float(max_scale)

    def forward(self, x: Tensor) -> Tensor:
        if not self.kappa_active:
            return super().forward(x)
        gate = self.gate(x)
        # κ = U^tanh(0 + b·c): the generic function with bias 0 and confidence c. A shared
        # (`global`) module may also hold the experts' a, unused here.
        act = kappa_swiglu(gate, gate.new_full((1,), self.constant, dtype=torch.float32),
                           gate.new_zeros((), dtype=torch.float32), self.kappa.bias[0], self.current_scale,
                           fused=self.fused)
        return self.down(act * self.up(x))


__all__ = ["KappaLRSchedule", "KappaParams", "KappaSwiGLUExperts", "KappaDenseSwiGLU", "RmsFloor", "GRANULARITIES",
           "STATS_NAMES"]
