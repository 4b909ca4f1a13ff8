"""Train/validation split, tokenization cache, packing and a resumable batch iterator.

Pipeline: documents -> split by a hash of each id -> tokenizer trained on the training split ->
one flat token array per split (every document followed by EOS, cached as ``.npy``) -> packed
rows of ``seq_len + 1`` tokens (inputs are ``row[:-1]``, targets ``row[1:]``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from slcompile.recipes.data.corpora import Document, content_hash, load_documents
from slcompile.recipes.data.tokenizer import EOS, cache_dir, get_tokenizer, tokenizer_hash
from slcompile.recipes.files import cached

Batch = tuple[torch.Tensor, torch.Tensor]


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Whether a document belongs to validation: a hash of its id, so the answer never depends on
    which other documents exist or in what order they come."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return bucket < val_fraction * 2**64


def split_documents(documents: Sequence[Document],
                    val_fraction: float = 0.02) -> tuple[list[Document], list[Document]]:
    """``(train, val)``: disjoint, order-preserving, each document in exactly one of them."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for doc in documents:
        (val if is_validation(doc.id, val_fraction) else train).append(doc)
    return train, val


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every token id: uint16 up to 65536 entries, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenize_documents(documents: Sequence[Document], tokenizer: Tokenizer,
                       cache: Path | None = None, split: str = "tokens") -> np.ndarray:
    """All documents' token ids, each followed by the EOS id: 1-D uint16/uint32 array.

    Cached as ``<split>-<key>.npy`` under ``cache`` (default :func:`cache_dir`), keyed by the
    tokenizer's definition and the documents' content, with its sha256 beside it (a damaged
    file is rebuilt; ids outside the vocabulary are refused, naming the file).
    """
    key = hashlib.sha256(f"{tokenizer_hash(tokenizer)}:{content_hash(documents)}".encode())
    path = (cache or cache_dir()) / f"{split}-{key.hexdigest()[:16]}.npy"
    vocab_size = tokenizer.get_vocab_size()

    def build() -> np.ndarray:
        dtype, eos = token_dtype(vocab_size), tokenizer.token_to_id(EOS)
        encodings = tokenizer.encode_batch([doc.text for doc in documents])
        return np.concatenate([np.asarray(enc.ids + [eos], dtype=dtype) for enc in encodings]
                              or [np.empty(0, dtype)])

    def save(tokens: np.ndarray, tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, because np.save appends ".npy" to other names
            np.save(f, tokens)

    tokens = cached(path, lambda file: np.load(file, allow_pickle=False), build, save)
    if tokens.ndim != 1 or (tokens.size and int(tokens.max()) >= vocab_size):
        raise ValueError(f"token cache {path} holds ids outside the tokenizer's {vocab_size} entries (or is not "
                         "1-D): remove it (and its .sha256) to rebuild it")
    return tokens


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
    resumed run sees exactly the batches the original run would have seen.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int = 0):
        if not 0 < batch_size <= len(rows):
            raise ValueError(f"batch_size must be in [1, {len(rows)}] (the number of rows), "
                             f"got {batch_size}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
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
        index = self._permutation()[self.offset:self.offset + self.batch_size]
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
    """Tokenized corpora: flat token arrays per split (1-D uint16/uint32) and their packing."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    seq_len: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def train(self) -> np.ndarray:
        """Packed training rows ``(n_train, seq_len + 1)``."""
        return pack(self.train_tokens, self.seq_len)

    @property
    def val(self) -> np.ndarray:
        """Packed validation rows ``(n_val, seq_len + 1)``."""
        return pack(self.val_tokens, self.seq_len)


def load_text_data(names: Sequence[str] = ("kjv", "shakespeare", "wiki"), vocab_size: int = 4096,
                   seq_len: int = 256, val_fraction: float = 0.02,
                   cache: Path | None = None) -> TextData:
    """Load the corpora, split them, train (or load) the tokenizer on the training split and
    tokenize both splits; every step after loading is cached on disk."""
    train_docs, val_docs = split_documents(load_documents(names), val_fraction)
    tokenizer = get_tokenizer(train_docs, vocab_size, cache)
    return TextData(tokenizer, tokenize_documents(train_docs, tokenizer, cache, "train"),
                    tokenize_documents(val_docs, tokenizer, cache, "val"), seq_len)
