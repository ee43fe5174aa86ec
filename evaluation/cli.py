"""`evaluate`: CORE score of a checkpoint (METHODS §4).

    python cli.py evaluate --ckpt_path checkpoints/tiny/last.ckpt
    python cli.py evaluate --ckpt_path last.ckpt --bundle PATH/core_bundle --tasks arc_easy,piqa --limit 200
    python cli.py evaluate --ckpt_path last.ckpt --mlflow_run_id RUN --tracking_uri sqlite:///mlflow.db
    python cli.py evaluate --export_lm_eval tasks/ [--bundle DIR]   # task YAMLs for `python -m evaluation`

Input errors raise ConfigError; `cli.py` prints them as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from evaluation import core
from lit_moe.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-moe evaluate", description="CORE evaluation of a lit-moe checkpoint.")
    p.add_argument("--ckpt_path", help="checkpoint written by `fit` (model and tokenizer)")
    p.add_argument("--bundle", default=str(core.DEFAULT_BUNDLE),
                   help="CORE bundle directory (core.yaml, eval_meta_data.csv, eval_data/); default: the mini bundle")
    p.add_argument("--tasks", help="comma-separated task labels (default: all tasks of the bundle)")
    p.add_argument("--limit", type=int, help="evaluate at most this many items per task")
    p.add_argument("--output", default="core_results.json", help="JSON results file (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA if available)")
    p.add_argument("--seed", type=int, default=core.FEWSHOT_SEED, help="few-shot sampling seed")
    p.add_argument("--mlflow_run_id", help="also log core/* metrics and the results table to this MLflow run")
    p.add_argument("--tracking_uri", default="sqlite:///mlflow.db", help="MLflow store of --mlflow_run_id")
    p.add_argument("--export_lm_eval", metavar="DIR",
                   help="write the bundle's tasks as lm-eval task YAMLs into DIR and exit (no checkpoint needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args: list[str] | None = None) -> dict | None:
    opts = _parser().parse_args(args)
    tasks = [t.strip() for t in opts.tasks.split(",") if t.strip()] if opts.tasks else None
    # Check everything cheap before loading the checkpoint.
    core.check_limit(opts.limit)
    if opts.batch_size < 1:
        raise ConfigError(f"--batch_size must be ≥ 1, got {opts.batch_size}.")
    core.load_bundle(opts.bundle, tasks)
    if opts.export_lm_eval:
        for path in core.write_lm_eval_tasks(opts.bundle, opts.export_lm_eval, tasks):
            print(path)
        return None
    if not opts.ckpt_path:
        raise ConfigError("--ckpt_path is required (a checkpoint written by `fit`).")

    from evaluation.adapter import LitMoELM  # imports torch and Lightning: after the checks

    lm = LitMoELM(checkpoint=opts.ckpt_path, batch_size=opts.batch_size, device=opts.device)
    result = core.evaluate_core(lm, opts.bundle, tasks, opts.limit, opts.seed, progress=not opts.quiet)
    result["checkpoint"] = opts.ckpt_path
    core.write_json(result, opts.output)
    print(core.results_table(result))
    print(f"CORE = {result['CORE']:.4f} over {len(result['tasks'])} tasks; results in {opts.output}")
    if opts.mlflow_run_id:
        core.log_to_mlflow(result, opts.mlflow_run_id, opts.tracking_uri)
        print(f"logged to MLflow run {opts.mlflow_run_id}")
    return result


def run(args: list[str] | None = None) -> None:
    """Console entry: `python cli.py evaluate ...`, with the CLI's one error handling (one
    message and exit code 2 for bad input)."""
    from cli import main as lit_moe_main  # the top-level command line, installed as the `cli` module

    lit_moe_main(["evaluate", *(sys.argv[1:] if args is None else args)])


if __name__ == "__main__":
    run()
