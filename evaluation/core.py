"""CORE evaluation (docs: METHODS §4): bundle reading, request building, scoring, reporting.

A bundle is a directory holding ``core.yaml`` (the tasks: type, few-shot count, continuation
delimiter), ``eval_meta_data.csv`` (random baselines, percent) and
``eval_data/<category>/<task>.jsonl`` (MosaicML ICL format, one item a line).

The requests are built here and sent through any lm-eval ``LM`` (``lm.loglikelihood``)
because lm-eval's task machinery scores choices by summed (or per-character) log-likelihood,
not by CORE's mean per-token loss. For lm-eval's own runner the same tasks are also
written as lm-eval task YAMLs (:func:`write_lm_eval_tasks`), scored with lm-eval's metrics.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM, TemplateLM

from lit_moe.atomic import atomic_path
from lit_moe.errors import ConfigError

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "core_mini"
FEWSHOT_SEED = 1234
FEWSHOT_SEPARATOR = "\n\n"  # between few-shot examples, and before the item
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# Required fields and their JSON types per task type (MosaicML ICL format).
ITEM_FIELDS: dict[str, dict[str, type]] = {
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "language_modeling": {"context": str, "continuation": str},
}


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str
    path: Path  # the task's JSONL file
    num_fewshot: int
    delimiter: str  # between an item's context and its answer
    baseline: float  # accuracy of random guessing, percent


@dataclass
class ItemRequests:
    """An item's (context, continuation) requests and the index of the right one."""

    pairs: list[tuple[str, str]]
    gold: int
    answer_chars: list[int]  # characters of each answer, for lm-eval's acc_norm


# -- bundle ------------------------------------------------------------------------------
def load_bundle(bundle: str | os.PathLike[str], tasks: Sequence[str] | None = None) -> list[CoreTask]:
    """The bundle's tasks (all, or those named in `tasks`, in that order), validated."""
    root = Path(bundle)
    if not root.is_dir():
        raise ConfigError(f"CORE bundle '{root}' is not a directory; pass --bundle DIR holding core.yaml, "
                          f"eval_meta_data.csv and eval_data/.")
    for name in ("core.yaml", "eval_meta_data.csv"):
        if not (root / name).is_file():
            raise ConfigError(f"CORE bundle '{root}' has no {name}.")
    try:
        config = yaml.safe_load((root / "core.yaml").read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{root / 'core.yaml'} is not valid YAML: {err}") from err
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{root / 'core.yaml'} has no `icl_tasks` list.")
    baselines = _read_baselines(root / "eval_meta_data.csv")

    found: dict[str, CoreTask] = {}
    for entry in entries:
        task = _parse_task(root, entry, baselines)
        if task.label in found:
            raise ConfigError(f"{root / 'core.yaml'}: task '{task.label}' is listed twice.")
        found[task.label] = task
    if tasks is None:
        selected = list(found.values())
    else:
        unknown = [name for name in tasks if name not in found]
        if unknown:
            raise ConfigError(f"task(s) {', '.join(unknown)} not in the CORE bundle '{root}'; "
                              f"valid tasks: {', '.join(found)}.")
        if not tasks:
            raise ConfigError("no tasks selected.")
        selected = [found[name] for name in dict.fromkeys(tasks)]
    for task in selected:
        if not task.path.is_file():
            raise ConfigError(f"CORE task '{task.label}': data file '{task.path}' does not exist.")
    return selected


def _read_baselines(path: Path) -> dict[str, float]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise ConfigError(f"{path} needs the columns 'Eval Task' and 'Random baseline'.")
    baselines = {}
    for line, row in enumerate(rows, start=2):
        try:
            baselines[row["Eval Task"].strip()] = float(row["Random baseline"])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}:{line}: 'Random baseline' is not a number ({row['Random baseline']!r}).") from err
    return baselines


def _parse_task(root: Path, entry: Any, baselines: dict[str, float]) -> CoreTask:
    where = f"{root / 'core.yaml'}"
    if not isinstance(entry, dict) or not all(k in entry for k in ("label", "dataset_uri", "icl_task_type")):
        raise ConfigError(f"{where}: each task needs label, dataset_uri and icl_task_type; got {entry!r}.")
    label, task_type = str(entry["label"]), entry["icl_task_type"]
    if task_type not in TASK_TYPES:
        raise ConfigError(f"{where}: task '{label}' has icl_task_type {task_type!r}; expected one of {TASK_TYPES}.")
    # core.yaml lists few-shot counts (CORE runs each task at one count: the first).
    shots = entry.get("num_fewshot", [0])
    shots = shots[0] if isinstance(shots, list) and shots else shots
    if not isinstance(shots, int) or shots < 0:
        raise ConfigError(f"{where}: task '{label}' has an invalid num_fewshot {entry.get('num_fewshot')!r}.")
    if label not in baselines:
        raise ConfigError(f"{root / 'eval_meta_data.csv'} has no random baseline for task '{label}'.")
    if not 0 <= baselines[label] < 100:
        raise ConfigError(f"task '{label}': random baseline {baselines[label]} is not in [0, 100).")
    return CoreTask(label=label, task_type=task_type, path=root / "eval_data" / entry["dataset_uri"],
                    num_fewshot=shots, delimiter=str(entry.get("continuation_delimiter", " ")),
                    baseline=baselines[label])


def read_items(task: CoreTask) -> list[dict[str, Any]]:
    """The task's items, each checked for its type's fields (errors name file:line)."""
    items = []
    with open(task.path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{task.path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg}).") from err
            _check_item(item, task.task_type, where)
            items.append(item)
    if not items:
        raise ConfigError(f"{task.path}: no items.")
    return items


def _check_item(item: Any, task_type: str, where: str) -> None:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(item).__name__}.")
    for name, kind in ITEM_FIELDS[task_type].items():
        if not isinstance(item.get(name), kind) or isinstance(item.get(name), bool):
            raise ConfigError(f"{where}: {task_type} items need '{name}' ({kind.__name__}); got {item.get(name)!r}.")
    options = item.get("choices", item.get("context_options"))
    if options is not None:
        if not options or not all(isinstance(o, str) for o in options):
            raise ConfigError(f"{where}: the options must be a non-empty list of strings.")
        if not 0 <= item["gold"] < len(options):
            raise ConfigError(f"{where}: gold={item['gold']} is not an index into its {len(options)} options.")


# -- requests ----------------------------------------------------------------------------
def fewshot_indices(items: Sequence[Any], index: int, k: int, seed: int = FEWSHOT_SEED) -> list[int]:
    """Up to `k` distinct random items to show before item `index`: never the item itself
    nor a verbatim copy of it. Seeded per item, so an item's examples do not depend on
    --limit or on which other tasks run."""
    rng = random.Random(f"{seed}:{index}")
    chosen: list[int] = []
    tried = {index}
    while len(chosen) < k and len(tried) < len(items):  # rejection sampling: k ≪ len(items) usually
        j = rng.randrange(len(items))
        if j not in tried:
            tried.add(j)
            if items[j] != items[index]:
                chosen.append(j)
    return chosen


def _shown(task: CoreTask, item: dict[str, Any]) -> str:
    """An item rendered as a solved few-shot example."""
    if task.task_type == "multiple_choice":
        return item["query"] + task.delimiter + item["choices"][item["gold"]]
    if task.task_type == "schema":
        return item["context_options"][item["gold"]] + task.delimiter + item["continuation"]
    return item["context"].strip() + task.delimiter + item["continuation"]


def _split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    # lm-eval's convention: word-boundary whitespace belongs to the continuation
    # ("...Answer:", " A"), as its tasks send it and its TemplateLM would move it anyway.
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def build_requests(task: CoreTask, items: Sequence[dict[str, Any]], limit: int | None = None,
                   seed: int = FEWSHOT_SEED) -> list[ItemRequests]:
    """Requests for the first `limit` items (all when None); few-shot examples from all items.

    Prompt = examples joined by a blank line, a blank line, then the item:
    multiple_choice: query + delimiter, then each choice; schema: each context option +
    delimiter, then the shared continuation; language_modeling: stripped context +
    delimiter, then the continuation (scored by greedy match).
    """
    out = []
    for index, item in enumerate(items[:limit]):
        shots = fewshot_indices(items, index, task.num_fewshot, seed) if task.num_fewshot else []
        prefix = "".join(_shown(task, items[j]) + FEWSHOT_SEPARATOR for j in shots)
        if task.task_type == "multiple_choice":
            contexts = [prefix + item["query"] + task.delimiter] * len(item["choices"])
            answers, gold = item["choices"], item["gold"]
        elif task.task_type == "schema":
            contexts = [prefix + option + task.delimiter for option in item["context_options"]]
            answers, gold = [item["continuation"]] * len(contexts), item["gold"]
        else:
            contexts, answers, gold = [prefix + item["context"].strip() + task.delimiter], [item["continuation"]], 0
        out.append(ItemRequests(pairs=[_split_whitespace(c, a) for c, a in zip(contexts, answers)],
                                gold=gold, answer_chars=[len(a) for a in answers]))
    return out


# -- scoring -----------------------------------------------------------------------------
def centered(acc: float, baseline: float) -> float:
    """Accuracy rescaled so random guessing (`baseline`, percent) is 0 and perfect is 1."""
    chance = 0.01 * baseline
    return (acc - chance) / (1 - chance)


def continuation_lengths(lm: LM, pairs: Sequence[tuple[str, str]]) -> list[int]:
    """Tokens in each continuation, counted as the model splits them (lm-eval's TemplateLM
    rule); an LM without a tokenizer gets characters instead."""
    if hasattr(lm, "encode_pairs"):  # LitMoELM: the same rule, batched
        return [len(cont) for _, cont in lm.encode_pairs(list(pairs))]
    if isinstance(lm, TemplateLM):
        return [len(lm._encode_pair(ctx, cont)[1]) if ctx else len(lm.tok_encode(cont)) for ctx, cont in pairs]
    return [len(cont) for _, cont in pairs]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first index on ties


def score_task(task: CoreTask, requests: Sequence[ItemRequests],
               outputs: Sequence[Sequence[tuple[float, bool, int]]]) -> dict[str, Any]:
    """Per-task metrics from each request's (log-likelihood, is_greedy, continuation tokens).

    acc: CORE's rule (METHODS §4): lowest mean per-token loss over the continuation among
    the options; for language_modeling, greedy decoding reproduces the continuation.
    acc_sum / acc_norm: lm-eval's acc (highest summed log-likelihood) and acc_norm (highest
    log-likelihood per answer character), for comparison with lm-eval's numbers.
    """
    correct = by_sum = by_norm = 0
    for item, out in zip(requests, outputs, strict=True):
        if task.task_type == "language_modeling":
            correct += out[0][1]
            continue
        correct += _argmax([ll / max(n, 1) for ll, _, n in out]) == item.gold  # max −loss = min loss
        by_sum += _argmax([ll for ll, _, _ in out]) == item.gold
        by_norm += _argmax([ll / max(c, 1) for (ll, _, _), c in zip(out, item.answer_chars)]) == item.gold
    n = len(requests)
    acc = correct / n
    result = {"acc": acc, "centered": centered(acc, task.baseline), "n": n, "type": task.task_type,
              "num_fewshot": task.num_fewshot, "baseline": task.baseline}
    if task.task_type != "language_modeling":
        result.update(acc_sum=by_sum / n, acc_norm=by_norm / n)
    return result


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive number of items per task, got {limit!r}.")


def evaluate_core(lm: LM, bundle: str | os.PathLike[str] = DEFAULT_BUNDLE, tasks: Sequence[str] | None = None,
                  limit: int | None = None, seed: int = FEWSHOT_SEED, progress: bool = False) -> dict[str, Any]:
    """Score `lm` on the bundle's CORE tasks; returns {"CORE", "tasks": {label: {...}}, ...}."""
    check_limit(limit)
    specs = load_bundle(bundle, tasks)
    started = time.perf_counter()
    loglikelihood_kwargs = {"disable_tqdm": not progress} if "disable_tqdm" in inspect.signature(
        lm.loglikelihood).parameters else {}
    results = {}
    # One loglikelihood call per task: the adapter batches within it, and memory stays bounded
    # by the largest task on full bundles.
    for task in specs:
        requests = build_requests(task, read_items(task), limit, seed)
        instances = []
        for doc_id, item in enumerate(requests):
            for pair in item.pairs:
                instances.append(Instance("loglikelihood", doc={}, arguments=pair, idx=len(instances),
                                          metadata=(task.label, doc_id, 1)))
        pairs = [instance.arguments for instance in instances]
        answers = lm.loglikelihood(instances, **loglikelihood_kwargs)
        # Token counts matter only for mean losses; language_modeling uses is_greedy alone.
        counts = continuation_lengths(lm, pairs) if task.task_type != "language_modeling" else [0] * len(pairs)
        flat = iter([(ll, greedy, n) for (ll, greedy), n in zip(answers, counts, strict=True)])
        results[task.label] = score_task(task, requests, [list(islice(flat, len(item.pairs))) for item in requests])
    return {
        "CORE": sum(r["centered"] for r in results.values()) / len(results),
        "tasks": results,
        "bundle": str(bundle),
        "limit": limit,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 3),
    }


# -- reporting ---------------------------------------------------------------------------
def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write atomically: a reader sees the previous file or the complete new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def results_table(result: dict[str, Any]) -> str:
    """A Markdown table of the per-task results, CORE last."""
    lines = ["| task | type | shots | n | acc | centered | acc_sum | acc_norm |", "|---|---|---|---|---|---|---|---|"]
    for label, r in result["tasks"].items():
        extra = [f"{r[k]:.4f}" if k in r else "" for k in ("acc_sum", "acc_norm")]
        lines.append(f"| {label} | {r['type']} | {r['num_fewshot']} | {r['n']} | {r['acc']:.4f} | "
                     f"{r['centered']:.4f} | {extra[0]} | {extra[1]} |")
    lines.append(f"| **CORE** | | | | | **{result['CORE']:.4f}** | | |")
    return "\n".join(lines) + "\n"


def metrics_for_logging(result: dict[str, Any]) -> dict[str, float]:
    """`core/CORE` and `core/<task>` (centered accuracy, what CORE averages). Raw accuracies
    are in the results table and JSON, not metrics: one chart per task is enough."""
    metrics = {"core/CORE": float(result["CORE"])}
    for label, r in result["tasks"].items():
        metrics[f"core/{label}"] = float(r["centered"])
    return metrics


def log_to_mlflow(result: dict[str, Any], run_id: str, tracking_uri: str | None = None,
                  step: int | None = None) -> None:
    """Log metrics and the results table (Markdown + JSON artifacts) to an existing run."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    now = int(time.time() * 1000)
    try:
        client.log_batch(run_id, metrics=[Metric(k, v, now, step or 0) for k, v in metrics_for_logging(result).items()])
        client.log_text(run_id, results_table(result), "core/results.md")
        client.log_dict(run_id, result, "core/results.json")
    except MlflowException as err:
        raise ConfigError(f"could not log to MLflow run '{run_id}' at {tracking_uri}: {err.message}") from err


# -- lm-eval task YAMLs ------------------------------------------------------------------
def lm_eval_task_config(task: CoreTask) -> dict[str, Any]:
    """The task as an lm-eval task config (local JSON data, no hub), with the same prompts.

    lm-eval scores it with its own metrics (acc = summed log-likelihood, acc_norm; for
    language_modeling acc = greedy match), not CORE's mean per-token loss.
    """
    # The delimiter is part of the prompt text (as in build_requests); {% raw %} keeps it literal.
    delimiter = "{% raw %}" + task.delimiter + "{% endraw %}"
    config: dict[str, Any] = {
        "task": f"core_{task.label}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(task.path).resolve())}},
        "test_split": "test",
        "fewshot_split": "test",
        "num_fewshot": task.num_fewshot,
        "fewshot_delimiter": FEWSHOT_SEPARATOR,
        "fewshot_config": {"sampler": "default"},
        "metadata": {"version": 1.0},
    }
    if task.task_type == "multiple_choice":
        config.update(output_type="multiple_choice", doc_to_text="{{query}}" + delimiter, doc_to_choice="choices",
                      doc_to_target="gold", target_delimiter="",
                      metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    elif task.task_type == "schema":
        # lm-eval's "multiple inputs" form (as its winogrande task): doc_to_text gives the gold
        # index, the choices are the contexts, the target is the shared continuation.
        config.update(output_type="multiple_choice", doc_to_text="gold", doc_to_choice="context_options",
                      doc_to_target="continuation", target_delimiter=task.delimiter,
                      metric_list=[{"metric": "acc"}])
    else:
        config.update(output_type="loglikelihood", doc_to_text="{{context | trim}}" + delimiter,
                      doc_to_target="continuation", target_delimiter="", metric_list=[{"metric": "acc"}])
    return config


class _YamlDumper(yaml.SafeDumper):
    """Writes strings holding newlines double-quoted ("\nAnswer: "), which stays readable."""


_YamlDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style='"' if "\n" in text else None))


def write_lm_eval_tasks(bundle: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                        tasks: Sequence[str] | None = None) -> list[Path]:
    """Write `core_<label>.yaml` per task into `out_dir`, for ``--include_path out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in load_bundle(bundle, tasks):
        path = out / f"core_{task.label}.yaml"
        path.write_text(yaml.dump(lm_eval_task_config(task), Dumper=_YamlDumper, sort_keys=False,
                                  allow_unicode=True), encoding="utf-8")
        written.append(path)
    return written


# -- mini bundle -------------------------------------------------------------------------
def make_mini_bundle(source: str | os.PathLike[str], dest: str | os.PathLike[str], max_items: int = 50,
                     seed: int = 0) -> None:
    """Copy a bundle keeping at most `max_items` lines per data file: a seeded sample, in
    file order (how evaluation/core_mini was made from the full bundle)."""
    src, dst = Path(source), Path(dest)
    tasks = load_bundle(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("core.yaml", "eval_meta_data.csv"):
        (dst / name).write_bytes((src / name).read_bytes())
    for path in sorted({task.path for task in tasks}):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        keep = sorted(random.Random(f"{seed}:{path.name}").sample(range(len(lines)), min(max_items, len(lines))))
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
