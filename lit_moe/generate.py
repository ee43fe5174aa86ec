"""Text generation from a lit-moe Transformer with a KV cache (plain torch, no Lightning).

    texts = generate_text(model, tokenizer, ["Once upon a time"], max_new_tokens=50,
                          sampling=Sampling(temperature=0.8, top_k=50, top_p=0.95, seed=0))

The prompt runs through the model once (prefill), then each step feeds only the new token
(`Transformer.forward(idx, cache=KVCache)`): keys and values of earlier tokens come from the
cache, and each MoE layer routes that one token. Prompts of different lengths are left-padded
in one batch; padding is masked out and every row keeps the positions it would have alone.
The cache holds at most the model's seq_len tokens: longer prompts keep their last
seq_len − max_new_tokens tokens (lm-eval's rule).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_moe.errors import ConfigError
from lit_moe.model import KVCache, Transformer
from lit_moe.moe.router import routing_statistics_off


@dataclass
class Sampling:
    """temperature 0: greedy (argmax); otherwise softmax(logits / temperature), optionally
    restricted to the top_k most likely tokens and then to the smallest set whose probability
    reaches top_p (nucleus). seed makes sampling reproducible."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be ≥ 0 (0 = greedy), got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top_k must be ≥ 1, got {self.top_k}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}.")


def next_token(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] (fp32) → token ids [B]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prompt_budget(model: Transformer, max_new_tokens: int) -> int:
    """Prompt tokens that fit in the cache next to max_new_tokens new ones."""
    seq_len = model.cfg.seq_len
    if not 1 <= max_new_tokens < seq_len:
        raise ConfigError(f"--max_new_tokens must be between 1 and seq_len − 1 = {seq_len - 1} (the model's "
                          f"context holds prompt and continuation), got {max_new_tokens}.")
    return seq_len - max_new_tokens


@torch.no_grad()
def generate_tokens(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    sampling: Sampling | None = None, stop_token: int | None = None, vocab_size: int | None = None,
                    should_stop: Callable[[int, list[int]], bool] | None = None) -> Iterator[tuple[int, int]]:
    """Yields (row, token) for every new token of every unfinished row, step by step.

    A row finishes after max_new_tokens, at stop_token (not yielded), or once
    should_stop(row, its tokens so far) is true. Logits past vocab_size (the model's padded
    vocabulary beyond the tokenizer's) are never chosen. Prompts are left-truncated to fit
    (`prompt_budget`); an empty prompt is an error.
    """
    sampling = sampling or Sampling()
    sampling.validate()
    keep = prompt_budget(model, max_new_tokens)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token.")
    prompts = [list(p)[-keep:] for p in prompts]
    device = next(model.parameters()).device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed)
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts])
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    cache = KVCache(model.cfg, len(prompts), width + max_new_tokens, pad=pad, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    # Generation is not validation: routers keep no statistics (nor spend time on them).
    with routing_statistics_off(model):
        try:
            logits = model(idx, cache=cache)[:, -1]
            done = [False] * len(prompts)
            generated: list[list[int]] = [[] for _ in prompts]
            for step in range(max_new_tokens):
                tokens = next_token(logits[:, :vocab_size] if vocab_size else logits, sampling, generator)
                for row, token in enumerate(tokens.tolist()):
                    if done[row]:
                        continue
                    if token == stop_token:
                        done[row] = True
                        continue
                    generated[row].append(token)
                    yield row, token
                    if len(generated[row]) >= max_new_tokens or (
                            should_stop is not None and should_stop(row, generated[row])):
                        done[row] = True
                if all(done) or step == max_new_tokens - 1:
                    break
                logits = model(tokens[:, None], cache=cache)[:, -1]
        finally:
            model.train(was_training)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """text up to the first stop string, and whether one occurred."""
    cut = min((text.index(stop) for stop in stops if stop and stop in text), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def generate_text(model: Transformer, tokenizer, prompts: Sequence[str], max_new_tokens: int,  # noqa: ANN001
                  sampling: Sampling | None = None, stops: Sequence[str] = (), stop_token: int | None = None,
                  on_text: Callable[[int, str], None] | None = None,
                  prompt_ids: Sequence[Sequence[int]] | None = None) -> list[str]:
    """Continuation text of each prompt, cut before the first stop string.

    tokenizer: a `tokenizers.Tokenizer`. on_text(row, new_text) streams each row's text as it
    grows (never past a stop string; held back while the last bytes are an incomplete UTF-8
    character). prompt_ids: already-encoded prompts (then `prompts` is ignored).
    """
    if prompt_ids is None:
        prompt_ids = [enc.ids for enc in tokenizer.encode_batch(list(prompts), add_special_tokens=False)]
    generated: list[list[int]] = [[] for _ in prompt_ids]
    texts = [""] * len(prompt_ids)
    shown = [0] * len(prompt_ids)
    stops = [s for s in stops if s]

    def should_stop(row: int, tokens: list[int]) -> bool:  # after the loop below decoded the row
        return bool(stops) and cut_at_stop(texts[row], stops)[1]

    vocab = min(tokenizer.get_vocab_size(), model.cfg.vocab_size)
    for row, token in generate_tokens(model, prompt_ids, max_new_tokens, sampling, stop_token, vocab, should_stop):
        generated[row].append(token)
        if stops or on_text is not None:
            texts[row] = tokenizer.decode(generated[row])
        if on_text is not None:
            visible, stopped = cut_at_stop(texts[row], stops)
            if not stopped:  # a stop string may still be forming: hold back its possible start
                hold = max((len(s) - 1 for s in stops), default=0)
                visible = visible[:max(len(visible) - hold, 0)]
            visible = visible.rstrip("\ufffd")
            if len(visible) > shown[row]:
                on_text(row, visible[shown[row]:])
                shown[row] = len(visible)
    results = [cut_at_stop(tokenizer.decode(tokens), stops)[0] for tokens in generated]
    if on_text is not None:
        for row, text in enumerate(results):
            if len(text) > shown[row]:
                on_text(row, text[shown[row]:])
    return results


# -- command line: `cli.py generate` ---------------------------------------------------------
def _parser():  # noqa: ANN202
    import argparse

    p = argparse.ArgumentParser(prog="lit-moe generate", description="Sample text from a lit-moe checkpoint.")
    p.add_argument("--ckpt_path", required=True,
                   help="checkpoint written by `fit` (.ckpt file or sharded directory), or a directory "
                        "written by `export --format safetensors`")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt_file", help="file with one prompt per line ('-' = stdin); \\n in a line is a newline")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate per prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 = sampling")
    p.add_argument("--top_k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top_p", type=float, help="nucleus sampling: smallest set with probability ≥ p")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable; \\n and \\t are newline and tab); not included in the output")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA if available)")
    p.add_argument("--no_stream", action="store_true", help="print each continuation only when it is complete")
    return p


def _read_prompts(opts) -> list[str]:  # noqa: ANN001
    import sys

    prompts = list(opts.prompt)
    if opts.prompt_file:
        try:
            if opts.prompt_file == "-":
                lines = sys.stdin.read().splitlines()
            else:
                with open(opts.prompt_file, encoding="utf-8") as f:
                    lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--prompt_file '{opts.prompt_file}' cannot be read ({err}).") from err
        prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise ConfigError("no prompt given: pass --prompt TEXT (repeatable) or --prompt_file FILE.")
    return prompts


def main(args: list[str] | None = None) -> list[str]:
    """`lit-moe generate`: bad input raises ConfigError (cli.py prints it, exit 2)."""
    import sys

    opts = _parser().parse_args(args)
    sampling = Sampling(opts.temperature, opts.top_k, opts.top_p, opts.seed)
    sampling.validate()
    if opts.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be ≥ 1, got {opts.max_new_tokens}.")
    prompts = _read_prompts(opts)

    from lit_moe.module import load_checkpoint  # imports Lightning: after the cheap checks
    from lit_moe.tokenizer import eot_id

    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    module, tokenizer = load_checkpoint(opts.ckpt_path, map_location=device)
    model = module.model
    prompt_budget(model, opts.max_new_tokens)
    stream = not opts.no_stream and len(prompts) == 1
    out = sys.stdout

    def on_text(row: int, text: str) -> None:
        out.write(text)
        out.flush()

    if stream:
        out.write(prompts[0])
        out.flush()
    stops = [stop.replace("\\n", "\n").replace("\\t", "\t") for stop in opts.stop]
    texts = generate_text(model, tokenizer, prompts, opts.max_new_tokens, sampling, stops,
                          stop_token=eot_id(tokenizer), on_text=on_text if stream else None)
    if stream:
        out.write("\n")
    else:
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            if len(prompts) > 1:
                out.write(f"=== prompt {i + 1} ===\n")
            out.write(prompt + text + "\n")
    out.flush()
    return texts
