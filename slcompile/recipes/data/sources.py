"""Your own data: files named by paths or globs, read as streams of documents or of token ids.

Text inputs: ``.txt`` (one document per file), ``.jsonl`` / ``.json`` (one JSON object per line,
the document in ``text_field``), ``.parquet`` (a string column ``text_field``; needs pyarrow),
each optionally compressed as ``.gz`` or ``.zst`` (needs zstandard). Pre-tokenized inputs: ``.bin``
(raw little-endian ids of ``--data-dtype``) and ``.npy`` (1-D unsigned integers), one flat stream
of ids per file that already holds its own document separators.

Nothing here holds a whole file in memory: documents and id blocks are yielded as they are read,
and a long ``.txt`` file comes in pieces of about :data:`PIECE_CHARS` characters. Every problem
is a ``ValueError`` naming the file (and the line where one applies).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np

TEXT_FORMATS = (".txt", ".jsonl", ".json", ".parquet")
TOKEN_FORMATS = (".bin", ".npy")
COMPRESSIONS = (".gz", ".zst")
TOKEN_DTYPES = ("uint16", "uint32")
PIECE_CHARS = 1 << 20  # a long .txt document is tokenized in pieces of about this many characters
ID_BLOCK = 1 << 22  # token ids read per block from a pre-tokenized file (8-16 MiB)


def _format(path: Path) -> tuple[str, str | None]:
    """``(format suffix, compression suffix or None)`` of ``path``, e.g. ``(".jsonl", ".gz")``."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes else ""
    if fmt not in TEXT_FORMATS + TOKEN_FORMATS or (compression and fmt in TOKEN_FORMATS + (".parquet",)):
        raise ValueError(f"{path}: unknown data format; use {', '.join(TEXT_FORMATS)} (optionally "
                         f"{' or '.join(COMPRESSIONS)}) or pre-tokenized {', '.join(TOKEN_FORMATS)}")
    return fmt, compression


def is_pretokenized(path: Path) -> bool:
    return _format(path)[0] in TOKEN_FORMATS


def resolve_paths(patterns: Sequence[str], flag: str = "--data") -> list[Path]:
    """The files ``patterns`` name, in order (each glob's matches sorted; a folder stands for the
    data files under it), each once; ``ValueError`` for a missing path, a glob matching nothing, an
    unknown format, an empty file, or text mixed with pre-tokenized files."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        found = [Path(m) for m in matches if Path(m).exists()]
        if not found:
            raise ValueError(f"{flag} {pattern}: " + ("no file matches this pattern" if glob.has_magic(pattern)
                                                      else "no such file or folder"))
        for path in found:
            paths += sorted(p for p in path.rglob("*") if p.is_file() and _has_data_suffix(p)) \
                if path.is_dir() else [path]
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise ValueError(f"{flag} {', '.join(patterns)}: the folders hold no data files")
    for path in paths:
        _format(path)
        if path.stat().st_size == 0:
            raise ValueError(f"{flag} {path}: the file is empty")
    if len({is_pretokenized(p) for p in paths}) > 1:
        raise ValueError(f"{flag}: text and pre-tokenized files cannot be mixed")
    return paths


def _has_data_suffix(path: Path) -> bool:
    try:
        _format(path)
        return True
    except ValueError:
        return False


def file_identity(paths: Sequence[Path]) -> list:
    """What keys a token cache: each file's absolute path, size and modification time (ns).

    Not a content hash: hashing would reread the whole corpus at every start (on every rank),
    while any ordinary rewrite changes size or mtime. An edit keeping both is missed: ``touch``
    the file (or remove the cache) after one.
    """
    return [[str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns] for p in paths]


def _open_binary(path: Path, compression: str | None) -> tuple[IO[bytes], tuple[type[Exception], ...]]:
    """The decompressed byte stream of ``path`` and the exceptions that mean a damaged stream. A file
    that cannot be opened is a ``ValueError`` naming it (an ``OSError`` would read as a cache that
    cannot be written)."""
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise ValueError(f"{path}: reading .zst files needs `pip install zstandard`") from None
    try:
        if compression == ".gz":
            return gzip.open(path, "rb"), (OSError, EOFError)  # gzip.BadGzipFile is an OSError
        if compression == ".zst":
            stream = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
            return io.BufferedReader(stream), (OSError, zstandard.ZstdError)
        return open(path, "rb"), (OSError,)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _lines(path: Path, compression: str | None) -> Iterator[tuple[int, str]]:
    """``(line number, decoded line with its newline)``; undecodable bytes or a damaged
    compressed stream name the file and line."""
    number = 0
    stream, damaged = _open_binary(path, compression)
    with stream:
        try:
            for number, raw in enumerate(stream, 1):
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{path} line {number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                     f"column {exc.start + 1})") from None
        except damaged as exc:
            raise ValueError(f"{path} after line {number}: cannot read or decompress it ({exc})") from None


def _text_pieces(path: Path, compression: str | None) -> Iterator[str]:
    """A ``.txt`` file's text in pieces of about :data:`PIECE_CHARS` characters, cut between a line
    ending ``<non-blank>\\n`` and a line starting with a non-blank character: there the byte-level
    BPE's pre-tokenizer splits anyway, so the pieces tokenize exactly like the whole text. A text
    without such a place (``\\r\\n`` line ends) is cut at any line end past 16 pieces' worth, to
    bound memory (the pre-tokens at those few cuts may differ); a single line must fit in memory."""
    piece: list[str] = []
    size, blank = 0, True
    for _, line in _lines(path, compression):
        if size >= PIECE_CHARS and (size >= 16 * PIECE_CHARS or (line[:1].strip() and piece[-1][-2:-1].strip())):
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
        blank = blank and not line.strip()
    if blank:
        raise ValueError(f"{path}: the file holds no text")
    yield "".join(piece)


def _json_documents(path: Path, compression: str | None, text_field: str) -> Iterator[tuple[str, str]]:
    count = 0
    for number, line in _lines(path, compression):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number}: not JSON ({exc.msg}); one JSON object per line") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path} line {number}: no string field {text_field!r} (set --text-field)")
        count += 1
        yield f"{path.name}:{number}", text
    if not count:
        raise ValueError(f"{path}: the file holds no JSON lines")


def _parquet_documents(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet files needs `pip install pyarrow`") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a damaged file
        raise ValueError(f"{path}: not a parquet file ({exc})") from None
    if text_field not in table.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}; "
                         "set --text-field)")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise ValueError(f"{path} row {row}: {text_field!r} is not a string ({text!r})")
            yield f"{path.name}:{row}", text
    if not row:
        raise ValueError(f"{path}: the file holds no rows")


def read_documents(path: Path, text_field: str = "text") -> Iterator[tuple[str, Iterator[str]]]:
    """``(document id, its text in pieces)`` for each document of a text file, in file order.

    Ids are ``<file name>:<line or row>`` (``<file name>`` for a ``.txt`` file): they stay the same
    when the folder moves, so a split by id does too. Consume each document's pieces before
    asking for the next document.
    """
    fmt, compression = _format(path)
    if fmt == ".txt":
        yield path.name, _text_pieces(path, compression)
        return
    documents = _parquet_documents(path, text_field) if fmt == ".parquet" else \
        _json_documents(path, compression, text_field)
    for doc_id, text in documents:
        yield doc_id, iter((text,))


def read_token_blocks(path: Path, dtype: str) -> Iterator[np.ndarray]:
    """A pre-tokenized file's ids in blocks of at most :data:`ID_BLOCK` (1-D, the file's dtype), read
    with plain reads (no memory map, so the pages read never count as this process's memory):
    ``.npy`` states its dtype, ``.bin`` is raw ``dtype`` (``uint16``/``uint32``, little-endian)."""
    with _open_binary(path, None)[0] as f:
        if _format(path)[0] == ".npy":
            try:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}[version]
                shape, _, item = read_header(f)
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{path}: not a .npy file ({exc})") from None
            if len(shape) != 1 or item.kind not in "ui":
                raise ValueError(f"{path}: a token file must hold a 1-D integer array, not {shape} {item}")
        else:
            item = np.dtype(dtype).newbyteorder("<")
            size = os.path.getsize(path)
            if size % item.itemsize:
                raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype} token ids (--data-dtype)")
        while (block := np.fromfile(f, dtype=item, count=ID_BLOCK)).size:
            yield block
