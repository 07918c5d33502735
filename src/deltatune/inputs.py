"""Hooks on the model's own forward, registered once per model.

A pre-hook (with kwargs) on the top-level model, and on the encoder of an
encoder-decoder model, lets input-side deltas rewrite the call (prepend virtual
tokens, extend the attention mask and labels) and lets a caller pass
``adapter_names=[...]`` for a batch whose rows use different adapters. Because
the hooks sit on the model itself, ``generate`` and ``transformers.Trainer``
need no wrapper class.

The hooks are plain module-level functions that find the model's state through
the module they are called on, so a ``copy.deepcopy`` of the model carries
working hooks that point at the copy's state, not the original's.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from .surgery import STATE_ATTR, ModelState, get_state


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


def remove_hooks(model: nn.Module) -> None:
    """Remove our hooks, found by identity (handles would not survive a deepcopy of the model)."""
    for module in model.modules():
        for table, extras in (
            (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
            (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
        ):
            for hook_id, fn in list(table.items()):
                if fn in (_model_pre_hook, _encoder_pre_hook, _clear_batch_adapters):
                    del table[hook_id]
                    for extra in extras:
                        extra.pop(hook_id, None)
        module.__dict__.pop(STATE_ATTR, None)


def _model_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    state: ModelState = module.__dict__[STATE_ATTR]
    if "adapter_names" in kwargs:
        kwargs = dict(kwargs)
        state.batch_adapters = kwargs.pop("adapter_names")
    elif state.pinned_batch_adapters is not None:
        state.batch_adapters = state.pinned_batch_adapters
    return _transform(module, state, "model", args, kwargs)


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
