"""FaultToleranceCallback: an interrupted fit leaves a checkpoint it can resume from.

- SIGTERM (SLURM preemption, `kill`, a scheduler's shutdown): Lightning notes the signal and
  stops every rank at the same step boundary (rank 0's flag is broadcast before each step);
  this callback then saves `last.ckpt` into the ModelCheckpoint directory, so
  `fit --ckpt_path last` continues exactly there.
- Ctrl-C: the first press is handled like SIGTERM (finish the current step, save, exit); a
  second press interrupts at once, without saving.
- Every checkpoint is written atomically (`AtomicCheckpointIO` below for files, the
  symlink swap of `FSDP2Strategy` for sharded directories), so a process killed while saving
  never leaves `last.ckpt` pointing at a checkpoint that cannot load.

The lit-moe CLI adds this callback to every run.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_moe.atomic import atomic_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, saving local files through `atomic_save`. Loading also
    accepts a sharded (FSDP2) checkpoint directory, consolidated in memory, so a single-process
    `validate` / `test` can read the checkpoints of sharded runs."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if os.path.isdir(path):
            from lit_moe.checkpoint import read_checkpoint

            return read_checkpoint(str(path))
        kwargs: dict[str, Any] = {"weights_only": weights_only}
        if map_location is not None:  # else Lightning's default (CPU storages)
            kwargs["map_location"] = map_location
        return super().load_checkpoint(path, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


class FaultToleranceCallback(L.Callback):
    """Args:
        handle_sigint: turn the first Ctrl-C into a clean stop with a checkpoint.
    """

    def __init__(self, handle_sigint: bool = True):
        self.handle_sigint = handle_sigint
        self.saved_path: str | None = None
        self._previous_sigint: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        # Only Lightning's default writer is swapped; a user's own CheckpointIO is left alone.
        if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    # -- Ctrl-C ---------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.handle_sigint and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint(trainer))

    def _on_sigint(self, trainer: L.Trainer) -> Any:
        def handler(signum: int, frame: Any) -> None:
            rank_zero_info("\nCtrl-C: stopping after this step and saving a checkpoint (press again to abort now).")
            signal.signal(signal.SIGINT, signal.default_int_handler)
            # The flag Lightning's own SIGTERM handler sets (no public setter): the loops then
            # stop at the next step boundary, all ranks together, and raise SIGTERMException.
            trainer._signal_connector.received_sigterm = True

        return handler

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    # -- the checkpoint on interruption ---------------------------------------------------
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        # Only a signal stop is at a step boundary on every rank; after another error, the ranks
        # (and the model) may be mid-step, and a collective save could hang.
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        checkpointer = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpointer is not None and checkpointer.dirpath:
            directory = checkpointer.dirpath
            path = os.path.join(directory, checkpointer.CHECKPOINT_NAME_LAST + checkpointer.FILE_EXTENSION)
            checkpointer.last_model_path = path  # part of the saved callback state, so set first
        else:
            directory = os.path.join(trainer.default_root_dir, "checkpoints")
            path = os.path.join(directory, "last.ckpt")
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(f"Interrupted at global step {trainer.global_step}: saved {path}; resume with "
                       f"`fit ... --ckpt_path {path}` (or `--ckpt_path last`).")
