"""Your own data (``--data``): every input format, the split, the token-shard cache, bad input as a
user meets it (an ``error:`` line naming the file, nothing written to ``--out``), exact resume."""
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from slcompile.recipes import train as train_mod
from slcompile.recipes.data import dataset, load_text_data, sources, train_tokenizer
from slcompile.recipes.data import tokenizer as tokenizer_mod
from slcompile.recipes.train import EXIT_STOPPED, main

VOCAB = 300
WORDS = "the quick brown fox jumps over a lazy dog; Ünïcödé — “quotes” 日本語 🙂 15 °C\n".split(" ")
DOCS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40 + i % 17)) for i in range(60)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLCOMPILE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(DOCS, VOCAB).save(str(path))
    return path


def write_jsonl(path, docs, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({field: doc, "n": i}) + "\n" for i, doc in enumerate(docs))
    return path


def expected_tokens(tokenizer, docs):
    """Each document's ids followed by the end-of-text id (0), as one array."""
    return np.concatenate([np.array(tokenizer.encode(doc).ids + [0]) for doc in docs])


def load(paths, tokenizer_file=None, **kwargs):
    kwargs.setdefault("val_fraction", 0.0)
    return load_text_data((), VOCAB, 16, data=[str(p) for p in paths],
                          tokenizer=str(tokenizer_file) if tokenizer_file else None, **kwargs)


# ------------------------------------------------------------------------------------- formats
def _zst(path, docs):
    zstandard = pytest.importorskip("zstandard")
    with zstandard.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)


def _parquet(path, docs):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path, row_group_size=7)


WRITERS = {
    "a.jsonl": lambda p, docs: write_jsonl(p, docs),
    "a.json": lambda p, docs: write_jsonl(p, docs),
    "a.jsonl.gz": lambda p, docs: write_jsonl(p, docs, opener=gzip.open),
    "a.jsonl.zst": _zst,
    "a.parquet": _parquet,
}


@pytest.mark.parametrize("name", WRITERS)
def test_each_text_format_gives_the_tokenizers_ids(tmp_path, tokenizer_file, name):
    WRITERS[name](tmp_path / name, DOCS)
    data = load([tmp_path / name], tokenizer_file)
    assert isinstance(data.train_tokens, np.memmap) and len(data.val_tokens) == 0
    assert np.array_equal(data.train_tokens, expected_tokens(data.tokenizer, DOCS))


def test_txt_files_are_documents_and_long_ones_stream_in_exact_pieces(tmp_path, tokenizer_file, monkeypatch):
    text = "\n".join(DOCS) + "\n"  # one long document with many lines
    (tmp_path / "b.txt").write_text(text, encoding="utf-8")
    (tmp_path / "a.txt").write_text("Short one.\n\n  indented\n", encoding="utf-8")
    monkeypatch.setattr(sources, "PIECE_CHARS", 50)  # cut the long file into dozens of pieces
    data = load([tmp_path / "*.txt"], tokenizer_file)
    assert np.array_equal(data.train_tokens, expected_tokens(data.tokenizer, ["Short one.\n\n  indented\n", text]))


def test_a_long_txt_without_clean_cuts_still_comes_in_bounded_pieces(tmp_path, monkeypatch):
    (tmp_path / "crlf.txt").write_bytes(("a line of text\r\n" * 400).encode())
    monkeypatch.setattr(sources, "PIECE_CHARS", 100)
    [(doc_id, pieces)] = sources.read_documents(tmp_path / "crlf.txt")
    pieces = list(pieces)
    assert doc_id == "crlf.txt" and "".join(pieces) == "a line of text\r\n" * 400
    assert len(pieces) == 4 and max(map(len, pieces)) <= 16 * 100 + 16


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_pretokenized_bin_and_npy_shards(tmp_path, dtype):
    first, second = np.arange(0, 200, dtype=dtype), np.arange(100, 300, dtype=dtype)[::-1].copy()
    first.tofile(tmp_path / "a.bin")
    np.save(tmp_path / "b.npy", second.astype(np.int64))  # .npy states its own dtype
    data = load([tmp_path / "a.bin", tmp_path / "b.npy"], data_dtype=dtype)
    assert data.tokenizer is None and data.vocab_size == VOCAB and data.train_tokens.dtype == np.uint16
    assert np.array_equal(data.train_tokens, np.concatenate([first, second]))
    assert data.train.shape == (400 // 17, 17)
    np.arange(10, dtype=dtype).tofile(tmp_path / "val.bin")
    with_val = load([tmp_path / "a.bin"], data_dtype=dtype, val_data=[str(tmp_path / "val.bin")])
    assert np.array_equal(with_val.val_tokens, np.arange(10))


@pytest.mark.parametrize("name, module", [("a.jsonl.zst", "zstandard"), ("a.parquet", "pyarrow.parquet")])
def test_a_missing_optional_package_is_named(tmp_path, monkeypatch, name, module):
    (tmp_path / name).write_bytes(b"data")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    package = module.split(".")[0]
    with pytest.raises(ValueError, match=rf"{name}: reading \.\w+ files needs `pip install {package}`"):
        load([tmp_path / name])


# ---------------------------------------------------------------------------------------- split
def test_hash_split_by_document_is_stable(tmp_path, tokenizer_file):
    """A document's split depends on its file name and line only: not on other files, their
    order, or the folder the data lives in."""
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    alone = load([tmp_path / "a.jsonl"], tokenizer_file, val_fraction=0.3)
    assert 0 < len(alone.val_tokens) < len(alone.train_tokens)
    write_jsonl(tmp_path / "b.jsonl", DOCS[::-1])
    both = load([tmp_path / "b.jsonl", tmp_path / "a.jsonl"], tokenizer_file, val_fraction=0.3)
    assert np.array_equal(both.val_tokens[-len(alone.val_tokens):], alone.val_tokens)
    (tmp_path / "moved").mkdir()
    os.replace(tmp_path / "a.jsonl", tmp_path / "moved" / "a.jsonl")
    moved = load([tmp_path / "moved"], tokenizer_file, val_fraction=0.3)  # a folder stands for its files
    assert np.array_equal(moved.val_tokens, alone.val_tokens)
    assert np.array_equal(moved.train_tokens, alone.train_tokens)
    given = load([tmp_path / "moved"], tokenizer_file, val_fraction=0.3, val_data=[str(tmp_path / "b.jsonl")])
    assert np.array_equal(given.train_tokens, expected_tokens(given.tokenizer, DOCS))  # --val-data: no split
    assert np.array_equal(given.val_tokens, expected_tokens(given.tokenizer, DOCS[::-1]))


# ---------------------------------------------------------------------------------------- cache
def test_the_cache_is_reused_and_rebuilt_when_an_input_changes(tmp_path, cache, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    first = load([path], workers=2, progress=True)  # no --tokenizer: a BPE is trained on the data
    assert first.vocab_size == VOCAB and len(list(cache.glob("train-*.bin"))) == 1
    assert "tokenizing train" in capsys.readouterr().err  # the progress bar

    def no_work(*args):
        raise AssertionError("cache miss: tokenized or trained again")

    with monkeypatch.context() as patch:
        patch.setattr(dataset._Encoder, "__call__", no_work)
        patch.setattr(tokenizer_mod, "train_tokenizer", no_work)
        again = load([path])
        assert np.array_equal(again.train_tokens, first.train_tokens)
    write_jsonl(path, DOCS + ["one more document"])
    changed = load([path])
    assert len(changed.train_tokens) > len(first.train_tokens)
    assert len(list(cache.glob("train-*.bin"))) == 2


# ------------------------------------------------------------------------------------ bad input
def _bad_inputs(tmp_path, tokenizer_file):
    """``{case: (extra CLI flags, text the error line must hold)}``, the files written for real."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("fine\nnot utf-8: caf\xe9\n".encode("latin-1"))
    write_jsonl(tmp_path / "field.jsonl", DOCS[:3], field="body")
    (tmp_path / "broken.jsonl").write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n')[:-12])
    np.array([5, VOCAB + 7], dtype=np.uint16).tofile(tmp_path / "ids.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    (tmp_path / "a.csv").write_text("text\nhello\n")
    good = str(write_jsonl(tmp_path / "good.jsonl", DOCS))
    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(tmp_path / "no_eos.json"))
    return {
        "missing": (["--data", str(tmp_path / "nope.jsonl")], f"--data {tmp_path / 'nope.jsonl'}: no such file"),
        "no match": (["--data", str(tmp_path / "*.txtt")], "no file matches this pattern"),
        "empty": (["--data", str(tmp_path / "empty.jsonl")], f"{tmp_path / 'empty.jsonl'}: the file is empty"),
        "undecodable": (["--data", str(tmp_path / "latin1.txt")],
                        f"{tmp_path / 'latin1.txt'} line 2: not UTF-8 text (byte 0xe9 at column 15)"),
        "no field": (["--data", str(tmp_path / "field.jsonl")], f"{tmp_path / 'field.jsonl'} line 1: no string field 'text'"),
        "not json": (["--data", str(tmp_path / "broken.jsonl")], f"{tmp_path / 'broken.jsonl'} line 2: not JSON"),
        "truncated gz": (["--data", str(tmp_path / "broken.jsonl.gz")], f"{tmp_path / 'broken.jsonl.gz'} after line"),
        "ids outside": (["--data", str(tmp_path / "ids.bin")],
                        f"{tmp_path / 'ids.bin'}: token id {VOCAB + 7} at position 1 is outside the vocabulary"),
        "odd bytes": (["--data", str(tmp_path / "odd.bin")], "3 bytes is not a whole number of uint16"),
        "format": (["--data", str(tmp_path / "a.csv")], "unknown data format"),
        "tokenizer too big": (["--data", good, "--tokenizer", str(tokenizer_file), "--vocab-size", "290"],
                              f"--tokenizer {tokenizer_file} has {VOCAB} entries, more than the model's embedding "
                              f"(--vocab-size 290): pass --vocab-size {VOCAB}"),
        "no tokenizer": (["--data", good, "--tokenizer", str(tmp_path / "a.csv")], "not a tokenizers JSON file"),
        "no eos": (["--data", good, "--tokenizer", str(tmp_path / "no_eos.json")],
                   f"--tokenizer {tmp_path / 'no_eos.json'} has none of the end-of-text tokens"),
    }


def test_bad_input_is_one_error_line_naming_the_file_before_any_write(tmp_path, tokenizer_file, capsys):
    for case, (flags, message) in _bad_inputs(tmp_path, tokenizer_file).items():
        out = tmp_path / "run"
        argv = ["--model", "llama-tiny", "--vocab-size", str(VOCAB), "--batch-size", "2", "--seq-len", "8",
                "--steps", "1", "--out", str(out), "--no-progress", *flags]
        if "--vocab-size" in flags:
            del argv[2:4]
        assert main(argv) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (case, err)
        assert not out.exists(), case


# ---------------------------------------------------------------------------------------- resume
def test_a_stopped_run_on_your_data_resumes_at_the_exact_position(tmp_path, tokenizer_file, monkeypatch):
    data = str(write_jsonl(tmp_path / "a.jsonl", DOCS * 3))

    def argv(out):
        return ["--model", "llama-tiny", "--data", data, "--tokenizer", str(tokenizer_file), "--vocab-size", "320",
                "--val-fraction", "0.2", "--batch-size", "4", "--seq-len", "16", "--steps", "6", "--log-every", "1",
                "--checkpoint-every", "100", "--eval-every", "100", "--no-progress", "--out", str(tmp_path / out)]

    def losses(out):
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    assert main(argv("full")) == 0
    step = train_mod.train_step

    def step_then_sigterm(run):
        result = step(run)
        if run.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # honoured after this step: checkpoint, exit 75
        return result

    with monkeypatch.context() as patch:
        patch.setattr(train_mod, "train_step", step_then_sigterm)
        assert main(argv("stopped")) == EXIT_STOPPED
    assert [s for s, _ in losses("stopped")] == [1, 2, 3]
    assert main(argv("stopped")) == 0
    assert losses("stopped") == losses("full")


# -------------------------------------------------------------------------------------- memory
@pytest.mark.slow
def test_peak_memory_stays_bounded_on_a_large_corpus(tmp_path, tokenizer_file):
    """40 MB of JSONL tokenized in a fresh process: its peak RSS grows far less than the corpus."""
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < 40_000_000:
            f.writelines(json.dumps({"text": doc}) + "\n" for doc in DOCS)
    script = textwrap.dedent(f"""
        import resource, sys
        from slcompile.recipes.data import load_text_data
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        data = load_text_data((), {VOCAB}, 16, 0.01, data=[{str(path)!r}], tokenizer={str(tokenizer_file)!r})
        assert len(data.train_tokens) > 10_000_000
        print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "SLCOMPILE_CACHE": str(tmp_path / "cache")}, check=True)
    before, after = map(int, result.stdout.split())
    assert (after - before) * 1024 < 100e6, (before, after)
