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
