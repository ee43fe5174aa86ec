"""Tests for the tokenizer and the data module (CPU only, small synthetic corpora)."""

from __future__ import annotations

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: never touch the network
os.environ["HF_HUB_OFFLINE"] = "1"

import functools
import gzip
import json
import math
import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler

import lit_moe.data as data_mod
from lit_moe.data import (
    LMDataModule,
    StreamingTokenWindows,
    TokenWindows,
    check_text_file,
    split_documents,
    unigram_entropy,
)
from lit_moe.tokenizer import EOT_TOKEN, eot_id, load_tokenizer, save_tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "of", "mixture", "experts", "router", "token", "naïve", "Zürich", "東京", "γλώσσα",
         "😀", "line\nbreak", "tab\there", "  spaces", "<|endoftext|>", "café", "42", "—"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({"title": f"t{i}", field: d}) + "\n" for i, d in enumerate(docs))
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(lines.encode("utf-8"), mtime=0))
    else:
        path.write_text(lines, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, object]:
    train, val = make_docs(120, seed=1), make_docs(20, seed=2)
    return {
        "train_docs": train,
        "val_docs": val,
        "train": write_jsonl(tmp_path / "train.jsonl.gz", train),
        "val": write_jsonl(tmp_path / "val.jsonl", val),
    }


def make_dm(tmp_path: Path, corpus: dict[str, object], **kw: object) -> LMDataModule:
    args: dict[str, object] = dict(
        train_files=str(corpus["train"]), val_files=str(corpus["val"]), vocab_size=300,
        seq_len=16, batch_size=8, cache_dir=str(tmp_path / "cache"),
    )
    args.update(kw)
    return LMDataModule(**args)  # type: ignore[arg-type]


def stream_of(tok, docs: list[str]) -> list[int]:
    """The expected token stream, computed independently of the data module."""
    eot = eot_id(tok)
    return [t for d in docs for t in tok.encode(d).ids + [eot]]


def windows_of(stream: list[int], seq_len: int) -> list[list[int]]:
    return [stream[k * seq_len : k * seq_len + seq_len + 1] for k in range((len(stream) - 1) // seq_len)]


def split_on_eot(tok, tokens: np.ndarray) -> list[str]:
    eot, docs, cur = eot_id(tok), [], []
    for t in tokens.tolist():
        if t == eot:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


# ---------------------------------------------------------------- tokenizer


@functools.cache
def small_tokenizer():
    return train_bpe(make_docs(60), vocab_size=320)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_tokenizer_round_trip_arbitrary_unicode(text: str) -> None:
    tok = small_tokenizer()
    assert tok.decode(tok.encode(text).ids) == text


def test_tokenizer_basics_and_literal_eot() -> None:
    tok = small_tokenizer()
    assert eot_id(tok) == 0 and tok.id_to_token(0) == EOT_TOKEN
    assert 257 <= tok.get_vocab_size() <= 320
    # Document text spelling the EOT token must not produce the separator id.
    text = f"a{EOT_TOKEN}b \x00 😀"
    ids = tok.encode(text).ids
    assert 0 not in ids and tok.decode(ids) == text


def test_save_and_load_tokenizer(tmp_path: Path) -> None:
    tok = small_tokenizer()
    path = tmp_path / "tok.json"
    save_tokenizer(tok, path)
    assert os.listdir(tmp_path) == ["tok.json"]  # no temp file left behind
    loaded = load_tokenizer(path)
    assert loaded.to_str() == tok.to_str()
    assert loaded.encode(f"x{EOT_TOKEN}").ids == tok.encode(f"x{EOT_TOKEN}").ids

    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match="bad.json.*not a Hugging Face tokenizers JSON"):
        load_tokenizer(tmp_path / "bad.json")


# ---------------------------------------------------------------- token files and windows


def test_token_files_equal_independent_encoding(tmp_path: Path, corpus: dict) -> None:
    dm = make_dm(tmp_path, corpus)
    dm.setup("fit")  # prepare_data was not called: setup must do it
    tok = dm.tokenizer
    train, val = dm.train_dataset.tokens, dm.val_dataset.tokens
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert train.tolist() == stream_of(tok, corpus["train_docs"])
    assert val.tolist() == stream_of(tok, corpus["val_docs"])
    assert dm.vocab_size_padded % 64 == 0 and dm.vocab_size_padded >= tok.get_vocab_size()
    assert json.loads(dm.tokenizer_json)["added_tokens"][0]["content"] == EOT_TOKEN


def test_vocab_size_padded_right_after_init(tmp_path: Path, corpus: dict) -> None:
    dm = make_dm(tmp_path, corpus, vocab_size=300)
    assert dm.vocab_size_padded == 320  # 300 -> next multiple of 64
    assert dm.train_dataset is None  # nothing set up yet


def test_token_windows() -> None:
    tokens = np.arange(103, dtype=np.uint16)
    ds = TokenWindows(tokens, seq_len=10)
    assert len(ds) == 10  # (103 - 1) // 10
    for i in range(len(ds)):
        w = ds[i]
        assert w.dtype == torch.int64 and w.tolist() == list(range(i * 10, i * 10 + 11))
        x, y = w[:-1], w[1:]
        assert torch.equal(x[1:], y[:-1])  # targets are inputs shifted by one
        if i + 1 < len(ds):
            assert w[-1] == ds[i + 1][0]  # stride seq_len: each token is a target once
    assert ds[-1].tolist() == ds[9].tolist()
    with pytest.raises(IndexError):
        ds[10]
    assert len(TokenWindows(np.arange(11), 10)) == 1  # exactly one window fits


def test_token_windows_too_short() -> None:
    with pytest.raises(ValueError, match=r"10 tokens.*seq_len \+ 1 = 11.*smaller seq_len"):
        TokenWindows(np.arange(10), seq_len=10)


def test_token_windows_pickle_reopens_memmap(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    np.arange(50, dtype=np.uint16).tofile(path)
    ds = TokenWindows(np.memmap(path, dtype=np.uint16, mode="r"), seq_len=7)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the path travels, not the tokens
    ds2 = pickle.loads(blob)
    assert isinstance(ds2.tokens, np.memmap)
    assert [ds2[i].tolist() for i in range(len(ds2))] == [ds[i].tolist() for i in range(len(ds))]


def test_distributed_sampler_shards_disjoint_and_complete() -> None:
    ds = TokenWindows(np.arange(1001), seq_len=10)  # 100 windows
    for seed in (0, 7):
        shares = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=seed))
                  for r in (0, 1)]
        assert len(shares[0]) == len(shares[1]) == 50
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == list(range(len(ds)))


def test_train_order_deterministic_per_seed(tmp_path: Path, corpus: dict) -> None:
    def epoch(seed: int) -> list[list[int]]:
        dm = make_dm(tmp_path, corpus, seed=seed)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        ds = dm.train_dataset
        assert len(batches) == len(ds) // 8 and all(b.shape == (8, 17) for b in batches)  # drop_last
        rows = [tuple(row) for b in batches for row in b.tolist()]
        all_windows = Counter(tuple(ds[i].tolist()) for i in range(len(ds)))
        assert not Counter(rows) - all_windows  # each row is a window, none repeated
        return rows

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert a == b
    assert a != c


def test_val_and_test_dataloaders(tmp_path: Path, corpus: dict) -> None:
    dm = make_dm(tmp_path, corpus, max_val_windows=5, batch_size=2)
    dm.setup("validate")
    rows = [r for b in dm.val_dataloader() for r in b.tolist()]
    assert rows == [dm.val_dataset[i].tolist() for i in range(5)]  # first windows, in order
    assert [r for b in dm.test_dataloader() for r in b.tolist()] == rows


def test_no_validation_data(tmp_path: Path, corpus: dict) -> None:
    dm = make_dm(tmp_path, corpus, val_files=None)
    with pytest.warns(UserWarning, match="validation is skipped"):
        dm.setup("fit")
    assert dm.val_dataloader() == []


def test_cache_reused_and_no_temp_files(tmp_path: Path, corpus: dict, monkeypatch) -> None:
    make_dm(tmp_path, corpus).setup("fit")
    cache = tmp_path / "cache"
    files = sorted(p.name for p in cache.iterdir() if p.is_file())
    assert sum(f.endswith(".bin") for f in files) == 2 and sum(f.startswith("tokenizer-") for f in files) == 1
    assert not [f for f in files if ".tmp" in f]
    mtimes = {f: (cache / f).stat().st_mtime_ns for f in files}

    def fail(*args, **kwargs):
        raise AssertionError("cache miss: work was redone")

    monkeypatch.setattr(data_mod, "train_bpe", fail)
    monkeypatch.setattr(LMDataModule, "_write_tokens", fail)
    dm = make_dm(tmp_path, corpus)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) > 0
    assert {f: (cache / f).stat().st_mtime_ns for f in files} == mtimes


def test_cache_invalidated_when_data_changes(tmp_path: Path, corpus: dict) -> None:
    make_dm(tmp_path, corpus).setup("fit")
    docs = corpus["train_docs"] + ["one more document"]
    write_jsonl(corpus["train"], docs)  # new size and mtime: a new data fingerprint
    dm = make_dm(tmp_path, corpus)
    dm.setup("fit")
    assert dm.train_dataset.tokens.tolist() == stream_of(dm.tokenizer, docs)


def test_given_tokenizer_path_is_used(tmp_path: Path, corpus: dict) -> None:
    save_tokenizer(small_tokenizer(), tmp_path / "tok.json")
    dm = make_dm(tmp_path, corpus, tokenizer_path=str(tmp_path / "tok.json"))
    dm.setup("fit")
    assert dm.tokenizer_json == small_tokenizer().to_str()
    assert dm.train_dataset.tokens.tolist() == stream_of(small_tokenizer(), corpus["train_docs"])


def test_failed_tokenization_leaves_no_files(tmp_path: Path, corpus: dict, monkeypatch) -> None:
    class Boom:
        @staticmethod
        def list_flatten(*args):
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(data_mod, "pc", Boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        make_dm(tmp_path, corpus).prepare_data()
    left = [p.name for p in (tmp_path / "cache").iterdir() if p.is_file()]
    assert left and all(n.startswith("tokenizer-") for n in left)  # no .bin, no .tmp


def test_val_fraction_holds_out_whole_documents(tmp_path: Path, corpus: dict) -> None:
    dm = make_dm(tmp_path, corpus, val_files=None, val_fraction=0.2, seed=3)
    dm.setup("fit")
    train = split_on_eot(dm.tokenizer, dm.train_dataset.tokens)
    val = split_on_eot(dm.tokenizer, dm.val_dataset.tokens)
    assert len(val) == 24 and len(train) == 96  # round(120 * 0.2)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(corpus["train_docs"])
    # Deterministic per seed; another seed holds out other documents.
    assert split_documents(120, 0.2, 3)[1].tolist() == split_documents(120, 0.2, 3)[1].tolist()
    assert split_documents(120, 0.2, 3)[1].tolist() != split_documents(120, 0.2, 4)[1].tolist()


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path, corpus: dict) -> None:
    with pytest.raises(ValueError, match=r"train_files: file not found: .*nope\.jsonl"):
        make_dm(tmp_path, corpus, train_files=str(tmp_path / "nope.jsonl")).prepare_data()


def test_glob_without_match(tmp_path: Path, corpus: dict) -> None:
    with pytest.raises(ValueError, match=r"no files match .*shard-\*\.jsonl"):
        make_dm(tmp_path, corpus, train_files=str(tmp_path / "shard-*.jsonl")).prepare_data()


def test_glob_matches_sorted(tmp_path: Path, corpus: dict) -> None:
    docs = corpus["train_docs"]
    write_jsonl(tmp_path / "s-1.jsonl", docs[60:])
    write_jsonl(tmp_path / "s-0.jsonl", docs[:60])
    dm = make_dm(tmp_path, corpus, train_files=str(tmp_path / "s-*.jsonl"))
    dm.setup("fit")
    assert dm.train_dataset.tokens.tolist() == stream_of(dm.tokenizer, docs)


@pytest.mark.parametrize("name, content", [("empty.jsonl", b""), ("empty.jsonl.gz", gzip.compress(b""))])
def test_empty_file(tmp_path: Path, corpus: dict, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}.* is empty"):
        make_dm(tmp_path, corpus, train_files=str(tmp_path / name)).prepare_data()


def test_unknown_extension(tmp_path: Path, corpus: dict) -> None:
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported file type: .*corpus\.csv"):
        make_dm(tmp_path, corpus, train_files=str(tmp_path / "corpus.csv")).prepare_data()


def test_missing_text_field(tmp_path: Path, corpus: dict) -> None:
    with pytest.raises(ValueError, match=r"train\.jsonl\.gz has no field 'body'.*Set text_field"):
        make_dm(tmp_path, corpus, text_field="body").prepare_data()


@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_bytes(tmp_path: Path, corpus: dict, gz: bool) -> None:
    raw = '{"text": "good"}\n{"text": "naïve"}\n'.encode() + b'{"text": "caf\xe9"}\n'
    path = tmp_path / ("latin.jsonl.gz" if gz else "latin.jsonl")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(ValueError, match=rf"latin\.jsonl.*not valid UTF-8.*byte offset {offset}\b.*Re-encode"):
        make_dm(tmp_path, corpus, train_files=str(path)).prepare_data()


def test_utf8_check_across_chunk_boundaries(tmp_path: Path) -> None:
    raw = "ééé😀".encode() + b"\xff"
    (tmp_path / "a.txt").write_bytes(raw)
    for chunk in (1, 2, 3, 5):  # multi-byte characters split between chunks
        with pytest.raises(ValueError, match=rf"byte offset {len(raw) - 1}\b"):
            check_text_file(str(tmp_path / "a.txt"), chunk_size=chunk)
    (tmp_path / "b.txt").write_bytes(raw[:-1])
    check_text_file(str(tmp_path / "b.txt"), chunk_size=1)
    (tmp_path / "c.txt").write_bytes(raw[:-2])  # ends inside a character
    with pytest.raises(ValueError, match="c.txt.*not valid UTF-8"):
        check_text_file(str(tmp_path / "c.txt"), chunk_size=4)


def test_corpus_shorter_than_one_window(tmp_path: Path, corpus: dict) -> None:
    write_jsonl(tmp_path / "tiny.jsonl", ["hi"])
    dm = make_dm(tmp_path, corpus, train_files=str(tmp_path / "tiny.jsonl"), seq_len=64)
    with pytest.raises(ValueError, match=r"train split has \d+ tokens.*seq_len \+ 1 = 65.*more data or a smaller seq_len"):
        dm.setup("fit")


def test_fewer_windows_than_batch_size(tmp_path: Path, corpus: dict) -> None:
    dm = make_dm(tmp_path, corpus, batch_size=100_000)
    dm.setup("fit")
    with pytest.raises(ValueError, match="fewer than batch_size=100000"):
        dm.train_dataloader()


def test_unwritable_cache_dir(tmp_path: Path, corpus: dict) -> None:
    (tmp_path / "afile").write_text("x")  # a directory cannot be created under a file, even by root
    cache = tmp_path / "afile" / "sub"
    with pytest.raises(ValueError, match=rf"cannot create cache_dir '{cache}'.*writable"):
        make_dm(tmp_path, corpus, cache_dir=str(cache)).prepare_data()


def test_conflicting_options(tmp_path: Path, corpus: dict) -> None:
    with pytest.raises(ValueError, match="val_files to null"):
        make_dm(tmp_path, corpus, val_fraction=0.1)
    with pytest.raises(ValueError, match="tokenizer_path not found"):
        make_dm(tmp_path, corpus, tokenizer_path=str(tmp_path / "missing.json"))


# ---------------------------------------------------------------- streaming


def test_streaming_local_files(tmp_path: Path, corpus: dict) -> None:
    dm = make_dm(tmp_path, corpus, streaming=True)
    dm.setup("fit")
    assert isinstance(dm.train_dataset, StreamingTokenWindows)
    expected = windows_of(stream_of(dm.tokenizer, corpus["train_docs"]), 16)
    got = [w.tolist() for w in dm.train_dataset]
    assert all(len(w) == 17 for w in got)
    assert got == expected
    batches = list(dm.train_dataloader())
    assert [r for b in batches for r in b.tolist()] == expected[: len(expected) // 8 * 8]
    # Validation still comes from the (pre-tokenized) val_files.
    assert dm.val_dataset.tokens.tolist() == stream_of(dm.tokenizer, corpus["val_docs"])


def test_streaming_shards_by_rank_and_worker(tmp_path: Path, corpus: dict) -> None:
    dm = make_dm(tmp_path, corpus, streaming=True)
    dm.setup("fit")
    tok, docs, base = dm.tokenizer, corpus["train_docs"], dm.train_dataset
    for rank in (0, 1):  # one file: ranks take every other document
        ds = StreamingTokenWindows(base.docs, dm.tokenizer_json, 16, rank=rank, world_size=2)
        assert [w.tolist() for w in ds] == windows_of(stream_of(tok, docs[rank::2]), 16)
    # Two DataLoader workers on one rank split the documents the same way.
    loader = DataLoader(base, batch_size=None, num_workers=2)
    got = Counter(tuple(w.tolist()) for w in loader)
    want = Counter(tuple(w) for r in (0, 1) for w in windows_of(stream_of(tok, docs[r::2]), 16))
    assert got == want


# ---------------------------------------------------------------- helpers and bundled data


def test_unigram_entropy() -> None:
    assert unigram_entropy(np.array([3, 3, 3]), 8) == 0.0
    assert math.isclose(unigram_entropy(np.arange(16) % 4, 8), math.log(4))
    assert math.isclose(unigram_entropy(np.array([0, 0, 0, 1]), 2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    with pytest.raises(ValueError):
        unigram_entropy(np.array([9]), 8)


def test_bundled_wikipedia_slice(monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the default paths are relative to the repository root
    dm = LMDataModule()
    for split, minimum in (("train", 100), ("val", 10)):
        (path,) = dm._resolved(split)
        with gzip.open(path, "rt", encoding="utf-8") as f:
            first = json.loads(f.readline())
            n_docs = 1 + sum(1 for _ in f)
        assert n_docs >= minimum and first["text"] and first["title"]
    sizes = sum(os.path.getsize(REPO / "data/wikipedia_en" / n) for n in ("train.jsonl.gz", "validation.jsonl.gz"))
    assert sizes <= 3 * 2**20
    assert "CC BY-SA 3.0" in (REPO / "data/wikipedia_en/LICENSE.md").read_text()
