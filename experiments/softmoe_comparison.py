"""SoftMoE experiment (issue 3): top-2 baseline vs SoftMoE (learned allocation) vs SoftMoE*
(fixed k_l = K/L), tiny configs, same steps and tokens, trained on the shared Wikipedia corpus.

    python experiments/softmoe_comparison.py --shared ../shared --steps 300
    python experiments/softmoe_comparison.py --report-only     # re-read the MLflow store

Runs go to <workdir>/mlflow.db (experiment "softmoe-comparison"); the table and plot are
written to docs/softmoe_experiment.md and docs/softmoe_experiment.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"top-2 baseline": "tiny.yaml", "SoftMoE learned (K=1.5L)": "tiny_softmoe.yaml",
           "SoftMoE* fixed (k=1.5)": "tiny_softmoe_fixed.yaml"}
EXPERIMENT = "softmoe-comparison"


def run_all(shared: Path, steps: int, workdir: Path, only: list[str] | None, parallel: bool) -> None:
    """Run the configs one after another, or all at once with one thread each (--parallel)."""
    corpus = shared / "data" / "corpus" / "wikipedia_en"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    if parallel:
        env["OMP_NUM_THREADS"] = "1"
    procs = []
    for label, config in CONFIGS.items():
        if only and label not in only:
            continue
        cmd = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(REPO / "conf" / config),
               "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.experiment_name", EXPERIMENT,
               "--trainer.logger.init_args.run_name", label,
               "--data.train_files", str(corpus / "train-00.jsonl.gz"),
               "--data.val_files", str(corpus / "validation-00.jsonl.gz")]
        print(f"== {label}: {' '.join(cmd[1:])}", flush=True)
        if parallel:
            procs.append(subprocess.Popen(cmd, cwd=workdir, env=env))
        else:
            subprocess.run(cmd, cwd=workdir, env=env, check=True)
    if any(p.wait() for p in procs):
        raise SystemExit("a run failed; see its output above")


def _tail_mean(client, run_id: str, key: str, last: int = 50) -> float | None:
    history = client.get_metric_history(run_id, key)
    values = [m.value for m in sorted(history, key=lambda m: m.step)][-last:]
    return statistics.fmean(values) if values else None


def report(workdir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"no experiment {EXPERIMENT!r} in {workdir / 'mlflow.db'}; run without --report-only first.")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])}
    rows, fig_rows = [], []
    fig, (ax_loss, ax_active) = plt.subplots(1, 2, figsize=(11, 4))
    for label in CONFIGS:
        run = runs.get(label)
        if run is None:
            continue
        rid, metrics = run.info.run_id, run.data.metrics
        layers = sorted({k.split("/")[-1] for k in metrics if k.startswith("budget/active/layer_")})
        train_active = [_tail_mean(client, rid, f"budget/active/layer_{l[-2:]}") for l in layers]
        val_active = [metrics.get(f"budget/val/active/layer_{l[-2:]}") for l in layers]
        params = run.data.params
        ks = [metrics.get(f"budget/k/layer_{l[-2:]}") for l in layers]
        if layers and None in ks and params.get("config/budget/total"):  # a fixed budget logs k_l = K/L as params
            ks = [float(params["config/budget/total"]) / int(params["config/n_layers"])] * len(layers)
        tok_s = _tail_mean(client, rid, "throughput/tokens_per_sec", 200)
        batch_tokens = int(params.get("data/batch_size", 16)) * int(params.get("config/seq_len", 256))
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs) if xs and None not in xs else "2 (fixed top-2)"
        rows.append(f"| {label} | {metrics['val/loss']:.4f} | {fmt(train_active)} | {fmt(val_active)} | "
                    f"{fmt(ks) if ks else '—'} | {batch_tokens / tok_s * 1e3:.0f} |")
        history = sorted(client.get_metric_history(rid, "val/loss"), key=lambda m: m.step)
        ax_loss.plot([m.step for m in history], [m.value for m in history], marker="o", label=label)
        if layers:
            fig_rows.append((label, train_active, ks))
    width = 0.35
    for j, (label, active, ks) in enumerate(fig_rows):
        xs = [i + (j - 0.5) * width for i in range(len(active))]
        ax_active.bar(xs, active, width, label=f"{label}: realised (train)")
        ax_active.scatter(xs, ks, color="black", marker="_", s=300, zorder=3)
    ax_loss.set(xlabel="step", ylabel="val/loss", title="Validation loss")
    ax_loss.legend()
    ax_active.axhline(2.0, color="grey", ls="--", lw=1, label="top-2 baseline")
    ax_active.set(xlabel="MoE layer", ylabel="active experts / token", title="Realised active experts (bars) vs k_l (—)")
    ax_active.legend(fontsize=7)
    fig.tight_layout()
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    fig.savefig(docs / "softmoe_experiment.png", dpi=110)
    table = "\n".join(["| method | val loss | active/layer (train, last 50 steps) | active/layer (val) | k_l (end) | step ms |",
                       "|---|---|---|---|---|---|", *rows])
    (docs / "softmoe_experiment_table.md").write_text(table + "\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "softmoe_experiment")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--only", help="comma-separated labels to run (default: all)")
    parser.add_argument("--parallel", action="store_true", help="run the configs at once, one thread each")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        only = args.only.split(",") if args.only else None
        run_all(args.shared.resolve(), args.steps, args.workdir, only, args.parallel)
    report(args.workdir)


if __name__ == "__main__":
    main()
