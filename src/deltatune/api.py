"""The life of a delta: attach, switch, merge, unmerge, detach, disable.

Every function works in place on a plain transformers model and dispatches on
the method's kind ("wrap", "input", "select"); no method needs a special case here.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch.nn as nn

from .config import DeltaConfig, DeltaError, method_of
from .inputs import ensure_hooks
from .surgery import (
    Delta,
    delta_layers,
    drop_state,
    get_state,
    remove_from_layers,
    remove_root_parameters,
    require_state,
    restore_selected,
    swap_selected,
    wrap_modules_to_save,
)

CLASSIFIER_HEADS = ("classifier", "score")  # heads a sequence classifier trains whole (peft's choice too)


def infer_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if cls.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and (
        cls.endswith("ForConditionalGeneration") or cls.endswith("Seq2SeqLM")
    ):
        return "SEQ_2_SEQ_LM"
    return None


def attach(model: nn.Module, config: DeltaConfig, name: str = "default") -> nn.Module:
    """Inject a delta into `model` in place, freeze everything else, make it the active delta.

    Returns the same model object, so generate(), save_pretrained() and
    transformers.Trainer keep working.
    """
    if not isinstance(config, DeltaConfig):
        raise DeltaError(f"attach expects a deltatune config (LoraConfig, ...), got {type(config).__name__}")
    method = method_of(config)
    state = get_state(model, create=True)
    if name in state.deltas:
        raise DeltaError(f"a delta named {name!r} is already attached; pass another name=..., or detach it first")
    if not state.deltas:
        state.original_requires_grad = {p: p.requires_grad for p in model.parameters()}
    task_type = config.task_type or infer_task_type(model)
    modules_to_save = list(config.modules_to_save or ())
    if task_type == "SEQ_CLS":
        modules_to_save += [h for h in CLASSIFIER_HEADS if h not in modules_to_save]
    base_name = config.base_model_name_or_path or getattr(model, "name_or_path", None) or None
    config = config.replace(task_type=task_type, modules_to_save=modules_to_save or None, base_model_name_or_path=base_name)
    state.deltas[name] = Delta(config=config, method=method)
    try:
        wrap_modules_to_save(model, name, config, optional=CLASSIFIER_HEADS)
        state.deltas[name].config = method.attach(model, config, name) or config
    except Exception:
        _remove(model, name, keep=False)
        raise
    ensure_hooks(model)
    set_active(model, [name])
    return model


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Choose which attached deltas the forward uses (and which train). [] runs the bare base."""
    state = require_state(model)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.deltas]
    if unknown:
        raise DeltaError(f"no delta named {unknown[0]!r} is attached; attached: {list(state.deltas)}")
    state.active = names
    for _, layer in delta_layers(model):
        layer.set_active(names)
    for name, delta in state.deltas.items():
        if delta.method.kind == "select":
            swap_selected(delta, active=name in names)
    _refresh_trainable(model)


def active(model: nn.Module) -> list[str]:
    state = get_state(model)
    return list(state.active) if state else []


def attached(model: nn.Module) -> dict[str, DeltaConfig]:
    state = get_state(model)
    return {n: d.config for n, d in state.deltas.items()} if state else {}


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    require_state(model).deltas[name].trainable = trainable
    _refresh_trainable(model)


def _refresh_trainable(model: nn.Module) -> None:
    state = require_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in state.active:
        if state.deltas[name].trainable:
            for p in delta_parameters(model, name).values():
                p.requires_grad_(True)


def delta_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters that make up delta `name`, by their current name in the model."""
    state = require_state(model)
    if name not in state.deltas:
        raise DeltaError(f"no delta named {name!r} is attached; attached: {list(state.deltas)}")
    delta = state.deltas[name]
    containers = set(delta.method.containers) | {"modules_to_save"}
    selected = {id(p) for p in delta.selected.values()}
    out = {}
    for path, p in model.named_parameters():
        parts = path.split(".")
        if id(p) in selected or any(parts[i] in containers and parts[i + 1] == name for i in range(len(parts) - 1)):
            out[path] = p
    return out


def _names(model: nn.Module, name: str | None, default: list[str]) -> list[str]:
    state = require_state(model)
    if name is None:
        return default
    if name not in state.deltas:
        raise DeltaError(f"no delta named {name!r} is attached; attached: {list(state.deltas)}")
    return [name]


def merge(model: nn.Module, name: str | None = None) -> None:
    """Fold delta `name` (default: the active ones) into the base weights. Idempotent."""
    state = require_state(model)
    for n in _names(model, name, list(state.active)):
        delta = state.deltas[n]
        if not delta.method.mergeable:
            raise DeltaError(f"{n!r} is a {delta.method.name} delta, which adds inputs rather than weights and cannot be merged")
        for _, layer in delta_layers(model):
            layer.merge(n)


def unmerge(model: nn.Module, name: str | None = None) -> None:
    """Take merged delta `name` (default: every merged one) back out of the base weights."""
    merged_anywhere = list(dict.fromkeys(n for _, layer in delta_layers(model) for n in layer.merged))
    for n in _names(model, name, merged_anywhere):
        for _, layer in delta_layers(model):
            layer.unmerge(n)


_merge = merge  # detach's `merge` flag shadows the function


def detach(model: nn.Module, name: str | None = None, merge: bool = False) -> nn.Module:
    """Remove delta `name` (default: all) and restore the original modules.

    merge=True keeps its effect in the base weights (merge-and-unload); otherwise the
    base is restored exactly as it was before attach.
    """
    state = require_state(model)
    for n in _names(model, name, list(state.deltas)):
        if merge:
            _merge(model, n)
        _remove(model, n, keep=merge)
    return model


def _remove(model: nn.Module, name: str, keep: bool) -> None:
    state = get_state(model)
    delta = state.deltas[name]
    remove_from_layers(model, name, keep_merged=keep)
    for container in delta.method.containers if delta.method.kind == "input" else ():
        remove_root_parameters(model, container, name)
    if delta.method.kind == "select":
        restore_selected(delta, keep_trained=keep)
    del state.deltas[name]
    state.active = [n for n in state.active if n != name]
    if state.deltas:
        _refresh_trainable(model)
    else:
        for p, flag in state.original_requires_grad.items():
            p.requires_grad_(flag)
        drop_state(model)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block; merged deltas are unmerged for its duration."""
    state = require_state(model)
    previous = list(state.active)
    merged = list(dict.fromkeys(n for _, layer in delta_layers(model) for n in layer.merged))
    for n in merged:
        unmerge(model, n)
    set_active(model, [])
    try:
        yield model
    finally:
        set_active(model, previous)
        for n in merged:
            for _, layer in delta_layers(model):
                layer.merge(n)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Every forward inside the block runs row i with adapter adapter_names[i] ("__base__": none).

    The same as passing adapter_names=[...] to the model's forward, for callers that
    cannot pass it, such as generate().
    """
    state = require_state(model)
    unknown = [n for n in adapter_names if n != "__base__" and n not in state.deltas]
    if unknown:
        raise DeltaError(f"adapter_names names {unknown[0]!r}, which is not attached; attached: {list(state.deltas)}")
    state.pinned_batch_adapters = list(adapter_names)
    try:
        yield model
    finally:
        state.pinned_batch_adapters = None
