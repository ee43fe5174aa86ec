"""The glibc malloc setting held while CPU work runs (`lit_moe.cpu_memory`)."""

from __future__ import annotations

import ctypes

import pytest

from lit_moe import cpu_memory


class _FakeLibc:
    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: fake)
    return fake


def test_nested_holders_restore_glibc_defaults_only_when_the_last_lets_go(libc):
    retained = [(cpu_memory._M_MMAP_MAX, 0), (cpu_memory._M_TRIM_THRESHOLD, 2**31 - 1)]
    defaults = [(cpu_memory._M_MMAP_MAX, 65536), (cpu_memory._M_TRIM_THRESHOLD, 128 * 1024)]
    with cpu_memory.retaining_freed_memory() as outer:
        assert outer and libc.calls == retained
        with cpu_memory.retaining_freed_memory() as inner:
            assert inner and libc.calls == retained  # already held: nothing set again
        assert libc.calls == retained  # the outer holder still runs
    assert libc.calls == retained + defaults


def test_disabled_or_without_glibc_it_changes_nothing(libc, monkeypatch):
    with cpu_memory.retaining_freed_memory(enabled=False) as held:
        assert not held
    assert libc.calls == []
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)
    with cpu_memory.retaining_freed_memory() as held:
        assert not held
    assert cpu_memory.retain_freed_memory() is False


def test_the_real_libc_accepts_the_settings():
    if cpu_memory._glibc() is None:
        pytest.skip("not glibc: the setting is a documented no-op there")
    assert cpu_memory.retain_freed_memory(True) and cpu_memory.retain_freed_memory(False)
    assert isinstance(cpu_memory._glibc(), ctypes.CDLL)


@pytest.mark.parametrize("retain", [True, False])
def test_a_cpu_fit_holds_the_setting_from_setup_to_teardown(tmp_path, retain):
    import lightning as L

    from lit_moe.module import LitMoE
    from tests.test_kappa import _loader, _trainer, small_config

    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(cpu_memory._holders)

    module = LitMoE(small_config(), warmup_steps=0, retain_cpu_memory=retain)
    _trainer(2, tmp_path, [Probe()]).fit(module, train_dataloaders=_loader())
    assert seen == ([1, 1] if retain else [0, 0])
    assert cpu_memory._holders == 0  # released by teardown
