"""ExpertBudgetCallback: watch (and optionally hold) the SoftMoE global expert budget.

Every training step it
- checks the invariant Σ_l k_l = K of the model's `GlobalExpertBudget` (a broken invariant,
  e.g. from a corrupted checkpoint, stops the run with a message);
- measures the realised mean number of active experts per MoE layer after truncation
  (averaged over the logging window and across ranks), separately for train and validation;
- in `enforce` mode, runs a feedback controller on each layer's truncation threshold θ_l;
- optionally anneals the LapSum scale α and freezes the allocation η after a given step.

Controller (enforce): truncation keeps p ≥ τ = θ·k/E, so a larger θ keeps fewer experts.
Every `control_every` steps, with a_l the layer's realised active count averaged over those
steps and k_l its budgeted count,

    θ_l ← clip(θ_l · exp(gain · (a_l − k_l) / k_l), theta_min, theta_max),

a multiplicative integral controller: it moves θ_l up while the layer spends more experts
than budgeted, down while it spends fewer, and stops once |a_l − k_l| ≤ tolerance · k_l.
Holding every layer to its own k_l holds the total to K = Σ k_l. θ_l lives on the router
(saved in the model state) and the controller's accumulators in this callback's state, so
both survive checkpoint + resume. No gradient is touched.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch

from lit_moe.dtensor import full_tensor
from lit_moe.errors import ConfigError

Mode = Literal["off", "monitor", "enforce"]


class ExpertBudgetCallback(L.Callback):
    def __init__(self, mode: Mode = "monitor", tolerance: float = 0.05, gain: float = 0.5, control_every: int = 10,
                 theta_min: float = 0.0, theta_max: float = 20.0, alpha_start: float | None = None,
                 alpha_end: float | None = None, alpha_steps: int | None = None, freeze_eta_after: int | None = None,
                 invariant_atol: float = 1e-3):
        if mode not in ("off", "monitor", "enforce"):
            raise ConfigError(f"ExpertBudgetCallback: mode must be off, monitor or enforce, got {mode!r}.")
        if tolerance < 0 or gain <= 0 or control_every < 1 or not 0 <= theta_min < theta_max:
            raise ConfigError("ExpertBudgetCallback: need tolerance ≥ 0, gain > 0, control_every ≥ 1 and "
                              f"0 ≤ theta_min < theta_max (got {tolerance}, {gain}, {control_every}, "
                              f"{theta_min}, {theta_max}).")
        if (alpha_start is None) != (alpha_end is None) or (alpha_start is not None and min(alpha_start, alpha_end) <= 0):
            raise ConfigError("ExpertBudgetCallback: set both alpha_start and alpha_end (> 0) for an α schedule, or neither.")
        self.mode = mode
        self.tolerance = tolerance
        self.gain = gain
        self.control_every = control_every
        self.theta_min, self.theta_max = theta_min, theta_max
        self.alpha_start, self.alpha_end, self.alpha_steps = alpha_start, alpha_end, alpha_steps
        self.freeze_eta_after = freeze_eta_after
        self.invariant_atol = invariant_atol
        # Controller state: per-layer sums of realised active counts since the last update.
        self._active_sum: torch.Tensor | None = None
        self._active_steps = 0
        self._val_sum: torch.Tensor | None = None
        self._val_batches = 0

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _routers(pl_module: L.LightningModule) -> list[tuple[int, Any]]:
        return [(i, r) for i, r in pl_module.model.routers() if hasattr(r, "last_active")]

    def alpha_at(self, step: int, total_steps: int) -> float:
        """Cosine from alpha_start to alpha_end over alpha_steps (default: the whole run)."""
        span = max(1, self.alpha_steps or total_steps)
        progress = min(1.0, step / span)
        return self.alpha_end + (self.alpha_start - self.alpha_end) * 0.5 * (1 + math.cos(math.pi * progress))

    # -- training ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.mode != "off" and not self._routers(pl_module):
            raise ConfigError("ExpertBudgetCallback needs SoftTopKRouter layers; this model has none "
                              "(remove the callback or set its mode to off).")
        if self.alpha_start is not None and any(getattr(r, "learn_alpha", False) for _, r in self._routers(pl_module)):
            raise ConfigError("ExpertBudgetCallback: alpha_start/alpha_end schedule α, but the routers learn it "
                              "(learn_alpha: true); drop the schedule or set learn_alpha: false.")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.mode == "off":
            return
        step = trainer.global_step
        if self.alpha_start is not None:
            alpha = self.alpha_at(step, int(trainer.estimated_stepping_batches))
            for _, router in self._routers(pl_module):
                router.alpha = alpha
        budget = pl_module.model.budget
        if budget is not None and self.freeze_eta_after is not None and step >= self.freeze_eta_after:
            if budget.eta is not None and budget.eta.requires_grad:
                budget.eta.requires_grad_(False)  # AdamW skips parameters without gradients

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.mode == "off":
            return
        routers = self._routers(pl_module)
        budget = pl_module.model.budget
        # The invariant check reads Σ k_l on the host: at logging steps only, so a training
        # step does not wait for the device.
        if budget is not None and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            try:
                budget.check_invariant(self.invariant_atol)
            except RuntimeError as err:
                raise RuntimeError(f"expert budget invariant broken at step {trainer.global_step}: {err}. "
                                   f"The checkpoint or the budget parameters are corrupted.") from err
        active = torch.stack([r.last_active.float() for _, r in routers])
        # One all-reduce for the whole vector (mean over ranks); a no-op on one process.
        active = trainer.strategy.reduce(active, reduce_op="mean")
        self._active_sum = active if self._active_sum is None else self._active_sum + active
        self._active_steps += 1
        layer_k = pl_module.model.target_active_experts()
        # Only what can change: k_l under a learnable budget, θ under the enforce controller.
        # The target total K and a fixed k_l = K/L are params (`config/budget/*`).
        learned_k = budget is not None and budget.learnable
        for (i, router), k_l, a_l in zip(routers, layer_k, active):
            if learned_k:
                pl_module.log(f"budget/k/layer_{i:02d}", k_l)
            pl_module.log(f"budget/active/layer_{i:02d}", a_l)
            if self.mode == "enforce":
                pl_module.log(f"budget/theta/layer_{i:02d}", router.theta)
            if getattr(router, "learn_alpha", False):  # a device tensor: no host read here
                pl_module.log(f"budget/alpha/layer_{i:02d}", full_tensor(router.log_alpha).detach().exp()[0])
        pl_module.log("budget/active_total", active.sum())
        if self.mode == "enforce" and self._active_steps >= self.control_every:
            self._control(routers, layer_k, self._active_sum / self._active_steps)
            self._active_sum, self._active_steps = None, 0

    def _control(self, routers: list, layer_k: torch.Tensor, mean_active: torch.Tensor) -> None:
        for (_, router), k_l, a_l in zip(routers, layer_k.tolist(), mean_active.tolist()):
            error = (a_l - k_l) / k_l
            if abs(error) > self.tolerance:
                # θ = 0 is a fixed point of a multiplicative update; restart from a small value.
                theta = max(router.theta, 1e-3)
                router.theta = min(self.theta_max, max(self.theta_min, theta * math.exp(self.gain * error)))

    # -- validation ----------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_sum, self._val_batches = None, 0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.mode == "off" or trainer.sanity_checking:
            return
        active = torch.stack([r.last_active.float() for _, r in self._routers(pl_module)])
        self._val_sum = active if self._val_sum is None else self._val_sum + active
        self._val_batches += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_sum is None:
            return
        active = trainer.strategy.reduce(self._val_sum / self._val_batches, reduce_op="mean")
        for (i, _), a_l in zip(self._routers(pl_module), active):
            pl_module.log(f"budget/val/active/layer_{i:02d}", a_l)
        pl_module.log("budget/val/active_total", active.sum())

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"active_sum": None if self._active_sum is None else self._active_sum.cpu().tolist(),
                "active_steps": self._active_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sums = state_dict.get("active_sum")
        self._active_sum = None if sums is None else torch.tensor(sums)
        self._active_steps = int(state_dict.get("active_steps", 0))
