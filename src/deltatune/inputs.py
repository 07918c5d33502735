"""Hooks on the model's own forward, registered once per model.

A pre-hook (with kwargs) on the top-level model, and on the encoder of an
encoder-decoder model, lets input-side deltas rewrite the call (prepend virtual
tokens, extend the attention mask and labels) and lets a caller pass
``adapter_names=[...]`` for a batch whose rows use different adapters. Because
the hooks sit on the model itself, ``generate`` and ``transformers.Trainer``
need no wrapper class.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .surgery import ModelState, get_state


def ensure_hooks(model: nn.Module) -> None:
    state = get_state(model, create=True)
    if state.hooks:
        return
    state.hooks.append(model.register_forward_pre_hook(_model_pre_hook(model, state, "model"), with_kwargs=True))
    state.hooks.append(model.register_forward_hook(_clear_batch_adapters(state), always_call=True))
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        encoder = model.get_encoder()
        state.hooks.append(encoder.register_forward_pre_hook(_model_pre_hook(model, state, "encoder"), with_kwargs=True))


def _model_pre_hook(model: nn.Module, state: ModelState, role: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if role == "model" and "adapter_names" in kwargs:
            state.batch_adapters = kwargs.pop("adapter_names")
        for name in state.active:
            delta = state.deltas[name]
            if delta.method.transform_inputs is not None:
                args, kwargs = _args_to_kwargs(module, args, kwargs)
                kwargs = delta.method.transform_inputs(model, role, name, delta.config, kwargs)
        return args, kwargs

    return hook


def _clear_batch_adapters(state: ModelState):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        state.batch_adapters = None

    return hook


def _args_to_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Positional inputs become keyword inputs so a transform sees every input by name."""
    if not args:
        return args, kwargs
    import inspect

    names = [p for p in inspect.signature(module.forward).parameters if p not in ("self",)]
    kwargs = dict(kwargs)
    for name, value in zip(names, args):
        kwargs[name] = value
    return (), kwargs
