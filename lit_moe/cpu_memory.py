"""glibc malloc setting for CPU training: keep freed memory for reuse instead of handing it back.

Why: glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap
and unmaps it on free, so each step's large tensors (an E=64 expert bank's 32 MiB weight
gradients, the [N, h] activations of an E=8, h=1024 layer) are new pages whose first touch
page-faults: ~17 ms per 32 MiB on this project's VM, against ~1.5 ms when the memory is
reused; on a 2-core machine that was a fifth of a layer's step. Switching glibc's mmap path
off and raising its trim threshold makes freed blocks stay in the heap for the next step,
the way PyTorch's CUDA caching allocator keeps GPU memory. The price: the process keeps its
high-water mark of heap memory (a tiny fit's peak RSS: 2.0 vs 1.87 GB, see benchmarks/).

It is process-wide state, so it is held only while work runs: by `LitMoE` from `setup` to
`teardown` of a single-process CPU run, like flushing denormals (`model.retain_cpu_memory:
false` leaves malloc alone; multi-process ranks always do: FSDP2's short-lived collective
buffers need freed blocks returned, see benchmarks/fsdp_memory.py), and by the lm-eval adapter
while it scores. Nested holders count: glibc's defaults come back when the last one lets go.
Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from contextlib import contextmanager
from typing import Iterator

# mallopt parameters (malloc.h) and glibc's defaults for them.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
# Freed memory at the top of the heap beyond this is returned to the OS even when retaining.
_RETAINED_TRIM_THRESHOLD = 2**31 - 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory(enable: bool = True) -> bool:
    """Keep (True) or return (False: glibc's defaults) freed heap memory; whether it applied.
    Unscoped: prefer `retaining_freed_memory`, which restores the defaults afterwards."""
    libc = _glibc()
    if libc is None:
        return False
    mmap_max, trim = (0, _RETAINED_TRIM_THRESHOLD) if enable else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    return bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))


_holders = 0
_holders_lock = threading.Lock()


@contextmanager
def retaining_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Retain freed memory while the block runs (yields whether it does); no-op if not enabled."""
    global _holders
    if not enabled or _glibc() is None:
        yield False
        return
    with _holders_lock:
        if _holders == 0:
            retain_freed_memory(True)
        _holders += 1
    try:
        yield True
    finally:
        with _holders_lock:
            _holders -= 1
            if _holders == 0:
                retain_freed_memory(False)


__all__ = ["retain_freed_memory", "retaining_freed_memory"]
