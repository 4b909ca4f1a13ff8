"""Tokenization benchmark for ``--data``: throughput (MB of text per second) with 1 and 2 workers,
and the peak RSS of a whole data preparation over a generated corpus of at least 500 MB.

The corpus is JSON lines (``{"text": ...}``) of the built-in corpora's documents (KJV chapters,
Shakespeare scenes, Wikipedia articles: real prose, not random words), reshuffled on every pass
until it reaches ``--mb`` MB; it is written to a temporary folder (``--tmp``, default the
system's) and deleted at the end, with the token cache.

- ``prepare``: one fresh process runs :func:`slcompile.recipes.data.load_text_data` over the whole
  corpus as ``python -m slcompile.train --data corpus.jsonl --tokenize-workers 2`` would before
  training: it reads the first 20M characters, trains the byte-level BPE (``--vocab-size``) on
  them, and tokenizes both splits into the cache. Reported: seconds, peak RSS of the main process
  (``ru_maxrss``) and of the largest worker process (forked: it shares most of those pages), tokens.
- ``training``: ``python -m slcompile.train --model llama-mini --data corpus.jsonl`` for
  ``--train-steps`` steps on that cache (shards verified and memory-mapped, not retokenized):
  seconds and the run's peak RSS (``summary.json``'s ``peak_memory_bytes``).
- ``throughput``: the first ``--throughput-mb`` MB of the corpus tokenized with the BPE trained
  above, once with each worker count, each in a fresh process with an empty cache; MB/s counts
  the UTF-8 bytes of the document texts (not the JSON around them).

    nice .venv/bin/python benchmarks/tokenize_bench.py --mb 500 --throughput-mb 50
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1_000_000


def generate(path: Path, size: int, seed: int = 0) -> tuple[int, int]:
    """Write JSON lines of the built-in corpora's documents until ``path`` holds ``size`` bytes;
    returns ``(documents, UTF-8 bytes of their texts)``."""
    from slcompile.recipes.data import load_documents
    texts = [doc.text for doc in load_documents()]
    rng, documents, text_bytes = random.Random(seed), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < size:
            rng.shuffle(texts)
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
                documents += 1
                text_bytes += len(text.encode())
                if f.tell() >= size:
                    break
    return documents, text_bytes


def child(corpus: str, cache: str, workers: int, vocab_size: int, tokenizer: str | None) -> None:
    """Prepare the data in this (fresh) process; print one JSON line of what it cost."""
    os.environ["SLCOMPILE_CACHE"] = cache
    from slcompile.recipes.data import load_text_data
    began = time.perf_counter()
    data = load_text_data((), vocab_size, 256, data=[corpus], tokenizer=tokenizer, workers=workers)
    seconds = time.perf_counter() - began
    print(json.dumps({
        "seconds": seconds, "tokens": int(len(data.train_tokens) + len(data.val_tokens)),
        "peak_rss_main_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_largest_worker_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "tokenizer": str(next(Path(cache).glob("tokenizer-*.json"), "")) or None}))


def run_child(corpus: Path, cache: Path, workers: int, vocab_size: int, tokenizer: str | None = None) -> dict:
    argv = [sys.executable, __file__, "--child", str(corpus), str(cache), str(workers), str(vocab_size)]
    load_before = os.getloadavg()[0]
    result = subprocess.run(argv + ([tokenizer] if tokenizer else []), capture_output=True, text=True, check=True)
    # The machine's 1-minute load average around the run: with other work on the cores, worker
    # counts above the free cores cannot speed up.
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "load_average": [load_before, os.getloadavg()[0]]}


def train_run(corpus: Path, cache: Path, out: Path, steps: int, vocab_size: int) -> dict:
    """``python -m slcompile.train`` for ``steps`` steps of llama-mini on the prepared corpus (the
    cache already holds its tokenizer and shards): wall seconds and the run's peak RSS."""
    argv = [sys.executable, "-m", "slcompile.train", "--model", "llama-mini", "--data", str(corpus),
            "--vocab-size", str(vocab_size), "--steps", str(steps), "--eval-every", str(steps), "--eval-rows", "16", "--no-progress", "--out", str(out)]
    began = time.perf_counter()
    subprocess.run(argv, capture_output=True, text=True, check=True, env={**os.environ, "SLCOMPILE_CACHE": str(cache)})
    summary = json.loads((out / "summary.json").read_text())
    return {"steps": steps, "seconds": time.perf_counter() - began, "peak_rss_bytes": summary["peak_memory_bytes"],
            "tokens": summary["tokens"]}


def head(source: Path, target: Path, size: int) -> int:
    """Copy whole lines of ``source`` to ``target`` up to ``size`` bytes; the UTF-8 bytes of their texts."""
    text_bytes = 0
    with open(source, encoding="utf-8") as f, open(target, "w", encoding="utf-8") as out:
        for line in f:
            out.write(line)
            text_bytes += len(json.loads(line)["text"].encode())
            if out.tell() >= size:
                break
    return text_bytes


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        corpus, cache, workers, vocab_size, *tokenizer = sys.argv[2:]
        child(corpus, cache, int(workers), int(vocab_size), tokenizer[0] if tokenizer else None)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=500, help="corpus size (MB of JSON lines)")
    parser.add_argument("--throughput-mb", type=int, default=50, help="corpus prefix timed per worker count")
    parser.add_argument("--workers", default="1,2", help="worker counts timed for throughput")
    parser.add_argument("--prepare-workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--train-steps", type=int, default=20, help="steps of the training run on the corpus")
    parser.add_argument("--tmp", default=None, help="folder for the corpus and cache (deleted after)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tokenize_bench.json"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tokenize_bench-", dir=args.tmp))
    try:
        corpus = tmp / "corpus.jsonl"
        began = time.perf_counter()
        documents, text_bytes = generate(corpus, args.mb * MB)
        print(f"generated {corpus.stat().st_size / MB:.0f} MB ({documents} documents) in "
              f"{time.perf_counter() - began:.0f} s", flush=True)
        prepare = run_child(corpus, tmp / "cache", args.prepare_workers, args.vocab_size)
        prepare.update(workers=args.prepare_workers, corpus_bytes=corpus.stat().st_size, documents=documents,
                       text_bytes=text_bytes, text_mb_per_s=text_bytes / MB / prepare["seconds"])
        print(f"prepare: {prepare['seconds']:.0f} s, peak RSS {prepare['peak_rss_main_bytes'] / 2**20:.0f} MiB "
              f"(largest worker {prepare['peak_rss_largest_worker_bytes'] / 2**20:.0f} MiB)", flush=True)
        training = train_run(corpus, tmp / "cache", tmp / "run", args.train_steps, args.vocab_size)
        print(f"training {training['steps']} steps on it: {training['seconds']:.0f} s, peak RSS "
              f"{training['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
        tokenizer = shutil.copy(prepare.pop("tokenizer"), tmp / "tokenizer.json")
        shutil.rmtree(tmp / "cache")
        sample = tmp / "sample.jsonl"
        sample_text = head(corpus, sample, args.throughput_mb * MB)
        throughput = []
        for workers in map(int, args.workers.split(",")):
            result = run_child(sample, tmp / f"cache-{workers}", workers, args.vocab_size, str(tokenizer))
            result.pop("tokenizer")
            result.update(workers=workers, text_bytes=sample_text, text_mb_per_s=sample_text / MB / result["seconds"])
            throughput.append(result)
            print(f"{workers} worker(s): {result['text_mb_per_s']:.2f} MB/s of text", flush=True)
        report = {"prepare": prepare, "training": training, "throughput": throughput, "vocab_size": args.vocab_size,
                  "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                  "python": platform.python_version()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
