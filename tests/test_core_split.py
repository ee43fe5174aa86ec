"""CORE split across ranks: two CPU processes (gloo), replicated (DDP-like) and FSDP2-sharded,
each score a different slice of the requests and get the same scores as one process."""

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluation import core
from evaluation.adapter import LitMoELM
from lit_moe.model import ModelConfig, Transformer
from lit_moe.tokenizer import tokenizer_from_json, train_bpe

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "evaluation" / "core_mini"
TINY = dict(d_model=32, n_layers=2, n_heads=2, num_experts=4, expert_hidden=32, vocab_size=512, seq_len=64)
TASKS = ["copa", "winograd", "lambada_openai"]
LIMIT = 6
PAIRS = [("The capital of France is", " Paris"), ("", "A whole sentence on its own."), ("One two", " three four"),
         ("Water boils at", " one hundred degrees"), ("The cat sat on the", " mat"), ("Hello", " world")]


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**TINY)).eval()


class _Request:
    def __init__(self, args):
        self.args = args


def _score(lm: LitMoELM) -> dict:
    calls = []
    inner = lm._logits_at
    lm._logits_at = lambda idx, *a, **k: calls.append(idx.shape[1]) or inner(idx, *a, **k)
    result = core.evaluate_core(lm, MINI, TASKS, LIMIT)
    loglikelihoods = lm.loglikelihood([_Request(p) for p in PAIRS], disable_tqdm=True)
    return {"result": result, "loglikelihoods": loglikelihoods, "calls": len(calls),
            "padding_calls": sum(1 for n in calls if n == 1)}


def _worker(rank: int, world: int, tmp: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{mode}", rank=rank, world_size=world)
    try:
        model = _model()
        if mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            from lit_moe.distributed import shard_transformer

            shard_transformer(model, init_device_mesh("cpu", (world,)))
        tokenizer = tokenizer_from_json(Path(tmp, "tokenizer.json").read_text())
        lm = LitMoELM(model=model, tokenizer=tokenizer, batch_size=1, distributed=True, lockstep=mode == "fsdp2")
        Path(tmp, f"{mode}-{rank}.json").write_text(json.dumps(_score(lm)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    with gzip.open(REPO / "data" / "wikipedia_en" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:5000] for _, line in zip(range(40), f)]
    tokenizer = train_bpe(texts, 512)
    tmp = tmp_path_factory.mktemp("split")
    (tmp / "tokenizer.json").write_text(tokenizer.to_str())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tmp, _score(LitMoELM(model=_model(), tokenizer=tokenizer, batch_size=1))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["replicated", "fsdp2"])
def test_two_ranks_score_halves_and_match_one_process(single, mode):
    tmp, reference = single
    mp.spawn(_worker, args=(2, str(tmp), mode), nprocs=2, join=True)
    ranks = [json.loads((tmp / f"{mode}-{rank}.json").read_text()) for rank in (0, 1)]
    for out in ranks:
        assert out["result"]["CORE"] == pytest.approx(reference["result"]["CORE"], abs=1e-12)
        for task, scores in reference["result"]["tasks"].items():
            assert out["result"]["tasks"][task]["acc"] == scores["acc"], task
        for (ll, greedy), (ll_ref, greedy_ref) in zip(out["loglikelihoods"], reference["loglikelihoods"], strict=True):
            assert math.isclose(ll, ll_ref, abs_tol=1e-4) and greedy == greedy_ref
    # Each rank ran about half of the forwards: with lockstep the same number (padded).
    real = [out["calls"] - out["padding_calls"] for out in ranks]
    assert sum(real) == reference["calls"] and max(real) <= (reference["calls"] + 2 * len(TASKS) + 2) // 2
    if mode == "fsdp2":
        assert ranks[0]["calls"] == ranks[1]["calls"]
    else:
        assert sum(out["padding_calls"] for out in ranks) == 0
