"""Checkpoints: the delta, the optimizer, the scheduler, the RNG states and the data position.

A checkpoint is a folder `checkpoints/step-000120/` written in full under a
temporary name and renamed into place, so it exists complete or not at all; the
newest complete one is what `resume` continues from. Tensors are stored with
safetensors and everything else as JSON: nothing is unpickled on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import io as dt_io

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest(output_dir: str | os.PathLike) -> Path | None:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    return found[-1][1] if found else None


def save_checkpoint(output_dir: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep_last: int) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".step-*.tmp-*"):  # what a killed save left behind
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    dt_io.save(model, tmp / "adapter")
    tensors, skeleton = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    record = {**state, "step": step, "optimizer": skeleton, "scheduler": scheduler.state_dict(),
              "python_random": _jsonable(random.getstate())}
    (tmp / "trainer_state.json").write_text(json.dumps(record, indent=1))
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    if final.exists():  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    for _, old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore the optimizer, scheduler and RNG states; returns the trainer state (step, data position, ...)."""
    record = json.loads((folder / "trainer_state.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), record.pop("optimizer")))
    scheduler.load_state_dict(record.pop("scheduler"))
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tuples(record.pop("python_random")))
    return record


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """Only the optimizer state of a checkpoint (continued training on new data starts its own schedule)."""
    record = json.loads((folder / "trainer_state.json").read_text())
    saved = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), record["optimizer"])
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        saved_group.update({k: group[k] for k in ("lr", "initial_lr") if k in group})  # this run's learning rate
    optimizer.load_state_dict(saved)


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, Any] = {"param_groups": state_dict["param_groups"], "state": {}}
    for index, values in state_dict["state"].items():
        skeleton["state"][str(index)] = {key: _flatten_value(f"{index}.{key}", value, tensors) for key, value in values.items()}
    return tensors, skeleton


def _flatten_value(name: str, value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A tensor becomes {"tensor": name}; a dict of them (bitsandbytes' 8-bit states) {"nested": {...}}."""
    if torch.is_tensor(value):
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict) and any(torch.is_tensor(v) or isinstance(v, dict) for v in value.values()):
        return {"nested": {k: _flatten_value(f"{name}.{k}", v, tensors) for k, v in value.items()}}
    return value


def _unflatten_value(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "tensor" in value:
        return tensors[value["tensor"]]
    if isinstance(value, dict) and "nested" in value:
        return {k: _unflatten_value(v, tensors) for k, v in value["nested"].items()}
    return value


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    state = {int(index): {k: _unflatten_value(v, tensors) for k, v in values.items()}
             for index, values in skeleton["state"].items()}
    return {"state": state, "param_groups": skeleton["param_groups"]}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"tuple": [_jsonable(v) for v in value]}
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_tuples(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_tuples(v) for v in value]
    return value
