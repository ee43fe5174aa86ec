"""What a run leaves in MLflow: the metric keys against the README's table, one step axis for
training, validation, routing and CORE, the run's settings and origin as params and tags, and
the one throughput figure."""

import gzip
import json
import math
import re
import subprocess
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import throughput_monitor
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

import cli
from callbacks import MLflowRunLogger, TokenThroughputMonitor
from lit_moe.model import ModelConfig
from lit_moe.module import LitMoE

REPO = Path(__file__).resolve().parents[1]
N_LAYERS = 2
SMALL = [
    "--trainer.max_steps", "20", "--trainer.val_check_interval", "10", "--trainer.limit_val_batches", "2",
    "--trainer.log_every_n_steps", "5", "--trainer.num_sanity_val_steps", "0",
    "--trainer.enable_progress_bar", "false", "--model.warmup_steps", "2",
    "--model.config.d_model", "32", "--model.config.n_layers", str(N_LAYERS), "--model.config.n_heads", "2",
    "--model.config.num_experts", "4", "--model.config.expert_hidden", "32",
    "--data.seq_len", "32", "--data.batch_size", "4", "--data.vocab_size", "300",
    "--data.train_files", "train.jsonl", "--data.val_files", "val.jsonl",
]
# Conditions of the README table's "when" column that hold for each config fitted here.
CONDITIONS = {
    "tiny.yaml": {"always", "CORE"},  # dropless top-2
    "tiny_softmoe_kappa.yaml": {"always", "active varies", "budget", "learned budget", "κ", "CORE"},
}
EXTRA_ARGS = {"tiny_softmoe_kappa.yaml": ["--model.config.budget.total", "3.0"]}  # K = 1.5·L for 2 layers


def readme_metric_table() -> list[tuple[list[str], str]]:
    """[(metric names of a row, its condition)] from the README's "### Metrics" table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Metrics\n", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1]))
    return rows


def _pattern(name: str) -> re.Pattern:
    parts = re.split(r"(XX|<task>)", name)
    regex = "".join({"XX": r"\d\d", "<task>": r"[a-z0-9_]+"}.get(p, re.escape(p)) for p in parts)
    return re.compile(regex + r"\Z")


def _write_docs(src: Path, dst: Path, count: int) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for _, line in zip(range(count), f):
            out.write(json.dumps({"text": json.loads(line)["text"][:6000]}) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One small fit per config of CONDITIONS into one temporary MLflow store."""
    work = tmp_path_factory.mktemp("runs")
    _write_docs(REPO / "data" / "wikipedia_en" / "train.jsonl.gz", work / "train.jsonl", 30)
    _write_docs(REPO / "data" / "wikipedia_en" / "validation.jsonl.gz", work / "val.jsonl", 3)
    store = f"sqlite:///{work / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for config in CONDITIONS:
            cli.main(["fit", "--config", str(REPO / "conf" / config), *SMALL, *EXTRA_ARGS.get(config, []),
                      "--trainer.logger.init_args.tracking_uri", store,
                      "--trainer.logger.init_args.experiment_name", f"keys-{config}"])
    client = MlflowClient(tracking_uri=store)
    found = {}
    for config in CONDITIONS:
        (run,) = client.search_runs([client.get_experiment_by_name(f"keys-{config}").experiment_id])
        found[config] = run
    return {"client": client, "runs": found, "work": work}


@pytest.mark.parametrize("config", list(CONDITIONS))
def test_logged_metric_keys_are_the_readme_table(runs, config):
    run = runs["runs"][config]
    logged = set(run.data.metrics)
    table = readme_metric_table()
    assert len(table) > 30  # the table was found and parsed
    applies = CONDITIONS[config]
    # Every logged key is a row of the table whose condition holds for this run.
    for key in logged:
        rows = [when for names, when in table for name in names if _pattern(name).match(key)]
        assert rows, f"{key} is logged but not in the README's metrics table"
        assert any(when in applies for when in rows), f"{key} is logged, but the README says only when {rows}"
    # Every row that applies is logged, for every MoE layer.
    for names, when in table:
        if when not in applies:
            continue
        for name in names:
            if "XX" in name:
                for layer in range(N_LAYERS):
                    assert name.replace("XX", f"{layer:02d}") in logged, (name, layer)
            else:
                assert any(_pattern(name).match(key) for key in logged), f"{name} ({when}) was not logged"


def test_a_dropless_top_k_run_logs_no_flat_charts(runs):
    run, client = runs["runs"]["tiny.yaml"], runs["client"]
    # Every token of a top-2 router without capacity has 2 experts and none is dropped.
    assert not [k for k in run.data.metrics if "active_" in k or "dropped" in k]
    assert "routing/layer_00/dead_experts" not in run.data.metrics
    # epoch: logged once (it stays 0 in this run), not with every batch of metrics.
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch")] == [(4, 0.0)]


def test_validation_routing_and_core_share_the_training_step_axis(runs):
    run, client = runs["runs"]["tiny.yaml"], runs["client"]
    rid = run.info.run_id

    def steps(key):
        return sorted(m.step for m in client.get_metric_history(rid, key))

    # Validation runs after the 10th and 20th optimizer steps, whose train/loss Lightning
    # logs at the 0-based indices 9 and 19 (log_every_n_steps 5: 4, 9, 14, 19).
    assert steps("train/loss") == [4, 9, 14, 19]
    assert steps("val/loss") == [9, 19]
    assert steps("routing/val/entropy") == [9, 19]
    assert steps("routing/entropy") == [9, 19]  # windows of 10 steps
    assert steps("core/CORE") == [19]  # after fit
    # train/lr: the lr of that step's update, conf/tiny.yaml's cosine from 3e-3 to 10 % after
    # 2 warmup steps (of 20).
    lrs = [(m.step, m.value) for m in client.get_metric_history(rid, "train/lr")]
    expected = [(s, 3e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - 2) / 18)))) for s in (4, 9, 14, 19)]
    assert sorted(lrs) == [(s, pytest.approx(lr, rel=1e-5)) for s, lr in expected]
    artifacts = {a.path for a in client.list_artifacts(rid, "routing")}
    assert artifacts == {"routing/step000019"}  # plot_every 100: only the end of training
    local = client.download_artifacts(rid, "routing/step000019/counts.json", str(runs["work"] / "dl"))
    counts = json.loads(Path(local).read_text())
    assert (counts["train"]["step"], counts["val"]["step"]) == (19, 19)  # the final validation is in it


def test_trainer_settings_config_and_commit_are_recorded(runs):
    run = runs["runs"]["tiny.yaml"]
    params, tags = run.data.params, run.data.tags
    expected = {"trainer/max_steps": "20", "trainer/precision": "32-true", "trainer/devices": "1",
                "trainer/num_nodes": "1", "trainer/strategy": "SingleDeviceStrategy",
                "trainer/accumulate_grad_batches": "1", "trainer/global_batch_size": "4",
                "trainer/val_check_interval": "10", "data/batch_size": "4", "config/seq_len": "32",
                "config/n_layers": str(N_LAYERS), "model/warmup_steps": "2", "seed_everything": "1234"}
    assert {k: params.get(k) for k in expected} == expected
    # Each setting once, nothing unset, no LightningCLI internals.
    assert "data/seq_len" not in params and "seq_len" not in params and "vocab_size" not in params
    assert "None" not in params.values() and not any("_instantiator" in k for k in params)
    assert tags["config"] == "conf/tiny.yaml"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert tags["git_commit"] == head == tags["mlflow.source.git.commit"]
    assert tags["git_dirty"] in ("true", "false")
    assert tags["method"] == "TopKRouter(top_k=2) + SwiGLUExperts"
    description = tags["mlflow.note.content"]
    assert "conf/tiny.yaml" in description and "TopKRouter(top_k=2)" in description and head[:10] in description
    experiment = runs["client"].get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


# -- throughput ---------------------------------------------------------------------------------
class _Clock:
    """A stand-in for time.perf_counter that moves only when told: 1 s per training batch,
    5 s per validation batch."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


class _Tick(L.Callback):
    def __init__(self, clock):
        self.clock = clock

    def on_train_batch_start(self, *args, **kwargs):
        self.clock.now += 1.0

    def on_validation_batch_start(self, *args, **kwargs):
        self.clock.now += 5.0


def test_tokens_per_sec_is_training_tokens_over_training_time(tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(throughput_monitor, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLflowRunLogger(experiment_name="throughput", tracking_uri=store)
    torch.manual_seed(0)
    data = torch.randint(0, 64, (64, 17))  # windows of seq_len 16 + 1
    module = LitMoE(ModelConfig(vocab_size=64, seq_len=16, d_model=16, n_layers=1, n_heads=2, num_experts=4,
                                expert_hidden=16), warmup_steps=1)
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=logger, log_every_n_steps=2, val_check_interval=4,
                        limit_val_batches=3, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[_Tick(clock), TokenThroughputMonitor(window_size=4)])
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    history = MlflowClient(tracking_uri=store).get_metric_history(logger.run_id, "throughput/tokens_per_sec")
    # 4 sequences × 16 tokens per 1-s step: 64 tokens/s, also where the window spans a
    # validation run (15 s, after steps 4 and 8). Logged once the 4-step window is full, at
    # the steps train/loss is (every 2nd).
    assert [(m.step, m.value) for m in history] == [(3, 64.0), (5, 64.0), (7, 64.0), (9, 64.0), (11, 64.0)]
    keys = set(MlflowClient(tracking_uri=store).get_run(logger.run_id).data.metrics)
    assert not [k for k in keys if k.startswith(("validate/", "train/device", "train/time", "train/samples"))]
    assert "throughput/mfu" not in keys  # CPU: no known peak
