"""KappaScheduleCallback: the κ-SwiGLU training schedule (METHODS §3) and its logging.

Every training batch, before forward:
- κ learning rate: the "kappa" parameter group (b, a) gets
  base · m(step) · f(step) — base and f from the κ layers' `KappaLRSchedule` (reference
  defaults: base 0.3·(d/768)^−½, f = 0 for max(200 steps, 5%), warmed up to 0.4 over 1000
  steps, then linear to 0.2 at the end), m the model's own lr multiplier (warmup, cosine/wsd);
- U warm-up: each κ module's `current_scale` goes linearly from 1 to its final U over
  ⌈warmup_fraction · total⌉ steps, after a delay that is the κ-lr delay unless `delay_steps`
  is given (plain SwiGLU until then);
- EMA-RMS floors (κ layers with `rms_floor`): their EMA and anchored target are updated.

How the κ lr composes with LitMoE's LambdaLR: the scheduler sets every group's lr to
initial_lr · m(step) at each step, so this callback sets the kappa group's lr from the
scheduler's last lr for that group divided by its initial_lr (= m, restored from the
checkpoint on resume), in `on_train_batch_start`, which runs after the scheduler's step for
the previous batch and before this batch's optimizer step. Nothing compounds, and every value
is a function of the step and the saved schedule length, so a resumed run continues exactly.

It logs the κ group's learning rate as `lr-AdamW/kappa` (the model's own groups follow
`train/lr`) and, after training batches, `kappa/layer_XX/{mean,std,min,max,corr}` (the experts'
sampled κ statistics, device tensors; on the steps the logger records), `kappa/max_scale`
and `kappa/lr_factor` (f). The schedule's length (total steps) is fixed at the first fit start
and saved in the callback's state; U itself and the floors' state are saved in the model's.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from torch import nn

from lit_moe.errors import ConfigError
from lit_moe.moe.kappa_experts import STATS_NAMES, KappaDenseSwiGLU, KappaLRSchedule, KappaSwiGLUExperts


class KappaScheduleCallback(L.Callback):
    """Args:
        max_scale: final U for every κ module; None: each module's configured `max_scale`
            (the experts' / dense MLP's init_args), which avoids two sources of truth.
        warmup_fraction: share of training over which U rises from 1 to its final value.
        delay_steps: steps at U = 1 before the warm-up starts; None: the κ-lr delay
            max(lr_delay_steps, ⌈lr_delay_fraction · total⌉) of the κ layers (reference).

    The κ-lr schedule itself is configured on the κ layers (experts / dense MLP init_args).
    """

    def __init__(self, max_scale: float | None = None, warmup_fraction: float = 0.15, delay_steps: int | None = None):
        if max_scale is not None and not max_scale > 1:
            raise ConfigError(f"KappaScheduleCallback: max_scale must be > 1 (or null), got {max_scale}.")
        if not 0 <= warmup_fraction <= 1:
            raise ConfigError(f"KappaScheduleCallback: warmup_fraction must lie in [0, 1], got {warmup_fraction}.")
        if delay_steps is not None and delay_steps < 0:
            raise ConfigError(f"KappaScheduleCallback: delay_steps must be ≥ 0 (or null), got {delay_steps}.")
        self.max_scale = max_scale
        self.warmup_fraction = warmup_fraction
        self.delay_steps = delay_steps
        self.total_steps: int | None = None
        self.last_lr_factor: float | None = None

    # -- schedule values (pure functions of the step) ------------------------------------------
    def scale_delay(self, total: int, schedule: KappaLRSchedule) -> int:
        return schedule.delay(total) if self.delay_steps is None else self.delay_steps

    def scale_progress(self, step: int, total: int, schedule: KappaLRSchedule) -> float:
        """Fraction of the U warm-up done at `step` (0 during the delay, 1 afterwards)."""
        delay = self.scale_delay(total, schedule)
        if step < delay:
            return 0.0
        warmup = math.ceil(self.warmup_fraction * total)
        return 1.0 if warmup == 0 else min(step - delay, warmup) / warmup

    def max_scale_at(self, step: int, total: int, final: float, schedule: KappaLRSchedule) -> float:
        """U at `step`: linear from 1 to `final`."""
        return 1.0 + (final - 1.0) * self.scale_progress(step, total, schedule)

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def kappa_modules(pl_module: L.LightningModule) -> list[nn.Module]:
        """The κ layers that have b (those before their start layer run plain SwiGLU)."""
        return [m for m in pl_module.modules()
                if isinstance(m, (KappaSwiGLUExperts, KappaDenseSwiGLU)) and m.kappa_active]

    @staticmethod
    def lr_schedule(modules: list[nn.Module]) -> tuple[KappaLRSchedule, float]:
        """The κ layers' common lr schedule and base lr (one "kappa" group: one schedule)."""
        settings = {(m.lr_schedule, m.lr_schedule.base_lr(m.d_model)) for m in modules}
        if len(settings) != 1:
            raise ConfigError(f"κ layers disagree on the kappa group's lr schedule ({sorted(map(str, settings))}); "
                              f"give the experts and dense_mlp the same lr_* options.")
        return next(iter(settings))

    @staticmethod
    def _lr_multiplier(trainer: L.Trainer, optimizer: Any, index: int, group: dict[str, Any]) -> float:
        """The model's lr multiplier m at the current step, from the scheduler's last lr."""
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is optimizer:
                return config.scheduler.get_last_lr()[index] / group["initial_lr"]
        return 1.0

    # -- hooks ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        modules = self.kappa_modules(pl_module)
        if not modules:
            raise ConfigError("KappaScheduleCallback needs κ-SwiGLU layers (experts lit_moe.moe.KappaSwiGLUExperts "
                              "or dense_mlp lit_moe.moe.KappaDenseSwiGLU); this model has none.")
        self.lr_schedule(modules)  # refuse disagreeing layers before the first step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.total_steps is None:  # restored from the checkpoint on resume
            self.total_steps = max(1, int(trainer.estimated_stepping_batches))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step, total = trainer.global_step, self.total_steps or max(1, int(trainer.estimated_stepping_batches))
        modules = self.kappa_modules(pl_module)
        schedule, base_lr = self.lr_schedule(modules)
        for module in modules:
            final = module.max_scale if self.max_scale is None else self.max_scale
            module.current_scale = self.max_scale_at(step, total, final, schedule)
        for params in {id(m.kappa): m.kappa for m in modules}.values():  # a shared (global) b, a once
            params.update_floors(step, total)
        factor = schedule.factor(step, total)
        for optimizer in trainer.optimizers:
            for index, group in enumerate(optimizer.param_groups):
                if group.get("name") == "kappa":
                    group["lr"] = base_lr * self._lr_multiplier(trainer, optimizer, index, group) * factor
                    # Here, not after the step: the model's scheduler then resets the group's lr.
                    pl_module.log("lr-AdamW/kappa", float(group["lr"]))
        self.last_lr_factor = factor

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Statistics cost a few small kernels per layer: computed only on steps the logger
        # records (Lightning logs when the stepped-batch count is a multiple of the interval).
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            for i, layer in pl_module.model.moe_layers():
                if isinstance(layer.experts, KappaSwiGLUExperts) and layer.experts.kappa_active:
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
