"""Small file-system steps that every durable write here is built from."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Callable

from .config import DeltaError

# What a write that failed for lack of space or permission says, by errno (OSError) or in its text: safetensors
# reports the same failures as SafetensorError("... I/O error: No space left on device (os error 28)").
_NO_SPACE = ((errno.ENOSPC, errno.EDQUOT), ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122"))
_READ_ONLY = ((errno.EROFS,), ("Read-only file system", "os error 30"))
_NO_PERMISSION = ((errno.EACCES, errno.EPERM), ("Permission denied", "os error 13", "Operation not permitted", "os error 1)"))


class WriteFailed(DeltaError):
    """A write that failed for lack of space or permission, said in full by the writer; `failure` is
    write_failure's verdict, so a caller that says it in its own words can still match it."""

    def __init__(self, message: str, failure: tuple[str, str]) -> None:
        super().__init__(message)
        self.failure = failure


def write_failure(err: BaseException) -> tuple[str, str] | None:
    """(what went wrong, what to do) when `err` is a write that failed for lack of space or permission; else None.

    Matched by errno on an OSError, else by the operating system's words in the message (whatever the class:
    safetensors, transformers and tokenizers wrap them in their own), so every writer is covered by one rule."""
    if isinstance(err, WriteFailed):
        return err.failure
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    text = str(err)
    for (codes, words), verdict in ((_NO_SPACE, ("the disk is full", "free some space on that disk")),
                                    (_READ_ONLY, ("the file system is read-only", "make that disk writable")),
                                    (_NO_PERMISSION, ("this process may not write there",
                                                      "make the folder writable"))):
        if code in codes or (code is None and any(w in text for w in words)):
            return verdict
    return None


def size_text(n: int) -> str:
    """A byte count as people read it: 1.2 MB, 640.0 kB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def tensor_bytes(tensors: Any) -> int:
    """The bytes a set of tensors takes on disk (safetensors adds only a small header)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def folder_bytes(folder: Path | None) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) if folder is not None else 0


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
