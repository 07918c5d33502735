"""Shared assertions: a model's complete observable state, and a folder's bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

import deltatune as dt
from deltatune.surgery import DeltaLayer, get_state


def fingerprint(model: torch.nn.Module) -> dict:
    """Everything an operation could change: tensors, flags, module types, active and merged sets."""
    state = get_state(model)
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "active": dt.active(model),
        "deltas": {n: (d.merged, d.trainable) for n, d in state.deltas.items()} if state else {},
        "layers": {n: (tuple(m.active), tuple(m.merged), tuple(m.live)) for n, m in model.named_modules()
                   if isinstance(m, DeltaLayer)},
        "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks)),
    }


def assert_unchanged(model: torch.nn.Module, before: dict, atol: float = 0.0) -> None:
    after = fingerprint(model)
    for key in ("requires_grad", "types", "active", "deltas", "layers", "hooks"):
        assert after[key] == before[key], key
    assert list(after["tensors"]) == list(before["tensors"])
    for key, value in before["tensors"].items():
        if atol:
            torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=atol, msg=key)
        else:
            assert torch.equal(after["tensors"][key], value), key


def folder_bytes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}
