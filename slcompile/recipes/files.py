"""File helpers shared by the recipes: atomic writes, content digests, the run-directory lock."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

RUN_MARKER = ".slcompile-run"  # lock file; its presence marks a folder as a run folder
_TMP_GLOB = ".*.tmp"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` in one step.

    Readers (or a concurrent process, e.g. another data-parallel rank) never see a partial file,
    and ``os.replace`` replaces a symlink at ``path`` rather than writing through it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per writer, not mkstemp: the writer creates it with the usual (umask) mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_digest(path: Path) -> None:
    """Record ``path``'s sha256 beside it (``<name>.sha256``), atomically, after ``path`` is complete."""
    with atomic_path(_digest_path(path)) as tmp:
        tmp.write_text(sha256_file(path) + "\n")


def digest_matches(path: Path) -> bool:
    """Whether ``path`` exists and its bytes match the digest :func:`write_digest` recorded.

    False also when the digest is missing (a write cut between the two files): caches then rebuild.
    """
    try:
        return _digest_path(path).read_text().strip() == sha256_file(path)
    except FileNotFoundError:
        return False


def cached(path: Path, load: Callable[[Path], T], build: Callable[[], T], save: Callable[[T, Path], None]) -> T:
    """``load(path)`` when ``path`` matches its recorded digest, else ``build()``, saved atomically
    with a new digest. A damaged or unverifiable file is rebuilt with a log line; a cache that
    cannot be written is a ``ValueError`` naming the file."""
    if path.exists():
        if digest_matches(path):
            try:
                return load(path)
            except (OSError, ValueError) as exc:
                reason = f"unreadable ({exc})"
        else:
            reason = "its content does not match its recorded sha256"
        log.warning("cache file %s: %s; rebuilding it", path, reason)
    value = build()
    try:
        with atomic_path(path) as tmp:
            save(value, tmp)
        write_digest(path)
    except OSError as exc:
        raise ValueError(f"cache file {path} could not be written ({exc.strerror or exc}): set SLCOMPILE_CACHE "
                         "to a writable folder") from exc
    return value


def is_disk_full(exc: BaseException) -> bool:
    """``ENOSPC``, or torch's zip writer's way of saying so (``unexpected pos`` from a short write)."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "unexpected pos" in str(exc)


def check_writable(directory: Path, what: str) -> None:
    """Create ``directory`` and a probe file in it; ``ValueError`` naming ``what`` if the OS refuses
    (a regular file on the way, a read-only file system, no permission), before any real work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):  # nameless or removed at once: nothing left behind
            pass
    except OSError as exc:
        raise ValueError(f"{what} {directory} is not a writable folder ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def locked_run_dir(out: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``out`` for the body; ``ValueError`` at once when another
    process holds it, when ``out`` is a non-empty folder that is not a run folder (no
    ``RUN_MARKER``), or when it holds a symlink (a write would land outside ``out``).

    Temporaries of earlier killed writers (``.*.tmp``) are removed once the lock is held: nobody
    else can be writing them then.
    """
    check_writable(out, "--out")
    marker = out / RUN_MARKER
    if not marker.exists() and not marker.is_symlink() and any(out.iterdir()):
        raise ValueError(f"--out {out} is a non-empty folder that is not a run folder (no {RUN_MARKER}): "
                         "choose an empty or new folder")
    links = sorted(p.name for p in out.iterdir() if p.is_symlink())
    if links:
        raise ValueError(f"--out {out} holds symbolic links ({', '.join(links)}): a run folder holds only "
                         "files its runs wrote; remove them")
    fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out} is in use by another run (it holds the lock {marker}): wait for that "
                             "run to end or choose another --out") from None
        for stale in out.glob(_TMP_GLOB):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        yield
    finally:
        os.close(fd)
