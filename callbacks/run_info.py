"""Record what a run needs to be found again (parameter counts, checkpoint paths), and its
throughput and model-FLOPs utilisation."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from callbacks.mlflow_utils import set_tags
from lit_moe.model import Transformer


class RunInfoCallback(L.Callback):
    """Logs total/active parameter counts at fit start and best/last checkpoint paths at fit end."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = pl_module.model.num_params()
        for logger in trainer.loggers:
            logger.log_hyperparams({"params/total": counts["total"], "params/active": counts["active"]})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                set_tags(trainer, {"checkpoint/best": callback.best_model_path,
                                   "checkpoint/last": callback.last_model_path,
                                   "checkpoint/dir": callback.dirpath})


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor for token-window batches [B, seq_len + 1], with MFU.

    Logs Lightning's throughput metrics (tokens/s as items_per_sec) and `throughput/mfu`: the
    model FLOP/s of one device ÷ its peak. FLOPs per batch come from the experts the routers
    actually used over their current counter window (`lit_moe.flops`), not the design k.

    Args:
        window_size: batches averaged per measurement.
        peak_flops: peak FLOP/s of one device, overriding the lookup (any device, CPUs too).
            Default: `lit_moe.flops.PEAK_BF16_FLOPS` for bf16/fp16 runs on H100/H200/B200/A100
            (dense tensor-core peaks; Lightning's own table misses e.g. "NVIDIA H200"), else
            Lightning's table.
    """

    def __init__(self, window_size: int = 20, peak_flops: float | None = None):
        if peak_flops is not None and peak_flops <= 0:
            from lit_moe.errors import ConfigError

            raise ConfigError(f"TokenThroughputMonitor.peak_flops must be > 0 FLOP/s, got {peak_flops}.")
        super().__init__(batch_size_fn=lambda batch: batch.shape[0],
                         length_fn=lambda batch: batch.shape[0] * (batch.shape[1] - 1), window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # As ThroughputMonitor.setup, with our peak (its lookup warns for chips it lacks).
        dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
        self.available_flops = self._peak(trainer.strategy.root_device, dtype)
        if stage == TrainerFn.FITTING and trainer.enable_validation:
            self._throughputs[RunningStage.VALIDATING] = Throughput(
                available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs)
        self._throughputs[trainer.state.stage] = Throughput(
            available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs)

    def _peak(self, device: torch.device, dtype: torch.dtype) -> float | None:
        from lit_moe.flops import peak_bf16_flops

        if self.peak_flops is not None:
            return float(self.peak_flops)
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
            peak = peak_bf16_flops(torch.cuda.get_device_name(device))
            if peak is not None:
                return peak
        if device.type == "cpu":
            return None  # no peak for CPUs unless given
        return get_available_flops(device, dtype)

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        model = getattr(pl_module, "model", None)
        if (self.available_flops and trainer.state.stage == RunningStage.TRAINING
                and isinstance(model, Transformer) and isinstance(batch, torch.Tensor)):
            from lit_moe.flops import flops_per_token, realised_active_experts

            tokens = batch.shape[0] * (batch.shape[1] - 1)
            pl_module.flops_per_batch = flops_per_token(model, realised_active_experts(model)) * tokens
        super()._update(trainer, pl_module, batch, iter_num)

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        super()._compute(trainer, iter_num)
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING or not trainer._logger_connector.should_update_logs:
            return
        throughput = self._throughputs[stage]
        mfu = throughput.compute().get(f"device{throughput.separator}mfu")
        if mfu is not None:
            trainer._logger_connector.log_metrics({"throughput/mfu": mfu}, step=iter_num)
