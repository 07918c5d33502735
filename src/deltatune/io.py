"""Saving and loading deltas: adapter_config.json + adapter_model.safetensors.

The files are the peft package's (see formats/peft.py), so adapters move both
ways. Every file is written to a temporary name and renamed into place, weights
before config, so an interrupted save leaves the previous adapter readable.
Weights are only ever read with safetensors; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import api
from .config import DeltaError, method_of
from .formats.peft import config_from_file, config_to_file, key_prefix, saved_key
from .surgery import require_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def file_keys(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Delta `name`'s parameters under the keys its adapter file uses (peft's names)."""
    delta = require_state(model).deltas[name]
    containers = tuple(delta.method.containers) + ("modules_to_save",)
    prefix = key_prefix(delta.method.kind)
    return {saved_key(path, name, containers, prefix): p for path, p in api.delta_parameters(model, name).items()}


def delta_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Delta `name`'s tensors under their file keys, detached, contiguous, on the CPU."""
    delta = require_state(model).deltas[name]
    # An inactive selective delta keeps its trained values aside; the live parameters hold the originals.
    stashed = {id(p): delta.stash[n] for n, p in delta.selected.items()} if delta.stash is not None else {}
    # a copy: safetensors refuses tensors that share storage (tied or aliased weights)
    return {key: stashed.get(id(p), p.detach()).to("cpu", copy=True).contiguous() for key, p in file_keys(model, name).items()}


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> None:
    """Write delta `name` into `path`; with name=None, every attached delta.

    With several deltas, the one named "default" goes in `path` and each other in
    `path/<name>`, as the peft package lays them out.
    """
    state = require_state(model)
    names = [name] if name is not None else list(state.deltas)
    for n in names:
        if n not in state.deltas:
            raise DeltaError(f"no delta named {n!r} is attached; attached: {list(state.deltas)}")
    root = Path(path)
    for n in names:
        folder = root if (name is not None or len(names) == 1 or n == "default") else root / n
        delta = state.deltas[n]
        _write_adapter(folder, config_to_file(delta.config), delta_state_dict(model, n), delta.method.peft_compatible)


def _write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor], peft_compatible: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    if not (folder / "README.md").exists():
        library = "peft" if peft_compatible else "deltatune"
        readers = "deltatune and the peft package can load it" if peft_compatible else \
            "deltatune can load it (the peft package has no such method)"
        base = config.get("base_model_name_or_path")
        card = (f"---\nlibrary_name: {library}\n" + (f"base_model: {base}\n" if base else "")
                + f"tags:\n- deltatune\n- {config['peft_type'].lower()}\n---\n\n"
                f"A {config['peft_type']} adapter written by deltatune; {readers}.\n")
        _atomic_write(folder / "README.md", lambda tmp: Path(tmp).write_text(card))


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_adapter(path: str | os.PathLike):
    """(config, tensors) from an adapter folder, with clear errors for missing or damaged files."""
    folder = Path(path)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        subfolders = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file()) if folder.is_dir() else []
        hint = f"; adapters found in subfolders: {subfolders}" if subfolders else ""
        raise DeltaError(f"no {CONFIG_NAME} in {folder}{hint}")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltaError(f"{config_path} is not valid JSON ({err}); the file is corrupted or truncated") from None
    config = config_from_file(data, str(config_path))
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise DeltaError(f"no {WEIGHTS_NAME} in {folder} (only safetensors weights are read)")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise DeltaError(f"{weights_path} cannot be read ({err}); the file is corrupted or truncated") from None
    return config, tensors


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, trainable: bool = False) -> nn.Module:
    """Attach the delta saved in `path` (by deltatune or peft) and load its weights.

    The loaded delta becomes the active one; it is frozen unless trainable=True.
    Files that do not fit the model are refused, and the model is left as it was.
    """
    name = name or "default"
    config, tensors = read_adapter(path)
    overrides = method_of(config).load_overrides
    api.attach(model, config.replace(**overrides), name)
    delta = require_state(model).deltas[name]
    delta.config = delta.config.replace(**{k: getattr(config, k) for k in overrides})  # a re-save writes what was read
    try:
        load_state_into(model, name, tensors, source=str(path))
    except Exception:
        api.detach(model, name)
        raise
    api.set_trainable(model, name, trainable)
    return model


def load_state_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = file_keys(model, name)
    for key, param in expected.items():
        if key not in tensors:
            raise DeltaError(
                f"adapter at {source} does not fit {type(model).__name__}: key {key} is missing from the file "
                f"(the file has {len(tensors)} keys, e.g. {next(iter(tensors), 'none')}); was it saved for another model?"
            )
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise DeltaError(
                f"adapter at {source} does not fit {type(model).__name__}: key {key} has shape "
                f"{list(tensors[key].shape)} in the file but {list(param.shape)} in the model; was it saved for another model?"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise DeltaError(
            f"adapter at {source} does not fit {type(model).__name__}: the file has key {unexpected[0]}"
            f"{f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''}, which this model has no place for"
        )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(param.dtype))
