"""KappaScheduleCallback: the κ-SwiGLU training schedule (METHODS §3) and its logging.

Every training batch, before forward:
- U warmup: each κ module's `current_scale` goes linearly from 1 to its final U over
  `warmup_fraction` of training, after `delay_steps` at U = 1 (plain SwiGLU);
- lr delay of the "kappa" parameter group (b, a): 0 for the first
  max(lr_delay_steps, ⌈lr_delay_fraction · total⌉) steps, then a linear ramp over
  `lr_ramp_steps` to the normal schedule.

How the lr delay composes with LitMoE's LambdaLR: the scheduler sets every group's lr to
base_lr · multiplier(step) at each step, so this callback sets the kappa group's lr to
(the scheduler's last lr for that group) · factor in `on_train_batch_start`, which runs after
the scheduler's step for the previous batch and before this batch's optimizer step. Reading
the scheduler's `get_last_lr()` (restored from the checkpoint) rather than multiplying the
current lr means the factor never compounds, also across a resume.

After training batches it logs `kappa/layer_XX/{mean,std,min,max,corr}` (the experts'
sampled κ statistics, device tensors; on the steps the logger records), `kappa/max_scale`
and `kappa/lr_factor`.
The schedule's length (total steps) is fixed at the first fit start and saved in the
callback's state, so a resumed run continues the same schedule; U itself is saved in the
model's state dict.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from torch import nn

from lit_moe.errors import ConfigError
from lit_moe.moe.kappa_experts import STATS_NAMES, KappaDenseSwiGLU, KappaSwiGLUExperts


class KappaScheduleCallback(L.Callback):
    """Args:
        max_scale: final U for every κ module; None: each module's configured `max_scale`
            (the experts' / dense MLP's init_args), which avoids two sources of truth.
        warmup_fraction: share of training over which U rises from 1 to its final value.
        delay_steps: steps at U = 1 before the warmup starts.
        lr_delay_steps, lr_delay_fraction: the kappa group's lr is 0 for the first
            max(lr_delay_steps, ⌈lr_delay_fraction · total⌉) steps.
        lr_ramp_steps: then its factor rises linearly from 1/lr_ramp_steps to 1.
    """

    def __init__(self, max_scale: float | None = None, warmup_fraction: float = 0.15, delay_steps: int = 0,
                 lr_delay_steps: int = 200, lr_delay_fraction: float = 0.05, lr_ramp_steps: int = 100):
        if max_scale is not None and not max_scale > 1:
            raise ConfigError(f"KappaScheduleCallback: max_scale must be > 1 (or null), got {max_scale}.")
        if not 0 <= warmup_fraction <= 1 or not 0 <= lr_delay_fraction <= 1:
            raise ConfigError(f"KappaScheduleCallback: warmup_fraction ({warmup_fraction}) and lr_delay_fraction "
                              f"({lr_delay_fraction}) must lie in [0, 1].")
        if min(delay_steps, lr_delay_steps, lr_ramp_steps) < 0:
            raise ConfigError(f"KappaScheduleCallback: delay_steps ({delay_steps}), lr_delay_steps "
                              f"({lr_delay_steps}) and lr_ramp_steps ({lr_ramp_steps}) must be ≥ 0.")
        self.max_scale = max_scale
        self.warmup_fraction = warmup_fraction
        self.delay_steps = delay_steps
        self.lr_delay_steps = lr_delay_steps
        self.lr_delay_fraction = lr_delay_fraction
        self.lr_ramp_steps = lr_ramp_steps
        self.total_steps: int | None = None
        self.last_lr_factor: float | None = None

    # -- schedule values (pure functions of the step) ------------------------------------------
    def scale_progress(self, step: int, total: int) -> float:
        """Fraction of the U warmup done at `step` (0 during the delay, 1 afterwards)."""
        if step < self.delay_steps:
            return 0.0
        warmup = round(self.warmup_fraction * total)
        return 1.0 if warmup == 0 else min(1.0, (step - self.delay_steps) / warmup)

    def max_scale_at(self, step: int, total: int, final: float) -> float:
        """U at `step`: linear from 1 to `final`."""
        return 1.0 + (final - 1.0) * self.scale_progress(step, total)

    def lr_delay(self, total: int) -> int:
        return max(self.lr_delay_steps, math.ceil(self.lr_delay_fraction * total))

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the kappa group's scheduled lr at `step`."""
        delay = self.lr_delay(total)
        if step < delay:
            return 0.0
        return 1.0 if self.lr_ramp_steps == 0 else min(1.0, (step - delay + 1) / self.lr_ramp_steps)

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def kappa_modules(pl_module: L.LightningModule) -> list[nn.Module]:
        return [m for m in pl_module.modules() if isinstance(m, (KappaSwiGLUExperts, KappaDenseSwiGLU))]

    @staticmethod
    def _scheduled_lr(trainer: L.Trainer, optimizer: Any, index: int, group: dict[str, Any]) -> float:
        """The lr the scheduler gave this group for the current step (before our factor)."""
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is optimizer:
                return config.scheduler.get_last_lr()[index]
        # No scheduler: the group's own lr, remembered once (it travels with the optimizer state).
        return group.setdefault("kappa_unscaled_lr", group["lr"])

    # -- hooks ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.kappa_modules(pl_module):
            raise ConfigError("KappaScheduleCallback needs κ-SwiGLU layers (experts lit_moe.moe.KappaSwiGLUExperts "
                              "or dense_mlp lit_moe.moe.KappaDenseSwiGLU); this model has none.")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.total_steps is None:  # restored from the checkpoint on resume
            self.total_steps = max(1, int(trainer.estimated_stepping_batches))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step, total = trainer.global_step, self.total_steps or max(1, int(trainer.estimated_stepping_batches))
        for module in self.kappa_modules(pl_module):
            final = module.max_scale if self.max_scale is None else self.max_scale
            module.current_scale = self.max_scale_at(step, total, final)
        factor = self.lr_factor(step, total)
        for optimizer in trainer.optimizers:
            for index, group in enumerate(optimizer.param_groups):
                if group.get("name") == "kappa":
                    group["lr"] = self._scheduled_lr(trainer, optimizer, index, group) * factor
        self.last_lr_factor = factor

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Statistics cost a few small kernels per layer: computed only on steps the logger
        # records (Lightning logs when the stepped-batch count is a multiple of the interval).
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            for i, layer in pl_module.model.moe_layers():
                if isinstance(layer.experts, KappaSwiGLUExperts):
                    stats = layer.experts.kappa_statistics()
                    for name, value in zip(STATS_NAMES, stats):
                        pl_module.log(f"kappa/layer_{i:02d}/{name}", value)
        modules = self.kappa_modules(pl_module)
        pl_module.log("kappa/max_scale", max(m.current_scale for m in modules))
        pl_module.log("kappa/lr_factor", float(self.last_lr_factor or 0.0))

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "last_lr_factor": self.last_lr_factor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_steps = state_dict.get("total_steps")
        self.last_lr_factor = state_dict.get("last_lr_factor")
