"""Checkpoints: the delta, the optimizer, the scheduler, the RNG states and the data position.

A checkpoint is a folder `checkpoints/step-000120/` written in full under a
temporary name and renamed into place. It holds

    delta.safetensors, delta.json   every attached delta as it trains (unfolded: P-tuning's encoder,
                                    prefix tuning's projection, diff pruning's log-alpha and mask,
                                    AdaLoRA's importance scores; see api.training_state)
    adapter/                        the folded export dt.load reads (train.init_adapter takes it)
    master.safetensors              the fp32 master weights (kahan: the 16-bit compensation buffers) of trainable 16-bit parameters (master.py), when
                                    there are any; the optimizer state is over them
    optimizer.safetensors, rng.safetensors, trainer_state.json
    complete.json                   written last: the size and fingerprint (model_files.fingerprint) of every other file

Resume takes the newest checkpoint whose complete.json is there and whose files match it,
and says which newer ones it skipped and why (a truncated file, a half-deleted folder).
A folder is deleted by renaming it to a `.trash-` name first (files.remove_tree), which resume never reads, so
a kill during the deletion leaves nothing that looks like a checkpoint. Tensors are stored
with safetensors and everything else as JSON: nothing is unpickled on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import api, io as dt_io
from ..config import DeltaError
from ..files import TRASH, folder_bytes, fsync_dir, remove_tree, size_text, tensor_bytes, write_failure, write_new
from ..master import MasterWeights
from ..model_files import fingerprint

STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "complete.json"
MASTER_FILE = "master.safetensors"


class CheckpointSpaceError(DeltaError):
    """A checkpoint could not be written for lack of space or permission (the pipeline reports it as a
    TrainingError); `folder`, `need` (bytes) and `kept` (the newest complete checkpoint) say the rest."""

    def __init__(self, message: str, folder: Path, need: int, kept: Path | None, failure: tuple[str, str]) -> None:
        super().__init__(message)
        self.folder, self.need, self.kept, self.failure = folder, need, kept, failure


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def steps(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every `step-N` folder, oldest first, complete or not."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


@dataclass
class Found:
    """The newest complete checkpoint (None: there is none) and the newer ones skipped, with why."""

    folder: Path | None
    skipped: list[tuple[Path, str]]

    def notes(self) -> list[str]:
        return [f"skipped checkpoint {p}: {why}" for p, why in self.skipped]


def latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete and verified checkpoint."""
    return find(output_dir).folder


def find(output_dir: str | os.PathLike) -> Found:
    skipped = []
    for _, folder in reversed(steps(output_dir)):
        problem = verify(folder)
        if problem is None:
            return Found(folder, skipped)
        skipped.append((folder, problem))
    return Found(None, skipped)


def verify(folder: Path) -> str | None:
    """None when every file listed in complete.json is there with its size and hash; else what is wrong."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the save or a deletion of it was interrupted)"
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MARKER} is damaged"
    for rel, want in listed.items():
        file = folder / rel
        if not file.is_file():
            return f"{rel} is missing"
        size, written = file.stat().st_size, int(str(want).split(":")[0])
        if size != written:
            return f"{rel} is {size} bytes, {written} when it was written (truncated or changed)"
        if fingerprint(file) != want:
            return f"{rel} does not hash to what was written (changed or damaged)"
    return None


def clear_leftovers(root: Path) -> None:
    """What a killed save or deletion left behind: temporary and trash folders."""
    if not root.is_dir():
        return
    for leftover in list(root.glob(".step-*.tmp-*")) + list(root.glob(f"{TRASH}*")):
        shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(output_dir: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep_last: int, master: MasterWeights | None = None) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    clear_leftovers(root)
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp-{secrets.token_hex(4)}"
    delta_tensors, delta_meta = api.training_state(model)
    opt_tensors, skeleton = _flatten_optimizer(optimizer.state_dict())
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    record = {**state, "step": step, "optimizer": skeleton, "scheduler": scheduler.state_dict(),
              "python_random": _jsonable(random.getstate())}
    try:
        tmp.mkdir()
        dt_io.save(model, tmp / "adapter")
        save_file(delta_tensors, str(tmp / "delta.safetensors"))
        _write_text(tmp / "delta.json", json.dumps(delta_meta, indent=1))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        if master is not None and len(master):
            save_file(master.state_dict(), str(tmp / MASTER_FILE))
        save_file(rng, str(tmp / "rng.safetensors"))
        _write_text(tmp / "trainer_state.json", json.dumps(record, indent=1))
        files = {}
        for file in sorted(tmp.rglob("*")):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
                files[file.relative_to(tmp).as_posix()] = fingerprint(file)
        _write_text(tmp / MARKER, json.dumps({"step": step, "files": files}, indent=1))  # last: the folder is complete
        fsync_dir(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(err)
        if failure is None:
            raise
        kept = latest(output_dir)
        # the previous checkpoint's size when there is one; else the tensors, twice (the export is about the delta's size)
        need = folder_bytes(kept) or tensor_bytes((*delta_tensors.values(), *delta_tensors.values(), *opt_tensors.values()))
        raise CheckpointSpaceError(
            f"step {step}: {failure[0]}: writing checkpoint {final} needs about {size_text(need)} "
            f"(the delta's training state, the optimizer state and the adapter export); the partial checkpoint was "
            f"removed and the earlier checkpoints stay valid{f' (the newest is {kept})' if kept else ''}. "
            f"{failure[1].capitalize()}{' (or lower train.keep_last)' if 'space' in failure[1] else ''} and resume with "
            "--train.resume true",
            folder=final, need=need, kept=kept, failure=failure) from None
    if final.exists():  # the same step saved again (a resumed run): replace it
        remove_tree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    for _, old in steps(output_dir)[:-keep_last]:
        remove_tree(old)
    return final


def load_checkpoint(folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore the optimizer, scheduler and RNG states; returns the trainer state (step, data position, ...)."""
    record = read_record(folder)
    optimizer.load_state_dict(_unflatten_optimizer(_tensors(folder / "optimizer.safetensors"), record.pop("optimizer")))
    scheduler.load_state_dict(record.pop("scheduler"))
    rng = _tensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tuples(record.pop("python_random")))
    return record


def load_master(folder: Path, master: MasterWeights, say: Any = print) -> None:
    """The fp32 master weights a checkpoint holds, and the 16-bit weights rounded from them. A checkpoint
    without them (another train.master_weights, an older deltatune) leaves the masters at the 16-bit weights."""
    if not len(master):
        return
    path = folder / MASTER_FILE
    if not path.is_file():
        kind = "Kahan compensation buffers" if master.comps else "fp32 master weights"
        say(f"{folder} holds no {kind} (written with another train.master_weights, or by an older "
            "deltatune): they start from its 16-bit weights, so training continues close to, not bit-equal "
            "with, a run that kept them")
        return
    master.load_state_dict(_tensors(path), str(path))


def load_delta(folder: Path, model: torch.nn.Module) -> None:
    """Put every attached delta back as it was when the checkpoint was written (attach it the same way first)."""
    meta_path = folder / "delta.json"
    if not meta_path.is_file():
        raise DeltaError(f"{folder} holds no delta.json (a checkpoint of an older deltatune, which kept only the "
                         "folded adapter): resume cannot continue it exactly; start the run again with "
                         f"--output.overwrite true, or continue from it with --train.init_adapter {folder}")
    api.load_training_state(model, _tensors(folder / "delta.safetensors"), json.loads(meta_path.read_text()), str(folder))


def read_record(folder: Path) -> dict[str, Any]:
    path = folder / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeltaError(f"{path} cannot be read ({err}); the checkpoint is damaged: resume from an earlier one "
                         "(delete this folder) or start again with --output.overwrite true") from None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DeltaError(f"{path} cannot be read ({err}); the checkpoint is damaged: resume from an earlier one "
                         "(delete this folder) or start again with --output.overwrite true") from None


def _write_text(path: Path, text: str) -> None:
    write_new(path, lambda f: f.write(text.encode()))


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
