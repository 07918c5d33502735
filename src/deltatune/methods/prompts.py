"""Prompt tuning: trainable virtual tokens prepended to the input embeddings.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning".
With E(x) the frozen token embeddings of an input x (T tokens) and P (n x d) the
trainable prompt, the model sees

    [P ; E(x)]   (n + T embeddings),   mask [1_n ; m],   labels [-100_n ; y]

P starts as random N(0, 1) rows, as the embeddings of n tokens sampled from the
vocabulary, or as the embeddings of a text (repeated or cut to n tokens). Only P
trains: n x d parameters (5 tokens on T5-XXL's d = 4096: 20,480).

For encoder-decoder models the prompt goes in front of the encoder input. Only
those n rows train; the file keeps peft's layout of one block of n rows per
transformer submodule (encoder and decoder, 2n rows, of which peft too uses only
the encoder's), written as two copies of the prompt and read back from the first.

The prompt is injected by a forward pre-hook on the model (and on the encoder of
an encoder-decoder), so generate() works on the plain model: the first call gets
the prompt, later decoding steps only extend the attention mask to cover the n
cached virtual positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from ..config import DeltaConfig, DeltaError, Method, check, not_serialised, register
from ..surgery import root_container

CONTAINER = "prompt_embeddings"


@dataclass(kw_only=True)
class PromptTuningConfig(DeltaConfig):
    """num_virtual_tokens: n; init: "random", "sample_vocab" or "text".

    A "text" init takes init_text, tokenised by `tokenizer` (an object, not saved) or
    by the tokenizer at tokenizer_name_or_path. token_dim, num_layers,
    num_attention_heads and num_transformer_submodules are filled from the model
    at attach (peft's files carry them).
    """

    method = "prompt_tuning"
    peft_type = "PROMPT_TUNING"

    num_virtual_tokens: int = check(20, gt=0)
    init: Literal["random", "sample_vocab", "text"] = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    tokenizer: Any = not_serialised()
    token_dim: int | None = check(None, gt=0)
    num_layers: int | None = check(None, gt=0)
    num_attention_heads: int | None = check(None, gt=0)
    num_transformer_submodules: int | None = check(None, gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init == "text" and not self.init_text:
            raise DeltaError("init='text' needs init_text (and a tokenizer or tokenizer_name_or_path)")


def _model_dims(model: nn.Module) -> dict[str, int | None]:
    cfg = model.config

    def first(*names: str) -> int | None:
        return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)

    return {
        "num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
        "num_attention_heads": first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }


def _init_rows(model: nn.Module, config: PromptTuningConfig, rows: int) -> torch.Tensor:
    embeddings = model.get_input_embeddings()
    table = embeddings.weight
    if config.init == "random":
        return torch.randn(rows, table.shape[1], device=table.device)
    if config.init == "sample_vocab":
        ids = torch.randint(0, table.shape[0], (rows,), device=table.device)
    else:
        tokenizer = config.tokenizer
        if tokenizer is None:
            if not config.tokenizer_name_or_path:
                raise DeltaError("init='text' needs a tokenizer= object or tokenizer_name_or_path")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
        ids = list(tokenizer(config.init_text)["input_ids"])
        ids = (ids * math.ceil(rows / len(ids)))[:rows]  # repeat a short text, cut a long one
        ids = torch.tensor(ids, device=table.device)
    with torch.no_grad():
        return embeddings(ids).detach().float().clone()


def attach(model: nn.Module, config: PromptTuningConfig, name: str) -> PromptTuningConfig:
    if not callable(getattr(model, "get_input_embeddings", None)) or model.get_input_embeddings() is None:
        raise DeltaError(f"prompt tuning needs a model with input embeddings; {type(model).__name__} has none")
    dim = model.get_input_embeddings().weight.shape[1]
    submodules = 2 if getattr(model.config, "is_encoder_decoder", False) else 1
    config = config.replace(token_dim=dim, num_transformer_submodules=submodules, **_model_dims(model))
    # fp32 whatever the base dtype; cast to the embeddings' dtype at use
    prompt = nn.Parameter(_init_rows(model, config, config.num_virtual_tokens).to(torch.float32))
    root_container(model, CONTAINER)[name] = prompt
    return config


def to_file(model: nn.Module, name: str, config: PromptTuningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's layout: one block of n rows per transformer submodule (2 for encoder-decoders)."""
    copies = config.num_transformer_submodules or 1
    return {k: torch.cat([v] * copies) if k == CONTAINER else v for k, v in tensors.items()}


def from_file(model: nn.Module, name: str, config: PromptTuningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's block of a peft file (the only one either library uses)."""
    n, blocks = config.num_virtual_tokens, config.num_transformer_submodules or 1
    out = dict(tensors)
    prompt = out.get(CONTAINER)
    if prompt is not None and prompt.dim() == 2 and prompt.shape[0] == n * blocks:
        out[CONTAINER] = prompt[:n]
    return out


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def _extend_mask(mask: torch.Tensor | None, n: int, target: int) -> torch.Tensor | None:
    """Prepend n ones to a 2-D mask that is n short of `target` columns."""
    if mask is None or mask.dim() != 2 or mask.shape[1] != target - n:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _prepend(model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Replace input_ids by inputs_embeds with the prompt in front; returns the original length T."""
    ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if ids is None:
            raise DeltaError("prompt tuning needs input_ids or inputs_embeds in the forward call")
        embeds = model.get_input_embeddings()(ids)
    batch, length = embeds.shape[:2]
    rows = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, d)
    kwargs["inputs_embeds"] = torch.cat([rows, embeds], dim=1)  # (B, n + T, d)
    return length, kwargs


def transform_inputs(model: nn.Module, role: str, name: str, config: PromptTuningConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    n = config.num_virtual_tokens
    prompt = model._modules[CONTAINER][name]
    # Virtual tokens have no positions or segments of their own: let the model number
    # the positions over the longer sequence (peft does the same).
    kwargs.pop("position_ids", None)
    kwargs.pop("cache_position", None)
    if getattr(model.config, "is_encoder_decoder", False):
        if role == "encoder":
            length, kwargs = _prepend(model, prompt, kwargs)
            kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), n, length + n)
        else:  # top-level call: the mask reaches the decoder's cross-attention too
            encoder_outputs = kwargs.get("encoder_outputs")
            mask = kwargs.get("attention_mask")
            if mask is not None:
                target = encoder_outputs[0].shape[1] if encoder_outputs is not None else mask.shape[1] + n
                kwargs["attention_mask"] = _extend_mask(mask, n, target)
        return kwargs

    if _cache_length(kwargs.get("past_key_values")) > 0:  # a decoding step: the prompt is in the cache
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = _extend_mask(mask, n, mask.shape[1] + n)
        return kwargs
    length, kwargs = _prepend(model, prompt, kwargs)
    kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), n, length + n)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == length:  # per-token labels
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
    token_types = kwargs.get("token_type_ids")
    if token_types is not None:
        kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(token_types.shape[0], n), token_types], dim=1)
    return kwargs


PROMPT_TUNING = register(
    Method(
        name="prompt_tuning",
        config_cls=PromptTuningConfig,
        kind="input",
        attach=attach,
        containers=(CONTAINER,),
        transform_inputs=transform_inputs,
        to_file=to_file,
        from_file=from_file,
        mergeable=False,
        peft_compatible=True,
        load_overrides={"init": "random"},
    )
)
