"""Checkpoint writes that a killed process cannot leave half done.

A file is written to a temporary name in its own directory, flushed to disk, then renamed over
the final name (`os.replace` is atomic within one file system). Lightning's default writer
also renames, but from the system temp directory, which is often another file system (then
the "rename" is a copy that can be cut short), and only after holding the whole checkpoint
in memory a second time.

A directory (a sharded checkpoint) cannot replace another in one rename, so its final name is
a symlink: the new directory is written under a unique name and the link is swapped atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # make the rename itself durable
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point_symlink(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` in one atomic rename (a temporary link replaces it)."""
    tmp = link.parent / f".{link.name}.link-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    if link.is_dir() and not link.is_symlink():
        # A real directory (e.g. written by plain ModelParallelStrategy) cannot be replaced by a
        # rename: move it aside first. Only this short window has no `link`.
        aside = link.parent / f".{link.name}.old-{os.getpid()}"
        os.replace(link, aside)
        os.replace(tmp, link)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, link)
    _fsync_directory(link.parent)


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
