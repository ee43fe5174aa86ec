"""End to end through the CLI: a tiny fit whose loss falls, tracked in MLflow, then resumed."""

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import cli
from lit_moe.module import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config", str(REPO / "conf" / "tiny.yaml"),
    "--trainer.max_steps", "40", "--trainer.val_check_interval", "20", "--trainer.limit_val_batches", "2",
    "--trainer.log_every_n_steps", "5", "--trainer.enable_progress_bar", "false",
    "--trainer.logger.init_args.experiment_name", "test-exp",
    "--model.warmup_steps", "5", "--model.lr", "1e-2",
    "--model.config.d_model", "32", "--model.config.n_layers", "2", "--model.config.n_heads", "2",
    "--model.config.num_experts", "4", "--model.config.expert_hidden", "32",
    "--data.seq_len", "32", "--data.batch_size", "8", "--data.vocab_size", "320",
    "--data.train_files", "train.jsonl", "--data.val_files", "val.jsonl",
]


def _write_docs(src: Path, dst: Path, count: int) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for _, line in zip(range(count), f):
            doc = json.loads(line)
            out.write(json.dumps({"text": doc["text"][:6000]}) + "\n")


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    _write_docs(REPO / "data" / "wikipedia_en" / "train.jsonl.gz", tmp_path / "train.jsonl", 40)
    _write_docs(REPO / "data" / "wikipedia_en" / "validation.jsonl.gz", tmp_path / "val.jsonl", 4)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(args):
    cli.main(args)


def test_fit_is_tracked_in_mlflow_and_resumes(workdir):
    _run(["fit", *TINY])
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test-exp")
    (run,) = client.search_runs([experiment.experiment_id])
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) >= 6
    # The loss falls well below the uniform-guess loss log(vocab) = log 320 ≈ 5.77, and below the
    # first logged one (step 5, already past the steepest descent). Thresholds leave room for the
    # shuffle order, which moves the final loss by about ±0.1.
    final = sum(losses[-3:]) / 3
    assert final < math.log(320) - 1.0 and final < losses[0] - 0.5, losses
    for name in ("val/loss", "val/ppl", "train/ce", "train/load_balance", "train/z_loss", "throughput/tokens_per_sec"):
        assert name in run.data.metrics, name
    assert abs(run.data.metrics["core/CORE"]) < 0.3  # CoreEvalCallback ran on the mini bundle
    val_loss = run.data.metrics["val/loss"]
    assert run.data.metrics["val/ppl"] == pytest.approx(torch.tensor(val_loss).exp().item(), rel=1e-3)
    assert run.data.params["config/num_experts"] == "4"
    assert int(run.data.params["params/total"]) > int(run.data.params["params/active"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    # SampleCallback: the fixed prompts' continuations after fit.
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/step000040.txt"}
    last = run.data.tags["checkpoint/last"]
    assert os.path.isfile(last) and os.path.isfile(run.data.tags["checkpoint/best"])

    # The checkpoint alone rebuilds model and tokenizer.
    module, tokenizer = load_checkpoint(last)
    text = "The river flows through the old town."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert module.model.cfg.d_model == 32
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 40

    # Resume from "last": training continues from step 40 to 60.
    _run(["fit", *TINY, "--trainer.max_steps", "60", "--ckpt_path", "last"])
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 60
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    resumed_steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert min(resumed_steps) >= 40

    # validate from the checkpoint: a run of its own, with the same settings and origin recorded
    _run(["validate", *TINY, "--ckpt_path", last])
    validated = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert "val/loss" in validated.data.metrics and "train/loss" not in validated.data.metrics
    assert validated.data.params["trainer/limit_val_batches"] == "2"
    assert validated.data.tags["config"] == "conf/tiny.yaml"


def _cli_error(args, capsys):
    with pytest.raises(SystemExit) as exc:
        _run(args)
    assert exc.value.code != 0
    return capsys.readouterr().err


def test_misspelled_config_key_is_one_clear_error(workdir, capsys):
    err = _cli_error(["fit", *TINY, "--model.config.num_exprts", "4"], capsys)
    assert "num_exprts" in err
    (workdir / "typo.yaml").write_text("model:\n  config:\n    d_modle: 64\n")
    err = _cli_error(["fit", *TINY, "--config", "typo.yaml"], capsys)
    assert "d_modle" in err


def test_unknown_router_class_is_one_clear_error(workdir, capsys):
    (workdir / "router.yaml").write_text("model:\n  config:\n    router:\n      class_path: lit_moe.moe.TopKRuter\n")
    err = _cli_error(["fit", *TINY, "--config", "router.yaml"], capsys)
    assert "TopKRuter" in err and "Traceback" not in err


def test_top_k_above_experts_is_one_clear_error(workdir, capsys):
    (workdir / "router.yaml").write_text(
        "model:\n  config:\n    router:\n      class_path: lit_moe.moe.TopKRouter\n      init_args: {top_k: 5}\n")
    err = _cli_error(["fit", *TINY, "--config", "router.yaml"], capsys)
    assert "top_k=5" in err


def test_missing_data_path_is_one_clear_error(workdir, capsys):
    err = _cli_error(["fit", *TINY, "--data.train_files", "nope/*.jsonl"], capsys)
    assert "nope" in err


def test_unwritable_output_dir_is_refused_before_training(workdir, capsys):
    (workdir / "afile").write_text("x")
    err = _cli_error(["fit", *TINY, "--trainer.default_root_dir", "afile/out"], capsys)
    assert "not writable" in err
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").rglob("*.ckpt"))


def test_console_entry_exits_nonzero_without_traceback(workdir):
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", *TINY, "--data.train_files", "missing.jsonl"],
                          capture_output=True, text=True, cwd=workdir, timeout=300)
    assert proc.returncode == 2
    assert "missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr
