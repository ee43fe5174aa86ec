import os

# Tests never reach a hub: everything is local files.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_float_state():
    """Fits flush denormals (a process-global CPU flag); keep tests independent of order."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny models: a second one only adds synchronisation, which on a
    busy 2-core machine can cost far more than the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
