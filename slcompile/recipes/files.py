"""File helpers shared by the recipes: atomic writes."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` in one step.

    Readers (or a concurrent process, e.g. another data-parallel rank) never see a partial file.
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
