"""LightningModule: language-model training of the MoE Transformer.

Loss = cross-entropy + Σ (weighted router aux losses, averaged over MoE layers); every term
is logged on its own. The checkpoint carries the model config (as plain data) and the
tokenizer JSON, so `load_checkpoint` rebuilds model and tokenizer from the file alone.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from tokenizers import Tokenizer
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_moe.checkpoint import check_compatible, is_export_directory, load_export, read_checkpoint
from lit_moe.errors import ConfigError, NonFiniteLossError
from lit_moe.model import ModelConfig, Transformer
from lit_moe.rng import rng_state, set_rng_state
from lit_moe.tokenizer import tokenizer_from_json

Schedule = Literal["cosine", "wsd", "constant"]
NanPolicy = Literal["skip", "stop"]


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


def optim_group_tags(model: nn.Module) -> dict[str, str]:
    """{parameter name: tag} of the parameters tagged with `param.optim_group`."""
    return {name: p.optim_group for name, p in model.named_parameters() if hasattr(p, "optim_group")}


def parameter_groups(model: nn.Module, weight_decay: float, tags: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on norms, biases and embeddings.

    A feature that needs its own group (own lr schedule or decay) tags its parameters with
    `param.optim_group = "name"`; each distinct tag becomes a group without weight decay,
    named so callbacks can find it (`group["name"]`). `tags` ({parameter name: tag}, from
    `optim_group_tags` before a strategy touched the model) covers parameters whose objects a
    strategy replaced, losing their attributes (FSDP2's DTensors after Lightning's `.to(device)`).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": []}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        tag = getattr(param, "optim_group", None) or (tags or {}).get(name)
        if tag is not None:
            groups.setdefault(tag, []).append(param)
        elif param.ndim >= 2 and id(param) not in embeddings:
            groups["decay"].append(param)
        else:
            groups["no_decay"].append(param)
    return [{"name": name, "params": params, "weight_decay": weight_decay if name == "decay" else 0.0}
            for name, params in groups.items() if params]


def adamw_implementation(model: nn.Module) -> dict[str, bool]:
    """AdamW's fused kernel (one launch for all parameters) when every parameter lives on a
    CUDA device, plain or as an FSDP2 DTensor shard; the multi-tensor `foreach` path elsewhere."""
    devices = {p.device.type for p in model.parameters()}
    if devices == {"cuda"}:
        return {"fused": True}
    return {"foreach": True}


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
        nan_policy: what a NaN/Inf training loss does. 'stop': raise an error naming the global
            step and the first layer whose router logits or output went non-finite. 'skip':
            skip that optimizer update on every rank (the batch still counts as a step), warn,
            and count it (`train/skipped_steps`). Checking costs one host sync per step.
        activation_checkpointing: recompute each Transformer block's activations in backward
            instead of storing them (less memory, about one more forward of compute).
        compile: compile each Transformer block with `torch.compile` (before FSDP2 shards it,
            the order torchtitan uses). The first steps take longer while it compiles; worth it
            on GPUs, not on a 2-core CPU. In fp32 the experts' grouped matmul stays eager (a
            graph break at that one call: torch traces `_grouped_mm` only in bf16).

    Under `ModelParallelStrategy` (e.g. `lit_moe.distributed.FSDP2Strategy`) `configure_model`
    shards the model with FSDP2, block by block.
    """

    def __init__(self, config: ModelConfig = ModelConfig(), lr: float = 3e-3,  # noqa: B008 (copied below)
                 min_lr_ratio: float = 0.1, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 100, schedule: Schedule = "cosine", decay_fraction: float = 0.2,
                 nan_policy: NanPolicy = "stop", activation_checkpointing: bool = False, compile: bool = False):
        super().__init__()
        # A dict comes from a checkpoint's hyperparameters; copy so instances never share state.
        config = ModelConfig(**config) if isinstance(config, dict) else copy.deepcopy(config)
        if lr <= 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1 or not 0 < decay_fraction <= 1:
            raise ConfigError(f"invalid optimiser settings: lr={lr} (>0), warmup_steps={warmup_steps} (≥0), "
                              f"min_lr_ratio={min_lr_ratio} (in [0,1]), decay_fraction={decay_fraction} (in (0,1]).")
        if schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"schedule must be 'cosine', 'wsd' or 'constant', got {schedule!r}.")
        if nan_policy not in ("skip", "stop"):
            raise ConfigError(f"nan_policy must be 'skip' or 'stop', got {nan_policy!r}.")
        self.config = config
        # Hyperparameters hold the config as plain data (no pickled dataclass), so checkpoints
        # load with weights_only. Loggers get them from callbacks.RunInfoCallback, with the
        # trainer and data settings under one naming scheme (`config/num_experts`, `model/lr`).
        self.save_hyperparameters(ignore=["config"], logger=False)
        self.hparams["config"] = dataclasses.asdict(config)
        self.model = Transformer(self.config)
        self._optim_group_tags = optim_group_tags(self.model)  # by name: survives strategies' param swaps
        for block in self.model.blocks:
            block.activation_checkpointing = activation_checkpointing
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss (nan_policy: skip)
        self._skip_optimizer_step = False
        self.val_loss = MeanMetric()
        self.tokenizer_json: str | None = None
        self._compiled = False

    # -- data / checkpoint plumbing ---------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._check_strategy(self.trainer.strategy)
        if self.trainer.strategy.root_device.type == "cpu":
            # AdamW moments of rarely-used rows (embeddings, idle experts) decay geometrically
            # into denormal floats, which CPUs process an order of magnitude slower than normal
            # ones. Flushing them to zero costs nothing in accuracy.
            torch.set_flush_denormal(True)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.tokenizer_json is None and datamodule is not None and hasattr(datamodule, "tokenizer_json"):
            self.tokenizer_json = datamodule.tokenizer_json
        # Training FLOPs per batch from the parameters a token uses (`lit_moe.flops`, design
        # number of experts); callbacks.TokenThroughputMonitor updates it from the experts the
        # routers actually used and turns it into MFU (`throughput/mfu`).
        from lit_moe.flops import flops_per_token

        tokens = getattr(datamodule, "batch_size", 1) * self.config.seq_len
        self.flops_per_batch = flops_per_token(self.model) * tokens

    def teardown(self, stage: str) -> None:
        # Flushing denormals is process-global state; give it back when this run is done.
        torch.set_flush_denormal(False)

    def _check_strategy(self, strategy: Any) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        # The expert budget (callbacks, active-parameter counts) and κ-SwiGLU's penalty read
        # parameters after the forward, where FSDP1 leaves only this rank's flat fragments
        # (FSDP2 gives DTensors, which `lit_moe.dtensor.full_tensor` gathers).
        penalties = any(hasattr(m, "regularization_losses") for m in self.model.modules() if m is not self.model)
        if isinstance(strategy, FSDPStrategy) and (self.model.budget is not None or penalties):
            raise ConfigError("Lightning's FSDPStrategy (FSDP1) cannot train a model with a SoftMoE budget or "
                              "κ-SwiGLU parameters (they are read outside the forward, where FSDP1 keeps only "
                              "fragments); use FSDP2: --config conf/fsdp_gpu.yaml (GPU) or conf/fsdp.yaml (CPU).")

    def configure_model(self) -> None:
        """FSDP2 under ModelParallelStrategy: shard each block, then the root (idempotent:
        Lightning calls this again for validate/test after fit)."""
        from lit_moe.distributed import FSDP2Strategy, is_sharded, shard_transformer

        if self.hparams.compile and not self._compiled:
            for block in self.model.blocks:
                block.compile()  # in place: parameter names and checkpoints stay the same
            self._compiled = True
        mesh = self.device_mesh
        if mesh is None or is_sharded(self.model):
            return
        if mesh["tensor_parallel"].size() != 1:
            raise ConfigError(f"lit-moe shards with FSDP2 only (no tensor parallelism), but the strategy has "
                              f"tensor_parallel_size={mesh['tensor_parallel'].size()}; use "
                              f"lit_moe.distributed.FSDP2Strategy (conf/fsdp.yaml) or tensor_parallel_size: 1.")
        strategy = self.trainer.strategy
        options = strategy.sharding_options() if isinstance(strategy, FSDP2Strategy) else {}
        shard_transformer(self.model, mesh["data_parallel"], **options)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokenizer_json"] = self.tokenizer_json
        checkpoint["skipped_steps"] = self.skipped_steps
        # Every rank's RNG state, by global rank (called on all ranks, so the gather is safe).
        state = rng_state()
        if self._trainer is not None and self.trainer.world_size > 1:
            states: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, state)
            checkpoint["rng_states"] = states
        else:
            checkpoint["rng_states"] = [state]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compatible(checkpoint, self, str(self.trainer.ckpt_path) if self._trainer is not None else "checkpoint")
        self.tokenizer_json = checkpoint.get("tokenizer_json", self.tokenizer_json)
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        states = checkpoint.get("rng_states")
        if states and self._trainer is not None and self.trainer.state.fn == "fit":
            if len(states) == self.trainer.world_size:
                set_rng_state(states[self.trainer.global_rank])
            else:
                rank_zero_warn(f"the checkpoint holds RNG states of {len(states)} ranks, this run has "
                               f"{self.trainer.world_size}: random draws continue from the seed instead")

    # -- steps ------------------------------------------------------------------------------
    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def _lm_loss(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Mean next-token cross-entropy of a batch of windows, and its targets; the logits
        are never kept whole (`Transformer.forward(targets=...)`)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        return self.model(inputs, targets=targets), targets

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        ce, _ = self._lm_loss(batch)
        aux = self.model.weighted_aux_loss()
        loss = ce + aux
        global_loss = self._mean_over_ranks(loss)
        if not math.isfinite(global_loss.item()):  # the step's one host sync
            self._non_finite_loss(loss)  # raises under nan_policy "stop"
            # "skip": backward still runs, on every rank alike (its collectives must match);
            # on_before_optimizer_step then drops the gradients, so the update does nothing.
            self._skip_optimizer_step = True
            return loss
        self.log("train/loss", global_loss, prog_bar=True)  # the loss of the global batch
        self.log("train/ce", ce)
        self.log("train/lr", self._scheduled_lr())
        for name, value in self.model.aux_losses().items():
            self.log(f"train/{name}", value)
        for name, value in self.model.regularization_losses().items():  # e.g. kappa/reg
            self.log(name, value)
        return loss

    def _scheduled_lr(self) -> float:
        """The learning rate of this step's update: the "decay" group's (every group without
        its own schedule has the same; κ's is this × `kappa/lr_factor`). One chart instead of
        LearningRateMonitor's identical one per group."""
        if self._trainer is None or not self.trainer.optimizers:
            return float(self.hparams.lr)
        groups = self.trainer.optimizers[0].param_groups
        return float(next((g["lr"] for g in groups if g.get("name") == "decay"), groups[0]["lr"]))

    def _mean_over_ranks(self, loss: Tensor) -> Tensor:
        """Mean of the ranks' losses (one all-reduce): non-finite when any rank's is, so all
        ranks see the same value and skip or stop together."""
        if self._trainer is None or self.trainer.world_size == 1:
            return loss.detach()
        return self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean")

    def _non_finite_loss(self, loss: Tensor) -> None:
        where = self.model.first_nonfinite()
        rank = self.global_rank if self._trainer is not None else 0
        place = (f"first non-finite on rank {rank}: {where}" if where else
                 f"on rank {rank} every layer's router logits and output were finite (the loss itself, the "
                 f"output head, or another rank)")
        step = self.trainer.global_step if self._trainer is not None else 0
        if self.hparams.nan_policy == "stop":
            raise NonFiniteLossError(f"training loss is {loss.item()} at global step {step}; {place}. Resume from the "
                                     f"last checkpoint with a lower lr, or set model.nan_policy: skip.")
        self.skipped_steps += 1
        rank_zero_warn(f"training loss is {loss.item()} at global step {step} ({place}): optimizer step skipped "
                       f"({self.skipped_steps} so far).")
        self.log("train/skipped_steps", float(self.skipped_steps))

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self._skip_optimizer_step:
            # No gradients: AdamW leaves these weights and their moments as they are, and
            # gradient clipping (next) sees nothing to clip.
            optimizer.zero_grad(set_to_none=True)
            self._skip_optimizer_step = False

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: Tensor, split: str) -> None:
        ce, targets = self._lm_loss(batch)
        self.val_loss.update(ce, weight=targets.numel())
        # Perplexity = exp(token-weighted mean cross-entropy), from the same running mean.
        self.log(f"{split}/loss", self.val_loss, prog_bar=split == "val", on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def _log_perplexity(self, split: str) -> None:
        if self.val_loss.update_called:
            self.log(f"{split}/ppl", torch.exp(self.val_loss.compute()))

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = parameter_groups(self.model, hp.weight_decay, self._optim_group_tags)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), **adamw_implementation(self.model))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(step, total, hp.warmup_steps, hp.schedule, hp.min_lr_ratio, hp.decay_fraction),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> tuple[LitMoE, Tokenizer]:
    """(LitMoE in eval mode, tokenizer) from a checkpoint file or sharded directory written by
    `fit`, or a directory written by `export --format safetensors`."""
    if is_export_directory(path):
        config, state, tokenizer_json = load_export(path)
        module = LitMoE(config)
        try:
            module.model.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(f"exported model '{path}' does not fit its own config ({err}).") from err
        module.tokenizer_json = tokenizer_json
        module.to(map_location).eval()
        return module, tokenizer_from_json(tokenizer_json)
    checkpoint = read_checkpoint(path)
    if "hyper_parameters" not in checkpoint or "config" not in checkpoint["hyper_parameters"]:
        raise ConfigError(f"checkpoint '{path}' has no lit-moe model config; was it written by lit-moe's `fit`?")
    tokenizer_json = checkpoint.get("tokenizer_json")
    if not tokenizer_json:
        raise ConfigError(f"checkpoint '{path}' carries no tokenizer; re-save it from a run that used "
                          f"lit_moe.data.LMDataModule (which stores tokenizer.json in the checkpoint).")
    # LightningCLI adds bookkeeping keys (e.g. `_instantiator`); keep only LitMoE's own arguments.
    # Components are stored as plain {class_path, init_args} specs and rebuilt without the CLI.
    accepted = inspect.signature(LitMoE.__init__).parameters
    try:
        module = LitMoE(**{k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted})
    except ConfigError as err:
        raise ConfigError(f"checkpoint '{path}': its model config cannot be built by this version of lit-moe: "
                          f"{err}") from err
    check_compatible(checkpoint, module, path)
    module.load_state_dict(checkpoint["state_dict"])
    module.tokenizer_json = tokenizer_json
    module.to(map_location).eval()
    return module, tokenizer_from_json(tokenizer_json)
