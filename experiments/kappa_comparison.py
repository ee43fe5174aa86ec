"""κ-SwiGLU experiment (issue 4): SwiGLU vs κ-SwiGLU experts, on the top-2 baseline and on
SoftMoE, tiny configs, same steps and tokens, several seeds, shared Wikipedia corpus.

    python experiments/kappa_comparison.py --shared ../shared --steps 200 --seeds 1234,4321
    python experiments/kappa_comparison.py --report-only     # re-read the MLflow store

The configs of one seed run at once (one thread each); seeds run one after another. Runs
go to <workdir>/mlflow.db (experiment "kappa-comparison"), one directory per seed for the
checkpoints; the table is written to docs/kappa_experiment.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's lit_moe (the report loads checkpoints), also when another is installed.
sys.path.insert(0, str(REPO))
# label → config; each κ config differs from its plain twin only in the experts (and the κ callback).
CONFIGS: dict[str, str | tuple[str, dict]] = {
    "top-2 + SwiGLU": "tiny.yaml",
    "top-2 + κ-SwiGLU": "tiny_kappa.yaml",
    # (config, experts init_args changed): the unnormalised confidence s = 0.3·z.
    "top-2 + κ-SwiGLU, s = 0.3·z": ("tiny_kappa.yaml", {"confidence": "top_logit"}),
    "SoftMoE + SwiGLU": "tiny_softmoe.yaml",
    "SoftMoE + κ-SwiGLU": "tiny_softmoe_kappa.yaml",
}
EXPERIMENT = "kappa-comparison"


def create_store(workdir: Path) -> None:
    """Create the MLflow store and experiment once: runs starting together on a fresh SQLite
    store race in its schema migration."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(workdir / 'mlflow.db').resolve()}")
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT)


def run_seed(shared: Path, steps: int, workdir: Path, seed: int, only: list[str] | None) -> None:
    corpus = shared / "data" / "corpus" / "wikipedia_en"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    seed_dir = workdir / f"seed_{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for label, entry in CONFIGS.items():
        if only and label not in only:
            continue
        config, changes = (entry, None) if isinstance(entry, str) else entry
        config_path = REPO / "conf" / config
        if changes:
            # A copy of the config with the experts' init_args changed, next to the run's logs.
            import yaml

            data = yaml.safe_load(config_path.read_text())
            data["model"]["config"]["experts"]["init_args"].update(changes)
            config = f"{config_path.stem}-{'-'.join(map(str, changes.values()))}.yaml"
            for callback in data["trainer"]["callbacks"]:  # its own checkpoint directory
                if callback["class_path"].endswith("ModelCheckpoint"):
                    callback["init_args"]["dirpath"] = f"checkpoints/{Path(config).stem}"
            config_path = seed_dir / config
            config_path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        cmd = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(config_path),
               "--seed_everything", str(seed), "--trainer.max_steps", str(steps),
               # Validation once, at the end (the table's val loss is the final model's).
               "--trainer.val_check_interval", str(steps),
               "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.experiment_name", EXPERIMENT,
               "--trainer.logger.init_args.tracking_uri", f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
               "--trainer.logger.init_args.run_name", f"{label} | seed {seed}",
               "--data.cache_dir", str((workdir / "cache").resolve()),
               "--data.train_files", str(corpus / "train-00.jsonl.gz"),
               "--data.val_files", str(corpus / "validation-00.jsonl.gz")]
        print(f"== {label}, seed {seed}", flush=True)
        log = open(seed_dir / f"{config}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append((subprocess.Popen(cmd, cwd=seed_dir, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for proc, log in procs:
        if proc.wait() != 0:
            failed.append(proc.args[3])
        log.close()
    if failed:
        raise SystemExit(f"runs failed: {failed}; see the logs in {seed_dir}")


def _last(client, run_id: str, key: str) -> float | None:
    history = client.get_metric_history(run_id, key)
    return max(history, key=lambda m: m.step).value if history else None


def kappa_distribution(checkpoints: list[Path], val_file: Path, batches: int = 4, batch_size: int = 8
                       ) -> dict[str, list[float]]:
    """κ over the (pair, unit) entries the experts' statistics sample (up to 256 pairs per
    layer and forward), pooled over `batches` validation windows of every checkpoint: per
    layer [mean, std, p5, p50, p95, share with |ln κ| > ln 1.1]."""
    import gzip
    import json

    import numpy as np
    import torch

    from lit_moe.checkpoint import load_checkpoint

    pooled: dict[str, list[np.ndarray]] = {}
    with gzip.open(val_file, "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    for path in checkpoints:
        module, tokenizer = load_checkpoint(str(path))
        seq = module.config.seq_len
        ids = [t for text in texts for t in tokenizer.encode(text).ids]
        windows = torch.tensor(ids[: batches * batch_size * seq]).view(batches, batch_size, seq)
        with torch.no_grad():
            for window in windows:
                module.model(window)
                for i, layer in module.model.moe_layers():
                    sample = layer.experts.kappa_sample()
                    if sample is not None:
                        pooled.setdefault(f"layer_{i:02d}", []).append(sample[0].flatten().numpy())
    stats = {}
    for name, parts in sorted(pooled.items()):
        kappa = np.concatenate(parts)
        p5, p50, p95 = np.percentile(kappa, [5, 50, 95])
        moved = float(np.mean(np.abs(np.log(kappa)) > np.log(1.1)))
        stats[name] = [float(kappa.mean()), float(kappa.std()), float(p5), float(p50), float(p95), moved]
    return stats


def core_from_checkpoint(path: Path, limit: int = 20) -> float:
    """CORE on the mini bundle (evaluation/core_mini), as `CoreEvalCallback(limit=20)` does
    after fit: for runs whose config had no CORE callback."""
    from evaluation import core
    from evaluation.adapter import LitMoELM
    from lit_moe.checkpoint import load_checkpoint

    module, tokenizer = load_checkpoint(str(path))
    lm = LitMoELM(model=module.model, tokenizer=tokenizer, batch_size=16)
    return float(core.evaluate_core(lm, str(REPO / "evaluation" / "core_mini"), None, limit)["CORE"])


def report(workdir: Path, val_file: Path | None = None) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"no experiment {EXPERIMENT!r} in {workdir / 'mlflow.db'}; run without --report-only first.")
    finished = [r for r in client.search_runs([experiment.experiment_id]) if r.info.status == "FINISHED"]
    lines = ["| method | val loss per seed | mean ± sd | CORE (mini) per seed | CORE mean | "
             "κ mean by layer (end) | κ std by layer | corr(conf, κ) by layer |",
             "|---|---|---|---|---|---|---|---|"]
    losses_by: dict[str, dict[str, float]] = {}
    for label in CONFIGS:
        runs = sorted((r for r in finished if r.info.run_name.startswith(f"{label} |")), key=lambda r: r.info.run_name)
        if not runs:
            continue
        seeds = [r.info.run_name.split("| ")[1] for r in runs]
        losses = [r.data.metrics["val/loss"] for r in runs]
        losses_by[label] = dict(zip(seeds, losses))
        cores = [r.data.metrics.get("core/CORE", math.nan) for r in runs]
        entry = CONFIGS[label]
        stem = Path(entry if isinstance(entry, str) else
                    f"{Path(entry[0]).stem}-{'-'.join(map(str, entry[1].values()))}.yaml").stem
        for j, (seed, value) in enumerate(zip(seeds, cores)):
            checkpoint = workdir / f"seed_{seed.split()[-1]}" / "checkpoints" / stem / "last.ckpt"
            if math.isnan(value) and checkpoint.exists():
                cores[j] = core_from_checkpoint(checkpoint)
        layers = sorted({k.split("/")[1] for k in runs[0].data.metrics if k.startswith("kappa/layer_")})

        def by_layer(stat: str) -> str:
            if not layers:
                return "—"
            values = [statistics.fmean(_last(client, r.info.run_id, f"kappa/{layer}/{stat}") for r in runs)
                      for layer in layers]
            return ", ".join(f"{v:.3f}" for v in values)

        spread = statistics.stdev(losses) if len(losses) > 1 else math.nan
        lines.append(f"| {label} | {', '.join(f'{v:.4f} ({s})' for v, s in zip(losses, seeds))} | "
                     f"**{statistics.fmean(losses):.4f}** ± {spread:.4f} | "
                     f"{', '.join(f'{c:.4f}' for c in cores)} | {statistics.fmean(cores):.4f} | "
                     f"{by_layer('mean')} | {by_layer('std')} | {by_layer('corr')} |")
    table = "\n".join(lines)
    for label, kappa in losses_by.items():
        base = label.split(" + ")[0]
        plain = losses_by.get(f"{base} + SwiGLU")
        if "κ" in label and plain:
            diffs = [kappa[s] - plain[s] for s in kappa if s in plain]  # paired by seed: same tokens
            spread = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
            table += (f"\n\n{label} − {base} + SwiGLU, val loss paired by seed: "
                      f"{', '.join(f'{d:+.4f}' for d in diffs)}; mean {statistics.fmean(diffs):+.4f} ± {spread:.4f} "
                      f"(sd over {len(diffs)} seeds).")
    if val_file is not None:
        for config in ("tiny_kappa", "tiny_kappa-top_logit", "tiny_softmoe_kappa"):
            checkpoints = sorted(workdir.glob(f"seed_*/checkpoints/{config}/last.ckpt"))
            if not checkpoints:
                continue
            stats = kappa_distribution(checkpoints, val_file)
            table += (f"\n\nκ after training, {config} ({len(checkpoints)} seeds pooled, validation windows):\n\n"
                      "| layer | mean | std | p5 | p50 | p95 | share outside [1/1.1, 1.1] |\n"
                      "|---|---|---|---|---|---|---|\n")
            table += "\n".join(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
                                for name, values in stats.items())
    print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="1234,4321")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "kappa_experiment")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--only", help="comma-separated labels to run (default: all)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        only = args.only.split(",") if args.only else None
        create_store(args.workdir)
        for seed in (int(s) for s in args.seeds.split(",")):
            run_seed(args.shared.resolve(), args.steps, args.workdir, seed, only)
    table = report(args.workdir, args.shared.resolve() / "data" / "corpus" / "wikipedia_en" / "validation-00.jsonl.gz")
    out = REPO / "docs" / "kappa_experiment_table.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table + "\n")


if __name__ == "__main__":
    main()
