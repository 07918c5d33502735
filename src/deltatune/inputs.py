"""Hooks on the model, registered once per model.

A pre-hook (with kwargs) on the top-level model, and on the encoder of an
encoder-decoder model, lets input-side deltas rewrite the call (prepend virtual
tokens, extend the attention mask and labels) and lets a caller pass
``adapter_names=[...]`` for a batch whose rows use different adapters. Because
the hooks sit on the model itself, ``generate`` and ``transformers.Trainer``
need no wrapper class.

Two more keep transformers' own machinery right while a delta is attached: a
forward hook on the input embeddings (the model's, and those its encoder and
decoder stacks hold of their own) makes their output require grad under
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
    model.register_forward_hook(_after_forward, always_call=True)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        encoder = model.get_encoder()
        encoder.__dict__[STATE_ATTR] = state
        encoder.register_forward_pre_hook(_encoder_pre_hook, with_kwargs=True)
    embeddings = _input_embeddings(model)
    if embeddings:
        state.checkpointing_modules = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    for module in embeddings:
        module.__dict__[STATE_ATTR] = state
        module.register_forward_hook(_embedding_output_hook)
    if callable(getattr(type(model), "save_pretrained", None)):
        # an instance attribute shadows the class's method; deepcopy and pickle carry it to the copy
        model.__dict__["save_pretrained"] = SavePretrained(model)


def _input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embeddings of the model and of every sub-model (as transformers 5's
    enable_input_require_grads): an encoder-decoder's stacks may hold embedding modules of their own,
    tied to the shared one (BART in transformers 4.x), which the model's embeddings never see run."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        get = getattr(module, "get_input_embeddings", None)
        try:
            embeddings = get() if callable(get) else None
        except NotImplementedError:
            continue
        while isinstance(embeddings, DeltaLayer):  # hook the module that stays when the wrapping delta is detached
            embeddings = embeddings.base_layer
        if isinstance(embeddings, nn.Module):
            found.setdefault(id(embeddings), embeddings)
    return list(found.values())


def remove_hooks(model: nn.Module) -> None:
    """Remove our hooks, found by identity (handles would not survive a deepcopy of the model)."""
    ours = (_model_pre_hook, _encoder_pre_hook, _after_forward, _embedding_output_hook)
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
    try:
        return _transform(module, state, "model", args, kwargs)
    except BaseException:
        _after_forward(module, args, None)  # undo what the transforms that ran had set up for this forward
        raise


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
        quantizer = getattr(model, "hf_quantizer", None)
        if state_dict is None or quantizer is None:
            return type(model).save_pretrained(model, save_directory, *args, state_dict=state_dict, **kwargs)
        # A quantised model (bitsandbytes): transformers replaces the state_dict argument by its quantizer's
        # (None: model.state_dict(), the wrapped keys), so the quantizer hands out ours, with its own metadata.
        before = vars(quantizer).get("get_state_dict_and_metadata")
        own = quantizer.get_state_dict_and_metadata
        quantizer.get_state_dict_and_metadata = lambda m: (state_dict, own(m)[1])
        try:
            return type(model).save_pretrained(model, save_directory, *args, state_dict=state_dict, **kwargs)
        finally:
            if before is None:
                del quantizer.get_state_dict_and_metadata
            else:
                quantizer.get_state_dict_and_metadata = before


def _encoder_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    return _transform(module, module.__dict__[STATE_ATTR], "encoder", args, kwargs)


def _transform(module: nn.Module, state: ModelState, role: str, args: tuple, kwargs: dict[str, Any]):
    before = None
    for name in state.active:
        delta = state.deltas[name]
        if delta.method.transform_inputs is not None:
            args, kwargs = args_to_kwargs(module, args, kwargs)
            before = dict(kwargs) if before is None else before
            kwargs = delta.method.transform_inputs(state.model, role, name, delta.config, kwargs)
    if before is not None and role == "model":
        _score_last_real_tokens(state, before, kwargs)
    return args, kwargs


def after_forward(model: nn.Module, call: Any) -> None:
    """Run call(output) -> output when the model's current forward ends (with None if it fails)."""
    get_state(model).after_forward.append(call)


def _after_forward(module: nn.Module, args: tuple, output: Any) -> Any:
    state: ModelState = module.__dict__[STATE_ATTR]
    state.batch_adapters = None
    calls, state.after_forward = state.after_forward, []
    for call in calls:
        output = call(output)
    return output


def _score_last_real_tokens(state: ModelState, before: dict[str, Any], after: dict[str, Any]) -> None:
    """A decoder sequence classifier (Llama, GPT-2 ...ForSequenceClassification) scores the rightmost
    token that is not padding, which it finds in input_ids; once a transform has replaced them by
    inputs_embeds it can no longer tell, and scores the last position, padding or not. So the head's
    output at the last position is replaced, for this forward, by its output at each row's last real
    token: the rightmost non-pad input id (transformers' own rule), shifted by the positions the
    transform put in front, and repeated for rows a transform repeated (blocks of the batch)."""
    model = state.model
    ids, embeds = before.get("input_ids"), after.get("inputs_embeds")
    head = getattr(model, "score", None)
    if (ids is None or embeds is None or after.get("input_ids") is not None or not isinstance(head, nn.Module)
            or not type(model).__name__.endswith("ForSequenceClassification") or ids.dim() != 2):
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    pad = getattr(config, "pad_token_id", None)
    if pad is None or embeds.shape[0] % ids.shape[0]:
        return  # without a pad id transformers scores the last position (and refuses padded batches) anyway
    positions = torch.arange(ids.shape[1], device=ids.device)
    last = (positions * (ids != pad)).argmax(-1) + (embeds.shape[1] - ids.shape[1])  # (B,)
    last = last.repeat(embeds.shape[0] // ids.shape[0])  # (B',) rows repeated in blocks

    def move_last(_module: nn.Module, _args: tuple, logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        picked = logits[rows, last.to(logits.device)]  # (B', C)
        return torch.cat([logits[:, :-1], picked.unsqueeze(1)], dim=1)

    handle = head.register_forward_hook(move_last)
    after_forward(model, lambda output: (handle.remove(), output)[1])


def args_to_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Positional inputs become keyword inputs so a transform sees every input by name."""
    if not args:
        return args, kwargs
    names = list(inspect.signature(module.forward).parameters)
    return (), {**kwargs, **dict(zip(names, args))}
