"""benchmarks/gpu_step.py --small: the GPU benchmark's code runs on CPU, so it cannot rot."""

import importlib.util
import sys
from pathlib import Path

import pytest


def test_small_run_prints_every_model_and_mode(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
    spec = importlib.util.spec_from_file_location("gpu_step", path)
    gpu_step = importlib.util.module_from_spec(spec)
    sys.modules["gpu_step"] = gpu_step  # dataclasses look their module up while the file loads
    spec.loader.exec_module(gpu_step)
    rows = gpu_step.main(["--small", "--steps", "1", "--warmup", "0", "--peak_tflops", "1"])
    seen = {(row["model"], row["mode"]) for row in rows}
    assert seen == {(m, mode) for m in gpu_step.MODELS for mode in gpu_step.MODES}
    for row in rows:
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] > 0
        assert row["vs_dense"] == pytest.approx(row["step_ms"] / next(
            r["step_ms"] for r in rows if r["model"] == "dense" and r["mode"] == row["mode"]), abs=2e-3)
    soft = next(row for row in rows if row["model"] == "softmoe")
    # SoftMoE keeps between 1 and ⌈k·cap⌉ = 4 experts per token in each of its 2 layers.
    assert len(soft["realised_active_experts"]) == 2
    assert all(1.0 <= k <= 4.0 for k in soft["realised_active_experts"])
    # Active parameters by hand for top-k: everything but 6 of 8 experts' weights per layer.
    topk = next(row for row in rows if row["model"] == "topk")
    shape = gpu_step.SMALL
    expert_params = 3 * shape.d_model * shape.expert_hidden
    from lit_moe.model import Transformer
    total = sum(p.numel() for p in Transformer(gpu_step.lit_config("topk", shape)).parameters())
    assert topk["active_params"] == total - shape.n_layers * (shape.num_experts - shape.top_k) * expert_params
    assert capsys.readouterr().out.count("\n") == len(rows)
