"""Small MLflow helpers shared by callbacks: find the run, log artifacts without crashing fit."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger


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



__all__ = ["mlflow_loggers", "log_text_artifact", "log_file_artifact", "set_tags"]
