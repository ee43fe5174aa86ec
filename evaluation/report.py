"""`report`: compare training runs from the MLflow store — a table and a validation-loss plot.

    python cli.py report --experiment lit-moe-tiny
    python cli.py report --run_ids RUN_A,RUN_B --tracking_uri sqlite:///mlflow.db --output comparison.png

Per run: name, method (router and experts from the logged config), last `val/loss`, realised
active experts per token and MoE layer (`routing/active_mean` of RoutingStatsCallback; k for a
dropless top-k router, which logs no such metric), parameters total/active (`params/*` of
RunInfoCallback), median `throughput/tokens_per_sec`, and `core/CORE` when present; missing
values print as "-". The plot draws `val/loss` against training tokens (`routing/tokens_seen`;
else step × batch_size × seq_len; else steps). Runs logged before these names were settled
(`train/tokens_per_sec`, params `batch_size`, `seq_len`) are read too.

Input errors (no store, unknown experiment or run, nothing to compare) raise ConfigError;
`cli.py` prints them as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_moe.errors import ConfigError

MISSING = "-"


@dataclass
class RunSummary:
    run_id: str
    name: str
    method: str
    val_loss: float | None
    active_experts: float | None
    params_total: int | None
    params_active: int | None
    tokens_per_sec: float | None
    core: float | None
    # Validation loss history: (optimizer step, training tokens or None, val/loss).
    curve: list[tuple[int, float | None, float]] = field(default_factory=list)


# -- reading the store ----------------------------------------------------------------------------
def open_store(tracking_uri: str) -> Any:
    """An MlflowClient for an existing store (a missing SQLite file is an error: MLflow would
    silently create an empty one)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise ConfigError(f"no MLflow store at '{path}' (--tracking_uri {tracking_uri}); train a run first "
                              f"or point --tracking_uri at the store that holds the runs.")
    return MlflowClient(tracking_uri=tracking_uri)


def select_runs(client: Any, experiment: str | None, run_ids: list[str]) -> list[Any]:
    """The runs of `experiment` (oldest first) or the runs named by id, in the order given."""
    from mlflow.exceptions import MlflowException

    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            known = f"known experiments: {', '.join(names)}" if names else "the store holds no experiments"
            raise ConfigError(f"unknown experiment '{experiment}' ({known}).")
        runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
        if not runs:
            raise ConfigError(f"experiment '{experiment}' has no runs.")
        return list(runs)
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException as err:
            raise ConfigError(f"unknown run id '{run_id}' in this MLflow store.") from err
    return runs


def _short(class_path: str | None) -> str:
    return class_path.rsplit(".", 1)[-1] if class_path else "?"


def method_name(params: dict[str, str]) -> str:
    """Router and experts classes with the router options that define the method."""
    details = [f"{key}={params[f'config/router/init_args/{key}']}" for key in ("top_k", "k", "capacity_factor")
               if params.get(f"config/router/init_args/{key}", "None") != "None"]
    if params.get("config/budget/total", "None") != "None":
        kind = "learned" if params.get("config/budget/learnable") == "True" else "fixed"
        details.append(f"K={params['config/budget/total']} {kind}")
    router = _short(params.get("config/router/class_path"))
    return f"{router}({', '.join(details)}) + {_short(params.get('config/experts/class_path'))}"


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _first(mapping: dict[str, Any], *keys: str) -> Any:
    return next((mapping[key] for key in keys if key in mapping), None)


def fixed_active_experts(params: dict[str, str]) -> float | None:
    """k of a dropless top-k router (every token gets exactly k experts), else None."""
    if _short(params.get("config/router/class_path")) != "TopKRouter":
        return None
    if params.get("config/router/init_args/capacity_factor", "None") != "None":
        return None
    k = params.get("config/router/init_args/top_k", "2")  # TopKRouter's default
    try:
        return float(k)
    except ValueError:
        return None


def summarize_run(client: Any, run: Any) -> RunSummary:
    run_id, params, metrics = run.info.run_id, run.data.params, run.data.metrics
    speeds = [m.value for m in client.get_metric_history(run_id, "throughput/tokens_per_sec")]
    if not speeds:  # runs logged before `throughput/tokens_per_sec`
        speeds = [m.value for m in client.get_metric_history(run_id, "train/tokens_per_sec")]
    val = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/loss"))
    tokens = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "routing/tokens_seen"))
    tokens_per_step = None
    batch_size = _int(_first(params, "trainer/global_batch_size", "data/batch_size", "batch_size"))
    seq_len = _int(_first(params, "config/seq_len", "seq_len"))
    if batch_size and seq_len:
        tokens_per_step = batch_size * seq_len
    def tokens_at(step: int) -> float | None:
        # MLflow steps are Lightning's 0-based step index: step s comes after s + 1 steps.
        if tokens:
            return _interpolate(tokens, step)
        return (step + 1) * tokens_per_step if tokens_per_step else None

    return RunSummary(
        run_id=run_id, name=run.info.run_name or run_id[:8], method=method_name(params),
        val_loss=metrics.get("val/loss"),
        active_experts=metrics.get("routing/active_mean", fixed_active_experts(params)),
        params_total=_int(params.get("params/total")),
        # Realised (the routers' counts over the last window) where the count varies, else the design's.
        params_active=_int(metrics.get("compute/active_params", params.get("params/active"))),
        tokens_per_sec=statistics.median(speeds) if speeds else None, core=metrics.get("core/CORE"),
        curve=[(step, tokens_at(step), loss) for step, loss in val])


def _interpolate(points: list[tuple[int, float]], step: int) -> float:
    """Tokens seen at `step`, linear between the logged (step, tokens) points, from (-1, 0)
    (before the first step); beyond the last point, extrapolated at the last window's rate."""
    points = [(-1, 0.0), *points]
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if step <= s1:
            return t0 + (t1 - t0) * (step - s0) / max(1, s1 - s0)
    (s0, t0), (s1, t1) = points[-2], points[-1]
    return t1 + (t1 - t0) * (step - s1) / max(1, s1 - s0)


# -- output ---------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _millions(value: int | None) -> str:
    return MISSING if value is None else f"{value / 1e6:.2f}M"


def format_table(runs: list[RunSummary]) -> str:
    header = ["run", "method", "val loss", "active/layer", "params total", "params active", "tokens/s", "CORE"]
    rows = [[r.name, r.method, _fmt(r.val_loss, ".4f"), _fmt(r.active_experts, ".2f"), _millions(r.params_total),
             _millions(r.params_active), _fmt(r.tokens_per_sec, ".0f"), _fmt(r.core, ".4f")] for r in runs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Text columns left-aligned, numbers right-aligned.
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def comparison_plot(runs: list[RunSummary], output: str) -> bool:
    """Validation loss vs training tokens (steps if any run lacks a token count), one line per
    run, as a PNG. False when no run has a validation loss to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawable = [r for r in runs if r.curve]
    if not drawable:
        return False
    in_tokens = all(tokens is not None for r in drawable for _, tokens, _ in r.curve)
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for r in drawable:
        xs = [tokens if in_tokens else step for step, tokens, _ in r.curve]
        ax.plot(xs, [loss for _, _, loss in r.curve], marker="o", markersize=3, label=f"{r.name} ({r.method})")
    ax.set_xlabel("training tokens" if in_tokens else "optimizer step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("validation loss", fontsize=10)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    return True


# -- command --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-moe report", description="Compare training runs tracked in MLflow.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="all runs of this MLflow experiment")
    which.add_argument("--run_ids", help="comma-separated MLflow run ids")
    p.add_argument("--tracking_uri", default="sqlite:///mlflow.db", help="MLflow store (default: %(default)s)")
    p.add_argument("--output", default="run_comparison.png", help="comparison plot PNG (default: %(default)s)")
    return p


def main(args: list[str] | None = None) -> list[RunSummary]:
    from mlflow.exceptions import MlflowException

    opts = _parser().parse_args(args)
    run_ids = [r.strip() for r in (opts.run_ids or "").split(",") if r.strip()]
    if opts.run_ids is not None and not run_ids:
        raise ConfigError("--run_ids is empty; give comma-separated MLflow run ids.")
    client = open_store(opts.tracking_uri)
    try:
        summaries = [summarize_run(client, run) for run in select_runs(client, opts.experiment, run_ids)]
    except MlflowException as err:
        raise ConfigError(f"could not read the MLflow store at {opts.tracking_uri}: {err.message}") from err
    print(format_table(summaries))
    if comparison_plot(summaries, opts.output):
        print(f"validation-loss comparison plot: {opts.output}")
    else:
        print("no run has a validation loss yet; no plot written")
    return summaries


__all__ = ["RunSummary", "open_store", "select_runs", "method_name", "summarize_run", "format_table",
           "comparison_plot", "fixed_active_experts", "main"]
