"""CORE evaluation during training: at the end of fit, and optionally every N steps.

    trainer:
      callbacks:
        - class_path: callbacks.core_eval.CoreEvalCallback
          init_args: {limit: 20, every_n_steps: 1000}

Runs on the in-memory model (no checkpoint needed) and logs `core/CORE` and `core/<task>`
(centered accuracy) to the trainer's loggers, plus the results table (with raw accuracies) as
MLflow artifacts `core/results_stepNNNNNN.{md,json}`. The step is the one `val/loss` of that
training step is logged at (`mlflow_utils.logging_step`).

Distributed (DDP, FSDP2, FSDP): every rank builds the same requests and scores a different
slice of them (`LitMoELM(distributed=True)`: every world_size-th batch), and the results are
gathered on every rank: the same scores as one process in about 1/N of the time. Where the
weights are sharded (FSDP, DeepSpeed, model parallel) a forward pass needs every rank, so the
ranks run in lockstep, padded to the same number of batches. Rank 0 logs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from callbacks.mlflow_utils import log_text_artifact, logging_step
from lit_moe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def _resolve_bundle(bundle: str) -> Path:
    # A relative path is tried from the working directory, then from the repository root,
    # so the default "evaluation/core_mini" works wherever training is started.
    path = Path(bundle)
    if path.is_absolute() or path.exists() or not (REPO / path).exists():
        return path
    return REPO / path


class CoreEvalCallback(Callback):
    """CORE score of the model being trained (METHODS §4).

    Args:
        bundle: CORE bundle directory (default: the repository's mini bundle).
        tasks: task labels to run (default: all of the bundle's).
        limit: at most this many items per task.
        every_n_steps: also evaluate every N optimizer steps (default: only at the end of fit).
        output: also write the latest results as JSON to this file.
        batch_size: sequences per forward pass.
    """

    def __init__(self, bundle: str = "evaluation/core_mini", tasks: list[str] | None = None,
                 limit: int | None = None, every_n_steps: int | None = None, output: str | None = None,
                 batch_size: int = 16):
        from evaluation import core

        core.check_limit(limit)
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(f"CoreEvalCallback.every_n_steps must be ≥ 1 or null, got {every_n_steps}.")
        if batch_size < 1:
            raise ConfigError(f"CoreEvalCallback.batch_size must be ≥ 1, got {batch_size}.")
        self.bundle = _resolve_bundle(bundle)
        core.load_bundle(self.bundle, tasks)  # fail before training, not after it
        self.tasks, self.limit, self.every_n_steps = tasks, limit, every_n_steps
        self.output, self.batch_size = output, batch_size
        self.results: dict[str, Any] | None = None  # the latest result, on every rank
        self._last_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module, logging_step(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:  # not twice when the last step was just evaluated
            self.run(trainer, pl_module, logging_step(trainer, after_training=True))

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, log_step: int | None = None
            ) -> dict[str, Any] | None:
        """Evaluate now, log on rank 0 at `log_step` (default: optimizer steps done), and return
        the result (on every rank)."""
        import torch.distributed as dist

        self._last_step = trainer.global_step
        sharded = isinstance(trainer.strategy, SHARDED_STRATEGIES)
        split = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        result = None
        if trainer.is_global_zero or sharded or split:
            result = self._evaluate(pl_module, split=split, lockstep=sharded)
        # Collective: every rank then holds rank 0's result (the same one under `split`).
        result = trainer.strategy.broadcast(result, src=0)
        if result is not None and trainer.is_global_zero:
            self._log(trainer, result, trainer.global_step if log_step is None else log_step)
        self.results = result
        return result

    def _evaluate(self, pl_module: L.LightningModule, split: bool = False,
                  lockstep: bool = False) -> dict[str, Any] | None:
        from evaluation import core
        from evaluation.adapter import LitMoELM
        from lit_moe.tokenizer import tokenizer_from_json

        tokenizer_json = getattr(pl_module, "tokenizer_json", None)
        if not tokenizer_json:
            warnings.warn("CoreEvalCallback: the module has no tokenizer (tokenizer_json); CORE not evaluated.",
                          stacklevel=2)
            return None
        model = pl_module.model
        was_training = model.training
        try:
            lm = LitMoELM(model=model, tokenizer=tokenizer_from_json(tokenizer_json), batch_size=self.batch_size,
                          distributed=split, lockstep=lockstep)
            return core.evaluate_core(lm, self.bundle, self.tasks, self.limit)
        except Exception as err:  # noqa: BLE001 — a failed evaluation must not hang other ranks or lose the run
            warnings.warn(f"CoreEvalCallback: CORE evaluation failed: {type(err).__name__}: {err}", stacklevel=2)
            return None
        finally:
            model.train(was_training)

    def _log(self, trainer: L.Trainer, result: dict[str, Any], step: int) -> None:
        from evaluation import core

        result = {**result, "step": step}
        metrics = core.metrics_for_logging(result)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        log_text_artifact(trainer, core.results_table(result), f"core/results_step{step:06d}.md")
        log_text_artifact(trainer, json.dumps(result, indent=2), f"core/results_step{step:06d}.json")
        if self.output:
            core.write_json(result, self.output)
