"""FLOPs per token from realised active experts, peak FLOP/s of current GPUs, and
`throughput/mfu` in MLflow."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient

from callbacks import TokenThroughputMonitor
from lit_moe.flops import flops_per_token, peak_bf16_flops, realised_active_experts
from lit_moe.model import ModelConfig, Transformer
from lit_moe.module import LitMoE

TINY = dict(d_model=32, n_layers=2, n_heads=2, num_experts=4, expert_hidden=16, vocab_size=64, seq_len=16,
            n_dense_layers=1, dense_hidden=24)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4e12), ("NVIDIA H200 NVL", 835.5e12), ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756.5e12), ("NVIDIA H100 NVL", 835.5e12), ("NVIDIA B200", 2.25e15),
    ("NVIDIA GB200", 2.5e15), ("NVIDIA GH200 480GB", 989.4e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_bf16_flops(name, peak):
    assert peak_bf16_flops(name) == peak


def test_flops_per_token_by_hand():
    model = Transformer(ModelConfig(**TINY))
    d, h, e, v, s = 32, 16, 4, 64, 16
    attn = 4 * d * d                     # qkv + proj
    dense = 3 * d * 24                   # one dense SwiGLU block
    router = d * e
    norms = 2 * 2 * d + d
    shared = v * d + 2 * attn + dense + router + norms  # tied: the embedding is the head
    expert = 3 * d * h                   # one expert
    attention = 12 * 2 * d * s
    assert flops_per_token(model) == pytest.approx(6 * (shared + 2 * expert) + attention)  # top-2 by design
    assert flops_per_token(model, [0.5]) == pytest.approx(6 * (shared + 0.5 * expert) + attention)
    assert flops_per_token(model, [None]) == flops_per_token(model)
    with pytest.raises(ValueError, match="MoE layers"):
        flops_per_token(model, [1.0, 1.0])


def test_mfu_logged_from_realised_active_experts(tmp_path):
    torch.manual_seed(0)
    # A capacity factor of 0.5 drops about half of the top-2 assignments: realised < design.
    router = {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 2, "capacity_factor": 0.5}}
    module = LitMoE(ModelConfig(**TINY, router=router), warmup_steps=1)
    data = torch.utils.data.DataLoader(torch.randint(0, 64, (12, 17)), batch_size=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="mfu", tracking_uri=uri)
    monitor = TokenThroughputMonitor(window_size=2, peak_flops=1e12)
    trainer = L.Trainer(max_steps=6, logger=logger, callbacks=[monitor], accelerator="cpu", devices=1,
                        log_every_n_steps=1, default_root_dir=tmp_path, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    (realised,) = realised_active_experts(module.model)
    assert 0 < realised <= 1.0
    tokens = 2 * 16
    assert module.flops_per_batch == pytest.approx(flops_per_token(module.model, [realised]) * tokens)
    assert module.flops_per_batch < flops_per_token(module.model) * tokens
    history = MlflowClient(tracking_uri=uri).get_metric_history(logger.run_id, "throughput/mfu")
    assert history and all(0 < m.value < 1 for m in history)
    with pytest.raises(ValueError, match="peak_flops"):
        TokenThroughputMonitor(peak_flops=0)
