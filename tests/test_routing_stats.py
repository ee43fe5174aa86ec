"""Routing statistics: router counters against hand-built routings, window and cross-rank
reduction, the callback in a fit (metrics + MLflow artifacts), and the `report` command."""

import gzip
import json
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

import cli
from callbacks import RoutingStatsCallback, routing_plots
from lit_moe.model import ModelConfig, Transformer
from lit_moe.module import LitMoE
from lit_moe.moe import SoftTopKRouter, TopKRouter
from lit_moe.moe.routing_metrics import RoutingCounters, model_summary, summarize
from routing_helpers import RANK_EXPERTS, one_hot_router, reduce_on_two_ranks, tokens_to

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module (creating a store costs seconds of migrations);
    each test writes its own experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


# -- statistics of hand-built routings ---------------------------------------------------------------
def test_everything_to_one_expert():
    router = one_hot_router(4)
    router(tokens_to([0] * 12, 4))
    stats = summarize(router.metrics("train"))
    assert stats["load_imbalance"] == pytest.approx(4.0)  # = E
    assert stats["dead_experts"] == 3  # = E − 1
    # tokens = [12, 0, 0, 0]: mean 3, population std √((9² + 3·3²)/4) = √27 → cv = √3.
    assert stats["load_cv"] == pytest.approx(math.sqrt(3))
    assert stats["active_mean"] == stats["active_p50"] == stats["active_p95"] == stats["active_max"] == 1
    assert stats["dropped"] == 0
    assert stats["peak_imbalance"] == pytest.approx(4.0)


def test_uniform_logits_have_entropy_log_e():
    router = TopKRouter(6, 8, top_k=2)
    with torch.no_grad():
        router.gate.weight.zero_()
    router(torch.randn(50, 6))
    assert summarize(router.metrics())["entropy"] == pytest.approx(math.log(8), rel=1e-5)


def test_entropy_from_the_routers_softmax_matches_a_per_element_sum():
    """The router hands its softmax and logsumexp to the counters (entropy = Σ lse − Σ p·z);
    that equals Σ −p·log p summed element by element, also with a −inf logit (p = 0 there)."""
    logits = torch.randn(40, 6, dtype=torch.float64) * 3
    logits[7, 2] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    expected = sum(-p * math.log(p) for p in probs.flatten().tolist() if p > 0)
    weights = torch.zeros(40, 6).scatter_(-1, torch.zeros(40, 1, dtype=torch.long), 1.0)
    aux = {"load_balance": torch.tensor(0.0), "z_loss": torch.tensor(0.0)}
    for given in (False, True):
        counters = RoutingCounters(6, "cpu")
        extra = dict(probs=probs, log_normalizer=torch.logsumexp(logits, dim=-1)) if given else {}
        counters.update(logits, weights, weights != 0, aux, **extra)
        assert counters.entropy.item() == pytest.approx(expected, rel=1e-5), given


def test_active_expert_percentiles_from_a_hand_built_weight_tensor():
    # 10 tokens using 1,1,1,1,1,2,2,2,3,4 experts: token i uses experts 0 .. a_i − 1.
    active = [1, 1, 1, 1, 1, 2, 2, 2, 3, 4]
    weights = torch.zeros(10, 5)
    for token, count in enumerate(active):
        weights[token, :count] = 0.5
    counters = RoutingCounters(5, "cpu")
    aux = {"load_balance": torch.tensor(1.0), "z_loss": torch.tensor(0.5)}
    counters.update(torch.zeros(10, 5), weights, weights != 0, aux)
    stats = summarize(counters.as_dict())
    assert stats["active_mean"] == pytest.approx(1.8)
    assert stats["active_p50"] == 1  # 5th of 10 sorted counts (nearest rank ⌈0.5·10⌉)
    assert stats["active_p95"] == 4  # 10th (⌈0.95·10⌉)
    assert stats["active_max"] == 4
    # Tokens per expert [10, 5, 2, 1, 0]: mean 3.6.
    assert counters.tokens.tolist() == [10, 5, 2, 1, 0]
    assert counters.weight.tolist() == pytest.approx([5.0, 2.5, 1.0, 0.5, 0.0])
    assert stats["load_imbalance"] == pytest.approx(10 / 3.6)
    assert stats["dead_experts"] == 1
    assert stats["entropy"] == pytest.approx(math.log(5), rel=1e-6)  # zero logits


def test_percentile_is_nearest_rank_not_interpolated():
    counters = RoutingCounters(4, "cpu")
    weights = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 1.0, 0, 0], [1.0, 1.0, 1.0, 0]])
    counters.update(torch.zeros(4, 4), weights, weights != 0, {"load_balance": torch.tensor(0.0),
                                                              "z_loss": torch.tensor(0.0)})
    stats = summarize(counters.as_dict())
    assert (stats["active_p50"], stats["active_p95"], stats["active_max"]) == (1, 3, 3)


def test_capacity_drops_are_counted():
    """4 tokens all choose expert 0 of 2 with capacity ⌈1.0·4·1/2⌉ = 2: 2 of 4 assignments dropped."""
    router = one_hot_router(2, capacity_factor=1.0)
    router(tokens_to([0, 0, 0, 0], 2))
    counters = router.metrics()
    assert counters["dropped"].item() == 2 and counters["tokens"].tolist() == [2, 0]
    stats = summarize(counters)
    assert stats["dropped"] == pytest.approx(0.5)
    assert stats["active_mean"] == pytest.approx(0.5) and stats["active_p50"] == 0 and stats["active_max"] == 1


def test_window_sums_several_forwards_and_keeps_the_peak():
    router = one_hot_router(4)
    router(tokens_to([0, 0, 0], 4))  # every forward sends all its tokens to one expert
    router(tokens_to([1] * 5, 4))
    router(tokens_to([2, 2], 4))
    counters = router.metrics()
    assert counters["tokens"].tolist() == [3, 5, 2, 0]
    assert counters["active_hist"].tolist() == [0, 10, 0, 0, 0]
    assert counters["forwards"].item() == 3
    stats = summarize(counters)
    assert stats["load_imbalance"] == pytest.approx(5 / 2.5)  # over the window: max 5, mean 10/4
    assert stats["peak_imbalance"] == pytest.approx(4.0)  # the worst single forward
    assert stats["dead_experts"] == 1
    router.reset_metrics("train")
    assert router.metrics()["tokens"].sum().item() == 0


def test_eval_forwards_do_not_touch_train_counters():
    model = Transformer(ModelConfig(vocab_size=50, seq_len=8, d_model=16, n_layers=2, n_heads=2, num_experts=4,
                                    expert_hidden=8))
    state_keys = set(model.state_dict())
    idx = torch.randint(0, 50, (3, 8))
    model.train()
    model(idx)
    before = {i: {k: v.clone() for k, v in r.metrics("train").items()} for i, r in model.routers()}
    model.eval()
    with torch.no_grad():
        model(idx)
        model(idx)
    for i, router in model.routers():
        for name, value in router.metrics("train").items():
            assert torch.equal(value, before[i][name]), name
        assert router.metrics("eval")["forwards"].item() == 2
        assert router.metrics("eval")["active_hist"].sum().item() == 2 * 3 * 8
    # Counters are not state: checkpoints keep exactly the keys they had.
    assert set(model.state_dict()) == state_keys


def test_activation_checkpointing_counts_each_token_once():
    """The recomputation in backward re-runs the router; it must not count again."""
    cfg = ModelConfig(vocab_size=50, seq_len=8, d_model=16, n_layers=2, n_heads=2, num_experts=4, expert_hidden=8)
    plain, recomputed = Transformer(cfg), Transformer(cfg)
    for block in recomputed.blocks:
        block.activation_checkpointing = True
    idx = torch.randint(0, 50, (2, 8))
    for model, runs in ((plain, 1), (recomputed, 2)):
        calls = []
        for _, router in model.routers():  # count how often each router really runs
            original = router.compute_logits
            router.compute_logits = lambda x, original=original: calls.append(1) or original(x)
        model(idx).sum().backward()
        assert len(calls) == runs * 2  # two MoE layers; the checkpointed ones run twice
        for _, router in model.routers():
            assert router.metrics()["forwards"].item() == 1
            assert router.metrics()["active_hist"].sum().item() == 2 * 8


def test_soft_router_counts_its_realised_active_experts():
    torch.manual_seed(0)
    router = SoftTopKRouter(8, 8, k=2.0)
    x = torch.randn(64, 8)
    weights = router(x)
    counts = (weights != 0).sum(-1)
    stats = summarize(router.metrics())
    assert stats["active_mean"] == pytest.approx(router.last_active.item())
    assert stats["active_max"] == counts.max().item()
    assert stats["dropped"] == 0


def test_model_summary_aggregates_layers():
    one = one_hot_router(4)
    one(tokens_to([0] * 8, 4))  # imbalance 4, 3 dead
    balanced = one_hot_router(4)
    balanced(tokens_to([0, 1, 2, 3] * 2, 4))  # imbalance 1, none dead
    counters = [one.metrics(), balanced.metrics()]
    overall = model_summary(counters, [summarize(c) for c in counters])
    assert overall["load_imbalance"] == pytest.approx(2.5) and overall["load_imbalance_max"] == pytest.approx(4)
    assert overall["dead_experts"] == 3 and overall["active_total"] == pytest.approx(2.0)


# -- across ranks ------------------------------------------------------------------------------------
def test_two_process_reduction_matches_the_combined_routing(tmp_path):
    out = str(tmp_path / "reduced")
    # Rank 0: 6 tokens all to expert 0 (peak imbalance 4); rank 1: one token per expert (peak 1).
    assert RANK_EXPERTS == {0: [0] * 6, 1: [0, 1, 2, 3]}
    mp.spawn(reduce_on_two_ranks, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    for rank in (0, 1):
        result = torch.load(f"{out}.{rank}")
        reduced = result["reduced"]
        assert result["after_reset"] == 0  # the window restarts after the reduction
        assert reduced["tokens"].tolist() == [7, 1, 1, 1]
        assert reduced["active_hist"].tolist() == [0, 10, 0, 0, 0]
        assert reduced["forwards"].item() == 2
        assert reduced["peak_imbalance"].item() == pytest.approx(4.0)  # max, not sum
        stats = summarize(reduced)
        assert stats["load_imbalance"] == pytest.approx(7 / 2.5)


# -- the callback in a fit -----------------------------------------------------------------------------
def _tiny_module(**config) -> LitMoE:
    base = dict(vocab_size=64, seq_len=16, d_model=16, n_layers=2, n_heads=2, num_experts=4, expert_hidden=16)
    return LitMoE(ModelConfig(**{**base, **config}), warmup_steps=1)


def test_fit_logs_windows_and_survives_a_failing_plot(store, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(routing_plots, "active_experts_chart", broken)
    torch.manual_seed(0)
    data = torch.randint(0, 64, (40, 17))
    logger = MLFlowLogger(experiment_name="routing-fit", tracking_uri=store)
    # A capacity factor makes the active-expert count a statistic (tokens over capacity lose an
    # expert); at 4 the capacity, 2·tokens per expert, exceeds any expert's load: nothing drops.
    capacity_router = {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 2, "capacity_factor": 4.0}}
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=logger, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, val_check_interval=4,
                        limit_val_batches=2, num_sanity_val_steps=0,
                        callbacks=[RoutingStatsCallback(window=2, plot_every=2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_tiny_module(router=capacity_router), DataLoader(data, batch_size=4),
                    DataLoader(data, batch_size=4))
    assert trainer.global_step == 5
    assert any("could not write the routing plots" in str(w.message) for w in caught)
    client = MlflowClient(tracking_uri=store)
    # Windows close after optimizer steps 2 and 4 (logged at Lightning's step labels 1 and 3,
    # beside that batch's train/loss) and at the end of training (the 5th step: label 4); each
    # step routes 4 sequences × 16 tokens.
    seen = [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "routing/tokens_seen")]
    assert sorted(seen) == [(1, 128.0), (3, 256.0), (4, 320.0)]
    active = client.get_metric_history(logger.run_id, "routing/layer_01/active_mean")
    assert [m.value for m in active] == [2.0, 2.0, 2.0]  # top-2
    assert [m.value for m in client.get_metric_history(logger.run_id, "routing/dropped")] == [0.0, 0.0, 0.0]
    # One validation pass, logged at the same step as val/loss.
    val = client.get_metric_history(logger.run_id, "routing/val/layer_00/active_mean")
    (val_loss,) = client.get_metric_history(logger.run_id, "val/loss")
    assert [(m.step, m.value) for m in val] == [(val_loss.step, 2.0)]


def _write_docs(src: Path, dst: Path, count: int) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for _, line in zip(range(count), f):
            out.write(json.dumps({"text": json.loads(line)["text"][:6000]}) + "\n")


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_cli_fit_logs_routing_metrics_and_plots_then_report_compares(store, tmp_path, monkeypatch, capsys):
    _write_docs(REPO / "data" / "wikipedia_en" / "train.jsonl.gz", tmp_path / "train.jsonl", 30)
    _write_docs(REPO / "data" / "wikipedia_en" / "validation.jsonl.gz", tmp_path / "val.jsonl", 3)
    monkeypatch.chdir(tmp_path)
    cli.main(["fit", "--config", str(REPO / "conf" / "tiny_kappa.yaml"),  # κ experts: κ histograms too
              "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
              "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.experiment_name", "routing-cli",
              "--trainer.logger.init_args.tracking_uri", store, "--model.warmup_steps", "1",
              "--model.config.d_model", "32", "--model.config.n_layers", "2", "--model.config.n_heads", "2",
              "--model.config.num_experts", "4", "--model.config.expert_hidden", "32",
              "--data.seq_len", "32", "--data.batch_size", "4", "--data.vocab_size", "300",
              "--data.train_files", "train.jsonl", "--data.val_files", "val.jsonl"])
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("routing-cli").experiment_id])
    for layer in ("layer_00", "layer_01"):
        for name in ("load_imbalance", "load_cv", "entropy", "load_balance", "z_loss", "peak_imbalance"):
            assert f"routing/{layer}/{name}" in run.data.metrics, (layer, name)
            assert f"routing/val/{layer}/{name}" in run.data.metrics, (layer, name)
        # Dropless top-2: every token has 2 experts and none is dropped; no flat charts for that.
        for name in ("active_mean", "active_p50", "active_p95", "active_max", "dropped", "dead_experts"):
            assert f"routing/{layer}/{name}" not in run.data.metrics, (layer, name)
    assert "routing/active_total" not in run.data.metrics
    assert 1.0 <= run.data.metrics["routing/load_imbalance_max"] <= 4.0
    # The config's window (10) never closed: the end of training logs the partial window and
    # plots it, at the logging step of the 4th (last) step, 3, as train/loss and val/loss are.
    (val_loss,) = client.get_metric_history(run.info.run_id, "val/loss")
    assert val_loss.step == 3
    artifacts = set(_artifacts(client, run.info.run_id, "routing"))
    for name in ("load_share.png", "kappa.png", "counts.csv", "counts.json"):
        assert f"routing/step000003/{name}" in artifacts, name
    assert "routing/step000003/active_experts.png" not in artifacts  # all bars would be k = 2
    # The snapshot holds the validation run at that step too, under the split name "val".
    local = client.download_artifacts(run.info.run_id, "routing/step000003/counts.json", str(tmp_path))
    counts = json.loads(Path(local).read_text())
    assert sorted(counts) == ["train", "val"] and counts["val"]["step"] == 3 == counts["train"]["step"]

    # A second run (other router, no routing callback data) in the same store, then the report.
    other = client.create_run(run.info.experiment_id, run_name="soft-run")
    rid = other.info.run_id
    client.log_param(rid, "config/router/class_path", "lit_moe.moe.SoftTopKRouter")
    client.log_param(rid, "config/experts/class_path", "lit_moe.moe.SwiGLUExperts")
    client.log_metric(rid, "val/loss", 9.5, step=4)
    client.set_terminated(rid)
    capsys.readouterr()
    cli.main(["report", "--experiment", "routing-cli", "--tracking_uri", store, "--output", "cmp.png"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["run", "method"]
    fit_row = next(line for line in lines if "TopKRouter(top_k=2) + KappaSwiGLUExperts" in line)
    assert f"{run.data.metrics['val/loss']:.4f}" in fit_row and "2.00" in fit_row
    soft_row = next(line for line in lines if line.startswith("soft-run"))
    assert "SoftTopKRouter() + SwiGLUExperts" in soft_row and "9.5000" in soft_row
    assert (tmp_path / "cmp.png").stat().st_size > 0


# -- report -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(store) -> list[str]:
    """Experiment "cmp": a top-k run as RunInfoCallback logs it now, and a SoftMoE run under the
    names runs had before (params `batch_size`, `seq_len`; `train/tokens_per_sec`)."""
    client = MlflowClient(tracking_uri=store)
    experiment = client.create_experiment("cmp")
    ids = []
    for name, router, params, val, speed_key in [
        ("topk", "TopKRouter", {"config/router/init_args/top_k": "2", "trainer/global_batch_size": "4",
                                "config/seq_len": "8"}, [(10, 6.0), (20, 5.5)], "throughput/tokens_per_sec"),
        ("soft", "SoftTopKRouter", {"config/budget/total": "6.0", "config/budget/learnable": "True",
                                    "batch_size": "4", "seq_len": "8"}, [(10, 6.2), (20, 5.4)], "train/tokens_per_sec"),
    ]:
        rid = client.create_run(experiment, run_name=name).info.run_id
        for key, value in {"config/router/class_path": f"lit_moe.moe.{router}",
                           "config/experts/class_path": "lit_moe.moe.SwiGLUExperts",
                           "params/total": "6889152", "params/active": "3055296", **params}.items():
            client.log_param(rid, key, value)
        for step, loss in val:
            client.log_metric(rid, "val/loss", loss, step=step)
        for step, speed in [(1, 100.0), (2, 300.0), (3, 200.0)]:
            client.log_metric(rid, speed_key, speed, step=step)
        ids.append(rid)
    # Only the soft run has the routing callback's data: exact token counts and active experts.
    for step, tokens in [(10, 400.0), (20, 1000.0)]:
        client.log_metric(ids[1], "routing/tokens_seen", tokens, step=step)
    client.log_metric(ids[1], "routing/active_mean", 1.5, step=20)
    client.log_metric(ids[1], "compute/active_params", 2504000.0, step=20)  # realised, below the design's
    client.log_metric(ids[1], "core/CORE", 0.0123, step=20)
    return ids


def test_report_table_and_curves_for_two_runs(store, two_runs, tmp_path, capsys):
    from evaluation import report

    summaries = report.main(["--run_ids", ",".join(reversed(two_runs)), "--tracking_uri", store,
                             "--output", str(tmp_path / "out" / "cmp.png")])
    assert [s.name for s in summaries] == ["soft", "topk"]  # the order given
    out = capsys.readouterr().out.splitlines()
    soft, topk = out[2], out[3]
    assert soft.split()[:2] == ["soft", "SoftTopKRouter(K=6.0"]
    for cell in ("5.4000", "1.50", "6.89M", "2.50M", "200", "0.0123"):  # median tokens/s of 100, 300, 200
        assert cell in soft, cell
    assert "TopKRouter(top_k=2) + SwiGLUExperts" in topk and "5.5000" in topk and "3.06M" in topk
    assert "2.00" in topk and "200" in topk  # dropless top-2: k active experts; median tokens/s
    assert topk.rstrip().endswith("-")  # no CORE
    # Tokens: the soft run's logged counts; the top-k run's (step + 1) × batch × seq_len = (step + 1) × 32,
    # as MLflow step s is the (s + 1)-th optimizer step.
    assert summaries[0].curve == [(10, 400.0, pytest.approx(6.2)), (20, 1000.0, pytest.approx(5.4))]
    assert [tokens for _, tokens, _ in summaries[1].curve] == [352, 672]
    assert (tmp_path / "out" / "cmp.png").stat().st_size > 0


def _report_error(args, capsys) -> str:
    capsys.readouterr()  # drop earlier output (MLflow logs store creation)
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    return err


def test_report_bad_input_is_one_clear_error(store, two_runs, tmp_path, capsys):
    uri = store
    assert "unknown experiment 'nope'" in _report_error(["--experiment", "nope", "--tracking_uri", uri], capsys)
    assert "cmp" in _report_error(["--experiment", "nope", "--tracking_uri", uri], capsys)  # lists the known ones
    assert "unknown run id 'deadbeef'" in _report_error(["--run_ids", "deadbeef", "--tracking_uri", uri], capsys)
    missing = tmp_path / "absent.db"
    assert "no MLflow store" in _report_error(["--experiment", "cmp", "--tracking_uri", f"sqlite:///{missing}"],
                                              capsys)
    assert not missing.exists()  # not created as a side effect
    # Every store has the experiment "Default"; nothing here logs to it.
    assert "has no runs" in _report_error(["--experiment", "Default", "--tracking_uri", uri], capsys)
    assert "--run_ids is empty" in _report_error(["--run_ids", ",", "--tracking_uri", uri], capsys)
