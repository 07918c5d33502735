"""Hooks on the model, registered once per model.

A pre-hook (with kwargs) on the top-level model, and on the encoder of an
encoder-decoder model, lets input-side deltas rewrite the call (prepend virtual
tokens, extend the attention mask and labels) and lets a caller pass
``adapter_names=[...]`` for a batch whose rows use different adapters. Because
the hooks sit on the model itself, ``generate`` and ``transformers.Trainer``
need no wrapper class.

Two more keep transformers' own machinery right while a delta is attached: a
forward hook on the input embeddings makes their output require grad under
gradient checkpointing (reentrant checkpointing, transformers' default through
4.57.x (5.0 made it non-reentrant), passes no gradient to a block none of whose
inputs requires one), and ``model.save_pretrained`` writes the base model's own
keys (see :func:`deltatune.surgery.base_state_dict`) so a plain ``from_pretrained`` reads it.

The hooks are plain module-level functions that find the model's state through
the module they are called on, so a ``copy.deepcopy`` of the model carries
working hooks that point at the copy's state, not the original's.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.nn as nn

from .config import DeltaError
from .surgery import STATE_ATTR, DeltaLayer, ModelState, base_state_dict, check_batch_adapters, get_state


def ensure_hooks(model: nn.Module) -> None:
    state = get_state(model, create=True)
    state.model = model
    if _model_pre_hook in model._forward_pre_hooks.values():
        return
    model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True)
    model.register_forward_hook(_clear_batch_adapters, always_call=True)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        encoder = model.get_encoder()
        encoder.__dict__[STATE_ATTR] = state
        encoder.register_forward_pre_hook(_encoder_pre_hook, with_kwargs=True)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    while isinstance(embeddings, DeltaLayer):  # hook the module that stays when the wrapping delta is detached
        embeddings = embeddings.base_layer
    if isinstance(embeddings, nn.Module):
        state.checkpointing_modules = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
        embeddings.__dict__[STATE_ATTR] = state
        embeddings.register_forward_hook(_embedding_output_hook)
    if callable(getattr(type(model), "save_pretrained", None)):
        # an instance attribute shadows the class's method; deepcopy and pickle carry it to the copy
        model.__dict__["save_pretrained"] = SavePretrained(model)


def remove_hooks(model: nn.Module) -> None:
    """Remove our hooks, found by identity (handles would not survive a deepcopy of the model)."""
    ours = (_model_pre_hook, _encoder_pre_hook, _clear_batch_adapters, _embedding_output_hook)
    for module in model.modules():
        for table, extras in (
            (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
            (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
        ):
            for hook_id, fn in list(table.items()):
                if fn in ours:
                    del table[hook_id]
                    for extra in extras:
                        extra.pop(hook_id, None)
        module.__dict__.pop(STATE_ATTR, None)
    if isinstance(model.__dict__.get("save_pretrained"), SavePretrained):
        del model.__dict__["save_pretrained"]


def _model_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    state: ModelState = module.__dict__[STATE_ATTR]
    if "adapter_names" in kwargs:
        kwargs = dict(kwargs)
        state.batch_adapters = check_batch_adapters(state, kwargs.pop("adapter_names"))
    elif state.pinned_batch_adapters is not None:
        state.batch_adapters = state.pinned_batch_adapters
    if module.training and torch.is_grad_enabled():
        merged = [n for n in state.active if state.deltas[n].merged and state.deltas[n].trainable]
        if merged:
            raise DeltaError(
                f"delta {merged[0]!r} is merged into the base weights, so a training step would not reach its "
                f"parameters; dt.unmerge(model) before training (or dt.set_trainable(model, {merged[0]!r}, False))"
            )
    return _transform(module, state, "model", args, kwargs)


def _embedding_output_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    state: ModelState = module.__dict__[STATE_ATTR]
    if (torch.is_tensor(output) and output.is_floating_point() and not output.requires_grad and module.training
            and torch.is_grad_enabled() and any(m.gradient_checkpointing for m in state.checkpointing_modules)):
        output.requires_grad_(True)
    return output


class SavePretrained:
    """transformers' save_pretrained for a model with a delta attached, writing the base model's own keys.

    Merged deltas are in the saved weights; unmerged ones are left out (with a
    warning), so the folder is the base model, or the merged model, that a plain
    from_pretrained loads. dt.save writes the delta itself.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: Any, *args: Any, state_dict: dict | None = None, **kwargs: Any) -> Any:
        model = self.model
        if state_dict is None and get_state(model) is not None:
            state_dict, left_out = base_state_dict(model)
            if left_out:
                warnings.warn(
                    f"deltatune: save_pretrained writes the base model without the unmerged delta(s) {left_out}; "
                    "dt.merge(model) first to include them, or dt.save(model, path) to save the delta alone",
                    stacklevel=2,
                )
        return type(model).save_pretrained(model, save_directory, *args, state_dict=state_dict, **kwargs)


def _encoder_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    return _transform(module, module.__dict__[STATE_ATTR], "encoder", args, kwargs)


def _transform(module: nn.Module, state: ModelState, role: str, args: tuple, kwargs: dict[str, Any]):
    for name in state.active:
        delta = state.deltas[name]
        if delta.method.transform_inputs is not None:
            args, kwargs = _args_to_kwargs(module, args, kwargs)
            kwargs = delta.method.transform_inputs(state.model, role, name, delta.config, kwargs)
    return args, kwargs


def _clear_batch_adapters(module: nn.Module, args: tuple, output: Any) -> None:
    module.__dict__[STATE_ATTR].batch_adapters = None


def _args_to_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Positional inputs become keyword inputs so a transform sees every input by name."""
    if not args:
        return args, kwargs
    names = list(inspect.signature(module.forward).parameters)
    return (), {**kwargs, **dict(zip(names, args))}
