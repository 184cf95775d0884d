"""Writing run files so that a kill at any moment (SIGKILL, power loss) never leaves a torn one.

A file is written under a temporary name beside its final one, flushed to disk, then renamed over it
(`os.replace` is atomic on POSIX and Windows): a reader sees the old content or the new, never half.
This module imports nothing of diffrl.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def temporary_name(path: Path) -> Path:
    """Where `atomic_write` writes before renaming: a hidden sibling ending in ``.tmp``."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, make it durable, and rename it to ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems (and Windows) cannot fsync a directory
        pass
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))
