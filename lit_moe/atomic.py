"""Checkpoint writes that a killed process cannot leave half done.

A file is written to a temporary name in its own directory, flushed to disk, then renamed over
the final name (`os.replace` is atomic within one file system). Lightning's default writer
also renames, but from the system temp directory, which is often another file system (then
the "rename" is a copy that can be cut short), and only after holding the whole checkpoint
in memory a second time.

A directory (a sharded checkpoint) cannot replace another in one rename, so its final name is
a symlink: the new directory is written under a unique name and the link is swapped atomically.
Plain torch (no Lightning): `callbacks.fault_tolerance.AtomicCheckpointIO` plugs this into Lightning.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lit_moe.errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block ends without an error
    it is renamed over `path`, so readers see the old file or the complete new one, never a
    part. On an error the temporary file is removed and `path` is left as it was.

    The temporary name is per process (concurrent writers never collide) and in the same
    directory (a rename across file systems would be a copy). durable: also fsync the rename
    (the caller fsyncs the file's contents), for checkpoints that must survive a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
        if durable:
            _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one."""
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_directory(output: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run write(tmp) on a fresh directory beside `output`, then rename it to `output`: readers
    never see a half-written directory (an export). An existing `output` is replaced only with
    `overwrite`."""
    output = Path(output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())) and not overwrite:
        raise ConfigError(f"output '{output}' exists and is not an empty directory; pass --overwrite to replace it.")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        raise ConfigError(f"output directory '{output}' is not writable ({err.strerror or err}).") from err
    try:
        write(tmp)
        _replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


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
    _replace(tmp, link)  # a real directory there (plain ModelParallelStrategy's) is moved aside
    _fsync_directory(link.parent)


def _replace(source: Path, destination: Path) -> None:
    """Rename `source` over `destination`. A real directory (not a link to one) cannot be
    renamed over: it is moved aside first and deleted after; only that short window has no
    `destination`."""
    if destination.is_dir() and not destination.is_symlink():
        aside = destination.parent / f".{destination.name}.old-{os.getpid()}"
        os.replace(destination, aside)
        os.replace(source, destination)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(source, destination)
