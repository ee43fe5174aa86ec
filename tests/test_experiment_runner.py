"""experiments/runner.py: overrides, paired tests against hand-computed p-values, and a tiny
arm set run end to end twice (the second run reuses every finished arm-seed)."""

import gzip
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import runner  # noqa: E402


@pytest.mark.parametrize("diffs,p", [
    ([1.0, 2.0, 3.0], 2 / 8),             # all one way, n = 3: 2 · (1/2)^3
    ([-0.1] * 5, 2 / 32),
    ([1.0, -1.0], 1.0),
    ([1, 1, -1, 1, 1, 1], 2 * 7 / 64),    # one loss in six: 2 · (C(6,0) + C(6,1)) / 2^6
    ([0.0, 0.0], 1.0),
])
def test_sign_test_matches_the_binomial_tail(diffs, p):
    assert runner.sign_test(diffs) == pytest.approx(p)


@pytest.mark.parametrize("diffs,p", [
    ([1.0, 2.0, 3.0], 2 / 8),             # W+ = 6 of 6: the two extreme sign patterns
    ([1, -2, 3, 4, 5], 6 / 32),           # W+ = 13; subsets of {1..5} summing to ≤ 2 or ≥ 13: 3 + 3
    ([1, 1, -1], 1.0),                    # tied ranks 2, 2, 2: every pattern is as extreme
    ([0.5, 0.0, -0.2, 0.3], 4 / 8),       # zero dropped; ranks 3, 1, 2: W+ = 5, centre 3; W+ ∈ {0,1,5,6}
])
def test_wilcoxon_matches_hand_enumeration(diffs, p):
    assert runner.wilcoxon_signed_rank(diffs) == pytest.approx(p)


def test_overrides_reach_nested_keys_and_select_callbacks_by_class():
    config = {"trainer": {"callbacks": [{"class_path": "callbacks.core_eval.CoreEvalCallback", "init_args": {"limit": 20}},
                                        {"class_path": "callbacks.SampleCallback"}]},
              "model": {"config": {"router": {"class_path": "lit_moe.moe.TopKRouter"}}}}
    runner.set_override(config, "trainer.callbacks[CoreEvalCallback].init_args.limit", 50)
    runner.set_override(config, "trainer.callbacks[SampleCallback]", None)
    runner.set_override(config, "model.config.router.init_args.top_k", 1)
    runner.set_override(config, "trainer.callbacks+", [{"class_path": "callbacks.ExpertBudgetCallback"}])
    assert config["trainer"]["callbacks"].pop()["class_path"] == "callbacks.ExpertBudgetCallback"
    assert config["trainer"]["callbacks"] == [{"class_path": "callbacks.core_eval.CoreEvalCallback", "init_args": {"limit": 50}}]
    assert config["model"]["config"]["router"] == {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 1}}
    with pytest.raises(runner.ArmSetError, match="no callbacks entry with class 'ModelCheckpoint'"):
        runner.set_override(config, "trainer.callbacks[ModelCheckpoint].init_args.dirpath", "x")


def test_arm_set_mistakes_are_named(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "seeds": [1], "baseline": "b", "arms": {"a": {"config": "conf/tiny.yaml"}}}))
    with pytest.raises(runner.ArmSetError, match="baseline 'b' is not one of its arms"):
        runner.load_arm_set(path, tmp_path)
    path.write_text(yaml.safe_dump({"name": "x", "seeds": [1], "baseline": "a", "arms": {"a": {"config": "conf/tiny.yaml"}},
                                    "pairs": [["a", "z"]]}))
    with pytest.raises(runner.ArmSetError, match="must each name two of its arms"):
        runner.load_arm_set(path, tmp_path)
    path.write_text(yaml.safe_dump({"name": "x", "seeds": [1], "baseline": "a", "arms": {"a": {"config": "conf/nope.yaml"}}}))
    with pytest.raises(runner.ArmSetError, match="conf/nope.yaml does not exist"):
        runner.load_arm_set(path, tmp_path)
    assert runner.main(["run", str(path), "--workdir", str(tmp_path / "w")]) == 2


def test_shipped_arm_sets_resolve(tmp_path):
    for name in ("cpu_arms.yaml", "gpu_arms.yaml"):
        arm_set = runner.load_arm_set(REPO / "experiments" / name, tmp_path)
        assert arm_set.baseline in {arm.name for arm in arm_set.arms} and len(arm_set.seeds) >= 3
        steps = {arm.config["trainer"]["max_steps"] for arm in arm_set.arms}
        data = {json.dumps(arm.config["data"], sort_keys=True) for arm in arm_set.arms}
        experts = {arm.config["model"]["config"]["num_experts"] for arm in arm_set.arms}
        assert len(steps) == len(data) == len(experts) == 1, "arms must see the same tokens and experts"
        assert all(str(tmp_path) in arm.config["data"]["train_files"] for arm in arm_set.arms)


def _docs(src: Path, dst: Path, count: int) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for _, line in zip(range(count), f):
            out.write(json.dumps({"text": json.loads(line)["text"][:6000]}) + "\n")


def test_tiny_arm_set_runs_reports_and_resumes(tmp_path, capsys):
    _docs(REPO / "data" / "wikipedia_en" / "train.jsonl.gz", tmp_path / "train.jsonl", 40)
    _docs(REPO / "data" / "wikipedia_en" / "validation.jsonl.gz", tmp_path / "val.jsonl", 4)
    tiny = {"trainer.max_steps": 6, "trainer.val_check_interval": 3, "trainer.limit_val_batches": 2,
            "trainer.log_every_n_steps": 1, "trainer.callbacks[RoutingStatsCallback].init_args.window": 2,
            "trainer.callbacks[CoreEvalCallback]": None, "trainer.callbacks[SampleCallback]": None,
            "model.warmup_steps": 1, "model.config.d_model": 32, "model.config.n_layers": 2,
            "model.config.n_heads": 2, "model.config.num_experts": 4, "model.config.expert_hidden": 32,
            "data.seq_len": 32, "data.batch_size": 4, "data.vocab_size": 320,
            "data.train_files": "{shared}/train.jsonl", "data.val_files": "{shared}/val.jsonl"}
    spec = {"name": "tiny-set", "seeds": [1, 2], "baseline": "top-2", "jobs": 2, "overrides": tiny,
            "pairs": [["top-2", "soft-kappa"]],
            "arms": {"top-2": {"config": "conf/tiny.yaml"},
                     "soft-kappa": {"config": "conf/tiny_softmoe_kappa.yaml",
                                    "overrides": {"model.config.budget.total": 3.0,
                                                  "model.config.router.init_args.alpha": 0.3}}}}
    path = tmp_path / "arms.yaml"
    path.write_text(yaml.safe_dump(spec))
    args = ["run", str(path), "--shared", str(tmp_path), "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "r")]
    assert runner.main(args) == 0
    out = capsys.readouterr().out
    assert "0 finished run(s) reused, 4 to run" in out
    table = (tmp_path / "r.md").read_text()
    arm_set = runner.load_arm_set(path, tmp_path)
    results = runner.collect(tmp_path / "w", arm_set)
    assert sorted((r.arm, r.seed) for r in results) == [("soft-kappa", 1), ("soft-kappa", 2), ("top-2", 1), ("top-2", 2)]
    # Same tokens for every arm-seed: 6 steps × 4 sequences × 32 tokens.
    assert {r.tokens for r in results} == {6 * 4 * 32}
    # A dropless top-2 uses exactly 2 experts per token in each layer; SoftMoE between 1 and ⌈k·2⌉.
    top2 = [r for r in results if r.arm == "top-2"]
    assert all(r.active == [2.0, 2.0] and r.target == [2.0, 2.0] for r in top2)
    assert all(1.0 <= a <= 3.0 for r in results if r.arm == "soft-kappa" for a in r.active)
    # No token gets more than the cap ⌈k_l·c⌉ (k_l ≤ K − (L − 1) = 2, c = 2); top-2 exactly 2.
    assert all(r.active_max == 2.0 for r in top2)
    assert all(max(r.active) <= r.active_max <= 4.0 for r in results if r.arm == "soft-kappa")
    # The paired row is the difference of the two seeds' own val losses.
    diffs = [next(r.val_loss for r in results if r.arm == "soft-kappa" and r.seed == s)
             - next(r.val_loss for r in results if r.arm == "top-2" and r.seed == s) for s in (1, 2)]
    row = next(line for line in table.splitlines() if line.startswith("| soft-kappa | top-2 | val loss"))
    assert f"{diffs[0]:+.4f} (s1)" in row and f"{diffs[1]:+.4f} (s2)" in row
    assert f"| {(diffs[0] + diffs[1]) / 2:+.4f} |" in row  # the median of two is their mean
    reverse = next(line for line in table.splitlines() if line.startswith("| top-2 | soft-kappa | val loss"))
    assert f"{-diffs[0]:+.4f} (s1)" in reverse and f"{-diffs[1]:+.4f} (s2)" in reverse
    assert "| top-2 | 2 |" in table and "κ after training" in table
    for suffix in ("_loss.png", "_paired.png", "_experts.png", "_kappa.png"):
        assert (tmp_path / f"r{suffix}").stat().st_size > 1000
    # Run again: nothing is retrained. Change one arm: only its seeds run.
    assert runner.main(args) == 0
    assert "4 finished run(s) reused, 0 to run" in capsys.readouterr().out
    spec["arms"]["top-2"]["overrides"] = {"model.lr": 2e-3}
    path.write_text(yaml.safe_dump(spec))
    assert runner.main(args + ["--seeds", "1"]) == 0
    assert "1 finished run(s) reused, 1 to run" in capsys.readouterr().out
    assert math.isfinite(next(r.val_loss for r in runner.collect(tmp_path / "w", runner.load_arm_set(path, tmp_path))
                              if r.arm == "top-2"))
