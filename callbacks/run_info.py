"""Record what a run needs to be found again: parameter counts and checkpoint paths."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor

from callbacks.mlflow_utils import set_tags


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
    """Lightning's ThroughputMonitor for token-window batches [B, seq_len + 1].

    Logs `throughput/items_per_sec` = tokens/s, and MFU on GPUs whose peak FLOPs Lightning
    knows (from `LitMoE.flops_per_batch`, computed from active parameters).
    """

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=lambda batch: batch.shape[0],
                         length_fn=lambda batch: batch.shape[0] * (batch.shape[1] - 1), window_size=window_size)
