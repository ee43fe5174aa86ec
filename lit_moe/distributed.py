"""FSDP2 (`torch.distributed.fsdp.fully_shard`) under Lightning's `ModelParallelStrategy`.

`FSDP2Strategy` is `ModelParallelStrategy` for pure data parallelism: every rank in one
data-parallel group (tensor-parallel size 1), across all devices and nodes, plus the sharding
options that `LitMoE.configure_model` reads (mixed precision, resharding). Its
checkpoints are sharded directories written atomically (see `save_checkpoint`).

    trainer:
      strategy:
        class_path: lit_moe.distributed.FSDP2Strategy
        init_args: {param_dtype: bfloat16}     # GPU; CPU runs leave it null (fp32)
"""

from __future__ import annotations

import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lit_moe.atomic import point_symlink
from lit_moe.errors import ConfigError

_DTYPES = {None: None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str | None, what: str) -> torch.dtype | None:
    if name not in _DTYPES:
        raise ConfigError(f"FSDP2Strategy: {what}={name!r} is not a dtype; use one of "
                          f"{sorted(k for k in _DTYPES if k)} or null.")
    return _DTYPES[name]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all ranks.

    Args:
        param_dtype: dtype parameters are all-gathered to and computed in (e.g. bfloat16 on
            GPUs); null keeps fp32. The sharded fp32 master weights and optimizer states stay fp32.
        reduce_dtype: dtype of the gradient reduce-scatter; null: as param_dtype.
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3;
            saves memory, costs a second all-gather in backward). False keeps them (ZeRO-2).
        save_distributed_checkpoint: sharded checkpoint directories (True) or one full file
            assembled on rank 0 (False).
        process_group_backend: null picks NCCL on GPUs and gloo on CPUs.
    """

    def __init__(self, param_dtype: str | None = None, reduce_dtype: str | None = None,
                 reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.param_dtype = _dtype(param_dtype, "param_dtype")
        self.reduce_dtype = _dtype(reduce_dtype, "reduce_dtype")
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the number of nodes (it expects
        # tensor parallelism within a node); here every rank is a data-parallel replica.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def sharding_options(self) -> dict[str, Any]:
        return {"param_dtype": self.param_dtype, "reduce_dtype": self.reduce_dtype,
                "reshard_after_forward": self.reshard_after_forward}

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Sharded save that never leaves `filepath` half written.

        Every rank writes its shard into a fresh directory next to `filepath`; once all are
        done, rank 0 points `filepath` (a symlink) at it with an atomic rename, and deletes the
        directory it pointed at before. A process killed mid-save leaves the old target intact.
        """
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        # A new name every time (even for a second save of the same step): the directory the
        # link points at now is never written into. Rank 0's choice holds for all ranks.
        unique = self.broadcast(uuid.uuid4().hex[:8])
        target = path.parent / f".{path.name}.step{checkpoint.get('global_step', 0):08d}.{unique}"
        super().save_checkpoint(checkpoint, target, storage_options)
        self.barrier()
        if self.is_global_zero:
            previous = path.resolve() if path.is_symlink() else None
            point_symlink(path, target)
            if previous is not None and previous != target.resolve() and previous.is_dir():
                shutil.rmtree(previous, ignore_errors=True)
        self.barrier()

    def remove_checkpoint(self, filepath: Any) -> None:
        path = Path(filepath)
        if self.is_global_zero and path.is_symlink():
            target = path.resolve()
            path.unlink()
            shutil.rmtree(target, ignore_errors=True)
            return
        super().remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Compare the checkpoint's model config with this run's before the sharded load, whose
        # own error for a shape mismatch does not say which setting caused it.
        from lit_moe.checkpoint import check_compatible, read_metadata

        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir() and self.lightning_module is not None:
            check_compatible(read_metadata(str(path)), self.lightning_module, str(path))
        return super().load_checkpoint(path, weights_only=weights_only)


def shard_transformer(model: nn.Module, mesh: Any, param_dtype: torch.dtype | None = None,
                      reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> None:
    """Apply FSDP2 to each Transformer block, then to the root (embeddings, head, budget, ...).

    A block holding a module shared with another block (κ-SwiGLU's `global` b, a) is left to
    the root's shard group, since FSDP2 groups must not overlap. The new DTensor parameters do
    not carry attributes such as `optim_group`; LitMoE keeps those tags by parameter name.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype or param_dtype)
    owners: dict[int, int] = {}
    for block in model.blocks:
        for param in block.parameters():
            owners[id(param)] = owners.get(id(param), 0) + 1
    for block in model.blocks:
        if all(owners[id(p)] == 1 for p in block.parameters()):
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters (embedding/tied head) are needed again right at the start of
    # backward, so the root keeps them gathered after forward (FSDP2's default for the root).
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())
