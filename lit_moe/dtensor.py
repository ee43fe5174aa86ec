"""Reading parameters that FSDP2 has sharded.

Under FSDP2 a parameter is a DTensor holding this rank's shard, except inside the forward of
the module group that owns it (where it is gathered). Code that reads parameters outside that
forward (a regulariser computed after the model ran, a callback inspecting the budget) gets
the whole tensor from `full_tensor`; everywhere else the tensor passes through unchanged.
"""

from __future__ import annotations

from torch import Tensor


def full_tensor(t: Tensor) -> Tensor:
    """`t` itself, or the whole tensor when `t` is a sharded DTensor: an all-gather, so every
    rank must call it at the same point. Differentiable: the gradient reaches each rank's
    shard (correct for values that every rank computes alike, as parameter penalties)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
