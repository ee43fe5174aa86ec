"""FSDP2 vs DDP on CPU, 2 ranks over gloo: peak memory per rank and training tokens/s.

    python benchmarks/fsdp_memory.py                    # ~104M-parameter MoE (64 experts), 6 steps each
    python benchmarks/fsdp_memory.py --steps 10 --experts 32

Prints one JSON line with `fsdp2_peak_mb`, `ddp_peak_mb`, `ratio` (FSDP2 / DDP; target ≤ 0.65)
and the tokens/s of both, plus the details of each run.

Peak memory is each rank's VmHWM from /proc/self/status: the kernel's high-water mark of the
process's resident memory. It counts everything the rank holds (parameters, gradients, AdamW
moments, DDP's gradient buckets, gathered FSDP blocks, activations, and the Python/torch runtime),
which is what decides whether a job fits on a machine. tracemalloc would not do: tensor storage
is not allocated through Python's allocator. The runtime's share, the same for both strategies,
is reported as `baseline_mb` (resident memory after imports, before the model is built). Each strategy runs in
fresh processes, so one run's high-water mark cannot leak into the other's; the larger of the two
ranks' peaks is reported. Parameters, gradients and optimizer states dominate: DDP keeps all of
them on every rank (plus a bucket copy of the gradients), FSDP2 half of each on each of 2 ranks.

glibc's allocator: by default it raises its mmap threshold after large blocks are freed, after
which freed blocks stay in the heap, counted as resident, and fragment as steps go on; FSDP2's
many short-lived collective buffers of changing sizes suffer from this far more than DDP's fixed
buckets (measured: FSDP2's resident memory grows every step, reaching ~1.7 GB after 3 steps
where its live tensors need ~1.2 GB). The runs therefore pin the threshold at glibc's default of
128 KiB (`MALLOC_MMAP_THRESHOLD_`), so freed large blocks return to the system and the peak
reflects the memory training needs. `--glibc_adaptive` measures with glibc's default behaviour;
on CPU, FSDP2 runs should pin the threshold (or use jemalloc/tcmalloc) for the same reason.

Data are random tokens (no tokenizer or corpus needed); throughput is the mean over the steps
after the first two (warm-up), counting the tokens of all ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def resident_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def run_one(strategy_name: str, args: argparse.Namespace) -> None:
    """One training run; Lightning's launcher re-runs this script for rank 1."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from lit_moe.distributed import FSDP2Strategy
    from lit_moe.model import ModelConfig
    from lit_moe.module import LitMoE

    baseline = resident_mb("VmRSS")  # the runtime: interpreter, torch, Lightning
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers,
                         n_heads=args.d_model // 64, num_experts=args.experts, expert_hidden=args.expert_hidden)
    module = LitMoE(config, lr=1e-3, warmup_steps=1)
    tokens = torch.randint(0, args.vocab, (args.batch_size * 2 * (args.steps + 1), args.seq_len + 1))
    loader = torch.utils.data.DataLoader(tokens, batch_size=args.batch_size)

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.times.append(time.perf_counter() - self.start)

    strategy = (FSDP2Strategy(process_group_backend="gloo") if strategy_name == "fsdp2"
                else DDPStrategy(process_group_backend="gloo", find_unused_parameters=True))
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], use_distributed_sampler=True)
    trainer.fit(module, loader)
    measured = timer.times[2:] or timer.times
    result = {"rank": trainer.global_rank, "peak_mb": resident_mb("VmHWM"), "baseline_mb": baseline,
              "params": module.model.num_params()["total"], "step_s": sum(measured) / len(measured),
              "tokens_per_step": trainer.world_size * args.batch_size * args.seq_len}
    Path(f"{args.out}.rank{trainer.global_rank}").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--expert_hidden", type=int, default=512)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=2, help="sequences per rank and step")
    parser.add_argument("--glibc_adaptive", action="store_true",
                        help="leave glibc's adaptive mmap threshold on (see the module docstring)")
    parser.add_argument("--run", choices=("fsdp2", "ddp"), help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(args.run, args)
        return

    runs = {}
    env = dict(os.environ)
    if not args.glibc_adaptive:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # inherited by Lightning's rank-1 process
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("fsdp2", "ddp"):
            out = os.path.join(tmp, name)
            command = [sys.executable, __file__, *sys.argv[1:], "--run", name, "--out", out]
            subprocess.run(command, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
            ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
            runs[name] = {"peak_mb": max(r["peak_mb"] for r in ranks), "baseline_mb": max(r["baseline_mb"] for r in ranks),
                          "step_s": max(r["step_s"] for r in ranks), "params": ranks[0]["params"],
                          "tokens_per_sec": ranks[0]["tokens_per_step"] / max(r["step_s"] for r in ranks)}
    fsdp, ddp = runs["fsdp2"], runs["ddp"]
    print(json.dumps({
        "benchmark": "fsdp_memory", "params": fsdp["params"], "ranks": 2, "device": "cpu",
        "fsdp2_peak_mb": round(fsdp["peak_mb"]), "ddp_peak_mb": round(ddp["peak_mb"]),
        "ratio": round(fsdp["peak_mb"] / ddp["peak_mb"], 3), "target_ratio": 0.65,
        "fsdp2_above_baseline_mb": round(fsdp["peak_mb"] - fsdp["baseline_mb"]),
        "ddp_above_baseline_mb": round(ddp["peak_mb"] - ddp["baseline_mb"]),
        "baseline_mb": round(max(fsdp["baseline_mb"], ddp["baseline_mb"])),
        "fsdp2_tokens_per_sec": round(fsdp["tokens_per_sec"], 1), "ddp_tokens_per_sec": round(ddp["tokens_per_sec"], 1),
        "steps": args.steps, "tokens_per_step": 2 * args.batch_size * args.seq_len,
        "malloc_mmap_threshold": None if args.glibc_adaptive else 128 * 1024,
    }))


if __name__ == "__main__":
    main()
