"""Data pipeline: text files or a Hugging Face dataset -> BPE tokens -> fixed-length windows.

Default (map-style) mode tokenizes the corpus once into a flat token file on disk
(``{cache_dir}/tokens-{hash}-{split}.bin``, documents separated by ``<|endoftext|>``) and
serves non-overlapping windows from it through ``np.memmap``, so start-up after the first run
is instant and memory use does not grow with the corpus. Streaming mode tokenizes on the fly
for corpora too large to tokenize up front (e.g. FineWeb-Edu from the Hugging Face hub).

A batch is an int64 tensor ``[batch_size, seq_len + 1]``: inputs are ``batch[:, :-1]`` and
next-token targets ``batch[:, 1:]``.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import logging
import mmap
import os
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from datasets.distributed import split_dataset_by_node
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

from lit_moe.atomic import atomic_path
from lit_moe.errors import ConfigError
from lit_moe.tokenizer import eot_id, load_tokenizer, save_tokenizer, tokenizer_from_json, train_bpe

log = logging.getLogger(__name__)

# File extension (after stripping ".gz") -> `datasets` builder that reads it.
_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
_SUPPORTED = ".jsonl, .json, .txt (each optionally .gz) or .parquet"


# --------------------------------------------------------------------------- file handling


def builder_for(path: str) -> str:
    """Name of the `datasets` builder for ``path`` ("json", "text" or "parquet")."""
    name = path.lower()
    gz = name.endswith(".gz")
    builder = _BUILDERS.get(os.path.splitext(name[:-3] if gz else name)[1])
    if builder is None or (gz and builder == "parquet"):
        raise ConfigError(f"unsupported file type: {path!r}. Use {_SUPPORTED} files.")
    return builder


def resolve_files(spec: str | Sequence[str], what: str = "files") -> list[str]:
    """Expand paths and glob patterns (relative to the current directory) to absolute paths.

    Raises ``ConfigError`` (a ``ValueError``) naming the offending path when a file is missing,
    a pattern matches nothing, or the files are not all of one supported type.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise ConfigError(f"{what} is an empty list. Give at least one file or glob pattern.")
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(
                    f"{what}: no files match {pattern!r} (relative paths are resolved against "
                    f"{os.getcwd()!r}). Fix the pattern or run from the directory it assumes."
                )
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise ConfigError(
                f"{what}: file not found: {pattern!r} (looked for {os.path.abspath(pattern)!r}). "
                "Fix the path; relative paths are resolved against the current directory."
            )
        files.extend(os.path.abspath(p) for p in matches)
    files = list(dict.fromkeys(files))  # drop duplicates from overlapping patterns, keep order
    builders = {f: builder_for(f) for f in files}
    if len(set(builders.values())) > 1:
        raise ConfigError(f"{what} mixes file types ({builders}). Use files of one type per split.")
    return files


def check_text_file(path: str, chunk_size: int = 1 << 20) -> None:
    """Raise ``ConfigError`` if ``path`` (gunzipped if .gz) is empty or not valid UTF-8.

    Reads in chunks through an incremental decoder, so memory use is constant, and reports the
    byte offset of the first bad byte, which `datasets` would otherwise hide in a deep traceback.
    """
    gz = path.lower().endswith(".gz")
    where = " of the decompressed data" if gz else ""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes fed to the decoder so far
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            while True:
                chunk = f.read(chunk_size)
                pending = len(decoder.getstate()[0])  # bytes of a split character, held over
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    bad = offset - pending + e.start
                    raise ConfigError(
                        f"{path!r} is not valid UTF-8: {e.reason} at byte offset {bad}{where} "
                        f"(byte 0x{e.object[e.start]:02x}). Re-encode the file to UTF-8, e.g. "
                        "`iconv -f latin1 -t utf-8 in > out`."
                    ) from None
                if not chunk:
                    break
                offset += len(chunk)
    except (OSError, EOFError, zlib.error) as e:  # unreadable or corrupt gzip
        raise ConfigError(f"cannot read {path!r}: {e}. Check that the file is intact.") from e
    if offset == 0:
        raise ConfigError(f"{path!r} is empty. Remove it from the file list or fill it.")


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic held-out split of ``n_docs`` documents: (train indices, val indices).

    A seeded permutation picks the held-out documents; both index lists are sorted, so the
    documents keep their file order within each split.
    """
    n_val = max(1, round(n_docs * val_fraction))
    if n_val >= n_docs:
        raise ConfigError(
            f"val_fraction={val_fraction} of {n_docs} documents leaves no training documents. "
            "Use a smaller val_fraction or more data."
        )
    perm = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id < ``vocab_size`` (halves disk use for <= 64K)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats/token of the empirical unigram distribution of ``tokens``.

    The loss of the best context-free model fitted to these very tokens: a trained LM's
    validation loss should end up well below this number.
    """
    tokens = np.asarray(tokens).ravel()
    if tokens.size == 0:
        raise ValueError("unigram_entropy needs at least one token")
    counts = np.bincount(tokens, minlength=vocab_size)
    if counts.size > vocab_size:
        raise ValueError(f"token id {tokens.max()} is out of range for vocab_size={vocab_size}")
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _write_json_atomic(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- datasets


class TokenWindows(Dataset[torch.Tensor]):
    """Windows of ``seq_len + 1`` tokens over a 1-D token array, with stride ``seq_len``.

    Item ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` as int64: consecutive windows
    share one token, so every token is a prediction target exactly once (except the first).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "corpus") -> None:
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ConfigError(
                f"the {name} has {len(tokens)} tokens, fewer than one window of seq_len + 1 = "
                f"{seq_len + 1}. Use more data or a smaller seq_len."
            )
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        start = (i % n) * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

    # Pickling a memmap copies all of its data; DataLoader workers started with "spawn" would
    # each get a private copy of the corpus. Re-open the file by name instead.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        t = self.tokens
        if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap):  # a whole mapping, no view
            state["tokens"] = (t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype, offset, shape = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)


class StreamingTokenWindows(IterableDataset):
    """Tokenize a document stream on the fly and pack it into windows of ``seq_len + 1``.

    Documents are joined with the EOT id; window ``k`` of one stream is
    ``stream[k*seq_len : k*seq_len + seq_len + 1]`` (same layout as :class:`TokenWindows`).
    The stream is split between ``world_size`` ranks x DataLoader workers with
    ``datasets.distributed.split_dataset_by_node``: whole shards (files) per consumer when the
    shard count divides evenly, else every n-th document. A leftover partial window is dropped.
    """

    def __init__(
        self,
        docs: datasets.IterableDataset,
        tokenizer_json: str,
        seq_len: int,
        text_field: str = "text",
        rank: int = 0,
        world_size: int = 1,
        docs_per_batch: int = 64,
    ) -> None:
        self.docs = docs
        self.tokenizer_json = tokenizer_json  # a string pickles cheaply into worker processes
        self.seq_len = seq_len
        self.text_field = text_field
        self.rank = rank
        self.world_size = world_size
        self.docs_per_batch = docs_per_batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        part = split_dataset_by_node(
            self.docs, rank=self.rank * n_workers + worker, world_size=self.world_size * n_workers
        )
        tok = tokenizer_from_json(self.tokenizer_json)
        eot = eot_id(tok)
        width = self.seq_len + 1
        buf: list[int] = []
        # `.iter()` rather than `iter(part)`: iterating a `datasets.IterableDataset` directly in
        # a DataLoader worker makes it split itself by worker once more, on top of our split.
        for batch in part.iter(batch_size=self.docs_per_batch):
            if self.text_field not in batch:
                raise ConfigError(
                    f"streamed documents have no field {self.text_field!r} (fields: "
                    f"{sorted(batch)}). Set text_field to the field holding the text."
                )
            for enc in tok.encode_batch([t or "" for t in batch[self.text_field]]):
                buf.extend(enc.ids)
                buf.append(eot)
            start = 0
            while len(buf) - start >= width:
                yield torch.tensor(buf[start : start + width], dtype=torch.int64)
                start += self.seq_len
            del buf[:start]


class ResumableSampler(DistributedSampler):
    """Shuffled training windows of one data-parallel rank that can start mid-epoch.

    The order is torch's `DistributedSampler(shuffle=True, seed, drop_last=True)`: a fresh
    permutation per epoch from `seed + epoch`, rank r taking every `num_replicas`-th window.
    `resume_at(epoch, skip)` drops the first `skip` windows of that epoch once, so a resumed
    run continues where the interrupted one stopped. Being a DistributedSampler, Lightning
    keeps it under DDP/FSDP instead of substituting its own. `len()` stays the whole epoch:
    Lightning sizes the epoch (and its progress counters) from it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, skip: int) -> None:
        self._resume = (epoch, skip)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1]:]
            self._resume = None
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A training DataLoader over a `ResumableSampler` whose position Lightning keeps in
    checkpoints: Lightning saves `state_dict()` of every training loader that has one and hands
    it back to `load_state_dict` before iterating on resume.

    The position is read from the trainer (`progress()`: epoch, batches processed in it), not
    counted here: Lightning prefetches, so the loader runs one batch ahead of training. It is
    stored as windows done by all ranks together, so a run can resume on another world size.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        sampler = self.sampler
        return {"epoch": epoch, "windows_done": batches * self.batch_size * sampler.num_replicas, "seed": sampler.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        sampler = self.sampler
        if state_dict["seed"] != sampler.seed:
            warnings.warn(f"resuming with data seed {sampler.seed} instead of the checkpoint's {state_dict['seed']}: "
                          "the epoch in progress restarts in a new order", stacklevel=2)
            return
        # Rank r's first s windows are windows r, r+W, ... of the epoch's permutation, so all
        # ranks together have trained on its first W·s: any world size W resumes from there.
        per_step = sampler.num_replicas * self.batch_size
        done = state_dict["windows_done"]
        if done % per_step:
            warnings.warn(f"{done} windows done is not a multiple of world size × batch size = {per_step}; "
                          "resuming at the nearest earlier batch", stacklevel=2)
        sampler.resume_at(state_dict["epoch"], done // per_step * self.batch_size)


# --------------------------------------------------------------------------- data module


class LMDataModule(L.LightningDataModule):
    """Language-modelling data: documents -> byte-level BPE tokens -> windows of ``seq_len + 1``.

    Batches are int64 tensors ``[batch_size, seq_len + 1]``; inputs ``batch[:, :-1]``, targets
    ``batch[:, 1:]``. Documents are separated by the ``<|endoftext|>`` token (id 0).

    Args:
        train_files: Training documents: a path, a glob pattern or a list of them, relative to
            the current directory. Types: .jsonl/.json (one object per document, text in
            ``text_field``), .txt (one document per line), each optionally gzipped, or .parquet.
            Ignored when ``hf_dataset`` is set.
        val_files: Validation documents, same forms as ``train_files``. Set to null to hold out
            ``val_fraction`` of the training documents instead, or to skip validation.
        val_fraction: Fraction of training documents held out for validation when
            ``val_files`` is null (chosen by ``seed``). 0 disables it.
        hf_dataset: Hugging Face hub dataset to train on instead of ``train_files``, e.g.
            "HuggingFaceFW/fineweb-edu" (use with ``streaming: true`` for large ones).
        hf_config: Configuration (subset) name of ``hf_dataset``, e.g. "sample-10BT".
        hf_split: Split of ``hf_dataset`` to train on.
        streaming: Tokenize training documents on the fly instead of once up front. Validation
            then needs ``val_files`` (tokenized up front); without them it is skipped.
        text_field: Field (column) holding the document text.
        tokenizer_path: An existing tokenizer.json to use. If null, a byte-level BPE tokenizer
            is trained on the training text and cached in ``cache_dir``.
        vocab_size: Vocabulary size of a newly trained tokenizer.
        tokenizer_train_docs: At most this many (first) training documents train the tokenizer.
        seq_len: Tokens per training example (each window holds ``seq_len + 1`` tokens).
        batch_size: Windows per batch (per device).
        num_workers: DataLoader worker processes.
        num_proc: Processes for tokenizing the corpus (``datasets.map``).
        cache_dir: Where tokenizers and token files are cached, relative to the current
            directory unless absolute. Safe to delete.
        seed: Seed for the training shuffle order and the held-out split.
        max_val_windows: Validate on only the first this many windows (null: all).
    """

    def __init__(
        self,
        train_files: list[str] | str | None = "data/wikipedia_en/train.jsonl.gz",
        val_files: list[str] | str | None = "data/wikipedia_en/validation.jsonl.gz",
        val_fraction: float = 0.0,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        streaming: bool = False,
        text_field: str = "text",
        tokenizer_path: str | None = None,
        vocab_size: int = 8192,
        tokenizer_train_docs: int = 20000,
        seq_len: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        num_proc: int = 1,
        cache_dir: str = ".cache/lit_moe",
        seed: int = 1234,
        max_val_windows: int | None = None,
    ) -> None:
        super().__init__()
        # Logged as `data/*` by callbacks.RunInfoCallback, beside the model's and trainer's settings.
        self.save_hyperparameters(logger=False)
        if train_files is None and hf_dataset is None:
            raise ConfigError("no training data: set train_files or hf_dataset.")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction > 0 and val_files is not None:
            raise ConfigError(
                f"both val_files and val_fraction={val_fraction} are set. Set val_files to null "
                "to hold out training documents, or val_fraction to 0 to use val_files."
            )
        if val_fraction > 0 and streaming:
            raise ConfigError("val_fraction is not supported with streaming=true; use val_files.")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("num_proc", num_proc),
                            ("tokenizer_train_docs", tokenizer_train_docs)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if tokenizer_path is None and vocab_size < 257:
            raise ConfigError(f"vocab_size must be >= 257 (EOT + 256 byte tokens), got {vocab_size}")
        if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
            raise ConfigError(
                f"tokenizer_path not found: {tokenizer_path!r}. Point it at an existing "
                "tokenizer.json, or set it to null to train a tokenizer on the training data."
            )
        self.train_files = train_files
        self.val_files = val_files
        self.val_fraction = val_fraction
        self.hf_dataset = hf_dataset
        self.hf_config = hf_config
        self.hf_split = hf_split
        self.streaming = streaming
        self.text_field = text_field
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.tokenizer_train_docs = tokenizer_train_docs
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.cache_dir = cache_dir
        self.seed = seed
        self.max_val_windows = max_val_windows

        self._tokenizer: Tokenizer | None = None
        self._files: dict[str, list[str]] = {}  # resolved train/val file lists
        self._docs: dict[str, datasets.Dataset] = {}  # loaded only when a cache is missing
        self.train_dataset: TokenWindows | StreamingTokenWindows | None = None
        self.val_dataset: TokenWindows | None = None

    # ---------------------------------------------------------------- tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer: loaded from ``tokenizer_path`` or the cache, or trained (once)."""
        if self._tokenizer is None:
            self._tokenizer = self._load_or_train_tokenizer()
        return self._tokenizer

    @property
    def tokenizer_json(self) -> str:
        """The tokenizer as a JSON string, to store in checkpoints."""
        return self.tokenizer.to_str()

    @property
    def vocab_size_padded(self) -> int:
        """Tokenizer vocabulary size rounded up to a multiple of 64 (the model's embedding rows)."""
        return -(-self.tokenizer.get_vocab_size() // 64) * 64

    def _load_or_train_tokenizer(self) -> Tokenizer:
        if self.tokenizer_path is not None:
            return load_tokenizer(self.tokenizer_path)
        key = _digest({"data": self._source("train"), "holdout": self._holdout(),
                       "text_field": self.text_field, "vocab_size": self.vocab_size,
                       "docs": self.tokenizer_train_docs})
        path = os.path.join(self._cache_path(), f"tokenizer-{key}.json")
        if os.path.isfile(path):
            log.info("Using cached tokenizer %s", path)
            return load_tokenizer(path)
        log.info("Training a %d-token BPE tokenizer on up to %d documents",
                 self.vocab_size, self.tokenizer_train_docs)
        tok = train_bpe(self._tokenizer_texts(), self.vocab_size)
        save_tokenizer(tok, path)
        return tok

    def _tokenizer_texts(self) -> Iterator[str]:
        n = self.tokenizer_train_docs
        if self.streaming:
            batches = self._stream_docs().take(n).iter(batch_size=256)
        else:
            docs = self._documents("train")
            batches = docs.select(range(min(n, len(docs)))).iter(batch_size=256)
        for batch in batches:
            yield from (t or "" for t in batch[self.text_field])

    # ---------------------------------------------------------------- sources and documents

    def _cache_path(self) -> str:
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"cannot create cache_dir {self.cache_dir!r}: {e.strerror}. "
                "Set cache_dir to a writable directory."
            ) from e
        if not os.access(self.cache_dir, os.W_OK):
            raise ConfigError(f"cache_dir {self.cache_dir!r} is not writable. Set a writable one.")
        return self.cache_dir

    def _resolved(self, split: str) -> list[str]:
        if split not in self._files:
            spec = self.train_files if split == "train" else self.val_files
            assert spec is not None
            self._files[split] = resolve_files(spec, f"{split}_files")
        return self._files[split]

    def _uses_hub(self, split: str) -> bool:
        # Held-out validation comes from the training source, whatever that is.
        return self.hf_dataset is not None and (split == "train" or self.val_files is None)

    def _source(self, split: str) -> Any:
        """What the documents of ``split`` are read from, for cache keys."""
        if self._uses_hub(split):
            return ["hf", self.hf_dataset, self.hf_config, self.hf_split]
        files = self._resolved("train" if split == "train" or self.val_files is None else "val")
        # Size and mtime stand in for content: re-hashing gigabytes on each start is too slow.
        return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]

    def _holdout(self) -> list[float] | None:
        return [self.val_fraction, self.seed] if self.val_fraction > 0 else None

    def _has_val(self) -> bool:
        return self.val_files is not None or self.val_fraction > 0

    def _load(self, split: str) -> datasets.Dataset:
        """All documents of a source (before any held-out split), as a `datasets.Dataset`."""
        if self._uses_hub(split):
            what = f"hf_dataset {self.hf_dataset!r}"
            ds = self._load_hub(streaming=False)
        else:
            files = self._resolved("train" if split == "train" or self.val_files is None else "val")
            what = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
            builder = builder_for(files[0])
            for f in files:
                if builder == "parquet":
                    if os.path.getsize(f) == 0:
                        raise ConfigError(f"{f!r} is empty. Remove it from the file list or fill it.")
                else:
                    check_text_file(f)
            try:
                ds = datasets.load_dataset(builder, data_files=files, split="train",
                                           cache_dir=os.path.join(self._cache_path(), "hf"))
            except Exception as e:  # malformed JSON/parquet surfaces as various error types
                raise ConfigError(f"could not read {what} as {builder} data: {e}") from e
        if len(ds) == 0:
            raise ConfigError(f"{what} holds no documents. Point the data module at a non-empty corpus.")
        if self.text_field not in ds.column_names:
            raise ConfigError(f"{what} has no field {self.text_field!r} (fields: {ds.column_names}). "
                              "Set text_field to the field that holds the text.")
        return ds.select_columns([self.text_field])

    def _documents(self, split: str) -> datasets.Dataset:
        """The documents of ``split`` ("train" or "val"), with the held-out split applied."""
        if split not in self._docs:
            if split == "val" and self.val_files is not None:
                self._docs[split] = self._load("val")
            else:
                docs = self._load("train")
                if self.val_fraction > 0:
                    train_idx, val_idx = split_documents(len(docs), self.val_fraction, self.seed)
                    self._docs["train"], self._docs["val"] = docs.select(train_idx), docs.select(val_idx)
                else:
                    self._docs["train"] = docs
        return self._docs[split]

    def _stream_docs(self) -> datasets.IterableDataset:
        """Training documents as a stream (no UTF-8 pre-pass: it would read the whole corpus)."""
        if self.hf_dataset is not None:
            return self._load_hub(streaming=True)
        files = self._resolved("train")
        return datasets.load_dataset(builder_for(files[0]), data_files=files, split="train", streaming=True)

    def _load_hub(self, streaming: bool) -> Any:
        try:
            return datasets.load_dataset(self.hf_dataset, self.hf_config, split=self.hf_split,
                                         streaming=streaming)
        except Exception as e:  # network, auth, name errors: many types, one message
            raise ConfigError(
                f"could not load hf_dataset {self.hf_dataset!r} (config {self.hf_config!r}, split "
                f"{self.hf_split!r}): {e}. Check the names and network access (HF_HUB_OFFLINE), "
                "or use local train_files."
            ) from e

    # ---------------------------------------------------------------- token files

    def _token_file(self, split: str) -> tuple[str, dict[str, Any]]:
        """Path and metadata of the token file of ``split``, tokenizing first if not cached."""
        tok = self.tokenizer
        dtype = token_dtype(tok.get_vocab_size())
        held_out = split == "train" or self.val_files is None
        key = _digest({"data": self._source(split), "holdout": self._holdout() if held_out else None,
                       "tokenizer": hashlib.sha256(self.tokenizer_json.encode()).hexdigest(),
                       "text_field": self.text_field, "dtype": dtype.str})
        base = os.path.join(self._cache_path(), f"tokens-{key}-{split}")
        path = base + ".bin"
        if os.path.isfile(base + ".json") and os.path.isfile(path):
            with open(base + ".json") as f:
                meta = json.load(f)
            if os.path.getsize(path) == meta["n_tokens"] * dtype.itemsize:
                return path, meta
        docs = self._documents(split)
        n_tokens = self._write_tokens(docs, path, dtype, desc=f"Tokenizing {split}")
        meta = {"dtype": dtype.name, "n_tokens": n_tokens, "n_docs": len(docs),
                "vocab_size": tok.get_vocab_size(), "source": self._source(split)}
        _write_json_atomic(base + ".json", meta)  # written last: it marks the .bin as complete
        log.info("Tokenized %s: %d documents, %d tokens -> %s", split, len(docs), n_tokens, path)
        return path, meta

    def _write_tokens(self, docs: datasets.Dataset, path: str, dtype: np.dtype, desc: str) -> int:
        tok, field = self.tokenizer, self.text_field
        eot = eot_id(tok)

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
            encs = tok.encode_batch([t or "" for t in batch[field]])
            return {"ids": [e.ids + [eot] for e in encs]}

        ids = docs.map(encode, batched=True, num_proc=self.num_proc if self.num_proc > 1 else None,
                       remove_columns=docs.column_names, desc=desc)
        n_tokens = 0
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            for table in ids.with_format("arrow").iter(batch_size=4096):
                flat = pc.list_flatten(table["ids"]).to_numpy().astype(dtype)
                f.write(flat.tobytes())
                n_tokens += flat.size
        return n_tokens

    def _open_tokens(self, split: str) -> np.ndarray:
        path, meta = self._token_file(split)
        if meta["n_tokens"] == 0:  # np.memmap cannot map an empty file
            return np.zeros(0, dtype=meta["dtype"])
        return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))

    # ---------------------------------------------------------------- Lightning hooks

    def prepare_data(self) -> None:
        """Train/load the tokenizer and tokenize the corpus into the cache (one process per node)."""
        _ = self.tokenizer
        if not self.streaming:
            self._token_file("train")
        if self._has_val():
            self._token_file("val")

    def setup(self, stage: str | None = None) -> None:
        """Open the cached token files (creating them if prepare_data did not run)."""
        if self.train_dataset is None:
            if self.streaming:
                rank, world = _rank_world()  # here, not in workers: they may not see the process group
                self.train_dataset = StreamingTokenWindows(
                    self._stream_docs(), self.tokenizer_json, self.seq_len, self.text_field, rank, world)
            else:
                self.train_dataset = TokenWindows(self._open_tokens("train"), self.seq_len, "train split")
        if self.val_dataset is None and self._has_val():
            self.val_dataset = TokenWindows(self._open_tokens("val"), self.seq_len, "validation split")
        elif not self._has_val():
            warnings.warn("no validation data (val_files is null and val_fraction is 0): "
                          "validation is skipped", stacklevel=2)

    def _loader(self, ds: Dataset | IterableDataset, **kwargs: Any) -> DataLoader:
        # An own generator (it only seeds workers here) keeps DataLoader iteration from drawing
        # on the global torch RNG, so validation runs do not shift the RNG a resumed run restores.
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=False,
                          generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def _data_parallel_rank_world(self) -> tuple[int, int]:
        strategy = getattr(self.trainer, "strategy", None) if self.trainer is not None else None
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) if strategy is not None else None
        if kwargs:
            return kwargs["rank"], kwargs["num_replicas"]
        return _rank_world()

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        ds = self.train_dataset
        if isinstance(ds, StreamingTokenWindows):
            return self._loader(ds, drop_last=True)
        assert ds is not None
        if len(ds) < self.batch_size:
            raise ConfigError(
                f"the train split has {len(ds)} windows of {self.seq_len + 1} tokens, fewer than "
                f"batch_size={self.batch_size}, so no full batch exists. Use more data, a smaller "
                "seq_len or a smaller batch_size."
            )
        rank, world = self._data_parallel_rank_world()
        sampler = ResumableSampler(ds, num_replicas=world, rank=rank, seed=self.seed)
        trainer = self.trainer

        def progress() -> tuple[int, int]:
            return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

        return ResumableDataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                   generator=torch.Generator().manual_seed(self.seed),
                                   progress=progress if trainer is not None else None)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.val_dataset is None and self._has_val():
            self.setup("validate")
        if self.val_dataset is None:
            return []  # Lightning runs no validation for an empty list
        ds: Dataset = self.val_dataset
        if self.max_val_windows is not None:
            ds = Subset(ds, range(min(self.max_val_windows, len(ds))))
        return self._loader(ds, shuffle=False)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.val_dataloader()
