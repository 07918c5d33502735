"""The reference model of the preference stages (DPO, KTO, GRPO with beta > 0): pi_ref, what the policy is
compared with.

Two sources, one interface (`reference(model)`, a context that yields the module to run the reference forward on):

- a delta method (LoRA, IA3, prompts, ...): the policy itself with its delta switched off (`dt.disabled`). No second
  copy of the weights is held, which is the memory win of training a delta; this stays the path for every method
  that can switch its delta off.
- a method that trains the base weights themselves (kind "select": full, freeze, bitfit): switching off would
  leave the trained weights, so the run holds a separate frozen copy, the base loaded again from model.name
  through the same loader as the policy (dtype, quantisation, attention; then the policy's device). It is in
  eval mode, requires no gradients, is never stepped and is no submodule of the policy, so neither checkpoints
  nor the adapter ever hold it. Since it is re-read from the files on disk, a resumed run gets the same
  reference as the run it continues (a copy of the policy made at the resumed step would be the trained
  weights: wrong).

The copy reaches the stages' losses through a small registry keyed by the policy (weakly, so it goes with the
model): train.run and evaluate `hold` it, a stage asks `reference(model)`. The loss signature stays
(forward, model, batch, config), and the copy cannot end up in the policy's state_dict or parameters, as an
attribute set on the module would. Planning: `needs_copy(config)` says whether a run holds one, and the memory
plan counts it (planner.Setting.reference).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from ... import api
from ...config import METHODS, DeltaError, method_of
from ...surgery import get_state

if TYPE_CHECKING:
    from ..config import RunConfig
    from . import Stage


@dataclass
class _Held:
    load: Callable[[], torch.nn.Module]  # called once, on first use: an evaluation that never asks loads nothing
    copy: torch.nn.Module | None = None

    def get(self) -> torch.nn.Module:
        if self.copy is None:
            self.copy = self.load()
        return self.copy


_held: "weakref.WeakKeyDictionary[torch.nn.Module, _Held]" = weakref.WeakKeyDictionary()


def needs_copy(config: "RunConfig") -> bool:
    """Whether a run holds a separate reference copy: its stage compares the policy with a reference, and its
    method trains the base weights, so no delta can be switched off to get the reference back."""
    from . import active_stage

    stage = active_stage(config)
    return (stage is not None and stage.reference is not None and stage.reference(config)
            and method_of(config.delta).kind == "select")


def needs_copy_by_default(stage: "Stage", method: str) -> bool:
    """`needs_copy` for a plan made before any config is read (`deltatune plan --stage dpo --method full`): the
    stage with its default settings (dpo: sigmoid, so yes; grpo: beta 0, so no) and `method`."""
    from types import SimpleNamespace

    if stage.reference is None or method not in METHODS or METHODS[method].kind != "select":
        return False
    defaults = SimpleNamespace(stage_settings={stage.name: stage.settings()} if stage.settings is not None else {})
    return bool(stage.reference(defaults))


def trains_base(model: torch.nn.Module) -> bool:
    """Whether `model` carries a delta that trains its base weights (whose reference is a separate copy)."""
    state = get_state(model)
    return state is not None and any(d.method.kind == "select" for d in state.deltas.values())


def load_reference(config: "RunConfig", tokenizer: Any, device: torch.device | str | None = None) -> torch.nn.Module:
    """The base of the run loaded again, frozen, in eval mode, on `device` (a quantised base stays where its
    loader put it, as the policy does)."""
    from ..train import load_base  # train imports the stages: imported here, when a run asks

    # load_base seeds the global generator (for a fresh head); the run's own stream is left as it was
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        copy = load_base(config, tokenizer)
    if config.model.quant is not None:
        from ...quant import prepare_kbit

        # the policy's norms and head go to fp32 for a quantised base (prepare_kbit); the same here, so that the
        # two compute alike and agree exactly before the first update
        prepare_kbit(copy, gradient_checkpointing=False)
    elif device is not None:
        copy.to(device)
    copy.eval()
    copy.requires_grad_(False)
    return copy


def hold(model: torch.nn.Module, load: Callable[[], torch.nn.Module]) -> None:
    """Make `load()`'s model the reference of `model`; loaded on the first `reference(model)` (or `copy_of`)."""
    _held[model] = _Held(load)


def release(model: torch.nn.Module) -> None:
    _held.pop(model, None)


def copy_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The separate reference held for `model` (loaded now if it was not yet), or None when none is held."""
    entry = _held.get(model)
    return None if entry is None else entry.get()


def is_held(model: torch.nn.Module) -> bool:
    return model in _held


@contextlib.contextmanager
def reference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module whose forward is the reference of `model`: the separate copy held for it, else the model with
    its delta switched off; a model with no delta (`deltatune eval` of the base alone) is its own reference. Run
    it under no_grad, calling the yielded module itself, not a DistributedDataParallel wrapper: nothing of the
    reference is reduced."""
    copy = copy_of(model)
    if copy is not None:
        yield copy
        return
    state = get_state(model)
    if state is None or not state.deltas:
        yield model
        return
    if trains_base(model):
        raise DeltaError("this model's delta trains its base weights (full, freeze or bitfit), so switching it off "
                         "gives no reference; hold a separate copy of the base first: "
                         "deltatune.pipeline.stages.reference.hold(model, lambda: load_reference(config, tokenizer))")
    with api.disabled(model):
        yield model


@contextlib.contextmanager
def ready(model: torch.nn.Module, config: "RunConfig", tokenizer: Any) -> Iterator[None]:
    """Within the block a model that trains its base weights has its reference at hand (loaded when first asked
    for, released at the end), unless one is held already (training's own evaluations). What `deltatune eval`
    of a full or bitfit run's weights needs, with nothing to do for any other model."""
    if not trains_base(model) or is_held(model):
        yield
        return
    device = next(model.parameters()).device
    hold(model, lambda: load_reference(config, tokenizer, device))
    try:
        yield
    finally:
        release(model)
