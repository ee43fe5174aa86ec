"""LightningModule: language-model training of the MoE Transformer.

Loss = cross-entropy + Σ (weighted router aux losses, averaged over MoE layers); every term
is logged on its own. The checkpoint carries the model config (as plain data) and the
tokenizer JSON, so `load_checkpoint` rebuilds model and tokenizer from the file alone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from lit_moe.errors import ConfigError
from lit_moe.model import ModelConfig, Transformer

Schedule = Literal["cosine", "wsd", "constant"]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: Schedule,
                  min_lr_ratio: float, decay_fraction: float) -> float:
    """Learning-rate factor at `step` (0-based): linear warmup, then the chosen shape.

    cosine: from 1 down to min_lr_ratio at total_steps.
    wsd (warmup-stable-decay): 1 until the last `decay_fraction` of training, then linear to
    min_lr_ratio. constant: 1 after warmup.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total_steps - int(decay_fraction * total_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on norms, biases and embeddings.

    A feature that needs its own group (own lr schedule or decay) tags its parameters with
    `param.optim_group = "name"`; each distinct tag becomes a group without weight decay,
    named so callbacks can find it (`group["name"]`).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": []}
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        tag = getattr(param, "optim_group", None)
        if tag is not None:
            groups.setdefault(tag, []).append(param)
        elif param.ndim >= 2 and id(param) not in embeddings:
            groups["decay"].append(param)
        else:
            groups["no_decay"].append(param)
    return [{"name": name, "params": params, "weight_decay": weight_decay if name == "decay" else 0.0}
            for name, params in groups.items() if params]


class LitMoE(L.LightningModule):
    """Trains `Transformer(config)` on token windows [B, seq_len + 1].

    Args:
        config: model hyperparameters (see `ModelConfig`).
        lr: peak learning rate of AdamW.
        min_lr_ratio: final lr as a fraction of `lr` (cosine / wsd).
        weight_decay: decoupled weight decay on weight matrices.
        betas: AdamW betas.
        warmup_steps: linear warmup length in optimizer steps.
        schedule: 'cosine', 'wsd' (warmup-stable-decay) or 'constant'.
        decay_fraction: share of training spent decaying under 'wsd'.
    """

    def __init__(self, config: ModelConfig = ModelConfig(), lr: float = 3e-3,  # noqa: B008 (copied below)
                 min_lr_ratio: float = 0.1, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 100, schedule: Schedule = "cosine", decay_fraction: float = 0.2):
        super().__init__()
        # A dict comes from a checkpoint's hyperparameters; copy so instances never share state.
        config = ModelConfig(**config) if isinstance(config, dict) else copy.deepcopy(config)
        if lr <= 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1 or not 0 < decay_fraction <= 1:
            raise ConfigError(f"invalid optimiser settings: lr={lr} (>0), warmup_steps={warmup_steps} (≥0), "
                              f"min_lr_ratio={min_lr_ratio} (in [0,1]), decay_fraction={decay_fraction} (in (0,1]).")
        if schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"schedule must be 'cosine', 'wsd' or 'constant', got {schedule!r}.")
        self.config = config
        # Hyperparameters hold the config as plain data (no pickled dataclass), so checkpoints
        # load with weights_only and loggers flatten it (`config/num_experts`, ...).
        config = dataclasses.asdict(config)  # noqa: F841 (read by save_hyperparameters from this frame)
        self.save_hyperparameters()
        self.model = Transformer(self.config)
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()
        self.tokenizer_json: str | None = None
        self._step_started: float | None = None

    # -- data / checkpoint plumbing ---------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.trainer.strategy.root_device.type == "cpu":
            # AdamW moments of rarely-used rows (embeddings, idle experts) decay geometrically
            # into denormal floats, which CPUs process ~10× slower: measured 1.5 s → 11 s per
            # tiny step after a few steps. Flushing them to zero costs nothing in accuracy.
            torch.set_flush_denormal(True)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.tokenizer_json is None and datamodule is not None and hasattr(datamodule, "tokenizer_json"):
            self.tokenizer_json = datamodule.tokenizer_json
        # Training FLOPs per batch from active parameters (6·N·tokens, plus attention scores);
        # ThroughputMonitor turns this into MFU on GPUs whose peak it knows.
        # (The input embedding is a lookup, not a matmul: counted only when tied, as the head.)
        cfg = self.config
        matmul_params = self.model.num_params()["active"] - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
        tokens = getattr(datamodule, "batch_size", 1) * cfg.seq_len
        attention = 12 * cfg.n_layers * cfg.d_model * cfg.seq_len
        self.flops_per_batch = (6 * matmul_params + attention) * tokens

    def teardown(self, stage: str) -> None:
        # Flushing denormals is process-global state; give it back when this run is done.
        torch.set_flush_denormal(False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokenizer_json"] = self.tokenizer_json

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer_json = checkpoint.get("tokenizer_json", self.tokenizer_json)

    # -- steps ------------------------------------------------------------------------------
    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def _lm_loss(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self.model(inputs)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ce, logits, targets

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        ce, _, _ = self._lm_loss(batch)
        aux = self.model.weighted_aux_loss()
        loss = ce + aux
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", ce)
        for name, value in self.model.aux_losses().items():
            self.log(f"train/{name}", value)
        for name, value in self.model.regularization_losses().items():  # e.g. kappa/reg
            self.log(name, value)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Tensor, batch_idx: int) -> None:
        # Wall time of forward + backward + optimizer step on this rank; every rank runs the
        # same shape, so the global rate is world_size times the local one.
        if self._step_started is not None:
            elapsed = time.perf_counter() - self._step_started
            tokens = (batch.shape[1] - 1) * batch.shape[0] * self.trainer.world_size
            self.log("train/tokens_per_sec", tokens / max(elapsed, 1e-9), prog_bar=True)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        ce, logits, targets = self._lm_loss(batch)
        self.val_loss.update(ce, weight=targets.numel())
        self.val_ppl.update(logits, targets)
        self.log("val/loss", self.val_loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log("val/ppl", self.val_ppl, on_step=False, on_epoch=True)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        ce, logits, targets = self._lm_loss(batch)
        self.val_loss.update(ce, weight=targets.numel())
        self.val_ppl.update(logits, targets)
        self.log("test/loss", self.val_loss, on_step=False, on_epoch=True)
        self.log("test/ppl", self.val_ppl, on_step=False, on_epoch=True)

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(parameter_groups(self.model, hp.weight_decay), lr=hp.lr,
                                      betas=tuple(hp.betas), fused=False)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(step, total, hp.warmup_steps, hp.schedule, hp.min_lr_ratio, hp.decay_fraction),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
