"""What a run needs to be found and compared again: its settings as MLflow params, its origin
(config file, git commit) as tags with a one-line description, checkpoint paths at the end;
and one training throughput figure with its model-FLOPs utilisation.

The names are listed in the README's MLflow section (tests/test_mlflow_run.py checks them).
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.logger import _flatten_dict
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from callbacks.mlflow_utils import logging_step, mlflow_loggers, set_tags
from lit_moe.flops import flops_per_token, peak_bf16_flops, realised_active_experts
from lit_moe.model import Transformer

REPO = Path(__file__).resolve().parents[1]
# Data settings the model config already carries (`config/seq_len`, `config/vocab_size`: the
# tokenizer's vocabulary padded for the embedding), so each is logged once.
_DATA_DUPLICATES = frozenset({"seq_len", "vocab_size"})
# MLflow 3 opens an experiment in its GenAI view unless the experiment says it is model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def git_state(repo: Path = REPO) -> dict[str, str]:
    """{'git_commit': sha, 'git_dirty': 'true'/'false'} of the code being run; {} outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def trainer_params(trainer: L.Trainer) -> dict[str, Any]:
    """The trainer settings that change what a run computes or how fast (`trainer/*`)."""
    datamodule = getattr(trainer, "datamodule", None)
    batch_size = getattr(datamodule, "batch_size", None)
    params = {
        "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
        "precision": trainer.precision, "accelerator": trainer.strategy.root_device.type,
        "devices": trainer.num_devices, "num_nodes": trainer.num_nodes, "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__, "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val, "val_check_interval": trainer.val_check_interval,
        "limit_val_batches": trainer.limit_val_batches, "log_every_n_steps": trainer.log_every_n_steps,
        # Sequences per optimizer step over all ranks (data.batch_size is per process).
        "global_batch_size": (batch_size * trainer.world_size * trainer.accumulate_grad_batches
                              if batch_size else None),
    }
    return {f"trainer/{key}": value for key, value in params.items() if value is not None and value != -1}


def run_params(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """All params of a run: model config (`config/*`), the other LitMoE arguments (`model/*`),
    data settings (`data/*`), trainer settings (`trainer/*`), parameter counts (`params/*`),
    the seed. Names follow the CLI keys (`--model.lr` → `model/lr`); None means unset and is
    left out, as are LightningCLI's internals (`_instantiator`)."""
    params: dict[str, Any] = {}
    hparams = dict(pl_module.hparams)
    params.update(_flatten_dict({"config": hparams.pop("config", {})}))
    params.update({f"model/{k}": v for k, v in hparams.items() if not k.startswith("_")})
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "hparams"):
        params.update({f"data/{k}": v for k, v in dict(datamodule.hparams).items()
                       if not k.startswith("_") and k not in _DATA_DUPLICATES})
    params.update(trainer_params(trainer))
    counts = pl_module.model.num_params()
    design = pl_module.model.target_active_experts().tolist()
    params.update({"params/total": counts["total"], "params/active": counts["active"],
                   "params/flops_per_token": flops_per_token(pl_module.model),
                   "params/moe_layers": len(design), "params/active_experts": sum(design)})
    if os.environ.get("PL_GLOBAL_SEED") is not None:  # set by seed_everything
        params["seed_everything"] = int(os.environ["PL_GLOBAL_SEED"])
    return {key: value for key, value in params.items() if value is not None}


def _short_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def run_description(params: dict[str, Any], tags: dict[str, str]) -> str:
    """One line for the runs table's Description column and the run page."""
    parts = [tags.get("config", ""), tags.get("method", ""),
             f"{params.get('config/n_layers')} layers, d={params.get('config/d_model')}, "
             f"{params.get('config/num_experts')} experts",
             f"{_short_count(params['params/total'])} params ({_short_count(params['params/active'])} active)",
             f"{params.get('trainer/max_steps')} steps × {params.get('trainer/global_batch_size')}×"
             f"{params.get('config/seq_len')} tokens",
             f"{params.get('trainer/accelerator')}×{params.get('trainer/world_size')} {params.get('trainer/precision')}"]
    if tags.get("git_commit"):
        parts.append(f"git {tags['git_commit'][:10]}{' (modified)' if tags.get('git_dirty') == 'true' else ''}")
    return " · ".join(p for p in parts if p)


class RunInfoCallback(L.Callback):
    """At setup of fit, validate or test (rank 0, once per run): every setting of the run as params (`run_params`), and the tags
    `config` (the config files, set by the CLI), `method` (router and experts), `git_commit`,
    `git_dirty` (also MLflow's own `mlflow.source.git.commit`) and a description
    (`mlflow.note.content`); marks the experiment as model training for MLflow's UI. At fit
    end: the best/last checkpoint paths as tags.

    Args:
        description: text put before the generated run description.
    """

    def __init__(self, description: str | None = None):
        self.description = description
        self.config_files: list[str] = []  # filled by cli.py from --config
        self._logged_runs: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        run_ids = {str(getattr(logger, "run_id", id(logger))) for logger in trainer.loggers}
        if not run_ids or run_ids <= self._logged_runs:  # validate after fit: same run, logged
            return
        self._logged_runs |= run_ids
        from evaluation.report import method_name

        params = run_params(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        tags = {"method": method_name({k: str(v) for k, v in params.items()}), **git_state()}
        if self.config_files:
            tags["config"] = ", ".join(self.config_files)
        if "git_commit" in tags:
            tags["mlflow.source.git.commit"] = tags["git_commit"]
        note = run_description(params, tags)
        tags["mlflow.note.content"] = f"{self.description} · {note}" if self.description else note
        set_tags(trainer, tags)
        for logger in mlflow_loggers(trainer):
            try:
                experiment = logger.experiment.get_experiment(logger.experiment_id)
                if EXPERIMENT_KIND[0] not in experiment.tags:
                    logger.experiment.set_experiment_tag(logger.experiment_id, *EXPERIMENT_KIND)
            except Exception as err:  # noqa: BLE001 — a UI hint must never end a run
                warnings.warn(f"could not tag the MLflow experiment: {err}", stacklevel=2)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                set_tags(trainer, {"checkpoint/best": callback.best_model_path,
                                   "checkpoint/last": callback.last_model_path,
                                   "checkpoint/dir": callback.dirpath})


class TokenThroughputMonitor(ThroughputMonitor):
    """The run's training speed, one figure: `throughput/tokens_per_sec` = training tokens of
    the last `window_size` optimizer steps, summed over all ranks, divided by the wall-clock time
    those steps took (data loading, forward, backward, optimizer, callbacks and logging; time
    spent in validation is left out). `throughput/mfu` beside it: the model FLOP/s of one device
    over its peak, where that peak is known (GPUs, or `peak_flops`). FLOPs per batch come from
    the experts the routers actually used over their current counter window (`lit_moe.flops`),
    not the design k. Logged at the steps `train/loss` is, once the window is full; validation
    throughput is not logged.

    Args:
        window_size: optimizer steps averaged per measurement.
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
        # The realised expert counts are read from the device: refreshed once per window, not
        # every step (a host read would stall the GPU's launch queue).
        if (self.available_flops and trainer.state.stage == RunningStage.TRAINING
                and isinstance(model, Transformer) and isinstance(batch, torch.Tensor)
                and (iter_num - 1) % self.kwargs.get("window_size", 20) == 0):
            tokens = batch.shape[0] * (batch.shape[1] - 1)
            pl_module.flops_per_batch = flops_per_token(model, realised_active_experts(model)) * tokens
        super()._update(trainer, pl_module, batch, iter_num)

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        # Lightning's version logs all of Throughput's counters for every stage, validation
        # against its own batch counter; keep the two training figures, on the training axis.
        if trainer.state.stage != RunningStage.TRAINING or not trainer._logger_connector.should_update_logs:
            return
        computed = self._throughputs[RunningStage.TRAINING].compute()
        metrics = {}
        if "device/items_per_sec" in computed:  # per rank; every rank runs the same batch shape
            metrics["throughput/tokens_per_sec"] = computed["device/items_per_sec"] * trainer.world_size
        if "device/mfu" in computed:
            metrics["throughput/mfu"] = computed["device/mfu"]
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=logging_step(trainer))
