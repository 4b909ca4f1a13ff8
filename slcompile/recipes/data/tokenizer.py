"""Byte-level BPE tokenizer trained on the training split, cached on disk; or one given as a file.

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
# End-of-text tokens looked up, in this order, in a given tokenizer (GPT-2, LLaMA/T5, LLaMA 3, ...).
EOS_TOKENS = (EOS, "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
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

    return cached(path, _read, lambda: train_tokenizer([doc.text for doc in documents], vocab_size),
                  lambda tokenizer, tmp: tokenizer.save(str(tmp)))


def _read(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises its own Exception type for a bad file
        raise ValueError(str(exc)) from exc


def load_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    """A Hugging Face ``tokenizers`` JSON file (``--tokenizer``); ``ValueError`` naming it when it
    cannot be read or has more entries than the model's embedding (``vocab_size``) can take."""
    try:
        tokenizer = _read(Path(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--tokenizer {path}: not a tokenizers JSON file ({exc})") from None
    eos_id(tokenizer, f"--tokenizer {path}")
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"--tokenizer {path} has {tokenizer.get_vocab_size()} entries, more than the model's "
                         f"embedding (--vocab-size {vocab_size}): pass --vocab-size {tokenizer.get_vocab_size()}")
    return tokenizer


def eos_id(tokenizer: Tokenizer, name: str = "the tokenizer") -> int:
    """The end-of-text id put after each document: the first of :data:`EOS_TOKENS` the tokenizer has."""
    for token in EOS_TOKENS:
        if (index := tokenizer.token_to_id(token)) is not None:
            return index
    raise ValueError(f"{name} has none of the end-of-text tokens {', '.join(EOS_TOKENS)}, which separate "
                     "documents")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Short digest of a tokenizer's full definition (vocab, merges, settings)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
