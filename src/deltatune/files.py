"""Small file-system steps that every durable write here is built from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable


def write_new(path: Path, write: Callable[[Any], Any], mode: int = 0o666) -> None:
    """Create `path` (it must not exist) with `mode` less the umask, write through `write(file)`, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable (some file systems cannot fsync a directory: then nothing)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
