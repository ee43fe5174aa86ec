"""`export --format hf`: transformers loads the directory as MixtralForCausalLM with lit-moe's
logits and greedy generations; models Mixtral cannot express are refused; `--format
safetensors` round-trips through `generate`."""

import gzip
import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import cli
from lit_moe.module import load_checkpoint
from lit_moe.export import rope_permutation
from lit_moe.generate import generate_tokens
from lit_moe.model import ModelConfig
from lit_moe.module import LitMoE
from lit_moe.tokenizer import eot_id, train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TINY = dict(d_model=32, n_layers=2, n_heads=2, num_experts=4, expert_hidden=16, vocab_size=304, seq_len=48)




@pytest.fixture(scope="module")
def tokenizer():
    with gzip.open(REPO / "data" / "wikipedia_en" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:3000] for _, line in zip(range(20), f)]
    return train_bpe(texts, 300)


def _checkpoint(tokenizer, path, **overrides):
    torch.manual_seed(0)
    module = LitMoE(ModelConfig(**{**TINY, **overrides}), warmup_steps=1)
    with torch.no_grad():  # 3× the init: logits with std ≈ 1, routing that varies by token
        for p in module.model.parameters():
            p.mul_(3.0)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "tokenizer_json": tokenizer.to_str()}, path)
    return module.model.eval(), str(path)


def test_rope_permutation_maps_pairs_to_halves():
    assert rope_permutation(2, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hf_mixtral_matches_lit_moe(tokenizer, tmp_path, tie, capsys):
    model, ckpt = _checkpoint(tokenizer, tmp_path / "m.ckpt", tie_embeddings=tie)
    out = tmp_path / "hf"
    cli.main(["export", "--ckpt_path", ckpt, "--format", "hf", "--output", str(out)])
    assert "wrote hf export" in capsys.readouterr().out
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(hf, transformers.MixtralForCausalLM)
    assert hf.config.tie_word_embeddings == tie and hf.config.num_key_value_heads == 2
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    text = "The city of Paris is the capital of France."
    ids = tokenizer.encode(text).ids
    assert hf_tok(text)["input_ids"] == ids and hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == eot_id(tokenizer)

    idx = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(idx).logits
    assert ours.std() > 0.5  # non-trivial logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    prompt = ids[:6]
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    ours_out = [t for _, t in generate_tokens(model, [prompt], 12, stop_token=eot_id(tokenizer))]
    assert hf_out[:len(ours_out)] == ours_out and len(ours_out) >= 1


@pytest.mark.parametrize("overrides, reason", [
    ({"n_dense_layers": 1}, "dense MLP"),
    ({"router": {"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"k": 2.0}}}, "SoftTopKRouter"),
    ({"experts": {"class_path": "lit_moe.moe.KappaSwiGLUExperts"}}, "KappaSwiGLUExperts"),
    ({"router": {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 2, "capacity_factor": 1.0}}},
     "capacity factor"),
], ids=["dense_first", "softmoe", "kappa", "capacity"])
def test_inexpressible_models_are_refused_and_export_as_safetensors(tokenizer, tmp_path, capsys, overrides, reason):
    model, ckpt = _checkpoint(tokenizer, tmp_path / "m.ckpt", **overrides)
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--ckpt_path", ckpt, "--format", "hf", "--output", str(tmp_path / "hf")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert reason in err and "--format safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()

    out = tmp_path / "st"
    cli.main(["export", "--ckpt_path", ckpt, "--format", "safetensors", "--output", str(out)])
    capsys.readouterr()
    loaded, tok = load_checkpoint(str(out))
    idx = torch.tensor([tokenizer.encode("The city of Paris").ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), model(idx), atol=0, rtol=0)
    args = ["--prompt", "The city of", "--max_new_tokens", "6", "--device", "cpu"]
    cli.main(["generate", "--ckpt_path", ckpt, *args])
    from_ckpt = capsys.readouterr().out
    cli.main(["generate", "--ckpt_path", str(out), *args])
    assert capsys.readouterr().out == from_ckpt


def test_export_refuses_to_overwrite(tokenizer, tmp_path, capsys):
    _, ckpt = _checkpoint(tokenizer, tmp_path / "m.ckpt")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--ckpt_path", ckpt, "--output", str(out)])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    cli.main(["export", "--ckpt_path", ckpt, "--output", str(out), "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
