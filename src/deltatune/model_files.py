"""A delta saved as a whole model: transformers' own folder layout plus deltatune's marker file.

A full fine-tuning delta is every weight, so its file is the model itself: the model's
own ``save_pretrained`` writes ``config.json`` and ``model.safetensors`` (shards and an
index past 50 GB), which a plain ``from_pretrained`` loads without deltatune. Beside
them, ``deltatune_config.json`` holds the delta's config (with a ``peft_type`` of
deltatune's own) and a fingerprint of every file the save wrote. There is no
``adapter_config.json``: transformers would hand such a folder to peft.

A save is one transaction as far as a folder of several files allows. Everything is
first written into a temporary folder inside the target and fsynced; then the files are
moved into place one rename at a time, weights first and the marker last. A reader
checks the files against the marker's fingerprints (size, and SHA-256 of the head,
tail and 16 spread blocks of each file: cheap on a 100 GB checkpoint, and certain to
differ between two trainings), so a save killed halfway is never read as a mix: if the
files in place are the new ones, the new marker still waiting in the temporary folder
is used (and moved into place by the next save); otherwise the old pair still agrees.
A kill between the renames of two files that both changed (two shards of a sharded
save, or a new config.json) leaves a folder the next save completes; reading it before
then is a clear error. Other files in the folder (a tokenizer, a model card) are left alone.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import DeltaError
from .files import fsync_dir, fsync_file, write_new

MARKER = "deltatune_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
FILES_KEY = "deltatune_files"  # in the marker: {file name: fingerprint} of every file the save wrote
TMP_PREFIX = ".deltatune-save."
BLOCK = 1 << 16


def fingerprint(path: Path) -> str:
    """"<size>:<SHA-256 of the first and last MiB and 16 evenly spread 64 KiB blocks>" of a file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 4 << 20:
            digest.update(f.read())
        else:
            offsets = [0] + [size * i // 17 for i in range(1, 17)] + [size - (1 << 20)]
            for i, offset in enumerate(offsets):
                f.seek(offset)
                digest.update(f.read(1 << 20 if i in (0, len(offsets) - 1) else BLOCK))
    return f"{size}:{digest.hexdigest()}"


def is_model_folder(folder: Path) -> bool:
    return (folder / MARKER).is_file() or _waiting_markers(folder) != []


def _waiting_markers(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{TMP_PREFIX}*.tmp/{MARKER}"))


# ---------------------------------------------------------------- writing


def write(folder: Path, model: nn.Module, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Write the model folder: save_pretrained's files, then the marker holding `config` and the fingerprints."""
    folder.mkdir(parents=True, exist_ok=True)
    finish_interrupted(folder)
    tmp = folder / f"{TMP_PREFIX}{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    try:
        save_pretrained(model, tmp, state_dict)
        mode = _usual_mode(tmp)
        written = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in written:
            os.chmod(tmp / name, mode)  # safetensors creates its files 0600
            fsync_file(tmp / name)
        marker = {**config, FILES_KEY: {name: fingerprint(tmp / name) for name in written}}
        write_new(tmp / MARKER, lambda f: f.write(json.dumps(marker, indent=2, sort_keys=True).encode()), mode)
        _commit(tmp, folder, written)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(folder)


def save_pretrained(model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """The model's own save_pretrained (not deltatune's override), with the given tensors under the model's own
    keys: transformers 5 would otherwise rename some back to a legacy checkpoint format (GPT-NeoX's lm_head to
    embed_out), which its from_pretrained reads either way but deltatune's load could not."""
    save = type(model).save_pretrained
    kwargs = {"save_original_format": False} if "save_original_format" in inspect.signature(save).parameters else {}
    save(model, str(folder), state_dict=state_dict, **kwargs)


def _commit(tmp: Path, folder: Path, written: list[str]) -> None:
    """Move the files into place, weights first and the marker last; drop what the previous save wrote and this one did not."""
    previous = _files_of(folder / MARKER)
    order = sorted(written, key=lambda n: (not n.endswith(".safetensors"), n != INDEX, n))
    for name in order:
        os.replace(tmp / name, folder / name)
    os.replace(tmp / MARKER, folder / MARKER)  # readers took the new files from the first rename on (read_marker)
    for stale in set(previous) - set(written):
        (folder / stale).unlink(missing_ok=True)


def finish_interrupted(folder: Path) -> None:
    """Complete a save killed after its first rename (readers already see it: see read_marker); clear leftovers."""
    for waiting in _waiting_markers(folder):
        tmp, files = waiting.parent, _files_of(waiting)
        at_hand = {name: (tmp / name).is_file() and fingerprint(tmp / name) == want for name, want in files.items()}
        placed = {name: (folder / name).is_file() and fingerprint(folder / name) == want for name, want in files.items()}
        moved = [name for name in files if placed[name] and not (tmp / name).exists()]
        if files and moved and all(at_hand[n] or placed[n] for n in files):
            for name in files:
                if not placed[name]:
                    os.replace(tmp / name, folder / name)
            os.replace(waiting, folder / MARKER)
    for leftover in folder.glob(f"{TMP_PREFIX}*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in folder.glob(".README.md.*.tmp"):  # a model card killed while written (io._write_card)
        leftover.unlink(missing_ok=True)


def _files_of(marker: Path) -> dict[str, str]:
    try:
        files = json.loads(marker.read_text()).get(FILES_KEY)
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _usual_mode(folder: Path) -> int:
    """0666 less the umask, as a newly created file gets."""
    probe = folder / ".mode-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def read_marker(folder: Path, verify: bool = True) -> dict[str, Any]:
    """The marker's config fields, once the files it lists are checked (see the module docstring)."""
    marker = folder / MARKER
    data = _marker_data(marker) if marker.is_file() else None  # (a folder with only a waiting marker has none)
    if data is None or not _matches(folder, data):
        # a save killed after moving its files: its marker still waits in the temporary folder
        waiting = [d for d in (_marker_data(w) for w in _waiting_markers(folder)) if d is not None and _matches(folder, d)]
        if waiting:
            data = waiting[0]
        elif data is None:
            raise DeltaError(f"no {MARKER} in {folder}")
        elif verify:
            raise DeltaError(_mismatch_message(folder, data))
    data = dict(data)
    data.pop(FILES_KEY, None)
    return data


def _marker_data(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        if path.parent.name.startswith(TMP_PREFIX):
            return None
        raise DeltaError(f"{path} is not valid JSON ({err}); the file is corrupted or truncated") from None
    if not isinstance(data, dict):
        raise DeltaError(f"{path} holds a JSON {type(data).__name__}, not an object; it is not a deltatune config")
    return data


def _matches(folder: Path, data: dict[str, Any]) -> bool:
    files = data.get(FILES_KEY)
    return isinstance(files, dict) and bool(files) and all(
        (folder / name).is_file() and fingerprint(folder / name) == want for name, want in files.items())


def _mismatch_message(folder: Path, data: dict[str, Any]) -> str:
    marker = folder / MARKER
    files = data.get(FILES_KEY)
    if not isinstance(files, dict) or not files:
        return f"{marker} lists no files ({FILES_KEY}); it was not written by deltatune's save, or was edited"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing: {marker} says the save wrote it; save the model again"
        size = path.stat().st_size
        if str(want).split(":")[0] != str(size):
            return (f"{path} cannot be read as saved: it has {size} bytes where the save wrote {str(want).split(':')[0]}; "
                    "the file is corrupted or truncated")
        if fingerprint(path) != want:
            return (f"{path} and {marker} do not belong together: the file is not the one that save wrote (replaced, "
                    "or the folder mixes two saves); save the model again, or pass verify=False to read the files anyway")
    return f"{marker} does not match the files in {folder}"


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS).is_file():
        shards = [folder / WEIGHTS]
    elif (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DeltaError(f"{folder / INDEX} cannot be read ({err!r}); the file is corrupted or truncated") from None
        shards = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        raise DeltaError(f"no {WEIGHTS} (or {INDEX}) in {folder} (only safetensors weights are read; nothing is unpickled)")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            tensors.update(load_file(shard))
        except (SafetensorError, OSError, ValueError) as err:
            raise DeltaError(f"{shard} cannot be read ({err}); the file is corrupted or truncated") from None
    return tensors


# ---------------------------------------------------------------- base models named by the user


# What deltatune's own from_pretrained calls add. transformers 5.25 turned hub kernels on by default
# (use_kernels=True: layers swapped for kernels fetched from the Hugging Face Hub, through the `kernels`
# package); before it the default was off. deltatune keeps it off: it wraps and merges into those very layers,
# its maths and tests are of the modules' own forward, and an offline machine cannot fetch the kernels.
# transformers 4.56 to 5.24 accept the key too.
BASE_LOAD_KWARGS = {"use_kernels": False}


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def check_model_path(name: str, key: str = "model.name") -> None:
    """A model name that looks like a local path must exist.

    transformers reads a name that is no folder as a hub id, so a mistyped `./models/tiny` comes back
    as "Repo id must be in the form 'repo_name'", which hides the mistake. A name is taken as a path when it
    starts with ./ ../ / or ~, has more than one separator (a hub id has one), or its first part exists here.
    """
    if not isinstance(name, str) or not name:
        return
    path = Path(name).expanduser()
    first = Path(name.split("/", 1)[0].split(os.sep, 1)[0])
    looks_local = (name.startswith(("./", "../", "/", "~", "." + os.sep, ".." + os.sep)) or name.count("/") > 1
                   or name.count(os.sep) > 1 or ("/" in name or os.sep in name) and first.exists() or path.exists())
    if not looks_local:
        return
    if not path.exists():
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        missing = path.absolute().relative_to(parent) if parent is not None else path
        raise DeltaError(f"{key} = {name!r}: no model folder at {path.absolute()} ({parent} exists, {missing} does not); "
                         "fix the path, or give a Hugging Face model id such as 'gpt2' or 'org/name'")


def check_base_model(name: str, key: str = "model.name") -> None:
    """Before loading a base model's weights: a local folder must hold safetensors weights.

    Only safetensors are read: a pickle (pytorch_model.bin) can run any code while it is unpickled, so a
    folder whose only weights are pickles is refused rather than loaded. (A hub id is left to transformers.)"""
    check_model_path(name, key)
    path = Path(name).expanduser() if isinstance(name, str) and name else None
    if path is None or not path.is_dir():
        return
    if not (path / "config.json").is_file():
        raise DeltaError(f"{key} = {name!r}: the folder {path} has no config.json, so it is not a transformers model "
                         "folder; point at the folder that save_pretrained wrote")
    if any(path.glob("*.safetensors")) or (path / INDEX).is_file():
        return
    pickles = sorted(p.name for p in path.iterdir() if p.name in PICKLE_WEIGHTS or p.suffix in (".bin", ".pt", ".pth", ".ckpt")
                     and p.name not in ("training_args.bin",))
    if pickles:
        raise DeltaError(
            f"{key} = {name!r}: the folder's only weights are {', '.join(pickles[:3])}"
            f"{f' (and {len(pickles) - 3} more)' if len(pickles) > 3 else ''}, and deltatune reads safetensors only: "
            "a pickle can run arbitrary code while it loads. If you trust the file, convert it once with transformers: "
            f"AutoModel.from_pretrained({str(path)!r}).save_pretrained({str(path)!r}, safe_serialization=True) "
            "(use the model's own Auto class, e.g. AutoModelForCausalLM), then run this again")


class _HeldReport(logging.Filter):
    """Holds back transformers' weight-loading report (5.x: the LOAD REPORT table; 4.x: "Some weights of ...
    were not initialized ... newly initialized"), keeping the records to give back if the load fails."""

    MARKS = ("LOAD REPORT", "newly initialized", "were not used when initializing")

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if any(mark in record.getMessage() for mark in self.MARKS):
            self.held.append(record)
            return False
        return True


def load_pretrained(cls: Any, name: str, **kwargs: Any) -> tuple[nn.Module, list[str]]:
    """cls.from_pretrained(name, ...) without transformers' load report, and the names of the weights the
    checkpoint lacked (initialised fresh: a classifier head on an encoder). The caller says what happens to
    them instead (trained by the delta, restored from an adapter), in one line, where the report read as if the
    scores used a random head. A load that fails shows the held report before its error, as transformers would."""
    logger = logging.getLogger("transformers.modeling_utils")
    report = _HeldReport()
    logger.addFilter(report)
    try:
        model, info = cls.from_pretrained(name, output_loading_info=True, **BASE_LOAD_KWARGS, **kwargs)
    except BaseException:
        for record in report.held:
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(report)
    return model, sorted(info.get("missing_keys", ()) if isinstance(info, dict) else getattr(info, "missing_keys", ()))


RESTORED = "the adapter's trained copy replaces it"


def fresh_weights_line(name: str, missing: list[str], seed: int | None, fate: str) -> str | None:
    """One line for the weights a base lacked and what becomes of them, or None when it lacked none."""
    if not missing:
        return None
    modules = sorted({key.rsplit(".", 1)[0] for key in missing})
    what = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
    start = f"initialised from seed {seed}" if seed is not None else "initialised at random"
    return f"{name} has no {what}: {start}; {fate}"


# ---------------------------------------------------------------- a classifier's label names beside its adapter

LABELS_FILE = "labels.json"  # {"id2label": {"0": "original", ...}}: peft's files have no place for them


def write_labels(folder: Path, id2label: dict[int, str]) -> None:
    """Record a classifier's label names beside its adapter, so `deltatune merge` writes them into the model."""
    from .files import write_atomic

    data = {"id2label": {str(i): str(name) for i, name in sorted(id2label.items())}}
    write_atomic(Path(folder) / LABELS_FILE, (json.dumps(data, indent=2) + "\n").encode())


def read_labels(folder: Path) -> dict[int, str] | None:
    """The label names saved beside an adapter, or None when there are none (or the file is not ours)."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["id2label"]
        return {int(i): str(name) for i, name in data.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DeltaError(f"{path}: not a label file deltatune wrote ({type(err).__name__}: {err}); delete it to merge "
                         "with transformers' default names (LABEL_0, ...)") from None
