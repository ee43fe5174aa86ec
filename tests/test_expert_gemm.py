"""Building and loading expert_gemm.c (`lit_moe.moe.grouped_matmul._expert_gemm`). Its numbers
are tested with the other backends in test_grouped_matmul.py."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import pytest
import torch

from lit_moe.moe import grouped_matmul as grouped_matmul_module
from lit_moe.moe.grouped_matmul import _build_expert_gemm, _expert_gemm, grouped_matmul


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo")
                    or " avx512f" not in open("/proc/cpuinfo").read() or os.environ.get("LIT_MOE_NO_EXPERT_GEMM"),
                    reason="expert_gemm.c needs an x86-64 CPU with AVX-512F")
def test_expert_gemm_is_built_where_the_cpu_has_avx512():
    assert _expert_gemm() is not None


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="needs a C compiler")
def test_build_is_atomic_and_reused(tmp_path):
    """The library is written to a temporary name and renamed; a second build reuses it; a
    failing compile raises and leaves nothing behind."""
    source = tmp_path / "kernel.c"
    source.write_text("int lm_expert_gemm_supported(void) { return 0; }\n")
    compiler = os.environ.get("CC") or "cc"
    built = _build_expert_gemm(source, tmp_path / "cache", compiler)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [built.name]
    stamp = built.stat().st_mtime_ns
    assert _build_expert_gemm(source, tmp_path / "cache", compiler) == built and built.stat().st_mtime_ns == stamp

    source.write_text("this is not C\n")
    with pytest.raises(subprocess.CalledProcessError):
        _build_expert_gemm(source, tmp_path / "broken", compiler)
    assert list((tmp_path / "broken").iterdir()) == []


def test_falls_back_when_it_cannot_be_built(tmp_path, monkeypatch):
    """No compiler: `_expert_gemm` is None and grouped_matmul still gives the right answer."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LIT_MOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(grouped_matmul_module.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    _expert_gemm.cache_clear()
    try:
        assert _expert_gemm() is None
        counts = torch.tensor([2, 1])
        x, w = torch.randn(3, 4), torch.randn(2, 4, 5)
        (out,) = grouped_matmul(x, (w,), counts)  # the MKL or loop path takes over
        torch.testing.assert_close(out, torch.cat([x[:2] @ w[0], x[2:] @ w[1]]))
    finally:
        monkeypatch.undo()
        _expert_gemm.cache_clear()
