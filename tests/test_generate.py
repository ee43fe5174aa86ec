"""Incremental decoding with the KV cache (against full uncached forwards), sampling, the
`generate` CLI and the lm-eval adapter's generate_until."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

import cli
from evaluation.adapter import LitMoELM
from lit_moe.generate import Sampling, generate_text, generate_tokens, next_token
from lit_moe.model import KVCache, ModelConfig, Transformer
from lit_moe.module import LitMoE
from lit_moe.tokenizer import train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TINY = dict(d_model=32, n_layers=3, n_heads=2, num_experts=4, expert_hidden=16, vocab_size=300, seq_len=48,
            n_dense_layers=1, dense_hidden=32)
SOFT = {"router": {"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"k": 2.0}},
        "budget": {"total": 4.0, "learnable": True}}




def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    # 3× the init: logits with std ≈ 1, as in a trained model, so choices vary from token to token.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    with gzip.open(REPO / "data" / "wikipedia_en" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:3000] for _, line in zip(range(20), f)]
    return train_bpe(texts, 300)


@pytest.mark.parametrize("overrides", [{}, SOFT], ids=["topk", "softmoe_budget"])
def test_cached_decoding_equals_full_forward(overrides):
    model = _model(**overrides)
    seq = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(model.cfg, batch=2, max_len=20)
        steps = [model(seq[:, :7], cache=cache)]  # prefill, then one token at a time
        steps += [model(seq[:, t:t + 1], cache=cache) for t in range(7, 20)]
    cached = torch.cat(steps, dim=1)
    assert cached.dtype == torch.float32
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def _greedy_uncached(model, prompt, steps):
    tokens = list(prompt)
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            out = model(torch.tensor([tokens]))[0, -1]
            logits.append(out)
            tokens.append(int(out.argmax()))
    return tokens[len(prompt):], torch.stack(logits)


def test_batched_generation_with_left_padding_matches_each_prompt_alone():
    model = _model()
    prompts = [[5, 17, 42, 7, 99, 3, 250], [11], [200, 201, 13]]
    got = [[] for _ in prompts]
    for row, token in generate_tokens(model, prompts, max_new_tokens=12):
        got[row].append(token)
    for prompt, tokens in zip(prompts, got):
        assert tokens == _greedy_uncached(model, prompt, 12)[0]
    # The padded rows' logits too: prefill + steps against the uncached forward, per row.
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts])
    cache = KVCache(model.cfg, len(prompts), width + 4, pad=pad)
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    with torch.no_grad():
        last = model(idx, cache=cache)[:, -1]
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(last[row], model(torch.tensor([prompt]))[0, -1], atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_filters():
    model = _model()
    prompts = [[1, 2, 3], [4, 5]]

    def run(**kw):
        out = [[] for _ in prompts]
        for row, tok in generate_tokens(model, prompts, 10, Sampling(**kw)):
            out[row].append(tok)
        return out

    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    greedy = run()
    assert run(temperature=1.0, top_k=1, seed=0) == greedy
    assert run(temperature=1.0, top_p=1e-6, seed=0) == greedy
    # top-k / top-p keep exactly the expected support.
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log_softmax(-1) * 0 + torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    gen = torch.Generator().manual_seed(0)
    picks = {int(next_token(logits, Sampling(1.0, top_k=2), gen)) for _ in range(200)}
    assert picks == {2, 3}
    picks = {int(next_token(logits, Sampling(1.0, top_p=0.65), gen)) for _ in range(200)}
    assert picks == {2, 3}  # 0.4 + 0.3 ≥ 0.65; 0.4 alone is not
    picks = {int(next_token(logits, Sampling(1.0, top_p=0.75), gen)) for _ in range(300)}
    assert picks == {1, 2, 3}


def test_stop_token_stop_strings_and_streaming(tokenizer):
    model = _model()
    prompt = "The city of"
    full = generate_text(model, tokenizer, [prompt], 16)[0]
    ids = tokenizer.encode(prompt).ids
    assert tokenizer.encode(full).ids != [] and full == tokenizer.decode(_greedy_uncached(model, ids, 16)[0])
    stop = full.strip()[2:4]
    pieces = []
    cut = generate_text(model, tokenizer, [prompt], 16, stops=[stop], on_text=lambda row, t: pieces.append(t))
    assert cut[0] == full[:full.index(stop)] and "".join(pieces) == cut[0]
    first = _greedy_uncached(model, ids, 1)[0][0]
    assert generate_text(model, tokenizer, [prompt], 16, stop_token=first) == [""]


def _checkpoint(tokenizer, path):
    torch.manual_seed(0)
    module = LitMoE(ModelConfig(**TINY), warmup_steps=1)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
             "tokenizer_json": tokenizer.to_str()}
    torch.save(state, path)
    return module.model.eval(), str(path)


def test_generate_cli_and_lm_eval_adapter(tokenizer, tmp_path, capsys):
    model, ckpt = _checkpoint(tokenizer, tmp_path / "tiny.ckpt")
    prompts = ["The city of", "In 1990, the"]
    expected = generate_text(model, tokenizer, prompts, 8)
    cli.main(["generate", "--ckpt_path", ckpt, "--prompt", prompts[0], "--max_new_tokens", "8", "--device", "cpu"])
    assert capsys.readouterr().out == prompts[0] + expected[0] + "\n"
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts) + "\n")
    cli.main(["generate", "--ckpt_path", ckpt, "--prompt_file", str(file), "--max_new_tokens", "8",
              "--temperature", "0.7", "--top_k", "20", "--seed", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("=== prompt") == 2 and prompts[1] in out
    lm = LitMoELM(model=model, tokenizer=tokenizer, batch_size=2, max_gen_toks=8)
    requests = [Instance("generate_until", doc={}, arguments=(p, {"until": []}), idx=i) for i, p in enumerate(prompts)]
    assert lm.generate_until(requests) == expected


@pytest.mark.parametrize("args, message", [
    (["--max_new_tokens", "0", "--prompt", "x"], "max_new_tokens"),
    (["--max_new_tokens", "48", "--prompt", "x"], "seq_len"),
    (["--temperature", "-1", "--prompt", "x"], "temperature"),
    (["--top_p", "1.5", "--prompt", "x"], "top_p"),
    ([], "no prompt"),
])
def test_generate_bad_input_is_one_clear_error(tokenizer, tmp_path, capsys, args, message):
    _, ckpt = _checkpoint(tokenizer, tmp_path / "tiny.ckpt")
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--ckpt_path", ckpt, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sample_callback_logs_continuations_to_mlflow(tokenizer, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from callbacks import SampleCallback

    torch.manual_seed(0)
    module = LitMoE(ModelConfig(**TINY), warmup_steps=1)
    module.tokenizer_json = tokenizer.to_str()
    data = torch.utils.data.DataLoader(torch.randint(0, 300, (8, TINY["seq_len"] + 1)), batch_size=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="samples", tracking_uri=uri)
    callback = SampleCallback(prompts=["The city of", "In 1990"], every_n_steps=2, max_new_tokens=6)
    trainer = L.Trainer(max_steps=3, logger=logger, callbacks=[callback], accelerator="cpu", devices=1,
                        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, data)
    assert module.model.training
    client = MlflowClient(tracking_uri=uri)
    artifacts = {a.path for a in client.list_artifacts(logger.run_id, "samples")}
    assert artifacts == {"samples/step000002.txt", "samples/step000003.txt"}
    text = client.download_artifacts(logger.run_id, "samples/step000003.txt", str(tmp_path))
    expected = generate_text(module.model, tokenizer, ["The city of", "In 1990"], 6, stop_token=0)
    assert callback.last == expected
    body = Path(text).read_text()
    assert "The city of" + expected[0] in body and "In 1990" + expected[1] in body
    with pytest.raises(ValueError, match="every_n_steps"):
        SampleCallback(every_n_steps=0)


def test_generate_reads_a_sharded_checkpoint_directory(tokenizer, tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    model, ckpt = _checkpoint(tokenizer, tmp_path / "tiny.ckpt")
    state = torch.load(ckpt, weights_only=True)
    sharded = tmp_path / "sharded.ckpt"
    # The layout FSDP2Strategy writes: DCP shards of {"state_dict": ...} plus meta.pt with the rest.
    dcp.save({"state_dict": state.pop("state_dict")}, checkpoint_id=str(sharded), no_dist=True)
    torch.save(state, sharded / "meta.pt")
    args = ["--prompt", "The city of", "--max_new_tokens", "6", "--device", "cpu"]
    cli.main(["generate", "--ckpt_path", ckpt, *args])
    from_file = capsys.readouterr().out
    cli.main(["generate", "--ckpt_path", str(sharded), *args])
    assert capsys.readouterr().out == from_file


def test_cache_follows_the_compute_dtype_under_autocast():
    model = _model()
    seq = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(seq)
        cache = KVCache(model.cfg, batch=1, max_len=10)  # fp32 buffers, bf16 keys: stored as bf16
        cached = torch.cat([model(seq[:, :4], cache=cache)] + [model(seq[:, t:t + 1], cache=cache)
                                                                for t in range(4, 10)], dim=1)
    assert cache.keys[0].dtype == torch.bfloat16
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.8  # bf16 rounding only
    with pytest.raises(ValueError, match="cache"):
        model(seq, positions=torch.zeros_like(seq), cache=KVCache(model.cfg, 1))
