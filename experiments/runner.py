"""One runner for the project's experiments: named arms × seeds, results from MLflow.

    python experiments/runner.py run experiments/cpu_arms.yaml       # train what is missing, then report
    python experiments/runner.py report experiments/cpu_arms.yaml    # re-read MLflow only
    python experiments/runner.py run experiments/gpu_arms.yaml --only top-2,softmoe --seeds 1

An arm set (YAML, see experiments/cpu_arms.yaml) names a base config and overrides per arm,
overrides shared by all arms (steps, data, size), the seeds, the baseline arm and optional
further `pairs` ([arm, reference]) to compare. Every arm
sees the same tokens: the same data files, batch, sequence length and steps, with the data
order and initialisation drawn from the seed, so arm-vs-baseline differences are paired by seed.

Each arm's resolved config is written to <workdir>/<arm>/config.yaml and its hash goes into the
run's MLflow tags with the arm and the seed. A seed whose FINISHED run carries the same hash is
not run again (resumable; change an arm and only it reruns). Runs go to <workdir>/mlflow.db,
checkpoints to <workdir>/<arm>/seed_<s>/.

The report (markdown table + figures, `--out`): final val loss, CORE, realised active experts
per layer, FLOPs and tokens/s as mean ± sd over seeds; per arm the paired differences against
the baseline (and for each listed pair) with a two-sided sign test and an exact Wilcoxon signed-rank test; figures of val
loss vs tokens, realised experts per layer over training, and κ after training (κ arms).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's lit_moe (the report loads checkpoints)


class ArmSetError(ValueError):
    """A mistake in an arm-set file: the message names it and the fix."""


# -- arm sets ------------------------------------------------------------------------------------
@dataclass
class Arm:
    name: str
    config: dict[str, Any]  # the resolved LightningCLI config


@dataclass
class ArmSet:
    name: str
    seeds: list[int]
    baseline: str
    jobs: int
    arms: list[Arm]
    pairs: list[tuple[str, str]] = field(default_factory=list)  # further (arm, reference) comparisons


_SELECTOR = re.compile(r"^(\w+)\[(\w+)\]$")


def set_override(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a LightningCLI config dict. `trainer.callbacks[CoreEvalCallback]`
    selects the callback whose class_path ends with that name; a None value there removes it
    (if present).
    A key ending in `+` (`trainer.callbacks+`) appends the items of a list value. Missing
    intermediate dicts are created (e.g. a component's init_args)."""
    if key.endswith("+"):
        if not isinstance(value, list):
            raise ArmSetError(f"override {key!r} appends a list; give a list (of callbacks), got {value!r}.")
        parent, _, field = key[:-1].rpartition(".")
        node = config
        for part in parent.split(".") if parent else []:
            node = node.setdefault(part, {})
        node[field] = list(node.get(field) or []) + value
        return
    parts = key.split(".")
    node: Any = config
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        match = _SELECTOR.match(part)
        if match:
            field, cls = match.groups()
            items = node.get(field) or []
            found = [j for j, item in enumerate(items) if str(item.get("class_path", "")).split(".")[-1] == cls]
            if not found and last and value is None:
                return  # removing what is not there: nothing to do
            if not found:
                raise ArmSetError(f"override {key!r}: no {field} entry with class {cls!r} in this config; "
                                  f"its {field} are {[str(it.get('class_path')) for it in items]}.")
            if last:
                if value is None:
                    del items[found[0]]
                else:
                    items[found[0]] = value
                return
            node = items[found[0]]
        elif last:
            node[part] = value
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]


def load_arm_set(path: Path, shared: Path) -> ArmSet:
    """Read an arm-set file; `{shared}` in string values becomes the shared-data folder, and
    relative config paths are taken from the repository root."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ArmSetError(f"cannot read arm set {path}: {err}") from err
    missing = [key for key in ("name", "seeds", "baseline", "arms") if key not in (spec or {})]
    if missing:
        raise ArmSetError(f"arm set {path} lacks {missing}; see experiments/cpu_arms.yaml for the format.")
    if spec["baseline"] not in spec["arms"]:
        raise ArmSetError(f"arm set {path}: baseline {spec['baseline']!r} is not one of its arms {list(spec['arms'])}.")

    def expand(value: Any) -> Any:
        return value.replace("{shared}", str(shared)) if isinstance(value, str) else value

    arms = []
    for name, arm in spec["arms"].items():
        if not re.fullmatch(r"[\w.+*-]+", name):
            raise ArmSetError(f"arm name {name!r}: use letters, digits and . + * - _ only (it names a folder).")
        config_path = REPO / arm["config"]
        if not config_path.is_file():
            raise ArmSetError(f"arm {name!r}: config {arm['config']} does not exist (paths are relative to the repository).")
        config = yaml.safe_load(config_path.read_text())
        for key, value in {**(spec.get("overrides") or {}), **(arm.get("overrides") or {})}.items():
            set_override(config, key, expand(value))
        arms.append(Arm(name, config))
    pairs = [tuple(pair) for pair in spec.get("pairs") or []]
    bad = [pair for pair in pairs if len(pair) != 2 or not set(pair) <= set(spec["arms"])]
    if bad:
        raise ArmSetError(f"arm set {path}: pairs {bad} must each name two of its arms {list(spec['arms'])}.")
    return ArmSet(spec["name"], [int(s) for s in spec["seeds"]], spec["baseline"], int(spec.get("jobs", 1)), arms,
                  pairs)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- running -------------------------------------------------------------------------------------
def _client(workdir: Path):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(workdir / 'mlflow.db').resolve()}")


def finished_runs(workdir: Path, arm_set: ArmSet) -> dict[tuple[str, int], Any]:
    """(arm, seed) → its latest FINISHED MLflow run whose config hash is the arm's current one."""
    if not (workdir / "mlflow.db").exists():
        return {}
    client = _client(workdir)
    experiment = client.get_experiment_by_name(arm_set.name)
    if experiment is None:
        return {}
    hashes = {arm.name: config_hash(arm.config) for arm in arm_set.arms}
    found: dict[tuple[str, int], Any] = {}
    for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time ASC"], max_results=5000):
        tags = run.data.tags
        if tags.get("arm") in hashes and tags.get("arm_hash") == hashes[tags["arm"]]:
            found[(tags["arm"], int(tags["seed"]))] = run
    return found


def prepare_data(arm_set: ArmSet, cache_dir: Path) -> None:
    """Train the tokenizer and tokenize each distinct data section once, before runs start
    together (they would all tokenize the same files at once)."""
    from lit_moe.data import LMDataModule

    seen = set()
    for arm in arm_set.arms:
        data = dict(arm.config.get("data") or {}, cache_dir=str(cache_dir))
        key = json.dumps(data, sort_keys=True)
        if key not in seen:
            seen.add(key)
            LMDataModule(**data).prepare_data()


def run_one(arm: Arm, seed: int, arm_set: ArmSet, workdir: Path, threads: int) -> int:
    arm_dir = workdir / arm.name
    seed_dir = arm_dir / f"seed_{seed}"
    if seed_dir.exists():  # leftovers of an unfinished or outdated run must not mix with this one
        shutil.rmtree(seed_dir)
    seed_dir.mkdir(parents=True)
    tags = {"arm": arm.name, "seed": str(seed), "arm_hash": config_hash(arm.config), "arm_set": arm_set.name}
    cmd = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(arm_dir / "config.yaml"),
           "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.experiment_name", arm_set.name,
           "--trainer.logger.init_args.tracking_uri", f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
           "--trainer.logger.init_args.run_name", f"{arm.name} | seed {seed}",
           "--trainer.logger.init_args.tags", json.dumps(tags),
           "--data.cache_dir", str((workdir / "cache").resolve())]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(REPO))
    with open(seed_dir / "train.log", "w") as log:
        print(f"== {arm.name}, seed {seed}: log {seed_dir / 'train.log'}", flush=True)
        code = subprocess.run(cmd, cwd=seed_dir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"== {arm.name}, seed {seed}: {'done' if code == 0 else f'FAILED (exit {code})'}", flush=True)
    return code


def run_all(arm_set: ArmSet, workdir: Path, jobs: int) -> list[str]:
    """Run every (arm, seed) without a finished run, `jobs` at a time; returns the failures."""
    workdir.mkdir(parents=True, exist_ok=True)
    done = finished_runs(workdir, arm_set)
    plan = [(arm, seed) for seed in arm_set.seeds for arm in arm_set.arms]
    todo = [(arm, seed) for arm, seed in plan if (arm.name, seed) not in done]
    print(f"{len(plan) - len(todo)} finished run(s) reused, {len(todo)} to run, {jobs} at a time", flush=True)
    if not todo:
        return []
    for arm in arm_set.arms:
        (workdir / arm.name).mkdir(exist_ok=True)
        (workdir / arm.name / "config.yaml").write_text(yaml.safe_dump(arm.config, sort_keys=False, allow_unicode=True))
    # Create the store and experiment first: runs starting together on a fresh SQLite store
    # race in its schema migration.
    client = _client(workdir)
    if client.get_experiment_by_name(arm_set.name) is None:
        client.create_experiment(arm_set.name)
    prepare_data(arm_set, workdir / "cache")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(lambda item: run_one(item[0], item[1], arm_set, workdir, threads), todo))
    return [f"{arm.name} seed {seed}" for (arm, seed), code in zip(todo, codes) if code != 0]


# -- statistics ----------------------------------------------------------------------------------
def sign_test(diffs: list[float]) -> float:
    """Two-sided sign test: P(a split at least as uneven) under a fair coin; zeros dropped."""
    nonzero = [d for d in diffs if d != 0]
    n = len(nonzero)
    if n == 0:
        return 1.0
    wins = sum(d > 0 for d in nonzero)
    tail = sum(math.comb(n, i) for i in range(min(wins, n - wins) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def wilcoxon_signed_rank(diffs: list[float]) -> float:
    """Exact two-sided Wilcoxon signed-rank p-value (zeros dropped, ties get mean ranks):
    the share of the 2^n sign flips whose W+ is at least as far from n(n+1)/4 as observed."""
    nonzero = [d for d in diffs if d != 0]
    n = len(nonzero)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(nonzero[i]))
    ranks = [0.0] * n
    i = 0
    while i < n:  # mean ranks over runs of equal |d|
        j = i
        while j + 1 < n and abs(nonzero[order[j + 1]]) == abs(nonzero[order[i]]):
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    centre = n * (n + 1) / 4
    observed = abs(sum(r for r, d in zip(ranks, nonzero) if d > 0) - centre)
    extreme = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - centre) >= observed - 1e-12
                  for signs in itertools.product((False, True), repeat=n))
    return extreme / 2 ** n


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


# -- collecting ----------------------------------------------------------------------------------
@dataclass
class RunResult:
    arm: str
    seed: int
    val_loss: float
    core: float
    tokens: float
    tokens_per_sec: float
    flops_per_token: float
    active: list[float]           # realised experts per token per MoE layer, last quarter of training
    target: list[float]           # the design's per layer (budget k_l or router k)
    active_max: float             # most experts any token got in any layer, over training
    val_curve: list[tuple[float, float]]   # (tokens, val loss)
    active_curves: dict[str, list[tuple[float, float]]]  # layer → (tokens, realised experts)
    target_curves: dict[str, list[tuple[float, float]]]  # layer → (tokens, design k_l)
    checkpoint_dir: Path


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:  # noqa: ANN001
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _tail_mean(points: list[tuple[int, float]], share: float = 0.25) -> float:
    if not points:
        return math.nan
    return statistics.fmean(v for _, v in points[-max(1, int(len(points) * share)):])


def collect(workdir: Path, arm_set: ArmSet) -> list[RunResult]:
    client = _client(workdir)
    results = []
    for (arm, seed), run in sorted(finished_runs(workdir, arm_set).items(), key=lambda item: item[0][1]):
        rid, metrics, params = run.info.run_id, run.data.metrics, run.data.params
        tokens_per_step = float(params.get("trainer/global_batch_size", 0)) * float(params.get("config/seq_len", 0))
        layers = sorted({k.split("/")[1] for k in metrics if k.startswith("compute/layer_")})
        active_curves = {layer: [(step * tokens_per_step, v) for step, v in
                                 _history(client, rid, f"compute/{layer}/active_experts")] for layer in layers}
        target_curves = {layer: [(step * tokens_per_step, v) for step, v in
                                 _history(client, rid, f"compute/{layer}/target_experts")] for layer in layers}
        if layers:
            active = [_tail_mean(active_curves[layer]) for layer in layers]
            target = [metrics.get(f"compute/{layer}/target_experts", math.nan) for layer in layers]
            flops = _tail_mean(_history(client, rid, "compute/flops_per_token"))
            active_max = max((v for layer in layers
                              for _, v in _history(client, rid, f"routing/{layer}/active_max")), default=math.nan)
        else:  # a count that cannot vary (dropless top-k) is logged only as design params
            n = int(params.get("params/moe_layers", 0))
            active = target = [float(params.get("params/active_experts", math.nan)) / n] * n if n else []
            flops = float(params.get("params/flops_per_token", math.nan))
            active_max = max(active, default=math.nan)
        results.append(RunResult(
            arm=arm, seed=seed, val_loss=metrics.get("val/loss", math.nan), core=metrics.get("core/CORE", math.nan),
            tokens=metrics.get("routing/tokens_seen", math.nan),
            tokens_per_sec=statistics.median(v for _, v in _history(client, rid, "throughput/tokens_per_sec") or [(0, math.nan)]),
            flops_per_token=flops, active=active, target=target, active_max=active_max,
            val_curve=[((step + 1) * tokens_per_step, v) for step, v in _history(client, rid, "val/loss")],
            active_curves=active_curves, target_curves=target_curves, checkpoint_dir=workdir / arm / f"seed_{seed}"))
    return results


# -- report --------------------------------------------------------------------------------------
def _fmt(mean: float, sd: float, digits: int = 4, signed: bool = False) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:{'+' if signed else ''}.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def comparisons(arm_set: ArmSet) -> list[tuple[str, str]]:
    """(arm, reference) pairs the report compares: every arm against the baseline, then `pairs`."""
    return [(arm.name, arm_set.baseline) for arm in arm_set.arms if arm.name != arm_set.baseline] + arm_set.pairs


def paired_diffs(results: list[RunResult], arm: str, reference: str, metric: str) -> list[tuple[int, float]]:
    """(seed, arm − reference) of `metric` over the seeds both have finished."""
    base = {r.seed: getattr(r, metric) for r in results if r.arm == reference}
    return [(r.seed, getattr(r, metric) - base[r.seed]) for r in results if r.arm == arm and r.seed in base]


def report_table(arm_set: ArmSet, results: list[RunResult]) -> str:
    by_arm = {arm.name: [r for r in results if r.arm == arm.name] for arm in arm_set.arms}
    lines = [f"Arm set `{arm_set.name}`: mean ± sd over seeds (n = seeds finished).", "",
             "| arm | n | val loss | CORE (mini) | realised experts / token, per layer | total (target) | "
             "max / token | GFLOPs / token | tokens / s | tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, runs in by_arm.items():
        if not runs:
            lines.append(f"| {arm} | 0 | not run | | | | | | | |")
            continue
        layers = len(runs[0].active)
        per_layer = ", ".join(f"{statistics.fmean(r.active[i] for r in runs):.2f}" for i in range(layers))
        total = statistics.fmean(sum(r.active) for r in runs)
        target = statistics.fmean(sum(r.target) for r in runs)
        lines.append(f"| {arm} | {len(runs)} | {_fmt(*mean_sd([r.val_loss for r in runs]))} | "
                     f"{_fmt(*mean_sd([r.core for r in runs]))} | {per_layer} | {total:.2f} ({target:.2f}) | "
                     f"{max(r.active_max for r in runs):g} | "
                     f"{_fmt(*mean_sd([r.flops_per_token / 1e9 for r in runs]), digits=4)} | "
                     f"{_fmt(*mean_sd([r.tokens_per_sec for r in runs]), digits=0)} | "
                     f"{statistics.fmean(r.tokens for r in runs):.3g} |")
    lines += ["", "Paired by seed (Δ = arm − reference; val loss: lower is better, CORE: higher is better; "
              f"p: two-sided, exact); the reference is the baseline `{arm_set.baseline}` unless named:", "",
              "| arm | reference | metric | Δ per seed | mean Δ ± sd | median Δ | arm better | sign test p | Wilcoxon p |",
              "|---|---|---|---|---|---|---|---|---|"]
    for arm, reference in comparisons(arm_set):
        for metric, better_low in (("val_loss", True), ("core", False)):
            pairs = paired_diffs(results, arm, reference, metric)
            diffs = [d for _, d in pairs if math.isfinite(d)]
            if not diffs:
                continue
            better = sum((d < 0) if better_low else (d > 0) for d in diffs)
            lines.append(f"| {arm} | {reference} | {'val loss' if better_low else 'CORE'} | "
                         f"{', '.join(f'{d:+.4f} (s{s})' for s, d in pairs)} | {_fmt(*mean_sd(diffs), signed=True)} | "
                         f"{statistics.median(diffs):+.4f} | "
                         f"{better}/{len(diffs)} | {sign_test(diffs):.3f} | {wilcoxon_signed_rank(diffs):.3f} |")
    n = max((len(runs) for runs in by_arm.values()), default=0)
    lines += ["", f"With n = {n} seeds the smallest two-sided p either test can give is {2 / 2 ** n:.3f}."
              if n else ""]
    return "\n".join(lines)


def kappa_samples(checkpoints: list[Path], val_file: str | list[str], windows: int = 4, batch_size: int = 8
                  ) -> dict[str, Any]:
    """κ over the (pair, gate unit) entries the κ experts sample, pooled over a few validation
    windows of every checkpoint (from the first file `val_file` names): layer name → 1-D array."""
    import gzip

    import numpy as np
    import torch

    from lit_moe.module import load_checkpoint

    pooled: dict[str, list[Any]] = {}
    import glob

    first = sorted(glob.glob(val_file if isinstance(val_file, str) else val_file[0]))[0]
    with (gzip.open(first, "rt") if first.endswith(".gz") else open(first)) as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, 2000)]
    for path in checkpoints:
        module, tokenizer = load_checkpoint(str(path))
        seq = module.config.seq_len
        ids = list(itertools.islice((t for text in texts for t in tokenizer.encode(text).ids), windows * batch_size * seq))
        if len(ids) < windows * batch_size * seq:
            continue
        with torch.no_grad():
            for window in torch.tensor(ids).view(windows, batch_size, seq):
                module.model(window)
                for i, layer in module.model.moe_layers():
                    sample = layer.experts.kappa_sample() if hasattr(layer.experts, "kappa_sample") else None
                    if sample is not None:
                        pooled.setdefault(f"layer_{i:02d}", []).append(sample[0].flatten().float().numpy())
    return {name: np.concatenate(parts) for name, parts in sorted(pooled.items())}


def count_varies(arm: Arm) -> bool:
    """Whether the arm's experts per token can vary (SoftMoE; top-k with a capacity limit)."""
    router = arm.config["model"]["config"].get("router", {})
    return "SoftTopK" in str(router.get("class_path")) or (router.get("init_args") or {}).get("capacity_factor") is not None


def kappa_arms(arm_set: ArmSet) -> list[Arm]:
    return [arm for arm in arm_set.arms
            if "Kappa" in str(arm.config["model"]["config"].get("experts", {}).get("class_path", ""))]


def report_figures(arm_set: ArmSet, results: list[RunResult], out: Path) -> tuple[list[Path], str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written, kappa_text = [], ""
    arms = [arm.name for arm in arm_set.arms if any(r.arm == arm.name for r in results)]
    # Val loss vs tokens: mean over seeds, band min..max.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        curves = [r.val_curve for r in results if r.arm == arm and r.val_curve]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        x = [p[0] for p in curves[0][:length]]
        values = np.array([[p[1] for p in c[:length]] for c in curves])
        ax.plot(x, values.mean(0), marker="o", label=arm)
        ax.fill_between(x, values.min(0), values.max(0), alpha=0.15)
    ax.set(xlabel="training tokens", ylabel="val loss", title=f"{arm_set.name}: val loss (mean, min–max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out.with_name(out.name + "_loss.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    # Paired val-loss differences, one dot per seed: the spread the mean ± sd summarises.
    shown = [(a, b) for a, b in comparisons(arm_set) if a in arms and b in arms]
    if shown:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(shown) + 1.2))
        for row, (arm, reference) in enumerate(shown):
            diffs = [d for _, d in paired_diffs(results, arm, reference, "val_loss")]
            ax.scatter(diffs, [row] * len(diffs), s=18, alpha=0.8)
            if diffs:
                ax.plot([statistics.median(diffs)] * 2, [row - 0.3, row + 0.3], color="k", lw=1.5)
        ax.axvline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(shown)), [f"{a} − {b}" for a, b in shown], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="Δ val loss per seed (bar: median; left of 0: arm better)",
               title=f"{arm_set.name}: paired differences")
        fig.tight_layout()
        written.append(out.with_name(out.name + "_paired.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    # Realised experts per layer over training, for the arms whose count varies.
    varying = [arm.name for arm in arm_set.arms if arm.name in arms and count_varies(arm)]
    if varying:
        fig, axes = plt.subplots(1, len(varying), figsize=(4.2 * len(varying), 3.6), squeeze=False, sharey=True)
        for ax, arm in zip(axes[0], varying):
            runs = [r for r in results if r.arm == arm]
            for layer in sorted(runs[0].active_curves):
                color = None
                for curves, style in (([r.active_curves[layer] for r in runs], "-"),
                                      ([r.target_curves[layer] for r in runs], ":")):
                    length = min(len(c) for c in curves)
                    if not length:
                        continue
                    x = [p[0] for p in curves[0][:length]]
                    line, = ax.plot(x, np.mean([[p[1] for p in c[:length]] for c in curves], axis=0), ls=style,
                                    color=color, lw=1.5 if style == "-" else 1.0, label=layer if style == "-" else None)
                    color = line.get_color()
            ax.set(title=arm, xlabel="training tokens")
        axes[0][0].set_ylabel("experts / token (mean over seeds; dotted: k_l)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        written.append(out.with_name(out.name + "_experts.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    # κ after training (pooled over seeds' last checkpoints).
    k_arms = [arm for arm in kappa_arms(arm_set) if arm.name in arms]
    if k_arms:
        fig, axes = plt.subplots(1, len(k_arms), figsize=(5 * len(k_arms), 3.6), squeeze=False)
        rows = ["| arm | layer | mean κ | sd | p5 | p50 | p95 | share with |ln κ| > ln 1.1 |", "|---|---|---|---|---|---|---|---|"]
        for ax, arm in zip(axes[0], k_arms):
            checkpoints = sorted(p for r in results if r.arm == arm.name for p in r.checkpoint_dir.glob("**/last.ckpt"))
            samples = kappa_samples(checkpoints, arm.config["data"]["val_files"]) if checkpoints else {}
            for layer, kappa in samples.items():
                ax.hist(kappa, bins=60, histtype="step", label=layer, density=True)
                p5, p50, p95 = np.percentile(kappa, [5, 50, 95])
                rows.append(f"| {arm.name} | {layer} | {kappa.mean():.3f} | {kappa.std():.3f} | {p5:.3f} | {p50:.3f} | "
                            f"{p95:.3f} | {np.mean(np.abs(np.log(kappa)) > np.log(1.1)):.3f} |")
            ax.set(title=f"{arm.name}: κ after training", xlabel="κ")
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out.with_name(out.name + "_kappa.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        kappa_text = ("κ after training (last checkpoint of every seed, 4 validation windows each, sampled "
                      "(token, gate unit) pairs):\n\n" + "\n".join(rows))
    return written, kappa_text


def report(arm_set: ArmSet, workdir: Path, out: Path) -> str:
    results = collect(workdir, arm_set)
    if not results:
        raise ArmSetError(f"no finished runs of {arm_set.name!r} in {workdir}; run `runner.py run` first.")
    tokens = {round(r.tokens) for r in results if math.isfinite(r.tokens)}
    text = report_table(arm_set, results)
    if len(tokens) > 1:
        text += f"\n\n**Warning: the runs saw different token counts {sorted(tokens)}; the comparison is not at equal tokens.**"
    out.parent.mkdir(parents=True, exist_ok=True)
    figures, kappa_text = report_figures(arm_set, results, out)
    if kappa_text:
        text += "\n\n" + kappa_text
    text += "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("arm_set", type=Path, help="arm-set YAML, e.g. experiments/cpu_arms.yaml")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                        help="folder with data/corpus (replaces {shared} in the arm set)")
    parser.add_argument("--workdir", type=Path, help="runs, MLflow store, caches (default runs/<arm set name>)")
    parser.add_argument("--out", type=Path, help="report path without suffix (default <workdir>/report)")
    parser.add_argument("--jobs", type=int, help="runs at once (default: the arm set's jobs)")
    parser.add_argument("--only", help="comma-separated arms to run (the report shows all)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the arm set's)")
    args = parser.parse_args(argv)
    try:
        arm_set = load_arm_set(args.arm_set, args.shared.resolve())
        if args.seeds:
            arm_set.seeds = [int(s) for s in args.seeds.split(",")]
        workdir = (args.workdir or REPO / "runs" / arm_set.name).resolve()
        out = args.out or workdir / "report"
        if args.command == "run":
            selected = arm_set
            if args.only:
                names = args.only.split(",")
                unknown = sorted(set(names) - {arm.name for arm in arm_set.arms})
                if unknown:
                    raise ArmSetError(f"--only: no arm {unknown} in {args.arm_set}; its arms are {[a.name for a in arm_set.arms]}.")
                selected = ArmSet(arm_set.name, arm_set.seeds, arm_set.baseline, arm_set.jobs,
                                  [arm for arm in arm_set.arms if arm.name in names], arm_set.pairs)
            failed = run_all(selected, workdir, args.jobs or arm_set.jobs)
            if failed:
                print(f"runs failed: {failed}; their train.log files say why. Rerun to retry only these.", file=sys.stderr)
                return 1
        report(arm_set, workdir, out)
    except ArmSetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
