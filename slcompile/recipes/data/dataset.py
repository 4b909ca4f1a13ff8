"""Train/validation split, token shards in the cache, packing and a resumable batch iterator.

Pipeline: inputs (named corpora and/or files) -> documents split by a hash of each id (or
``--val-data``) -> a tokenizer (a given one, or a byte-level BPE trained on a sample of the
training split) -> one flat token shard per split (every document followed by EOS), written once
as a stream and memory-mapped -> packed rows of ``seq_len + 1`` tokens (inputs ``row[:-1]``,
targets ``row[1:]``). Pre-tokenized inputs skip the tokenizer and are copied into shards, checked.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from slcompile.recipes.data.corpora import Document, content_hash, load_corpus
from slcompile.recipes.data.sources import (ID_BLOCK, file_identity, is_pretokenized, read_documents,
                                            read_token_blocks, resolve_paths)
from slcompile.recipes.data.tokenizer import cache_dir, eos_id, get_tokenizer, load_tokenizer, tokenizer_hash
from slcompile.recipes.files import cached

Batch = tuple[torch.Tensor, torch.Tensor]


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Whether a document belongs to validation: a hash of its id, so the answer never depends on
    which other documents exist or in what order they come."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return bucket < val_fraction * 2**64


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every token id: uint16 up to 65536 entries, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


BATCH_CHARS = 1 << 20  # characters per tokenization task (bounds the memory of each task in flight)
SAMPLE_CHARS = 20_000_000  # the BPE is trained on the training split's first documents up to this size


def _tasks(documents: Iterable[Iterable[str]]) -> Iterator[list[tuple[str, bool]]]:
    """Documents (each an iterable of text pieces) as tasks of about :data:`BATCH_CHARS` characters:
    lists of ``(piece, ends a document)``."""
    task, size = [], 0
    for pieces in documents:
        previous = None
        for piece in pieces:
            if previous is not None:
                task.append((previous, False))
                size += len(previous)
            previous = piece
        task.append((previous or "", True))
        size += len(previous or "")
        if size >= BATCH_CHARS:
            yield task
            task, size = [], 0
    if task:
        yield task


@dataclass(frozen=True)
class _Encoder:
    """Picklable task -> ids: each piece's ids (no special tokens added), EOS after each document;
    1-D ``dtype`` array."""

    tokenizer: Tokenizer
    eos: int
    dtype: np.dtype

    def __call__(self, task: list[tuple[str, bool]]) -> np.ndarray:
        ids: list[int] = []
        for text, ends in task:
            ids += self.tokenizer.encode(text, add_special_tokens=False).ids
            if ends:
                ids.append(self.eos)
        return np.array(ids, dtype=self.dtype)


_worker_encoder: _Encoder | None = None


def _init_worker(encoder: _Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(task: list[tuple[str, bool]]) -> np.ndarray:
    return _worker_encoder(task)


def _encoded(tasks: Iterator[list[tuple[str, bool]]], encoder: _Encoder, workers: int) -> Iterator[np.ndarray]:
    """``encoder(task)`` for each task, in order; ``workers`` processes with at most two tasks each
    in flight (so memory stays bounded however many tasks come), or this process alone for 1."""
    if workers == 1:
        yield from map(encoder, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # Each worker encodes single-threaded; set so, tokenizers does not warn about the fork.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(workers, _init_worker, (encoder,))
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    with pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode_in_worker, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _load_shard(path: Path, dtype: np.dtype, vocab_size: int) -> np.ndarray:
    """The shard at ``path`` memory-mapped read-only (1-D ``dtype``), after checking, with plain
    reads in blocks, that every id is below ``vocab_size``."""
    with open(path, "rb") as f:
        while (block := np.fromfile(f, dtype=dtype, count=ID_BLOCK)).size:
            if int(block.max()) >= vocab_size:
                raise ValueError(f"token cache {path} holds ids outside the vocabulary's {vocab_size} entries: "
                                 "remove it (and its .sha256) to rebuild it")
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)


def _cached_shard(name: str, key: list, write: Callable[[Path], None], dtype: np.dtype, vocab_size: int,
                  cache: Path | None) -> np.ndarray:
    """The token shard ``<name>-<digest of key>.bin`` in the cache, written by ``write(tmp)`` (which
    streams into ``tmp``) unless a copy that matches its sha256 is there; memory-mapped."""
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = (cache or cache_dir()) / f"{name}-{digest}.bin"
    # Both branches give the path: the shard is streamed to disk, never held as a value.
    cached(path, lambda file: file, lambda: path, lambda _, tmp: write(tmp))
    return _load_shard(path, dtype, vocab_size)


def tokenize_documents(documents: Iterable[Iterable[str]], tokenizer: Tokenizer, key: Any,
                       cache: Path | None = None, split: str = "tokens", workers: int = 1,
                       progress: bool = False) -> np.ndarray:
    """All documents' token ids, each document followed by the EOS id: 1-D uint16/uint32, memory-mapped.

    ``documents`` yields each document as text pieces (read only on a cache miss, as a stream);
    ``key`` (JSON) identifies them. The shard ``<split>-<digest>.bin`` under ``cache`` (default
    :func:`cache_dir`) is keyed by ``key`` and the tokenizer's definition, carries its sha256 (a
    damaged file is rebuilt) and is refused, naming it, if it holds ids outside the vocabulary.
    """
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    encoder = _Encoder(tokenizer, eos_id(tokenizer), dtype)

    def write(tmp: Path) -> None:
        from tqdm import tqdm
        with open(tmp, "wb") as f, tqdm(desc=f"tokenizing {split}", unit="char", unit_scale=True,
                                        disable=not progress, file=sys.stderr) as bar:
            def counted(tasks: Iterator[list[tuple[str, bool]]]) -> Iterator[list[tuple[str, bool]]]:
                for task in tasks:
                    bar.update(sum(len(text) for text, _ in task))
                    yield task

            for ids in _encoded(counted(_tasks(documents)), encoder, workers):
                ids.tofile(f)

    return _cached_shard(split, [tokenizer_hash(tokenizer), key], write, dtype, vocab_size, cache)


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping rows of ``seq_len + 1`` consecutive tokens, ``(n, seq_len + 1)``, same dtype
    (a view; the ragged tail is dropped). Rows cross document boundaries at EOS tokens."""
    rows = len(tokens) // (seq_len + 1)
    return tokens[:rows * (seq_len + 1)].reshape(rows, seq_len + 1)


def to_batch(rows: np.ndarray) -> Batch:
    """``(inputs, targets)``, both int64 ``(batch, seq_len)``, from packed rows ``(batch, seq_len + 1)``."""
    ids = torch.from_numpy(rows.astype(np.int64))
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


class BatchIterator:
    """Endless shuffled batches over packed rows, exactly resumable.

    Epoch ``e`` visits the rows in the permutation drawn from ``(seed, e)``, in batches of
    ``batch_size`` (the last incomplete batch of an epoch is skipped). The position is
    ``(epoch, offset)``; :meth:`state_dict` / :meth:`load_state_dict` save and restore it, so a
    resumed run sees exactly the batches the original run would have seen, on any world size.

    With ``world_size > 1`` each rank gets (and reads from ``rows``, e.g. a memory map) only its
    slice ``[rank * b / world_size, (rank + 1) * b / world_size)`` of every global batch.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 < batch_size <= len(rows):
            raise ValueError(f"batch_size must be in [1, {len(rows)}] (the number of rows), "
                             f"got {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world_size}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        per_rank = batch_size // world_size
        self._local = slice(rank * per_rank, (rank + 1) * per_rank)
        self.epoch, self.offset = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), one epoch cached

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = (self.epoch, rng.permutation(len(self.rows)))
        return self._order[1]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self.offset + self.batch_size > len(self.rows):
            self.epoch, self.offset = self.epoch + 1, 0
        index = self._permutation()[self.offset:self.offset + self.batch_size][self._local]
        self.offset += self.batch_size
        return to_batch(self.rows[index])

    def state_dict(self) -> dict[str, int]:
        """Position plus what it is only valid for (seed, number of rows, batch size)."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "num_rows": len(self.rows), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position; refuses one saved over different data or settings."""
        expected = {"seed": self.seed, "num_rows": len(self.rows), "batch_size": self.batch_size}
        mismatched = {k: (state[k], v) for k, v in expected.items() if state[k] != v}
        if mismatched:
            raise ValueError(f"iterator state does not match this data (saved, current): {mismatched}")
        self.epoch, self.offset = state["epoch"], state["offset"]


def eval_batches(rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """One ordered pass over ``rows`` in batches (the last one may be smaller)."""
    for start in range(0, len(rows), batch_size):
        yield to_batch(rows[start:start + batch_size])


@dataclass(frozen=True)
class TextData:
    """Tokenized data: flat token arrays per split (1-D uint16/uint32, memory-mapped) and their packing.

    ``vocab_size`` bounds every id (the tokenizer's size); ``tokenizer`` is None for pre-tokenized
    inputs given without ``--tokenizer``.
    """

    train_tokens: np.ndarray
    val_tokens: np.ndarray
    seq_len: int
    vocab_size: int
    tokenizer: Optional[Tokenizer] = None

    @property
    def train(self) -> np.ndarray:
        """Packed training rows ``(n_train, seq_len + 1)``."""
        return pack(self.train_tokens, self.seq_len)

    @property
    def val(self) -> np.ndarray:
        """Packed validation rows ``(n_val, seq_len + 1)``."""
        return pack(self.val_tokens, self.seq_len)


# One input document: (source name, stable id, its text in pieces).
Doc = tuple[str, str, Iterator[str]]


@dataclass(frozen=True)
class _Input:
    """A named corpus or a list of files: ``identity`` (JSON) keys the caches, ``documents()``
    streams its documents anew at each call."""

    identity: list
    documents: Callable[[], Iterator[Doc]]


def _corpus_input(name: str) -> _Input:
    docs = load_corpus(name)  # the shipped corpora are small; their content is their identity
    return _Input(["corpus", name, content_hash(docs)], lambda: ((d.source, d.id, iter((d.text,))) for d in docs))


def _files_input(paths: Sequence[Path], text_field: str) -> _Input:
    def documents() -> Iterator[Doc]:
        for path in paths:
            for doc_id, pieces in read_documents(path, text_field):
                yield "data", doc_id, pieces

    return _Input(["files", file_identity(paths), text_field], documents)


def _sample(documents: Iterator[Doc], chars: int = SAMPLE_CHARS) -> list[Document]:
    """The first documents' pieces, up to ``chars`` characters: what the BPE is trained on."""
    sample, size = [], 0
    for source, doc_id, pieces in documents:
        for piece in pieces:
            sample.append(Document(source, doc_id, piece))
            size += len(piece)
            if size >= chars:
                return sample
    return sample


def load_text_data(names: Sequence[str] = ("kjv", "shakespeare", "wiki"), vocab_size: int = 4096,
                   seq_len: int = 256, val_fraction: float = 0.02, cache: Path | None = None, *,
                   data: Sequence[str] = (), val_data: Sequence[str] = (), text_field: str = "text",
                   data_dtype: str = "uint16", tokenizer: str | None = None, workers: int = 1,
                   progress: bool = False) -> TextData:
    """Tokenized train/validation data from the corpora ``names`` and the files ``data`` (paths,
    globs or folders, see :mod:`slcompile.recipes.data.sources`); every step after reading is cached.

    Validation holds the documents whose id hashes below ``val_fraction`` (for pre-tokenized
    files: whole files by name), or else the files ``val_data``. ``tokenizer`` is a Hugging Face
    ``tokenizers`` JSON file, whose size must not exceed ``vocab_size`` (the model's embedding);
    without it a byte-level BPE of ``vocab_size`` is trained on the training split's first
    :data:`SAMPLE_CHARS` characters. Bad input is a ``ValueError`` naming the file (and line).
    """
    paths, val_paths = resolve_paths(data) if data else [], resolve_paths(val_data, "--val-data") if val_data else []
    given = load_tokenizer(tokenizer, vocab_size) if tokenizer else None
    pretokenized = [p for p in paths + val_paths if is_pretokenized(p)]
    if pretokenized:
        if names or len(pretokenized) < len(paths + val_paths):
            raise ValueError("pre-tokenized --data cannot be mixed with text or --corpora")
        limit = given.get_vocab_size() if given else vocab_size
        if not val_paths:
            val_paths = [p for p in paths if is_validation(p.name, val_fraction)]
            paths = [p for p in paths if p not in val_paths]
        train, val = (_copy_tokens(ps, data_dtype, limit, cache, split)
                      for ps, split in ((paths, "train"), (val_paths, "val")))
        return _checked(TextData(train, val, seq_len, limit, given))
    inputs = [_corpus_input(name) for name in names] + ([_files_input(paths, text_field)] if paths else [])
    if not inputs:
        raise ValueError("no data: pass --data files or --corpora names")

    def documents(split: str) -> Iterator[Doc]:
        if split == "val" and val_paths:
            yield from _files_input(val_paths, text_field).documents()
            return
        for item in inputs:
            for doc in item.documents():
                if val_paths or (split == "val") == is_validation(doc[1], val_fraction):
                    yield doc

    key = [[item.identity for item in inputs], file_identity(val_paths) if val_paths else val_fraction, text_field]
    tok = given or get_tokenizer(_sample(documents("train")), vocab_size, cache)
    train, val = (tokenize_documents((pieces for _, _, pieces in documents(split)), tok, [key, split], cache,
                                     split, workers, progress) for split in ("train", "val"))
    return _checked(TextData(train, val, seq_len, tok.get_vocab_size(), tok))


def _checked(data: TextData) -> TextData:
    if not len(data.train_tokens):
        raise ValueError("the training split is empty: add data, or lower --val-fraction")
    return data


def _copy_tokens(paths: Sequence[Path], dtype: str, vocab_size: int, cache: Path | None, split: str) -> np.ndarray:
    """Pre-tokenized files concatenated into one cached shard (``token_dtype(vocab_size)``), each
    block checked on the way: an id outside the vocabulary names the file and its position."""
    out = token_dtype(vocab_size)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for path in paths:
                position = 0
                for block in read_token_blocks(path, dtype):
                    bad = np.flatnonzero((block < 0) | (block >= vocab_size))
                    if bad.size:
                        raise ValueError(f"{path}: token id {int(block[bad[0]])} at position {position + bad[0]} is "
                                         f"outside the vocabulary (0 to {vocab_size - 1}): check --data-dtype and "
                                         "--tokenizer / --vocab-size")
                    block.astype(out).tofile(f)
                    position += len(block)

    return _cached_shard(split, ["tokens", file_identity(paths), dtype, vocab_size], write, out, vocab_size, cache)
