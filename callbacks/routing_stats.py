"""RoutingStatsCallback: how the experts are used, per MoE layer, for every router.

    trainer:
      callbacks:
        - class_path: callbacks.RoutingStatsCallback
          init_args: {window: 10, plot_every: 100}

The routers count during forward, on device (`Router.metrics()`, `lit_moe.moe.routing_metrics`);
this callback only reads and resets those counters. Every `window` optimizer steps it
- gathers the counters of all MoE layers into one flat vector and reduces it across ranks with
  a single collective (sums for counts, max for maxima), then resets them;
- logs, per layer, `routing/layer_XX/{load_imbalance, load_cv, entropy, load_balance, z_loss,
  peak_imbalance}` and model-wide aggregates `routing/{load_imbalance, load_imbalance_max,
  load_cv, dead_experts, entropy, tokens_seen}`; where the number of active experts per token
  can vary (SoftMoE, top-k with a capacity factor) also `active_{mean,p50,p95,max}` per layer
  and `routing/{active_mean, active_total}`, and with a capacity factor `dropped`. A dropless
  top-k router gives every token exactly k experts and drops nothing: those would be flat lines
  (k is the param `config/router/init_args/top_k`).
  Where the count varies it also logs what a token cost: `compute/layer_XX/{active_experts,
  target_experts}` (realised vs design experts per token) and `compute/{active_params,
  flops_per_token}` from the realised counts (the design's: params `params/active`,
  `params/flops_per_token`).
Validation forwards fill separate counters (reset at validation start, reduced and logged at
validation end) under `routing/val/...`; they never change the training window. Everything is
logged at the step Lightning's own logging uses at that moment (`mlflow_utils.logging_step`),
so it lines up with `train/loss` and `val/loss`; artifact folders carry that same step.

Every `plot_every` steps and at the end of training (rank 0, MLflow loggers only) it adds the
artifacts `routing/stepNNNNNN/`: `load_share.png` (layer × expert heatmaps of the training
window and of the latest validation, on one fixed colour scale so snapshots compare by eye),
`active_experts.png` (realised vs target k_l; only where the count can vary), `kappa.png` (κ
histograms, κ-SwiGLU experts only), and the raw counts as `counts.csv` / `counts.json`. A
snapshot due at a step where validation runs is written after it, so it includes that
validation. A failure there is a warning, never the end of the run.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.mlflow_utils import log_file_artifact, logging_step, mlflow_loggers
from lit_moe.errors import ConfigError
from lit_moe.flops import flops_per_token
from lit_moe.moe.router import Router
from lit_moe.moe.routing_metrics import (COUNTER_NAMES, flatten_counters, model_summary, summarize,
                                         unflatten_counters)

# The routers' counter sets are "train" and "eval"; what the user sees calls the latter "val",
# as `val/loss` does.
PREFIX = {"train": "routing", "eval": "routing/val"}
SPLIT_NAME = {"train": "train", "eval": "val"}
ACTIVE_STATS = ("active_mean", "active_p50", "active_p95", "active_max")
# Per-layer dead experts are in the heatmap and counts; the model-wide sum is the chart.
LAYER_ONLY_IN_ARTIFACTS = ("dead_experts",)


def active_count_varies(router: Any) -> bool:
    """False for a dropless top-k router: every token then has exactly k active experts."""
    from lit_moe.moe import TopKRouter

    return not isinstance(router, TopKRouter) or getattr(router, "capacity_factor", None) is not None


def drops_tokens(router: Any) -> bool:
    return getattr(router, "capacity_factor", None) is not None


def compute_metrics(model: Any, layers: list[str], realised: list[float | None], targets: list[float]
                    ) -> dict[str, float]:
    """What a token costs over the window, from the experts it really used (SoftMoE's truncation
    keeps a varying number): per layer the realised experts per token beside the design's (the
    budget's k_l or the router's k), and in total the active parameters and training FLOPs per
    token from the realised counts (the design's are the params `params/active` and
    `params/flops_per_token`)."""
    metrics: dict[str, float] = {}
    for layer, active, target in zip(layers, realised, targets):
        if active is not None:
            metrics[f"compute/{layer}/active_experts"] = active
        metrics[f"compute/{layer}/target_experts"] = target
    metrics["compute/active_params"] = float(model.num_params(realised)["active"])
    metrics["compute/flops_per_token"] = flops_per_token(model, realised)
    return metrics


def reduce_across_ranks(values: Tensor, is_max: Tensor) -> Tensor:
    """Sum (max where `is_max`) of `values` over all ranks: one all_gather of the whole vector,
    so mixed reductions still cost a single collective. A no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values)
    stacked = torch.stack(gathered)
    return torch.where(is_max, stacked.amax(dim=0), stacked.sum(dim=0))


def reduced_counters(routers: list[Router], split: str) -> list[dict[str, Tensor]]:
    """Every router's counters of `split` (handed out tagged with how they reduce), reduced
    across ranks, on the CPU; then resets them. A collective: every rank must call it at the
    same point."""
    per_layer = [router.metrics(split) for router in routers]
    values, is_max = flatten_counters(per_layer)
    for router in routers:
        router.reset_metrics(split)
    return unflatten_counters(reduce_across_ranks(values, is_max).cpu(), per_layer)


@dataclass
class Window:
    """One reduced window of one split: what was logged, kept for the plots. first_step and
    step are the logging steps of its first and last batch (both the validation's step for a
    validation window)."""

    split: str
    first_step: int
    step: int
    layers: list[str]
    counters: list[dict[str, Tensor]]
    stats: list[dict[str, float]]
    target_k: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"split": SPLIT_NAME[self.split], "first_step": self.first_step, "step": self.step,
                "layers": [{"layer": name, "target_k": k, "stats": stats,
                            "counters": {n: c[n].tolist() for n in COUNTER_NAMES}}
                           for name, k, stats, c in zip(self.layers, self.target_k, self.stats, self.counters)]}


class RoutingStatsCallback(L.Callback):
    """Args:
        window: optimizer steps per training window (counters are reduced, logged and reset).
        plot_every: write the plot/count artifacts every this many steps (at the first window
            end at or after it); None: only at the end of training.
        kappa_bins: bins of the κ histograms.
    """

    def __init__(self, window: int = 50, plot_every: int | None = 500, kappa_bins: int = 40):
        if window < 1:
            raise ConfigError(f"RoutingStatsCallback.window must be ≥ 1, got {window}.")
        if plot_every is not None and plot_every < 1:
            raise ConfigError(f"RoutingStatsCallback.plot_every must be ≥ 1 or null, got {plot_every}.")
        if kappa_bins < 1:
            raise ConfigError(f"RoutingStatsCallback.kappa_bins must be ≥ 1, got {kappa_bins}.")
        self.window = window
        self.plot_every = plot_every
        self.kappa_bins = kappa_bins
        self.tokens_seen = 0  # training tokens through the MoE layers (all ranks); resumes
        self.latest: dict[str, Window] = {}  # last reduced window per split
        self._enabled = True
        self._window_start = 0
        self._last_plot_step: int | None = None  # optimizer steps done at the last window plotted
        self._snapshot_due: int | None = None  # logging step of a snapshot waiting for validation

    @staticmethod
    def _routers(pl_module: L.LightningModule) -> list[tuple[int, Any]]:
        return list(pl_module.model.routers())

    # -- hooks ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enabled = bool(self._routers(pl_module))
        if not self._enabled:
            rank_zero_warn("RoutingStatsCallback: the model has no MoE layers; no routing statistics.")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for _, router in self._routers(pl_module):
            router.reset_metrics("train")
        self._window_start = trainer.global_step
        self._last_plot_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimizer steps, so under gradient accumulation a window still
        # spans `window` steps; every rank reaches the same decision (the reduce is collective).
        step = trainer.global_step
        if self._enabled and step - self._window_start >= self.window:
            self._close_train_window(trainer, pl_module, step, logging_step(trainer))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._snapshot_due is not None:  # no validation ran at that step
            self._write_artifacts(trainer, pl_module, self._snapshot_due)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        step, label = trainer.global_step, logging_step(trainer, after_training=True)
        if step > self._window_start:  # the last, partial window
            self._close_train_window(trainer, pl_module, step, label, plot=False)
        if self._snapshot_due is not None:
            self._write_artifacts(trainer, pl_module, self._snapshot_due)
        elif self._last_plot_step != step and "train" in self.latest:
            self._write_artifacts(trainer, pl_module, label)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for _, router in self._routers(pl_module):
            router.reset_metrics("eval")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and self._routers(pl_module) and not trainer.sanity_checking:
            label = logging_step(trainer)
            self.latest["eval"] = self._reduce_and_log(trainer, pl_module, "eval", label, label)
            if self._snapshot_due is not None:
                self._write_artifacts(trainer, pl_module, self._snapshot_due)

    # -- windows ---------------------------------------------------------------------------------
    def _close_train_window(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, label: int,
                            plot: bool = True) -> None:
        # The window's batches carry the logging steps window_start … label.
        self.latest["train"] = self._reduce_and_log(trainer, pl_module, "train", self._window_start, label)
        self._window_start = step
        due = self.plot_every is not None and step - (self._last_plot_step or 0) >= self.plot_every
        if plot and due:
            # Written after this step's validation, if one runs, else before the next batch.
            self._snapshot_due = label
            self._last_plot_step = step

    @staticmethod
    def _logged_names(routers: list[Any]) -> tuple[set[str], set[str]]:
        """Statistics that can change during this run: (per layer, model-wide)."""
        varies = any(active_count_varies(r) for _, r in routers)
        drops = any(drops_tokens(r) for _, r in routers)
        skip = set(LAYER_ONLY_IN_ARTIFACTS) | (set() if varies else set(ACTIVE_STATS)) | (set() if drops else {"dropped"})
        model_skip = (set() if varies else {"active_mean", "active_total"}) | (set() if drops else {"dropped"})
        return skip, model_skip

    def _reduce_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, first_step: int,
                        label: int) -> Window:
        routers = self._routers(pl_module)
        layers = [f"layer_{i:02d}" for i, _ in routers]
        counters = reduced_counters([router for _, router in routers], split)
        stats = [summarize(c) for c in counters]
        prefix = PREFIX[split]
        skip, model_skip = self._logged_names(routers)
        metrics = {f"{prefix}/{layer}/{name}": value for layer, layer_stats in zip(layers, stats)
                   for name, value in layer_stats.items() if name not in skip}
        metrics.update({f"{prefix}/{name}": value for name, value in model_summary(counters, stats).items()
                        if name not in model_skip})
        targets = pl_module.model.target_active_experts().tolist()
        if split == "train":
            self.tokens_seen += int(counters[0]["active_hist"].sum())
            metrics["routing/tokens_seen"] = float(self.tokens_seen)
            if any(active_count_varies(router) for _, router in routers):
                metrics.update(compute_metrics(pl_module.model, layers, [s.get("active_mean") for s in stats], targets))
        metrics = {name: value for name, value in metrics.items() if math.isfinite(value)}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=label)
        return Window(split, first_step, label, layers, counters, stats, targets)

    # -- artifacts -------------------------------------------------------------------------------
    def _kappa_samples(self, pl_module: L.LightningModule) -> tuple[list[str], list[np.ndarray], list[float]]:
        names, samples, scales = [], [], []
        for i, layer in pl_module.model.moe_layers():
            sample = layer.experts.kappa_sample() if hasattr(layer.experts, "kappa_sample") else None
            if sample is not None:
                names.append(f"layer_{i:02d}")
                samples.append(sample[0].float().cpu().numpy())
                scales.append(float(layer.experts.current_scale))
        return names, samples, scales

    def _write_artifacts(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """The snapshot `routing/stepNNNNNN/` of the latest windows; `step` is the logging step
        of the training window it shows."""
        self._snapshot_due = None
        if not mlflow_loggers(trainer):  # configured alike on every rank
            return
        try:
            kappa = self._kappa_samples(pl_module)  # every rank: FSDP2 gathers sharded κ parameters
            if trainer.is_global_zero:
                with tempfile.TemporaryDirectory(prefix="routing-") as tmp:
                    for path in self._render(Path(tmp), kappa, self._active_varies(pl_module)):
                        log_file_artifact(trainer, str(path), f"routing/step{step:06d}")
        except Exception as err:  # noqa: BLE001 — plots are diagnostics: never end a run for them
            warnings.warn(f"RoutingStatsCallback: could not write the routing plots at step {step}: "
                          f"{type(err).__name__}: {err}", stacklevel=2)

    def _active_varies(self, pl_module: L.LightningModule) -> bool:
        return any(active_count_varies(router) for _, router in self._routers(pl_module))

    def _render(self, out: Path, kappa: tuple[list[str], list[np.ndarray], list[float]],
                active_varies: bool = True) -> list[Path]:
        from callbacks import routing_plots  # matplotlib only when plotting

        train = self.latest["train"]
        # Windows are labelled like the metrics: by the logging step of their last batch.
        span = f"train, steps {train.first_step}–{train.step}"
        written = []
        panels = [(span, np.stack([c["tokens"].numpy() for c in train.counters]))]
        val = self.latest.get("eval")
        if val is not None:
            panels.append((f"val at step {val.step}", np.stack([c["tokens"].numpy() for c in val.counters])))
        figures = {"load_share.png": routing_plots.load_share_heatmap(train.layers, panels, "load share")}
        if active_varies:  # a dropless top-k router's bars would all equal k
            figures["active_experts.png"] = routing_plots.active_experts_chart(
                train.layers, [s.get("active_mean", math.nan) for s in train.stats],
                [s.get("active_p95", math.nan) for s in train.stats],
                [s.get("active_max", math.nan) for s in train.stats], train.target_k,
                f"active experts per token vs target, {span}")
        kappa_layers, kappa_values, scales = kappa
        if kappa_layers:
            figures["kappa.png"] = routing_plots.kappa_histograms(
                kappa_layers, kappa_values, scales, f"κ of sampled pairs, step {train.step}", bins=self.kappa_bins)
        for name, figure in figures.items():
            figure.savefig(out / name, dpi=110)
            written.append(out / name)
        windows = [w for w in (self.latest.get("train"), self.latest.get("eval")) if w is not None]
        with open(out / "counts.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["split", "first_step", "step", "layer", "expert", "tokens", "weight", "load_share"])
            for w in windows:
                for layer, c in zip(w.layers, w.counters):
                    total = float(c["tokens"].sum()) or 1.0
                    for e, (t, wt) in enumerate(zip(c["tokens"].tolist(), c["weight"].tolist())):
                        writer.writerow([SPLIT_NAME[w.split], w.first_step, w.step, layer, e, int(t), wt, t / total])
        (out / "counts.json").write_text(json.dumps({SPLIT_NAME[w.split]: w.to_json() for w in windows}, indent=1))
        return [*written, out / "counts.csv", out / "counts.json"]

    # -- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))


__all__ = ["RoutingStatsCallback"]
