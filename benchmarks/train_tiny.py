"""Training throughput of the tiny MoE vs a dense model with equal active parameters.

Dense twin: the same Transformer with every block dense and hidden = top_k · expert_hidden,
so both spend the same matmul FLOPs per token. Both run forward + backward + AdamW on
[batch, seq_len + 1] windows in this process, interleaved. Then (unless --no-fit) the real
`cli.py fit --config conf/tiny.yaml` runs for a few steps in a child process to record the
peak resident memory of a tiny fit.

Prints JSON lines: {"moe_tokens_per_s", "dense_tokens_per_s", "ratio"} and {"fit_peak_rss_gb"}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from lit_moe.model import ModelConfig, Transformer
from lit_moe.module import parameter_groups

REPO = Path(__file__).resolve().parents[1]


def tiny_config() -> ModelConfig:
    conf = yaml.safe_load((REPO / "conf" / "tiny.yaml").read_text())
    model = dict(conf["model"]["config"])
    return ModelConfig(**model, seq_len=conf["data"]["seq_len"], vocab_size=conf["data"]["vocab_size"])


def tokens_per_second(model: Transformer, batch: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3)

    def step() -> None:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        (loss + model.weighted_aux_loss()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch[:, :-1].numel() / (time.perf_counter() - start)


def fit_peak_rss_gb(steps: int) -> float:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(REPO / "conf" / "tiny.yaml"),
               "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "2",
               "--trainer.enable_progress_bar", "false",
               "--data.train_files", str(REPO / "data/wikipedia_en/train.jsonl.gz"),
               "--data.val_files", str(REPO / "data/wikipedia_en/validation.jsonl.gz")]
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        subprocess.run(cmd, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB → GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--fit_steps", type=int, default=20)
    parser.add_argument("--no-fit", action="store_true")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as LitMoE does on CPU
    torch.manual_seed(0)
    cfg = tiny_config()
    top_k = cfg.router.get("init_args", {}).get("top_k", 2)
    dense_cfg = dataclasses.replace(cfg, n_dense_layers=cfg.n_layers, dense_hidden=top_k * cfg.expert_hidden)
    moe, dense = Transformer(cfg), Transformer(dense_cfg)
    batch = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.seq_len + 1))
    moe_rates, dense_rates = [], []
    for _ in range(args.rounds):  # interleaved so machine noise hits both alike
        moe_rates.append(tokens_per_second(moe, batch, args.steps))
        dense_rates.append(tokens_per_second(dense, batch, args.steps))
    m, d = max(moe_rates), max(dense_rates)
    print(json.dumps({"config": "conf/tiny.yaml", "moe_active_params": moe.num_params()["active"],
                      "dense_params": dense.num_params()["total"], "moe_tokens_per_s": round(m),
                      "dense_tokens_per_s": round(d), "ratio": round(m / d, 3), "target": ">= 0.8"}), flush=True)
    if not args.no_fit:
        print(json.dumps({"fit_steps": args.fit_steps, "fit_peak_rss_gb": round(fit_peak_rss_gb(args.fit_steps), 3),
                          "target": "< 4"}), flush=True)


if __name__ == "__main__":
    main()
