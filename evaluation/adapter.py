"""lm-evaluation-harness model adapter for lit-moe models, registered as ``lit_moe``.

    lm = LitMoELM(checkpoint="checkpoints/tiny/last.ckpt", batch_size=32)   # from a file
    lm = LitMoELM(model=pl_module.model, tokenizer=tok)                     # in memory
    python -m evaluation --model lit_moe --model_args checkpoint=PATH --tasks ...

Scoring follows lm-eval's conventions (its ``TemplateLM``): a request's context and
continuation are encoded as ``encode(context + continuation)`` split after
``len(encode(context))`` tokens, with trailing context whitespace moved to the
continuation; only the last ``seq_len + 1`` tokens are kept (left truncation).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from lit_moe.errors import ConfigError
from lit_moe.model import Transformer
from lit_moe.moe.router import routing_statistics_off
from lit_moe.tokenizer import eot_id

DEFAULT_BATCH_SIZE = 16

# (request key for lm-eval's cache or None, context token ids, continuation token ids)
TokenRequest = tuple[Any, list[int], list[int]]


def _batch_size(value: int | str | None) -> int:
    # lm-eval passes the CLI's --batch_size as given: an int, "16", "auto" or "auto:N".
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {size}.")
    return size


_ASCII_WHITESPACE = frozenset(" \t\n\r\x0b\x0c")


def splits_at_whitespace(tokenizer: Tokenizer) -> bool:
    """Whether encode(a + b) == encode(a) + encode(b) whenever a ends in a non-whitespace
    character and b starts with ASCII whitespace.

    True for byte-level BPE with GPT-2's pre-tokenizer regex and no normalizer (lit-moe's own
    tokenizers): BPE merges stay inside pre-tokens, and no alternative of that regex
    (contractions, ` ?letters`, ` ?digits`, ` ?other`, whitespace runs) can match a span that
    starts before such a join and ends after it, nor does it look behind; added tokens
    without whitespace cannot straddle it either. Anything else: False (encode both strings).
    """
    try:
        config = json.loads(tokenizer.to_str())
    except Exception:  # not serialisable: assume nothing
        return False
    pre = config.get("pre_tokenizer") or {}
    return (config.get("normalizer") is None and (config.get("model") or {}).get("type") == "BPE"
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and not any(any(ch.isspace() for ch in tok.get("content", "")) for tok in config.get("added_tokens") or []))


def _fsdp_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        FSDPModule = FullyShardedDataParallel  # noqa: N806
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


class PackedRow:
    """One model input: a context, then continuations that each see only the context.

    tokens: context + each continuation without its last token (never an input);
    positions: the position each token would have in its own request;
    scored_at[i]: indices in `tokens` whose next-token logits score continuation i
    (the last context token for its first token, then its own tokens).
    """

    def __init__(self, context: tuple[int, ...]):
        self.context = context
        self.tokens = list(context)
        self.positions = list(range(len(context)))
        self.segments = [0] * len(context)  # 0: context, i: continuation i
        self.targets: list[tuple[int, ...]] = []
        self.scored_at: list[list[int]] = []

    def add(self, target: tuple[int, ...]) -> None:
        start = len(self.tokens)
        self.targets.append(target)
        self.scored_at.append([len(self.context) - 1, *range(start, start + len(target) - 1)])
        self.tokens += target[:-1]
        self.positions += range(len(self.context), len(self.context) + len(target) - 1)
        self.segments += [len(self.targets)] * (len(target) - 1)

    def mask(self) -> torch.Tensor:
        """[n, n] bool: causal, and a continuation token sees the context and its own segment."""
        segments = torch.tensor(self.segments)
        n = len(segments)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return causal & ((segments[None, :] == 0) | (segments[None, :] == segments[:, None]))


@register_model("lit_moe")
class LitMoELM(TemplateLM):
    """A lit-moe ``Transformer`` plus its tokenizer as an lm-eval language model.

    Args:
        checkpoint: a ``.ckpt`` written by ``fit`` (model and tokenizer come from it), or
        model, tokenizer: an in-memory ``lit_moe.model.Transformer`` and its tokenizer.
        batch_size: sequences of seq_len tokens per forward pass (a token budget: shorter
            rows come more to a batch, packed ones fewer).
        max_gen_toks: default cap on generated tokens for ``generate_until``.
        device: where to run; default: the model's device, or CUDA when loading a checkpoint
            on a machine that has one.
        distributed: under an initialised torch.distributed process group, every rank calls
            with the same requests and scores only every world_size-th batch of them; the
            results are gathered on every rank (same scores as one process, N× less time).
        lockstep: with distributed, every rank runs the same number of forwards (padding with
            a one-token forward): needed when the weights are sharded (FSDP), where a forward
            is a collective.
    """

    def __init__(self, checkpoint: str | None = None, model: nn.Module | None = None,
                 tokenizer: Tokenizer | None = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_gen_toks: int = 256, device: str | None = None, distributed: bool = False,
                 lockstep: bool = False, **unused: Any):
        super().__init__()
        unused.pop("max_batch_size", None)  # lm-eval always passes it; there is no auto sizing here
        if unused:
            warnings.warn(f"lit_moe ignores model arguments {sorted(unused)}", stacklevel=2)
        if checkpoint is not None:
            from lit_moe.module import load_checkpoint  # imports Lightning: only when needed

            module, tokenizer = load_checkpoint(str(checkpoint))
            model = module.model
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None or tokenizer is None:
            raise ConfigError("LitMoELM needs checkpoint=PATH, or both model= and tokenizer=.")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"device {device!r} requested but CUDA is not available; using the CPU.", stacklevel=2)
            device = "cpu"
        self.model = model if device is None else model.to(device)
        self.model.eval()
        self.tokenizer = tokenizer
        self._device = next(self.model.parameters()).device
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = self.model.cfg.seq_len
        # The model's vocabulary is padded (to a multiple for fast matmuls); ids past the
        # tokenizer's are never real tokens, so log-probabilities and greedy choices are
        # taken over the tokenizer's vocabulary only.
        self.vocab_size = min(tokenizer.get_vocab_size(), self.model.cfg.vocab_size)
        self._splits_at_whitespace = splits_at_whitespace(tokenizer)
        self._encoded: tuple[list[tuple[str, str]], list[tuple[list[int], list[int]]]] | None = None
        # Split scoring across the ranks of the initialised process group (every rank makes
        # the same calls with the same requests; results are gathered on every rank).
        self.distributed = bool(distributed)
        self.lockstep = bool(lockstep)
        # `select` runs the last block through `Block.forward_at`, past FSDP's per-block hooks
        # (which gather the sharded weights): sharded models take the plain forward.
        self._select = isinstance(self.model, Transformer) and not _fsdp_sharded(self.model)

    # -- tokenizer ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return eot_id(self.tokenizer)

    @property
    def tokenizer_name(self) -> str:
        return f"lit_moe-bpe-{self.tokenizer.get_vocab_size()}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # -- scoring --------------------------------------------------------------------------
    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context ids, continuation ids) per pair by TemplateLM's rule (``_encode_pair``, and
        ``loglikelihood``'s empty-context case), but with each distinct string encoded once,
        in parallel chunks. Only what the model can see is kept: the last seq_len + 1 context
        ids and the last seq_len continuation ids (a longer continuation is scored on its tail)."""
        if self._encoded is not None and self._encoded[0] == pairs:
            return self._encoded[1]  # the same batch again (evaluation.core counts tokens after scoring)
        split = []
        for context, continuation in pairs:
            stripped = context.rstrip()  # trailing whitespace goes with the continuation
            split.append((stripped, context[len(stripped):] + continuation) if context else ("", continuation))
        # encode(context + continuation) is encode(context) + encode(continuation) where the
        # tokenizer cannot merge across the join (`_splits_at_whitespace`); there the long
        # context + continuation string need not be encoded at all.
        apart = [bool(context) and self._splits_at_whitespace and continuation[:1] in _ASCII_WHITESPACE
                 for context, continuation in split]
        strings = list(dict.fromkeys(s for (context, continuation), alone in zip(split, apart)
                                     for s in ((context, continuation) if alone else
                                               (context, context + continuation) if context else (continuation,))))
        ids: dict[str, tuple[int, list[int]]] = {}  # string → (token count, last tokens)
        keep = self.max_length + 1
        for start in range(0, len(strings), 256):  # chunks: Encoding objects are large
            chunk = strings[start:start + 256]
            for string, enc in zip(chunk, self.tokenizer.encode_batch(chunk, add_special_tokens=False)):
                ids[string] = (len(enc.ids), enc.ids[-keep:])
        out = []
        for (context, continuation), alone in zip(split, apart):
            if alone:
                cont = ids[continuation][1]
                out.append((ids[context][1], cont[-self.max_length:]))
                continue
            if not context:
                cont = ids[continuation][1][-self.max_length:]
                out.append(([self.prefix_token_id], cont) if not cont or cont[0] != self.prefix_token_id
                           else (cont[:1], cont[1:]))
                continue
            n_context, context_ids = ids[context]
            n_whole, whole_ids = ids[context + continuation]
            n_cont = min(n_whole - n_context, self.max_length)  # the model scores at most seq_len tokens
            out.append((context_ids, whole_ids[len(whole_ids) - n_cont:] if n_cont > 0 else []))
        self._encoded = (list(pairs), out)
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        return self._loglikelihood_tokens([(pair, context, continuation) for pair, (context, continuation)
                                           in zip(pairs, self.encode_pairs(pairs))], disable_tqdm=disable_tqdm)

    @contextmanager
    def _scoring(self) -> Iterator[None]:
        """No gradients, and routers keep no statistics (scoring is not validation: it must not
        count in the eval routing window, and the counters and aux losses cost time)."""
        with torch.no_grad(), routing_statistics_off(self.model):
            yield

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        with self._scoring():
            return self._score(requests, disable_tqdm)

    def _score(self, requests: list[TokenRequest], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is the greedy choice) per request.

        Requests whose model input starts with the same context (a multiple-choice item's
        choices) are packed into one row: the context once, then each continuation, every
        continuation token attending to the context and to its own earlier tokens at the
        positions it would have alone (`Transformer.forward`'s positions / attn_mask). With
        per-token routing this scores exactly like one row per request, and reads the
        context once instead of once per choice.
        """
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # empty continuations stay so
        # context tokens → {continuation tokens → request indices}. The model reads
        # tokens[:-1] and predicts tokens[1:]; the continuation is the tail, and a request
        # alone keeps only its last seq_len + 1 tokens, so its context is what is left of them.
        groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if continuation:
                target = continuation[-self.max_length:]  # longer than the window: score its tail
                context = context or [self.prefix_token_id]  # the first token needs something before it
                tokens = (context + target)[-(self.max_length + 1):]
                groups.setdefault(tuple(tokens[:-len(target)]), {}).setdefault(tuple(target), []).append(i)
        rows = [row for context, conts in groups.items() for row in self._pack(context, list(conts))]
        # Longest first, as lm-eval's HF adapter does: each batch pads to its first row (little
        # padding), and an out-of-memory error shows at once rather than at the end.
        rows.sort(key=lambda row: len(row.tokens), reverse=True)
        # Several ranks (`distributed`): each scores every world-th batch, then all gather the
        # results. In lockstep (sharded weights: a forward needs every rank) the ranks run the
        # same number of forwards, those with fewer batches padding with a one-token forward.
        rank, world = self._rank_world()
        batches = list(self._batches(rows))
        mine = batches[rank::world]
        steps = -(-len(batches) // world) if self.lockstep else len(mine)
        scored: list[tuple[int, tuple[float, bool]]] = []  # (request index, result)
        progress = tqdm(total=sum(len(groups[row.context][t]) for batch in mine for row in batch for t in row.targets),
                        desc="lit_moe loglikelihood", disable=disable_tqdm)
        for step in range(steps):
            if step >= len(mine):
                self._logits_at(torch.zeros(1, 1, dtype=torch.long, device=self._device), [0], [0])
                continue
            batch = mine[step]
            length = len(batch[0].tokens)
            packed = any(len(row.targets) > 1 for row in batch)
            # Right padding: invisible to real positions under causal attention (or the mask,
            # where padding attends only to itself) and per-token routing.
            idx = torch.tensor([row.tokens + [0] * (length - len(row.tokens)) for row in batch])
            positions = mask = None
            if packed:
                positions = torch.tensor([row.positions + [0] * (length - len(row.tokens)) for row in batch])
                mask = torch.eye(length, dtype=torch.bool).repeat(len(batch), 1, 1)
                for b, row in enumerate(batch):
                    n = len(row.tokens)
                    mask[b, :n, :n] = row.mask()
            rows_at, at, wanted = [], [], []
            for b, row in enumerate(batch):
                for target, scored_at in zip(row.targets, row.scored_at):
                    rows_at += [b] * len(target)
                    at += scored_at
                    wanted += target
            logits = self._logits_at(idx.to(self._device), rows_at, at,
                                     None if positions is None else positions.to(self._device),
                                     None if mask is None else mask.to(self._device))
            wanted_t = torch.tensor(wanted, device=logits.device)
            # log-softmax at the wanted token only: logit − logsumexp (no [n, vocab] output).
            token_logprob = (logits.gather(1, wanted_t[:, None]).squeeze(1) - logits.logsumexp(-1)).double()
            missed = (logits.argmax(-1) != wanted_t).double()
            # Per continuation: sum of its tokens' log-probs, and whether none was missed.
            lengths = torch.tensor([len(target) for row in batch for target in row.targets], device=logits.device)
            owner = torch.repeat_interleave(torch.arange(len(lengths), device=logits.device), lengths)
            sums = torch.zeros(len(lengths), dtype=torch.float64, device=logits.device)
            totals = sums.index_add(0, owner, token_logprob).tolist()
            misses = sums.index_add(0, owner, missed).tolist()
            per_continuation = iter(zip(totals, misses))
            for row in batch:
                for target in row.targets:
                    total, miss = next(per_continuation)
                    result = (total, miss == 0)
                    same_request = groups[row.context][target]
                    scored += [(i, result) for i in same_request]
                    progress.update(len(same_request))
        progress.close()
        if world > 1:
            import torch.distributed as dist

            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, scored)
            scored = [pair for part in parts for pair in part]
        for i, result in scored:
            results[i] = result
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return results

    def _rank_world(self) -> tuple[int, int]:
        import torch.distributed as dist

        if self.distributed and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _batches(self, rows: list[PackedRow]) -> Iterator[list[PackedRow]]:
        """Consecutive rows (longest first) in batches of at most batch_size · seq_len tokens,
        padding included: packed rows run up to 1.5·seq_len, short ones come many to a batch."""
        budget = self.batch_size * self.max_length
        start = 0
        while start < len(rows):
            count = max(1, budget // len(rows[start].tokens))
            yield rows[start:start + count]
            start += count

    def _pack(self, context: tuple[int, ...], targets: list[tuple[int, ...]]) -> list[PackedRow]:
        """Rows holding `context` once and then as many continuations as fit in 1.5·seq_len
        tokens: a masked row pays attention over its whole square (no causal skipping), so
        longer rows cost more than re-reading the context (measured best on the mini bundle)."""
        rows: list[PackedRow] = []
        limit = max(3 * self.max_length // 2, len(context) + max(len(t) for t in targets))
        for target in sorted(targets, key=len, reverse=True):
            if not rows or len(rows[-1].tokens) + len(target) - 1 > limit:
                rows.append(PackedRow(context))
            rows[-1].add(target)
        return rows

    def _logits_at(self, idx: torch.Tensor, rows: list[int], positions: list[int],
                   token_positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Logits [len(rows), vocab] at the given (row, index) pairs of idx [B, S]; the
        optional token_positions / attn_mask go to the model (packed rows).

        lit-moe's Transformer computes them there only (`select`: the last block's queries and
        MLP and the output head run at the scored positions: the head alone is ~40% of the
        tiny model's FLOPs, while a choice scores a handful of positions). Other models, and
        FSDP-sharded ones (whose per-block hooks `select` would bypass), get a plain forward.
        """
        rows_t = torch.tensor(rows, device=idx.device)
        at_t = torch.tensor(positions, device=idx.device)
        if self._select:
            return self.model(idx, token_positions, attn_mask, select=(rows_t, at_t))[:, :self.vocab_size]
        return self.model(idx, token_positions, attn_mask)[rows_t, at_t, :self.vocab_size]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole string, scored in disjoint windows of seq_len."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        with self._scoring():
            return self._generate(requests, disable_tqdm)

    def _generate(self, requests: list[Any], disable_tqdm: bool) -> list[str]:
        """Greedy decoding until a stop string, the end-of-text token or max_gen_toks, with the
        model's KV cache (`lit_moe.generate`, the code behind `cli.py generate`).

        Requests with the same stop strings and token cap run together, batch_size at a time
        (left-padded prompts). The cache holds seq_len tokens: a context keeps its last
        seq_len − max_gen_toks tokens (lm-eval's rule), and max_gen_toks is capped at seq_len / 2.
        """
        from lit_moe.generate import generate_text

        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        cap = max(1, self.max_length // 2)
        for i, req in enumerate(requests):
            gen_kwargs = dict(req.args[1] or {})
            stops = gen_kwargs.pop("until", None) or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if max_new > cap:
                warnings.warn(f"lit_moe generates at most seq_len / 2 = {cap} tokens per request "
                              f"(max_gen_toks={max_new} asked).", stacklevel=2)
                max_new = cap
            if gen_kwargs.pop("do_sample", False) or gen_kwargs.get("temperature", 0) not in (0, 0.0):
                warnings.warn("lit_moe decodes greedily; sampling arguments are ignored.", stacklevel=2)
            groups.setdefault((tuple(stops), max_new), []).append(i)
        progress = tqdm(total=len(requests), desc="lit_moe generate_until", disable=disable_tqdm)
        for (stops, max_new), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in batch]
                texts = generate_text(self.model, self.tokenizer, [], max_new, stops=stops,
                                      stop_token=self.eot_token_id, prompt_ids=prompts)
                for i, text in zip(batch, texts):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return [text or "" for text in outputs]
