"""CORE evaluation through lm-eval: adapter, request building, scoring, CLI, callback."""

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM, TemplateLM
from mlflow.tracking import MlflowClient

import cli
from callbacks.core_eval import CoreEvalCallback
from evaluation import core
from evaluation.adapter import LitMoELM
from lit_moe.model import ModelConfig
from lit_moe.module import LitMoE
from lit_moe.tokenizer import train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "evaluation" / "core_mini"
TINY = dict(d_model=32, n_layers=2, n_heads=2, num_experts=4, expert_hidden=32, vocab_size=512, seq_len=64)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer():
    with gzip.open(REPO / "data" / "wikipedia_en" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:5000] for _, line in zip(range(40), f)]
    return train_bpe(texts, 512)


@pytest.fixture(scope="session")
def module(tokenizer):
    torch.manual_seed(0)
    module = LitMoE(ModelConfig(**TINY), warmup_steps=1)
    module.tokenizer_json = tokenizer.to_str()
    return module.eval()


def _save(module, path, with_tokenizer=True):
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    if with_tokenizer:
        state["tokenizer_json"] = module.tokenizer_json
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="session")
def checkpoint(module, tmp_path_factory):
    return _save(module, tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def make_bundle(root: Path, tasks: dict, baseline: float = 25.0) -> Path:
    """tasks: label → (task type, items, num_fewshot, delimiter or None)."""
    entries, rows = [], ["Eval Task,Random baseline"]
    for label, (kind, items, shots, delimiter) in tasks.items():
        (root / "eval_data" / "t").mkdir(parents=True, exist_ok=True)
        (root / "eval_data" / "t" / f"{label}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        entry = {"label": label, "dataset_uri": f"t/{label}.jsonl", "num_fewshot": [shots], "icl_task_type": kind}
        if delimiter is not None:
            entry["continuation_delimiter"] = delimiter
        entries.append(entry)
        rows.append(f"{label},{baseline}")
    (root / "core.yaml").write_text(json.dumps({"icl_tasks": entries}))  # JSON is YAML
    (root / "eval_meta_data.csv").write_text("\n".join(rows) + "\n")
    return root


def _instances(pairs):
    return [Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


class TableLM(TemplateLM):
    """Byte-level fake model: log-likelihoods looked up by continuation, or by context suffix."""

    def __init__(self, by_continuation=None, by_context=None):
        super().__init__()
        self.by_continuation, self.by_context = by_continuation or {}, by_context or {}
        self.seen = []

    eot_token_id = 0

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return list(string.encode())

    def loglikelihood(self, requests, disable_tqdm=False):
        out = []
        for context, continuation in (r.args for r in requests):
            self.seen.append((context, continuation))
            ll = self.by_continuation.get(continuation)
            if ll is None:
                ll = next(v for k, v in self.by_context.items() if context.endswith(k))
            out.append((ll, True))
        return out

    def _loglikelihood_tokens(self, requests, **kwargs):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


# -- scoring and request building ----------------------------------------------------------
def test_centered_accuracy_on_hand_values():
    assert core.centered(0.25, 25) == 0.0
    assert core.centered(1.0, 25) == 1.0
    assert core.centered(0.625, 25) == pytest.approx(0.5)
    assert core.centered(0.5, 62) == pytest.approx((0.5 - 0.62) / 0.38)
    assert core.centered(0.3, 0) == pytest.approx(0.3)


def test_multiple_choice_requests_and_mean_token_loss(tmp_path):
    items = [{"query": "Q0?", "choices": ["x", "yyyyyyyy"], "gold": 1},
             {"query": "Q1?", "choices": ["c", "d"], "gold": 0}]
    bundle = make_bundle(tmp_path, {"mc": ("multiple_choice", items, 1, "\nAnswer: ")})
    (task,) = core.load_bundle(bundle)
    requests = core.build_requests(task, core.read_items(task))
    # The only other item is the example; examples are joined with a blank line; the
    # delimiter's trailing space moves to the continuation (lm-eval's convention).
    assert requests[0].pairs == [("Q1?\nAnswer: c\n\nQ0?\nAnswer:", " x"),
                                 ("Q1?\nAnswer: c\n\nQ0?\nAnswer:", " yyyyyyyy")]
    assert requests[1].pairs[0] == ("Q0?\nAnswer: yyyyyyyy\n\nQ1?\nAnswer:", " c")

    # " x" (2 byte tokens) has loss 1.5 per token, " yyyyyyyy" (9) 1.0: CORE picks the long
    # one (gold), lm-eval's summed acc the short one; acc_norm divides by answer characters.
    lm = TableLM(by_continuation={" x": -3.0, " yyyyyyyy": -9.0, " c": -1.0, " d": -2.0})
    result = core.evaluate_core(lm, bundle)
    r = result["tasks"]["mc"]
    assert (r["acc"], r["acc_sum"], r["acc_norm"], r["n"]) == (1.0, 0.5, 1.0, 2)
    assert result["CORE"] == 1.0


def test_schema_requests_pick_the_context_with_lowest_loss(tmp_path):
    items = [{"context_options": ["The cat", "The dog"], "continuation": "barked.", "gold": 1},
             {"context_options": ["Ann met Bo; Ann", "Ann met Bo; Bo"], "continuation": "smiled.", "gold": 0}]
    bundle = make_bundle(tmp_path, {"wsc": ("schema", items, 0, None)})  # default delimiter " "
    (task,) = core.load_bundle(bundle)
    requests = core.build_requests(task, core.read_items(task))
    assert requests[0].pairs == [("The cat", " barked."), ("The dog", " barked.")]
    assert requests[1].pairs == [("Ann met Bo; Ann", " smiled."), ("Ann met Bo; Bo", " smiled.")]
    lm = TableLM(by_context={"The cat": -9.0, "The dog": -2.0, "; Ann": -3.0, "; Bo": -4.0})
    r = core.evaluate_core(lm, bundle)["tasks"]["wsc"]
    assert r["acc"] == 1.0 and r["centered"] == 1.0


def test_language_modeling_requests_and_greedy_match(tmp_path):
    items = [{"context": "  2+2= ", "continuation": "4"}, {"context": "3+3=", "continuation": "6"}]
    bundle = make_bundle(tmp_path, {"lm": ("language_modeling", items, 1, None)})
    (task,) = core.load_bundle(bundle)
    requests = core.build_requests(task, core.read_items(task))
    assert requests[0].pairs == [("3+3= 6\n\n2+2=", " 4")]
    assert requests[1].pairs == [("2+2= 4\n\n3+3=", " 6")]

    class HalfGreedy(TableLM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [(-1.0, r.args[1] == " 4") for r in requests]

    r = core.evaluate_core(HalfGreedy(), bundle)["tasks"]["lm"]
    assert r["acc"] == 0.5 and "acc_norm" not in r


def test_fewshot_never_contains_the_item():
    items = ["a", "b", "a", "c", "d"]  # item 2 is a verbatim copy of item 0
    for index in range(len(items)):
        shots = core.fewshot_indices(items, index, 10)
        assert index not in shots and all(items[j] != items[index] for j in shots)
        assert len(shots) == len(set(shots)) == sum(x != items[index] for x in items)
    assert core.fewshot_indices(items, 1, 2) == core.fewshot_indices(items, 1, 2)  # seeded

    for task in core.load_bundle(MINI):
        if not task.num_fewshot:
            continue
        items = core.read_items(task)
        for index, item in enumerate(items):
            shots = core.fewshot_indices(items, index, task.num_fewshot)
            assert len(shots) == task.num_fewshot and index not in shots
            assert all(items[j] != item for j in shots), task.label
        # an item's prompt does not depend on --limit
        assert core.build_requests(task, items, limit=3) == core.build_requests(task, items)[:3]


def test_mini_bundle_is_complete_and_small():
    tasks = core.load_bundle(MINI)
    assert len(tasks) == 22
    for task in tasks:
        assert 0 < len(core.read_items(task)) <= 50
    assert (MINI / "LICENSE.md").is_file() and (MINI / "README.md").is_file()


class OracleLM(LM):
    """Knows every gold answer of the bundle: log-likelihood 0 for it, −1 per character else."""

    def __init__(self, bundle):
        super().__init__()
        self.golds = set()
        for task in core.load_bundle(bundle):
            for item in core.read_items(task):
                d = task.delimiter
                self.golds.add({"multiple_choice": lambda: item["query"] + d + item["choices"][item["gold"]],
                                "schema": lambda: item["context_options"][item["gold"]] + d + item["continuation"],
                                "language_modeling": lambda: item["context"].strip() + d + item["continuation"],
                                }[task.task_type]())

    def loglikelihood(self, requests):
        out = []
        for context, continuation in (r.args for r in requests):
            gold = any((context + continuation).endswith(g) for g in self.golds)
            out.append((0.0 if gold else -float(len(continuation)), gold))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError


def test_oracle_scores_core_one():
    result = core.evaluate_core(OracleLM(MINI))
    assert result["CORE"] == 1.0
    assert len(result["tasks"]) == 22 and all(r["acc"] == 1.0 for r in result["tasks"].values())


# -- adapter -------------------------------------------------------------------------------
def _reference_loglikelihood(lm, context, continuation):
    """One request alone, from lm-eval's own encoding rule and one unpadded forward."""
    if context:
        ctx, cont = lm._encode_pair(context, continuation)
    else:
        ctx, cont = [lm.eot_token_id], lm.tok_encode(continuation)
    tokens = (ctx + cont)[-(lm.max_length + 1):]
    with torch.no_grad():
        logits = lm.model(torch.tensor([tokens[:-1]]))[0, -len(cont):, :lm.vocab_size]
    logprobs = F.log_softmax(logits, -1)
    target = torch.tensor(cont)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def test_batched_loglikelihood_equals_one_by_one(module, tokenizer):
    lm = LitMoELM(model=module.model, tokenizer=tokenizer, batch_size=3)
    long_context = "The river flows through the old town and past the mill. " * 20  # > seq_len tokens
    pairs = [("Question: what is red?\nAnswer:", " A"), ("Question: what is red?\nAnswer:", " B"),
             ("Question: what is red?\nAnswer:", " C"), ("The cat", " sat on the mat."), ("", "Hello world"),
             (long_context, " And then it rained."), ("A dog ", "barked."), ("x", " y" * 3),
             (long_context[:90], " " + long_context[:40]),
             # choices of different lengths after one context (packed into one row), a
             # duplicate, and choices after a context the window truncates differently
             ("The cat", " ran."), ("The cat", " sat on the mat."), ("The cat", " slept all day long, as cats do."),
             (long_context, " Yes."), (long_context[:400], " a b c d e f g"), (long_context[:400], " no"),
             # joins the whitespace shortcut must get right, and ones it must leave alone
             ("It's", "  s"), ("don'", " t"), ("x", "\n\ny"), ("sum = 4", "2"), ("sum = 4", " 2"), ("café", " é!"),
             ("Q?", "\t yes"), ("end.", " "), ("word", "word")]
    got = lm.loglikelihood(_instances(pairs))
    assert len({tuple(p) for p in pairs}) < len(pairs)  # the duplicate is there
    for pair, (ll, greedy) in zip(pairs, got):
        ref_ll, ref_greedy = _reference_loglikelihood(lm, *pair)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy, pair
    assert lm.model.cfg.seq_len < len(lm.tok_encode(long_context))
    # the batched encoder follows TemplateLM's rule
    for (context, continuation), (_, cont) in zip(pairs, lm.encode_pairs(pairs)):
        if context:
            assert cont == lm._encode_pair(context, continuation)[1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(left=st.text(st.sampled_from(list("ab'sd1 .,?é\u00e9\u0301\n\t-")), min_size=1, max_size=12),
       right=st.text(st.sampled_from(list("ab'sd1 .,?é\u0301\n\t-")), max_size=12),
       space=st.sampled_from([" ", "  ", "\n", "\t", " \n", "\r\n"]))
def test_byte_level_bpe_never_merges_across_a_whitespace_join(tokenizer, left, right, space):
    """The adapter's tokenization shortcut: with lit-moe's byte-level BPE, a text ending in
    non-whitespace followed by one starting with whitespace encodes as the two encodings."""
    from evaluation.adapter import splits_at_whitespace

    assert splits_at_whitespace(tokenizer)
    left = left.rstrip() or "a"
    both = tokenizer.encode(left + space + right, add_special_tokens=False).ids
    apart = (tokenizer.encode(left, add_special_tokens=False).ids
             + tokenizer.encode(space + right, add_special_tokens=False).ids)
    assert both == apart


def test_whitespace_join_shortcut_only_for_known_tokenizers(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from evaluation.adapter import splits_at_whitespace

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.Metaspace()
    assert splits_at_whitespace(tokenizer) and not splits_at_whitespace(other)


def test_rolling_and_generation(module, tokenizer):
    lm = LitMoELM(model=module.model, tokenizer=tokenizer, batch_size=4, max_gen_toks=8)
    short = "Paris is the capital of France."
    (rolling,) = lm.loglikelihood_rolling(_instances([(short,)]))
    assert rolling == pytest.approx(_reference_loglikelihood(lm, "", short)[0], abs=1e-4)
    long = "word " * 300  # several windows
    (total,) = lm.loglikelihood_rolling(_instances([(long,)]))
    assert math.isfinite(total) and total < rolling

    def gen(until):
        return lm.generate_until([Instance("generate_until", doc={}, arguments=("The city of", {"until": until}),
                                           idx=0)])[0]

    text = gen([])
    with torch.no_grad():
        first = lm.model(torch.tensor([lm.tok_encode("The city of")]))[0, -1, :lm.vocab_size].argmax()
    assert text.startswith(lm.tok_decode([int(first)]))
    if len(text.strip()) >= 3:
        stop = text.strip()[1:3]
        assert gen([stop]) == text[:text.index(stop)]


def test_untrained_model_scores_near_zero_through_the_cli(checkpoint, tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("core-eval")).info.run_id
    out = tmp_path / "core.json"
    cli.main(["evaluate", "--ckpt_path", checkpoint, "--output", str(out), "--batch_size", "32", "--quiet",
              "--mlflow_run_id", run_id, "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    result = json.loads(out.read_text())
    assert abs(result["CORE"]) < 0.15
    assert len(result["tasks"]) == 22 and result["limit"] is None
    for r in result["tasks"].values():
        assert {"acc", "centered", "n"} <= set(r) and 0 < r["n"] <= 50
        assert ("acc_norm" in r) == (r["type"] != "language_modeling")
    metrics = client.get_run(run_id).data.metrics
    assert metrics["core/CORE"] == pytest.approx(result["CORE"])
    assert metrics["core/copa"] == pytest.approx(result["tasks"]["copa"]["centered"])
    assert {a.path for a in client.list_artifacts(run_id, "core")} >= {"core/results.md", "core/results.json"}


def test_lm_eval_cli_runs_local_tasks_with_lit_moe(checkpoint, tmp_path):
    tasks = ["copa", "winograd", "lambada_openai"]  # one task of each type
    core.write_lm_eval_tasks(MINI, tmp_path / "tasks", tasks)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation", "--model", "lit_moe", "--model_args", f"checkpoint={checkpoint}",
         "--tasks", ",".join(f"core_{t}" for t in tasks), "--include_path", str(tmp_path / "tasks"),
         "--limit", "6", "--batch_size", "8", "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert {"acc,none", "acc_norm,none"} <= set(results["core_copa"])
    assert "acc,none" in results["core_winograd"] and "acc,none" in results["core_lambada_openai"]

    # lm-eval built the same 0-shot prompts as core.build_requests (up to where the
    # word-boundary space sits, which lm-eval's encoder moves anyway).
    (samples_file,) = (tmp_path / "out").rglob("samples_core_copa_*.jsonl")
    sent = [tuple(a.values()) for s in map(json.loads, samples_file.read_text().splitlines())
            for a in s["arguments"].values()]
    (task,) = core.load_bundle(MINI, ["copa"])
    ours = [p for item in core.build_requests(task, core.read_items(task), limit=6) for p in item.pairs]
    assert sorted(ours) == sorted(core._split_whitespace(c, x) for c, x in sent)


# -- bad input -----------------------------------------------------------------------------
def _cli_error(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_input_is_one_clear_error(checkpoint, module, tmp_path, capsys):
    assert "is not a directory" in _cli_error(["--ckpt_path", checkpoint, "--bundle", str(tmp_path / "nope")], capsys)
    (tmp_path / "empty").mkdir()
    assert "core.yaml" in _cli_error(["--ckpt_path", checkpoint, "--bundle", str(tmp_path / "empty")], capsys)
    err = _cli_error(["--ckpt_path", checkpoint, "--tasks", "arc_easy,arc_hard"], capsys)
    assert "arc_hard" in err and "valid tasks" in err and "winogrande" in err
    assert "limit" in _cli_error(["--ckpt_path", checkpoint, "--limit", "0"], capsys)
    assert "does not exist" in _cli_error(["--ckpt_path", str(tmp_path / "missing.ckpt"), "--tasks", "copa"], capsys)
    no_tok = _save(module, tmp_path / "no_tok.ckpt", with_tokenizer=False)
    assert "no tokenizer" in _cli_error(["--ckpt_path", no_tok, "--tasks", "copa"], capsys)

    bundle = make_bundle(tmp_path / "b", {"mc": ("multiple_choice", [{"query": "q", "choices": ["a"], "gold": 0}], 0,
                                                 None)})
    data = bundle / "eval_data" / "t" / "mc.jsonl"
    data.write_text(data.read_text() + '{"query": "q2", "choices": ["a"]\n')
    assert f"{data}:2" in _cli_error(["--ckpt_path", checkpoint, "--bundle", str(bundle)], capsys)
    data.write_text('{"query": "q", "choices": ["a"], "gold": 3}\n')
    assert f"{data}:1" in _cli_error(["--ckpt_path", checkpoint, "--bundle", str(bundle)], capsys)
    data.unlink()
    assert "does not exist" in _cli_error(["--ckpt_path", checkpoint, "--bundle", str(bundle)], capsys)


# -- callback ------------------------------------------------------------------------------
def test_callback_logs_core_after_fit_and_every_n_steps(tokenizer, tmp_path):
    torch.manual_seed(0)
    module = LitMoE(ModelConfig(**TINY), warmup_steps=1)
    module.tokenizer_json = tokenizer.to_str()
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (8, TINY["seq_len"] + 1)), batch_size=4)
    logger = MLFlowLogger(experiment_name="core-cb", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    callback = CoreEvalCallback(tasks=["copa", "winograd", "lambada_openai"], limit=4, every_n_steps=2,
                                output=str(tmp_path / "core.json"))
    trainer = L.Trainer(max_steps=3, logger=logger, callbacks=[callback], accelerator="cpu", devices=1,
                        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, data)
    assert module.model.training  # handed back in training mode

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(logger.run_id, "core/CORE")
    # After the 2nd step, then at the end of fit (after the 3rd), at the steps Lightning logs
    # those steps' train/loss and val/loss: the 0-based step indices 1 and 2.
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(callback.results["CORE"])
    metrics = set(client.get_run(logger.run_id).data.metrics)
    assert metrics == {"core/CORE", "core/copa", "core/winograd", "core/lambada_openai"}  # no raw-accuracy keys
    artifacts = {a.path for a in client.list_artifacts(logger.run_id, "core")}
    assert "core/results_step000002.md" in artifacts
    assert json.loads((tmp_path / "core.json").read_text())["step"] == 2


def test_callback_rejects_bad_settings():
    with pytest.raises(ValueError, match="limit"):
        CoreEvalCallback(limit=0)
    with pytest.raises(ValueError, match="valid tasks"):
        CoreEvalCallback(tasks=["nope"])
