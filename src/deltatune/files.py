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


TRASH = ".trash-"  # the prefix of a folder on its way out: nothing reads one, and the next cleanup deletes it


def remove_tree(folder: Path) -> None:
    """Delete a folder so that a kill at any moment leaves it whole or gone: renamed first to a
    `.trash-` name beside it (which no reader takes for the folder), then deleted."""
    import secrets
    import shutil

    folder = Path(folder)
    if not folder.exists():
        return
    trash = folder.with_name(f"{TRASH}{folder.name}-{secrets.token_hex(4)}")
    os.rename(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace the small file `path` with `data` in one step: a temporary sibling, fsynced, renamed over it."""
    import secrets

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_new(tmp, lambda f: f.write(data))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def replace_tree(new: Path, folder: Path) -> None:
    """Put the complete folder `new` (a sibling of `folder`) at `folder`, replacing what is there: at every
    moment `folder` is the old one or the new one, never a mix."""
    import secrets
    import shutil

    new, folder = Path(new), Path(folder)
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{secrets.token_hex(4)}")
        os.rename(folder, old)
    try:
        os.rename(new, folder)
    except OSError:
        if old is not None:
            os.rename(old, folder)  # put the old one back: the caller's temporary folder stays for it to clear
        raise
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_folder(folder: Path, inputs: dict[str, Path], overwrite: bool, what: str = "--out") -> None:
    """Refuse an output folder that would destroy something: one that holds an input of the command (never,
    even with overwrite), the current directory or one above it, or a folder with files unless overwrite."""
    from .config import DeltaError

    target = Path(folder).resolve()
    for name, path in inputs.items():
        source = Path(path).resolve()
        if source == target or target in source.parents:
            raise DeltaError(f"{what} {folder} {'is' if source == target else 'holds'} the {name} ({path}) that this "
                             "command reads, and writing there would delete it: choose a new folder")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise DeltaError(f"{what} {folder} is the current directory{'' if target == cwd else ' or one above it'}, "
                         f"which cannot be replaced: name a new folder, e.g. {what} merged")
    if target.exists() and not target.is_dir():
        raise DeltaError(f"{what} {folder} is a file, not a folder: choose another path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise DeltaError(f"{what} {folder} already exists and is not empty; nothing was written. Pass --overwrite to "
                         "replace it (its files are deleted once the new folder is complete), or choose another folder")
