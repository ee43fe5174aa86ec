"""The paper-scale configs compare methods on equal footing: same experts, size, data and
schedule; SoftMoE's global budget K is stated against top-k's L·k."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAPER = ["paper_topk.yaml", "paper_softmoe.yaml", "paper_kappa.yaml", "paper_softmoe_kappa.yaml"]


def _load(name):
    return yaml.safe_load((REPO / "conf" / name).read_text())


def _footing(config):
    model = dict(config["model"])
    arch = {k: v for k, v in model.pop("config").items() if k not in ("router", "experts", "budget")}
    trainer = {k: v for k, v in config["trainer"].items() if k not in ("logger", "callbacks")}
    return {"arch": arch, "optim": model, "trainer": trainer, "data": config["data"], "seed": config["seed_everything"]}


@pytest.mark.parametrize("name", PAPER[1:])
def test_paper_configs_share_experts_size_data_and_schedule(name):
    assert _footing(_load(name)) == _footing(_load("paper_topk.yaml"))


@pytest.mark.parametrize("name", ["paper_softmoe.yaml", "paper_softmoe_kappa.yaml"])
def test_softmoe_budget_is_one_and_a_half_experts_per_moe_layer(name):
    config = _load(name)["model"]["config"]
    moe_layers = config["n_layers"] - config["n_dense_layers"]
    top_k = _load("paper_topk.yaml")["model"]["config"]["router"]["init_args"]["top_k"]
    assert config["budget"]["total"] == pytest.approx(1.5 * moe_layers)
    # The header states K against top-k's L·k.
    header = (REPO / "conf" / name).read_text().split("seed_everything")[0]
    assert f"{moe_layers * top_k}" in header and f"{1.5 * moe_layers:g}" in header
