"""Small MLflow helpers shared by callbacks: the logger, the step axis, artifacts that never
crash a fit."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger


class MLflowRunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, less its clutter:

    - `epoch`, which Lightning adds to every batch of logged metrics, is logged only when it
      changes (a steps-based run shows it once, then at each new pass over the data);
    - hyperparameters whose value is None are not logged (absent means unset).
    Everything else is Lightning's logger unchanged (`trainer.logger.init_args` as usual).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._last_epoch: float | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = dict(metrics)
        if "epoch" in metrics:
            epoch = float(metrics["epoch"])
            if epoch == self._last_epoch:
                del metrics["epoch"]
            else:
                self._last_epoch = epoch
        if metrics:
            super().log_metrics(metrics, step)

    def log_hyperparams(self, params: Any) -> None:
        flat = _flatten_dict(_convert_params(params))
        super().log_hyperparams({key: value for key, value in flat.items() if value is not None})


def logging_step(trainer: L.Trainer, after_training: bool = False) -> int:
    """The MLflow step of what is logged now: Lightning's own label for `self.log` values, the
    0-based index of the optimizer step being taken (`train/loss` of the 300th step and the
    validation run after it are both at step 299). Lightning advances that counter only after
    a batch's hooks and validation; once training has ended (`after_training`) it is one past
    the last batch's label."""
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
    return max(0, step - 1) if after_training else step


def mlflow_loggers(trainer: L.Trainer) -> list[MLFlowLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]


def log_text_artifact(trainer: L.Trainer, text: str, artifact_file: str) -> None:
    """Write `text` as an artifact of every MLflow run of this trainer (rank 0 only)."""
    if not trainer.is_global_zero:
        return
    for logger in mlflow_loggers(trainer):
        try:
            logger.experiment.log_text(logger.run_id, text, artifact_file)
        except Exception as err:  # artifacts are a convenience: never kill training for them
            warnings.warn(f"could not log artifact {artifact_file} to MLflow: {err}", stacklevel=2)


def log_file_artifact(trainer: L.Trainer, path: str, artifact_path: str | None = None) -> None:
    if not trainer.is_global_zero:
        return
    for logger in mlflow_loggers(trainer):
        try:
            logger.experiment.log_artifact(logger.run_id, path, artifact_path)
        except Exception as err:
            warnings.warn(f"could not log artifact {path} to MLflow: {err}", stacklevel=2)


def set_tags(trainer: L.Trainer, tags: dict[str, Any]) -> None:
    if not trainer.is_global_zero:
        return
    for logger in mlflow_loggers(trainer):
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, str(value))



__all__ = ["MLflowRunLogger", "logging_step", "mlflow_loggers", "log_text_artifact", "log_file_artifact", "set_tags"]
