"""Saving and loading deltas: adapter_config.json + adapter_model.safetensors.

The files are the peft package's (see formats/peft.py), so adapters move both
ways. Weights are only ever read with safetensors; nothing is unpickled.

A save is one transaction over the two files. Both are first written in full
under temporary names (and fsynced); the weights carry, in their safetensors
metadata, the SHA-256 of the config text they belong with. Then the weights are
renamed into place (the commit point) and the config after them. A process
killed at any moment leaves either the old pair, or the new pair, or the new
weights beside the old config with the new config still waiting under its
temporary name: `load` sees that the config's hash is not the one the weights
name, finds the waiting config that matches, and reads the new adapter (the next
`save` into the folder completes the rename and clears other leftovers). So a
reader gets exactly the old adapter or exactly the new one, never a mix. A pair
that disagrees with no waiting config to explain it (a config edited by hand,
one file copied over from elsewhere) is a clear error naming both files.

A delta whose Method says folder="model" (full fine-tuning) is saved as the whole
model in transformers' own layout instead; see model_files.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import api, model_files
from .files import fsync_dir, fsync_file, write_atomic, write_new
from .config import DeltaError, method_of
from .formats.peft import PREFIX, config_from_file, config_to_file, key_prefix, saved_key
from .surgery import base_state_dict, get_state, require_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
# safetensors metadata key: SHA-256 of the adapter_config.json text saved with these weights
PAIR_KEY = "deltatune_config_sha256"


def file_keys(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Delta `name`'s parameters under the keys its adapter file uses (peft's names)."""
    delta = require_state(model).deltas[name]
    containers = tuple(delta.method.containers) + ("modules_to_save",)
    prefix = key_prefix(delta.method.kind)
    return {saved_key(path, name, containers, prefix): p for path, p in api.delta_parameters(model, name).items()}


def delta_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Delta `name`'s tensors as its file holds them: file keys, detached, contiguous, on the CPU."""
    delta = require_state(model).deltas[name]
    # An inactive selective delta keeps its trained values aside; the live parameters hold the originals.
    stashed = {id(p): delta.stash[n] for n, p in delta.selected.items()} if delta.stash is not None else {}
    # a copy: safetensors refuses tensors that share storage (tied or aliased weights)
    tensors = {key: stashed.get(id(p), p.detach()).to("cpu", copy=True).contiguous() for key, p in file_keys(model, name).items()}
    for key, (param, _) in delta.base_originals.items():  # base tensors the delta's file overrode, as peft saved them
        tensors[key] = param.detach().to("cpu", copy=True).contiguous()
    if delta.method.to_file is not None:
        tensors = delta.method.to_file(model, name, delta.config, tensors)
    return tensors


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None, *, relative_to_original: bool = False) -> None:
    """Write delta `name` into `path`; with name=None, every attached delta.

    With several deltas, the one named "default" goes in `path` and each other in
    `path/<name>`, as the peft package lays them out. Each folder is written as one
    transaction (see the module docstring).

    relative_to_original=True writes a delta that rewrote base weights when it was
    built (LoRA with init="pissa" or "olora") as an equivalent plain delta on the
    original weights (a LoRA of rank 2r), which loads onto the unmodified base model
    and mixes with other adapters; deltas that rewrote nothing are written as they are.
    """
    state = require_state(model)
    if not isinstance(path, (str, os.PathLike)):
        raise DeltaError(f"save expects a folder path, got {type(path).__name__}")
    if not isinstance(relative_to_original, bool):
        raise DeltaError(f"save expects relative_to_original=True or False, got {relative_to_original!r}")
    names = [api._one_name(state, name)] if name is not None else list(state.deltas)
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise DeltaError(f"cannot save into {root}: it is a file, not a folder")
    # everything is computed before anything is written
    plan = []
    for n in names:
        folder = root if (name is not None or len(names) == 1 or n == "default") else root / n
        delta = state.deltas[n]
        _check_layout(folder, delta.method.folder)
        if delta.method.folder == "model":
            if not callable(getattr(type(model), "save_pretrained", None)):
                raise DeltaError(f"a {delta.method.name} delta is saved as a transformers model folder, and "
                                 f"{type(model).__name__} has no save_pretrained; save model.state_dict() yourself")
            plan.append((folder, delta, config_to_file(delta.config), model_state_dict(model, n), delta.method.peft_compatible))
        else:
            config, tensors = delta.config, delta_state_dict(model, n)
            if relative_to_original and delta.rewrites:
                if delta.method.to_original_base is None:
                    raise DeltaError(f"delta {n!r} ({delta.method.name}) rewrote base weights and cannot be written "
                                     "relative to the original ones; save it without relative_to_original")
                config, tensors = delta.method.to_original_base(model, n, config, tensors)
            file_config = config_to_file(config)
            # a variant of a peft method with a layout of its own (its own peft_type) is for deltatune only
            peft_compatible = delta.method.peft_compatible and file_config["peft_type"] == type(config).peft_type
            plan.append((folder, delta, file_config, tensors, peft_compatible))
    for folder, delta, config, tensors, peft_compatible in plan:
        if delta.method.folder == "model":
            model_files.write(folder, model, config, tensors)
            _write_card(folder, config, peft_compatible, whole_model=True)
        else:
            _write_adapter(folder, config, tensors, peft_compatible)


def _check_layout(folder: Path, layout: str) -> None:
    """An adapter folder and a model folder never share a folder: from_pretrained would hand the model to peft."""
    if layout == "model" and (folder / CONFIG_NAME).exists():
        raise DeltaError(f"{folder} holds an adapter ({CONFIG_NAME}); a whole-model save cannot go there (transformers "
                         "would read the folder as a peft adapter): choose another folder")
    if layout == "adapter" and model_files.is_model_folder(folder):
        raise DeltaError(f"{folder} holds a whole-model save ({model_files.MARKER}); an adapter cannot go there: "
                         "choose another folder")


def model_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The whole model under its own keys (as save_pretrained writes it) with delta `name`'s trained values in
    place, other unmerged deltas left out. Tied names share one tensor, so save_pretrained writes it once."""
    delta = require_state(model).deltas[name]
    out, _ = base_state_dict(model)
    stashed = {id(p): delta.stash[n] for n, p in delta.selected.items()} if delta.stash is not None else {}
    containers = tuple(delta.method.containers) + ("modules_to_save",)
    aliases: dict[int, list[str]] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(path)
    for p in api.delta_parameters(model, name).values():
        value = stashed.get(id(p), p.detach())
        for path in aliases[id(p)]:
            key = saved_key(path, name, containers, prefix="")
            if key in out and value.dtype != out[key].dtype:
                value = value.to(out[key].dtype)  # a head kept whole trains in fp32 over a half-precision base
            out[key] = value
    return out


def _write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor], peft_compatible: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(folder)
    text = json.dumps(config, indent=2, sort_keys=True)
    token = secrets.token_hex(6)
    tmp_config, tmp_weights = folder / f".{CONFIG_NAME}.{token}.tmp", folder / f".{WEIGHTS_NAME}.{token}.tmp"
    committed = False
    try:
        write_new(tmp_config, lambda f: f.write(text.encode()))
        save_file(tensors, str(tmp_weights), metadata={"format": "pt", PAIR_KEY: _digest(text.encode())})
        os.chmod(tmp_weights, stat.S_IMODE(tmp_config.stat().st_mode))  # safetensors creates it 0600
        fsync_file(tmp_weights)
        os.replace(tmp_weights, folder / WEIGHTS_NAME)  # the commit point
        committed = True
        os.replace(tmp_config, folder / CONFIG_NAME)
    except BaseException:
        if committed and tmp_config.exists():  # roll forward: the new weights are in place
            os.replace(tmp_config, folder / CONFIG_NAME)
        for tmp in (tmp_config, tmp_weights):
            if tmp.exists():
                tmp.unlink()
        raise
    finally:
        fsync_dir(folder)
    _write_card(folder, config, peft_compatible)


# a card exactly as _write_card writes it: a later save into the folder rewrites it to describe what is there now
# (a BitFit run over a LoRA one must not leave "A LORA adapter"); a card someone wrote or edited is left alone
_OWN_CARD = re.compile(r"---\nlibrary_name: \S+\n(?:base_model: [^\n]*\n)?tags:\n- deltatune\n- \S+\n---\n\n"
                       r"A \S+ [^\n]* written by deltatune; [^\n]*\.\n")


def _write_card(folder: Path, config: dict, peft_compatible: bool, whole_model: bool = False) -> None:
    card_path = folder / CARD_NAME
    try:
        if card_path.exists() and not _OWN_CARD.fullmatch(card_path.read_text(encoding="utf-8")):
            return
    except (OSError, UnicodeDecodeError):
        return  # not a card deltatune wrote
    library = "peft" if peft_compatible else "transformers" if whole_model else "deltatune"
    if whole_model:
        what = "model (every weight, in transformers' own layout)"
        readers = ("transformers' from_pretrained loads it as a plain model, and deltatune's load attaches it as a "
                   f"delta ({model_files.MARKER} holds its config); the peft package cannot read it, it is not an adapter")
    else:
        what = "adapter"
        readers = ("deltatune and the peft package can load it" if peft_compatible
                   else "deltatune can load it (the peft package has no such method)")
    base = config.get("base_model_name_or_path")
    card = (f"---\nlibrary_name: {library}\n" + (f"base_model: {base}\n" if base else "")
            + f"tags:\n- deltatune\n- {str(config['peft_type']).lower()}\n---\n\n"
            f"A {config['peft_type']} {what} written by deltatune; {readers}.\n")
    write_atomic(card_path, card.encode())


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pair_digest(weights_path: Path) -> str | None:
    """The config hash the weights were saved with (None for files not written by deltatune)."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return (f.metadata() or {}).get(PAIR_KEY)
    except (SafetensorError, OSError, ValueError):
        return None


def _waiting_config(folder: Path, digest: str) -> Path | None:
    """The temporary config of an interrupted save whose weights are already in place."""
    for tmp in sorted(folder.glob(f".{CONFIG_NAME}.*.tmp")):
        if _digest(tmp.read_bytes()) == digest:
            return tmp
    return None


def finish_interrupted_save(folder: Path) -> None:
    """Complete a save that was killed between its two renames; remove every other leftover."""
    weights = folder / WEIGHTS_NAME
    digest = _pair_digest(weights) if weights.is_file() else None
    config = folder / CONFIG_NAME
    if digest is not None and (not config.is_file() or _digest(config.read_bytes()) != digest):
        waiting = _waiting_config(folder, digest)
        if waiting is not None:
            os.replace(waiting, config)
    for pattern in (f".{CONFIG_NAME}.*.tmp", f".{WEIGHTS_NAME}.*.tmp", f".{CARD_NAME}.*.tmp"):
        for leftover in folder.glob(pattern):
            leftover.unlink(missing_ok=True)


def read_adapter(path: str | os.PathLike, verify: bool = True):
    """(config, tensors) from an adapter folder, with clear errors for missing, damaged or mismatched files.

    A whole-model folder (model_files.py) gives its tensors under the model's own keys.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise DeltaError(f"expected an adapter folder path, got {type(path).__name__}")
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise DeltaError(f"no adapter folder at {folder}" + (" (it is a file; pass its folder)" if folder.exists() else ""))
    if not config_path.is_file() and model_files.is_model_folder(folder):
        data = model_files.read_marker(folder, verify=verify)
        config = config_from_file(data, str(folder / model_files.MARKER))
        if method_of(config).folder != "model":
            raise DeltaError(f"{folder / model_files.MARKER} names a {config.peft_type} delta, which is saved as an "
                             f"adapter ({CONFIG_NAME}), not as a whole model; the folder was edited by hand")
        return config, model_files.read_weights(folder)
    if not weights_path.is_file():
        if (folder / "config.json").is_file() and ((folder / model_files.WEIGHTS).is_file() or (folder / model_files.INDEX).is_file()):
            raise DeltaError(f"{folder} is a transformers model folder, not a delta (it has no {CONFIG_NAME} and no "
                             f"{model_files.MARKER}); load it with from_pretrained")
        if config_path.is_file():
            raise DeltaError(f"no {WEIGHTS_NAME} in {folder} (only safetensors weights are read; nothing is unpickled)")
        subfolders = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
        hint = f"; adapters found in subfolders: {subfolders}" if subfolders else ""
        raise DeltaError(f"no {CONFIG_NAME} in {folder}{hint}")
    digest = _pair_digest(weights_path)
    config_bytes = config_path.read_bytes() if config_path.is_file() else None
    if digest is not None and (config_bytes is None or _digest(config_bytes) != digest):
        waiting = _waiting_config(folder, digest)
        if waiting is not None:  # a save was interrupted after its commit point: this is its config
            config_bytes = waiting.read_bytes()
        elif verify and _parses(config_bytes):
            raise DeltaError(
                f"{weights_path} and {config_path} do not belong together: the weights were saved with a different "
                f"adapter_config.json (SHA-256 {digest[:12]}...). One of them was replaced or edited after the save, or "
                "the folder mixes two saves; save the adapter again, or pass verify=False to read them anyway"
            )
    if config_bytes is None:
        raise DeltaError(f"no {CONFIG_NAME} in {folder}")
    try:
        data = json.loads(config_bytes.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltaError(f"{config_path} is not valid JSON ({err}); the file is corrupted or truncated") from None
    if not isinstance(data, dict):
        raise DeltaError(f"{config_path} holds a JSON {type(data).__name__}, not an object; it is not an adapter config")
    config = config_from_file(data, str(config_path))
    if method_of(config).folder == "model":
        raise DeltaError(f"{config_path} names a {config.peft_type} delta, which is saved as a whole model with "
                         f"{model_files.MARKER}, never as an adapter; the folder was edited by hand")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise DeltaError(f"{weights_path} cannot be read ({err}); the file is corrupted or truncated") from None
    return config, tensors


def _parses(data: bytes | None) -> bool:
    try:
        json.loads((data or b"").decode())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return data is not None


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, trainable: bool = False,
         verify: bool = True) -> nn.Module:
    """Attach the delta saved in `path` (by deltatune or peft) and load its weights.

    The file's config decides everything, the task type and the modules kept whole
    included (nothing is inferred from the model class). The loaded delta becomes
    active beside any merged ones; it is frozen unless trainable=True. Files that do
    not fit the model are refused, and the model is left exactly as it was.
    """
    name = "default" if name is None else name
    get_state(model)  # a clear error for something that is not a model, before any file is read
    if not isinstance(trainable, bool):
        raise DeltaError(f"load expects trainable=True or False, got {trainable!r}")
    config, tensors = read_adapter(path, verify=verify)
    method = method_of(config)
    overrides = method.load_overrides(config) if callable(method.load_overrides) else method.load_overrides
    state = get_state(model)
    snapshot = api._Snapshot.take(model, state) if state is not None and state.deltas else None
    delta = api._attach(model, config.replace(**overrides), name, infer_task=False, activate=False)
    state = require_state(model)
    try:
        # a re-save writes what was read; fields never written (an inference-mode flag) keep the value attach saw
        written = {f.name for f in dataclasses.fields(config) if f.metadata.get("serialise", True)}
        delta.config = delta.config.replace(**{k: getattr(config, k) for k in overrides if k in written})
        if method.folder == "model":
            tensors = _from_model_keys(model, name, tensors)
        if method.from_file is not None:
            tensors = method.from_file(model, name, delta.config, tensors)
        load_state_into(model, name, tensors, source=str(path))
        delta.trainable = trainable
        api._apply_active(model, state, state.merged() + [name])
    except BaseException:
        api._remove(model, name, keep=False)
        if snapshot is not None:
            snapshot.restore(model, state)
        raise
    return model


def load_state_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Check every key and shape first, then copy; a base weight the file carries must match or is loaded in."""
    expected = file_keys(model, name)
    where = f"adapter at {source} does not fit {type(model).__name__}"
    for key, param in expected.items():
        if key not in tensors:
            raise DeltaError(
                f"{where}: key {key} is missing from the file "
                f"(the file has {len(tensors)} keys, e.g. {next(iter(tensors), 'none')}); was it saved for another model?"
            )
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise DeltaError(
                f"{where}: key {key} has shape {list(tensors[key].shape)} in the file but {list(param.shape)} in the "
                "model; was it saved for another model?"
            )
    base = _base_tensors(model, name, set(tensors) - set(expected))
    unexpected = sorted(set(tensors) - set(expected) - set(base))
    if unexpected:
        raise DeltaError(
            f"{where}: the file has key {unexpected[0]}"
            f"{f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''}, which this model has no place for"
        )
    for key, param in base.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise DeltaError(f"{where}: base weight {key} has shape {list(tensors[key].shape)} in the file but "
                             f"{list(param.shape)} in the model")
    delta = require_state(model).deltas[name]
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(param.dtype))
        for key, param in base.items():
            value = tensors[key].to(device=param.device, dtype=param.dtype)
            if not torch.equal(value, param):  # a changed base (say, an extended vocabulary): load it, keep the original
                delta.base_originals[key] = (param, param.detach().clone())
                param.copy_(value)


def _from_model_keys(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole-model file's tensors under the keys delta `name` expects: a tied weight is saved under one of its
    names, whichever save_pretrained kept; the model's buffers are not the delta's and are skipped."""
    expected = file_keys(model, name)
    containers = tuple(require_state(model).deltas[name].method.containers) + ("modules_to_save",)
    key_of: dict[int, str] = {id(p): key for key, p in expected.items()}
    by_name: dict[str, str] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        if id(p) in key_of:
            by_name.setdefault(saved_key(path, name, containers, prefix=""), key_of[id(p)])
    buffers = {saved_key(path, name, containers, prefix="") for path, _ in model.named_buffers()}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key in by_name:
            out.setdefault(by_name[key], value)
        elif key not in buffers:
            out[PREFIX + key] = value  # no place for it: load_state_into names it
    return out


def _base_tensors(model: nn.Module, name: str, keys: set[str]) -> dict[str, nn.Parameter]:
    """Keys that name a wrapped module's base weight (`...embed_tokens.base_layer.weight`), as peft's
    save_embedding_layers writes them for embedding LoRA, by the parameter they name."""
    params = dict(model.named_parameters())
    found = {}
    for key in keys:
        if key.startswith(PREFIX) and ".base_layer." in key and key[len(PREFIX):] in params:
            found[key] = params[key[len(PREFIX):]]
    return found
