"""Byte-level BPE tokenizer trained on the training split, cached on disk.

Byte-level BPE needs no unknown token and decodes every string back exactly (no normalizer, no
added prefix space), so ``decode(encode(text)) == text`` for any unicode text.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from slcompile.recipes.data.corpora import Document, content_hash
from slcompile.recipes.files import cached

EOS = "<|endoftext|>"
# Bump when the training recipe below changes, so cached tokenizers are retrained.
TOKENIZER_VERSION = 1


def cache_dir() -> Path:
    """Cache root: ``$SLCOMPILE_CACHE`` if set, else ``.cache/slcompile`` in the working directory."""
    return Path(os.environ.get("SLCOMPILE_CACHE", Path.cwd() / ".cache" / "slcompile"))


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (the EOS special token included, id 0)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  # All 256 bytes up front: any text is encodable whatever it held.
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def tokenizer_key(documents: Sequence[Document], vocab_size: int) -> str:
    """Cache key over (corpus names, vocab size, text content, recipe and library versions)."""
    names = sorted({doc.source for doc in documents})
    blob = json.dumps([names, vocab_size, content_hash(documents), TOKENIZER_VERSION,
                       tokenizers.__version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_tokenizer(documents: Sequence[Document], vocab_size: int = 4096,
                  cache: Path | None = None) -> Tokenizer:
    """The tokenizer trained on ``documents`` (pass the training split only), from the cache if
    an identical one was trained before, else trained now and stored under ``cache``
    (default :func:`cache_dir`) as ``tokenizer-<key>.json`` with its sha256 (a damaged file is retrained)."""
    path = (cache or cache_dir()) / f"tokenizer-{tokenizer_key(documents, vocab_size)}.json"

    def load(file: Path) -> Tokenizer:
        try:
            return Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises its own Exception type for a bad file
            raise ValueError(str(exc)) from exc

    return cached(path, load, lambda: train_tokenizer([doc.text for doc in documents], vocab_size),
                  lambda tokenizer, tmp: tokenizer.save(str(tmp)))


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Short digest of a tokenizer's full definition (vocab, merges, settings)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
