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
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# label → config; each κ config differs from its plain twin only in the experts (and the κ callback).
CONFIGS = {
    "top-2 + SwiGLU": "tiny.yaml",
    "top-2 + κ-SwiGLU": "tiny_kappa.yaml",
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
    for label, config in CONFIGS.items():
        if only and label not in only:
            continue
        cmd = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(REPO / "conf" / config),
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


def report(workdir: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"no experiment {EXPERIMENT!r} in {workdir / 'mlflow.db'}; run without --report-only first.")
    finished = [r for r in client.search_runs([experiment.experiment_id]) if r.info.status == "FINISHED"]
    lines = ["| method | val loss per seed | mean | κ mean by layer (end) | κ std by layer | corr(conf, κ) by layer |",
             "|---|---|---|---|---|---|"]
    means: dict[str, float] = {}
    for label in CONFIGS:
        runs = sorted((r for r in finished if r.info.run_name.startswith(f"{label} |")), key=lambda r: r.info.run_name)
        if not runs:
            continue
        losses = [r.data.metrics["val/loss"] for r in runs]
        means[label] = statistics.fmean(losses)
        layers = sorted({k.split("/")[1] for k in runs[0].data.metrics if k.startswith("kappa/layer_")})

        def by_layer(stat: str) -> str:
            if not layers:
                return "—"
            values = [statistics.fmean(_last(client, r.info.run_id, f"kappa/{layer}/{stat}") for r in runs)
                      for layer in layers]
            return ", ".join(f"{v:.3f}" for v in values)

        seeds = ", ".join(f"{loss:.4f} ({r.info.run_name.split('| ')[1]})" for loss, r in zip(losses, runs))
        lines.append(f"| {label} | {seeds} | **{means[label]:.4f}** | {by_layer('mean')} | {by_layer('std')} | "
                     f"{by_layer('corr')} |")
    table = "\n".join(lines)
    for base in ("top-2", "SoftMoE"):
        plain, kappa = means.get(f"{base} + SwiGLU"), means.get(f"{base} + κ-SwiGLU")
        if plain is not None and kappa is not None:
            table += f"\n\n{base}: κ-SwiGLU − SwiGLU = {kappa - plain:+.4f} nats (mean over seeds)."
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
    table = report(args.workdir)
    out = REPO / "docs" / "kappa_experiment_table.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table + "\n")


if __name__ == "__main__":
    main()
