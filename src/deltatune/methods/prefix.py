"""Prefix tuning and P-tuning v2: trainable keys and values in front of every attention layer.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation";
Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks" (ChatGLM's `pre_seq_len`).

Every attention layer l gets n trainable key and value rows in front of its own:

    attn_l(x) = softmax(q [K_l ; k(x)]^T / sqrt(d_h)) [V_l ; v(x)],   mask [1_n ; m]

with K_l, V_l of n x (kv heads x head dim) each. All of them are one matrix
P of n x (L 2 w), w the key/value width (w = kv_heads x head_dim: the narrower
width of grouped-query attention, as peft writes token_dim for it), read as
(n, 2L, kv_heads, head_dim): rows 2l and 2l + 1 of the second axis are K_l, V_l.

Prefix tuning trains P through a reparameterisation (projection=True): n
trainable rows E (n x w) and P = W2 tanh(W1 E + b1) + b2 with W1 (h x w) and W2
(L 2 w x h), which trains n w + (w h + h) + (h L 2 w + L 2 w) parameters. Only P
is saved (peft's `prompt_embeddings`, n x L 2 w) and a loaded adapter is P
itself, n L 2 w parameters (Llama-3.2-3B, 200 tokens: 200 x 28 x 2 x 1024 =
11,468,800). P-tuning v2 (PTuningV2Config) trains P directly, with no
reparameterisation, and is saved the same way (prefix_projection: false).

The prefixes reach the model as its `past_key_values`, so nothing inside the
model is patched: a transformers `DynamicCache` holding (K_l, V_l) per layer
(an `EncoderDecoderCache` for encoder-decoders), with n ones in front of the
attention mask; positions given by the caller move up by n. generate() fills
the empty cache it starts with on the first step and then reuses it, so later
steps only extend the mask. A task head whose forward takes no cache
(transformers 4.x's BertForSequenceClassification ...) gets them in its call
of the base model instead. Under gradient checkpointing transformers drops
caches from checkpointed blocks (a block run twice would write its cache
twice); there the prefixes go in a cache that is only read, never written,
which the blocks get back, for the length of the forward, through the
checkpoint function they call (transformers 4.56 to 5.x).

Encoder-decoders, as peft lays them out and computes them: the file holds L
pairs (L the encoder's layer count); decoder layer i's self-attention gets pair
2i mod L (peft doubles the pairs and takes four per layer, keeping the first two
as self-attention and clearing the cross-attention ones); the encoder and the
cross-attention get no prefix (transformers' encoder stacks take no cache).

Models outside transformers (remote code such as ChatGLM) get the prefixes as
their own code reads them: a tuple of per-layer (K_l, V_l) tensors of shape
(batch, kv_heads, n, head_dim), which their forward must name `past_key_values`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from ..config import DeltaConfig, DeltaError, Method, check, not_serialised, register
from ..inputs import after_forward, args_to_kwargs
from ..surgery import get_state, root_container
from .prompts import CACHE_KEYS, cache_key, cache_length, extend_mask, given_cache, input_embeddings

CONTAINER = "prefix_embeddings"  # P itself, or the projection's n input rows E
PROJECTION = "prefix_projection"  # W2 tanh(W1 E + b1) + b2, while training with projection=True
FILE_KEY = "prompt_embeddings"


@dataclass(kw_only=True)
class PrefixTuningConfig(DeltaConfig):
    """num_virtual_tokens: n; projection: train through the Linear-Tanh-Linear reparameterisation
    (dropped when saving); projection_hidden_size: its width h (None: the key/value width w);
    init: "random" (N(0, 1) rows, as peft) or "zero" (P starts at zero). token_dim (w),
    num_layers, num_attention_heads (kv heads) and num_transformer_submodules are filled in at attach.
    """

    method = "prefix_tuning"
    peft_type = "PREFIX_TUNING"

    num_virtual_tokens: int = check(20, gt=0)
    projection: bool = True
    projection_hidden_size: int | None = check(None, gt=0)
    init: Literal["random", "zero"] = "random"
    token_dim: int | None = check(None, gt=0)
    num_layers: int | None = check(None, gt=0)
    num_attention_heads: int | None = check(None, gt=0)
    num_transformer_submodules: int | None = check(None, gt=0)
    # True: P alone (what a loaded file gives), no projection. Never written to files.
    inference_mode: bool = not_serialised(False)


@dataclass(kw_only=True)
class PTuningV2Config(PrefixTuningConfig):
    """Deep prompts on every layer, trained directly: prefix tuning without the reparameterisation
    (ChatGLM's pre_seq_len). Saved as peft's PREFIX_TUNING with prefix_projection: false."""

    method = "p_tuning_v2"

    projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection:
            raise DeltaError("PTuningV2Config trains the prefixes directly; for the reparameterised version use "
                             "PrefixTuningConfig(projection=True)")


# ---------------------------------------------------------------- shapes


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first(config: Any, *names: str) -> Any:
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def _dims(model: nn.Module, method: str) -> dict[str, int]:
    """peft's num_layers; the key/value width and kv heads the attention layers really use."""
    cfg = _text_config(model)
    layers = _first(cfg, "num_hidden_layers", "num_layers", "n_layer")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        raise DeltaError(f"{method} cannot read the layer count, heads and width of {type(model).__name__} from its config")
    kv_heads = _first(cfg, "num_key_value_heads") or (getattr(cfg, "multi_query_group_num", None)
                                                     if getattr(cfg, "multi_query_attention", False) else None) or heads
    head_dim = _first(cfg, "head_dim", "kv_channels", "d_kv") or hidden // heads
    return {"num_layers": layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}


def _decoder_layers(model: nn.Module, config: PrefixTuningConfig, method: str) -> list[int]:
    """Which of the file's L (key, value) pairs each attention layer that takes the cache reads."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return list(range(config.num_layers))
    cfg = model.config
    decoder = _first(cfg, "num_decoder_layers", "decoder_layers") or config.num_layers
    if decoder != config.num_layers:
        raise DeltaError(
            f"{method} on {type(model).__name__}: its decoder has {decoder} layers and its encoder "
            f"{config.num_layers}; peft's prefix layout for encoder-decoders needs them equal"
        )
    return [(2 * i) % config.num_layers for i in range(decoder)]  # peft's doubled-and-regrouped pairs


def _takes_cache_objects(module: nn.Module) -> bool:
    """Is module.forward transformers' own code (a model, or a subclass keeping its forward), which takes
    Cache objects? Remote code (ChatGLM's) reads per-layer tuples."""
    forward = getattr(type(module), "forward", None)
    return getattr(forward, "__module__", "").startswith("transformers.")


def _takes_past_key_values(module: nn.Module) -> bool:
    """Does module.forward take past_key_values: by name, or (transformers' own models) through **kwargs?"""
    params = inspect.signature(module.forward).parameters
    if any(key in params for key in CACHE_KEYS):  # `cache` from transformers 5.24 on
        return True
    return _takes_cache_objects(module) and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _cache_receiver(model: nn.Module) -> nn.Module | None:
    """The module the prefixes are handed to: the model, or its base model where the model's forward takes
    no past_key_values (transformers 4.x task heads such as BertForSequenceClassification name their
    arguments and pass on only those; 5.x heads pass **kwargs through to the base model)."""
    if _takes_past_key_values(model):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model and _takes_past_key_values(base):
        return base
    return None


# ---------------------------------------------------------------- attach


_DISPLAY = {"prefix_tuning": "prefix tuning", "p_tuning_v2": "P-tuning v2"}


def attach(model: nn.Module, config: PrefixTuningConfig, name: str) -> PrefixTuningConfig:
    method = _DISPLAY[config.method]
    device = input_embeddings(model, method).weight.device
    if _cache_receiver(model) is None:
        base = getattr(model, "base_model", model)
        also = f" (nor does its base model's, {type(base).__name__}.forward)" if base is not model else ""
        raise DeltaError(
            f"{method} passes its prefixes as past_key_values, but {type(model).__name__}.forward takes no "
            f"past_key_values argument{also}, so {method} cannot work on this architecture; use prompt tuning or LoRA"
        )
    dims = _dims(model, method)
    submodules = 2 if getattr(model.config, "is_encoder_decoder", False) else 1
    config = config.replace(num_transformer_submodules=submodules, **dims)
    config = config.replace(projection_hidden_size=config.projection_hidden_size or config.token_dim)
    _decoder_layers(model, config, method)  # refuse an unsupported layout now, not at the first forward
    n, w, width = config.num_virtual_tokens, config.token_dim, config.num_layers * 2 * config.token_dim
    if config.projection and not config.inference_mode:
        h = config.projection_hidden_size
        with torch.device(device):  # built where the model is (no memory on the meta device)
            projection = nn.Sequential(nn.Linear(w, h), nn.Tanh(), nn.Linear(h, width))
        if config.init == "zero":
            nn.init.zeros_(projection[2].weight)
            nn.init.zeros_(projection[2].bias)
        root_container(model, PROJECTION, kind=nn.ModuleDict)[name] = projection
        rows = torch.randn(n, w, device=device)  # (n, w)
    else:
        rows = torch.zeros(n, width, device=device) if config.init == "zero" else torch.randn(n, width, device=device)
    root_container(model, CONTAINER)[name] = nn.Parameter(rows)  # fp32 whatever the base dtype
    return config


def prefix_matrix(model: nn.Module, name: str) -> torch.Tensor:
    """P, (n, L 2 w): through the projection while it is attached, else the parameter itself."""
    rows = model._modules[CONTAINER][name]
    projections = model._modules.get(PROJECTION)
    if projections is not None and name in projections:
        return projections[name](rows)
    return rows


def to_file(model: nn.Module, name: str, config: PrefixTuningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only P is saved (peft's prompt_embeddings); the projection is dropped."""
    with torch.no_grad():
        matrix = prefix_matrix(model, name).detach().float().cpu().contiguous()
    out = {k: v for k, v in tensors.items() if k != CONTAINER and not k.startswith(PROJECTION + ".")}
    out[FILE_KEY] = matrix
    return out


def from_file(model: nn.Module, name: str, config: PrefixTuningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    if FILE_KEY in out:
        out[CONTAINER] = out.pop(FILE_KEY)
    return out


# ---------------------------------------------------------------- the prefixes as a cache


class _ReadOnlyPrefix:
    """Mixed into a cache layer: attention reads [prefix ; new states] and nothing is stored, so a
    block that gradient checkpointing runs a second time sees exactly what it saw the first time."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.keys is None:  # a cross-attention layer: no prefix, nothing kept
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


_READ_ONLY_LAYER: list[type] = []


def _read_only_layer_class() -> type:
    """transformers' DynamicLayer with _ReadOnlyPrefix's update (built once, on first use)."""
    if not _READ_ONLY_LAYER:
        from transformers.cache_utils import DynamicLayer

        _READ_ONLY_LAYER.append(type("ReadOnlyPrefixLayer", (_ReadOnlyPrefix, DynamicLayer), {}))
    return _READ_ONLY_LAYER[0]


def _filled(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> Any:
    """A cache layer holding (keys, values), set directly (DynamicLayer.lazy_initialization takes the keys
    alone in transformers 4.x, keys and values in 5.x, and would start both empty anyway)."""
    layer.dtype, layer.device = keys.dtype, keys.device
    layer.keys, layer.values = keys, values
    layer.is_initialized = True  # 5.x reads this flag; 4.x looks at keys
    return layer


class _NeverUpdated(dict):
    """EncoderDecoderCache.is_updated for a read-only cache: cross-attention is always recomputed."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def get(self, key: Any, default: Any = None) -> bool:
        return False


def _layer_prefixes(model: nn.Module, matrix: torch.Tensor, config: PrefixTuningConfig, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K_l, V_l) for every attention layer that reads the cache, each (B, kv_heads, n, head_dim)."""
    n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    kv = matrix.view(n, 2 * layers, heads, config.token_dim // heads).permute(1, 2, 0, 3)  # (2L, H, n, D)
    kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, H, n, D)
    return [(kv[2 * j], kv[2 * j + 1]) for j in _decoder_layers(model, config, config.method)]


def _cache(prefixes: list, given: Any, seq2seq: bool, read_only: bool) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    if read_only:
        layer_cls = _read_only_layer_class()
        self_cache = DynamicCache()
        self_cache.layers = [_filled(layer_cls(), keys, values) for keys, values in prefixes]
        if not seq2seq:
            return self_cache
        cross = DynamicCache()
        cross.layers = [layer_cls() for _ in prefixes]
        cache = EncoderDecoderCache(self_cache, cross)
        cache.is_updated = _NeverUpdated()
        return cache
    if getattr(given, "is_compileable", False):
        raise DeltaError(
            f"prefix tuning puts its prefixes in the attention cache, and a fixed-size {type(given).__name__} (sized, and "
            "masked, for the text alone) has no room for them; generate without cache_implementation='static' "
            "(the default dynamic cache)"
        )
    if given is not None and hasattr(given, "get_seq_length"):  # the empty cache generate() starts with: fill it
        target = given.self_attention_cache if isinstance(given, EncoderDecoderCache) else given
        for i, (keys, values) in enumerate(prefixes):
            target.update(keys, values, i)
        return given
    self_cache = DynamicCache(prefixes)
    return EncoderDecoderCache(self_cache, DynamicCache()) if seq2seq else self_cache


# ---------------------------------------------------------------- gradient checkpointing

# transformers' checkpointed blocks set these to None before checkpointing their forward (a block run
# twice would write its cache twice); ours is only read, so the blocks that read it get it back.
_CACHE_ARGUMENTS = (*CACHE_KEYS, "past_key_value", "layer_past")


def _checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """transformers' checkpointed blocks (GradientCheckpointingLayer) when this forward trains."""
    if not (model.training and torch.is_grad_enabled()):
        return []
    state = get_state(model)
    modules = state.checkpointing_modules if state else ()
    if not modules:
        return []
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in modules if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def _cache_readers(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The blocks that read the prefixes: all of them, or an encoder-decoder's decoder blocks."""
    if not getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        return blocks
    encoder = {id(m) for m in model.get_encoder().modules()}
    return [b for b in blocks if id(b) not in encoder]


def _reentrant(blocks: list[nn.Module]) -> bool:
    """Do the blocks use reentrant checkpointing (torch's default when use_reentrant is not given)?"""
    func = getattr(blocks[0], "_gradient_checkpointing_func", None)
    return bool(getattr(func, "keywords", {}).get("use_reentrant", True))


class _GradBridge(torch.autograd.Function):
    """Identity on a block's input. Reentrant checkpointing runs a separate backward inside every
    block, which would go through P's own graph (the projection) once per block; so the blocks read a
    detached copy (`leaf`) whose gradient they add up, and this node, whose backward runs after the
    block's own (the block depends on its output), hands what has been added so far to P and clears it.
    P's graph runs once, when every bridge has handed over its part."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, matrix: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        ctx.leaf = leaf
        return hidden.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        leaf_grad, ctx.leaf.grad = ctx.leaf.grad, None
        return grad, leaf_grad, None


def _bridge_to(matrix: torch.Tensor, leaf: torch.Tensor) -> Any:
    return lambda hidden: _GradBridge.apply(hidden, matrix, leaf)


class _PrefixCheckpoint:
    """A reading block's checkpoint function for one forward. It gives the block back the cache its
    checkpointing set to None (transformers 4.x drops it unconditionally; 5.x blocks are told they
    may keep it, see _keep_cache_through_checkpoints) and puts a _GradBridge on the block's input. It
    runs where the block calls the checkpoint, so outside it: 4.x blocks checkpoint their forward hooks
    too, so a hook would run again, or not at all once removed, when the backward recomputes the block."""

    def __init__(self, original: Any, cache: Any, bridge: Any) -> None:
        self.original, self.cache, self.bridge = original, cache, bridge

    def __call__(self, run: Any, *args: Any, **kwargs: Any) -> Any:
        keywords = getattr(run, "keywords", {})
        dropped = {k: self.cache for k in _CACHE_ARGUMENTS if k in keywords and keywords[k] is None}
        if dropped:  # bound into the function the checkpoint keeps, so the recomputation reads it too
            run = functools.partial(run, **dropped)
        if self.bridge is not None and args and torch.is_tensor(args[0]):  # hidden states: positional, as
            args = (self.bridge(args[0]), *args[1:])  # transformers passes them for reentrant checkpointing
        return self.original(run, *args, **kwargs)


def _keep_cache_through_checkpoints(model: nn.Module, blocks: list[nn.Module], cache: Any, bridge: Any) -> None:
    """For this forward: the blocks that read the prefixes keep the cache (and with reentrant
    checkpointing bridge its gradient), and the models' own checkpointing flags are off (GPT-2's model
    passes its blocks no cache at all while its flag is on)."""
    from transformers import PreTrainedModel

    state = get_state(model)
    models = [m for m in state.checkpointing_modules if isinstance(m, PreTrainedModel) and m.gradient_checkpointing]
    readers = _cache_readers(model, blocks)
    for block in readers:
        if hasattr(type(block), "_can_checkpoint_with_cache"):  # 5.x: the block keeps it (and does not warn)
            block._can_checkpoint_with_cache = True
        block._gradient_checkpointing_func = _PrefixCheckpoint(block._gradient_checkpointing_func, cache, bridge)
    for module in models:
        module.gradient_checkpointing = False

    def restore(output: Any) -> Any:
        for block in readers:
            block.__dict__.pop("_can_checkpoint_with_cache", None)
            if isinstance(block._gradient_checkpointing_func, _PrefixCheckpoint):
                block._gradient_checkpointing_func = block._gradient_checkpointing_func.original
        for module in models:
            module.gradient_checkpointing = True
        return output

    after_forward(model, restore)


# ---------------------------------------------------------------- the forward


def _batch_size(kwargs: dict[str, Any], keys: tuple[str, ...]) -> int:
    for key in keys:
        value = kwargs.get(key)
        if torch.is_tensor(value):
            return value.shape[0]
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:
        return encoder_outputs[0].shape[0]
    raise DeltaError("prefix tuning needs input_ids or inputs_embeds (decoder_input_ids for an encoder-decoder) in the "
                     "forward call, to know the batch size")


def _check_alone(model: nn.Module, name: str) -> None:
    """The prefixes own the cache: another delta that rewrites the inputs would read it as text
    already seen (or add a second prefix the positions do not count), so none may be active beside them."""
    state = get_state(model)
    others = [n for n in state.active if n != name and state.deltas[n].method.transform_inputs is not None]
    if others:
        method = state.deltas[name].method.name
        raise DeltaError(
            f"delta {name!r} ({method}) puts its prefixes in the attention cache and cannot be active together with "
            f"{others} ({', '.join(state.deltas[o].method.name for o in others)}), which also rewrite the model's inputs; "
            f"dt.set_active(model, {name!r}) or the others alone"
        )


def _without_cache(output: Any) -> Any:
    for key in CACHE_KEYS:
        if getattr(output, key, None) is not None:  # ModelOutput: item and attribute (setattr alone skips None)
            output[key] = None
    return output


def _add_prefixes(model: nn.Module, receiver: nn.Module, name: str, config: PrefixTuningConfig,
                  kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call of `receiver`, the module that takes the cache (the model, or its base model), with the prefixes in it."""
    n = config.num_virtual_tokens
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    # the inputs that set the batch and the new length: the decoder's for an encoder-decoder
    inputs = ("decoder_input_ids", "decoder_inputs_embeds", "labels", "input_ids", "inputs_embeds") if seq2seq \
        else ("input_ids", "inputs_embeds")
    mask_key = "decoder_attention_mask" if seq2seq else "attention_mask"
    new = next((kwargs[k].shape[1] for k in inputs[:3 if seq2seq else 2] if torch.is_tensor(kwargs.get(k))), None)
    given = given_cache(kwargs)
    seen = cache_length(given)
    if seen == 0:
        matrix = prefix_matrix(model, name).to(model.get_input_embeddings().weight.dtype)  # (n, L 2 w)
        blocks = _checkpointed_blocks(model)
        bridge = None
        if blocks and _reentrant(blocks):
            leaf = matrix.detach().requires_grad_(True)  # what the blocks read; _GradBridge joins it to P
            bridge, matrix = _bridge_to(matrix, leaf), leaf
        prefixes = _layer_prefixes(model, matrix, config, _batch_size(kwargs, inputs))
        if _takes_cache_objects(receiver):
            cache = _cache(prefixes, given, seq2seq, read_only=bool(blocks))
        else:
            cache = tuple(prefixes)
        if blocks:
            _keep_cache_through_checkpoints(model, blocks, cache, bridge)
        for key in CACHE_KEYS:  # under one name only: given both, transformers 5.24 drops past_key_values
            kwargs.pop(key, None)
        kwargs[cache_key(receiver)] = cache
        if kwargs.get("use_cache") is False:  # the caller keeps no cache: hand back none, or generate(use_cache=False)
            after_forward(model, _without_cache)  # would feed ours (prefix and text) back with the whole text again
        seen = n
    # the mask covers the cache and the new tokens: the prefix's n columns go in front
    mask = kwargs.get(mask_key)
    if mask is not None and new is not None:
        kwargs[mask_key] = extend_mask(mask, n, seen + new)
    if kwargs.get("position_ids") is not None:  # positions counted from the first real token
        kwargs["position_ids"] = kwargs["position_ids"] + n
    kwargs.pop("cache_position", None)  # the model counts them from the cache's length
    return kwargs


def transform_inputs(model: nn.Module, role: str, name: str, config: PrefixTuningConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    if role != "model":  # encoder stacks take no cache; the prefixes live in the decoder's self-attention
        return kwargs
    _check_alone(model, name)
    receiver = _cache_receiver(model)
    if receiver is model:
        return _add_prefixes(model, model, name, config, kwargs)

    # a head that takes no past_key_values: the prefixes go into its call of the base model
    def into_base_call(module: nn.Module, args: tuple, base_kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        handle.remove()
        args, base_kwargs = args_to_kwargs(module, args, base_kwargs)
        return args, _add_prefixes(model, module, name, config, base_kwargs)

    handle = receiver.register_forward_pre_hook(into_base_call, with_kwargs=True)
    after_forward(model, lambda output: (handle.remove(), output)[1])
    return kwargs


def _method(name: str, config_cls: type) -> Method:
    return Method(
        name=name,
        config_cls=config_cls,
        kind="input",
        attach=attach,
        containers=(CONTAINER, PROJECTION),
        transform_inputs=transform_inputs,
        to_file=to_file,
        from_file=from_file,
        mergeable=False,
        peft_compatible=True,
        load_overrides={"inference_mode": True},
    )


PREFIX_TUNING = register(_method("prefix_tuning", PrefixTuningConfig))
P_TUNING_V2 = register(_method("p_tuning_v2", PTuningV2Config))
