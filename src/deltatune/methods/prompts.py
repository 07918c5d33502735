"""Prompt tuning: trainable virtual tokens prepended to the input embeddings.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning".
With E(x) the frozen token embeddings of an input x (T tokens) and P (n x d) the
trainable prompt, the model sees

    [P ; E(x)]   (n + T embeddings),   mask [1_n ; m],   labels [-100_n ; y]

P starts as random N(0, 1) rows, as the embeddings of n tokens sampled from the
vocabulary, or as the embeddings of a text (repeated or cut to n tokens). Only P
trains: n x d parameters (5 tokens on T5-XXL's d = 4096: 20,480).

Prompt ensembling (the paper's section 6), ``num_prompts=k``: k prompts for one
task, P_1 .. P_k, held in one (k n x d) parameter. Every batch of B rows runs as
k B rows, block i being the batch behind P_i, so all k train at once with the
mean of their losses. At inference (the model in eval mode) the k blocks of
logits are averaged, z(x) = (1/k) sum_i z_i(x): logits, not probabilities, so
the mean also serves regression heads; softmax of the mean is the normalised
geometric mean of the k predictive distributions. Generation averages the logits
of every decoding step the same way. A loss computed at inference is the mean of
the k prompts' losses. The file holds all k prompts, under a peft_type of its own
(PROMPT_TUNING_ENSEMBLE) that only deltatune reads.

For encoder-decoder models the prompt goes in front of the encoder input. Only
those n rows train; the file keeps peft's layout of one block of n rows per
transformer submodule (encoder and decoder, 2n rows, of which peft too uses only
the encoder's), written as two copies of the prompt and read back from the first.

The prompt is injected by a forward pre-hook on the model (and on the encoder of
an encoder-decoder), so generate() works on the plain model: the first call gets
the prompt, later decoding steps only extend the attention mask to cover the n
cached virtual positions. `inject` does that for any method whose virtual tokens
are rows of input embeddings (P-tuning uses it too).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from ..config import DeltaConfig, DeltaError, Method, check, not_serialised, register
from ..inputs import after_forward
from ..surgery import root_container

CONTAINER = "prompt_embeddings"
ENSEMBLE_FILE_TYPE = "PROMPT_TUNING_ENSEMBLE"


@dataclass(kw_only=True)
class PromptTuningConfig(DeltaConfig):
    """num_virtual_tokens: n; num_prompts: k prompts trained and averaged as an ensemble (1: plain
    prompt tuning); init: "random", "sample_vocab" or "text".

    A "text" init takes init_text, tokenised by `tokenizer` (an object, not saved) or
    by the tokenizer at tokenizer_name_or_path. token_dim, num_layers,
    num_attention_heads and num_transformer_submodules are filled from the model
    at attach (peft's files carry them).
    """

    method = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    file_types = (ENSEMBLE_FILE_TYPE,)

    num_virtual_tokens: int = check(20, gt=0)
    num_prompts: int = check(1, gt=0)
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
        if self.init == "text" and self.num_prompts > 1:
            raise DeltaError(
                f"PromptTuningConfig(num_prompts={self.num_prompts}, init='text') would start every prompt of the "
                "ensemble from the same rows, and identical prompts train identically; use init='random' or "
                "'sample_vocab' for an ensemble"
            )

    def file_peft_type(self) -> str:
        return self.peft_type if self.num_prompts == 1 else ENSEMBLE_FILE_TYPE


def model_dims(model: nn.Module) -> dict[str, int | None]:
    """num_layers and num_attention_heads as peft fills them in from the model config."""
    cfg = model.config

    def first(*names: str) -> int | None:
        return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)

    return {
        "num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
        "num_attention_heads": first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }


def input_embeddings(model: nn.Module, method: str) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Module) or not hasattr(embeddings, "weight"):
        raise DeltaError(f"{method} needs a model with input embeddings; {type(model).__name__} has none")
    return embeddings


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
    dim = input_embeddings(model, "prompt tuning").weight.shape[1]
    submodules = 2 if getattr(model.config, "is_encoder_decoder", False) else 1
    config = config.replace(token_dim=dim, num_transformer_submodules=submodules, **model_dims(model))
    # one draw per prompt of an ensemble; fp32 whatever the base dtype, cast to the embeddings' dtype at use
    rows = torch.cat([_init_rows(model, config, config.num_virtual_tokens) for _ in range(config.num_prompts)])
    root_container(model, CONTAINER)[name] = nn.Parameter(rows.to(torch.float32))  # (k n, d)
    return config


def file_blocks(config: Any, rows: torch.Tensor) -> torch.Tensor:
    """peft's layout: one block of the prompt rows per transformer submodule (2 for encoder-decoders)."""
    return torch.cat([rows] * (config.num_transformer_submodules or 1))


def first_block(config: Any, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The encoder's block of n rows from a file in peft's layout (the only block either library uses)."""
    if rows.dim() == 2 and rows.shape[0] == n * (config.num_transformer_submodules or 1):
        return rows[:n]
    return rows  # a wrong shape is reported by the loader, naming the key


def to_file(model: nn.Module, name: str, config: PromptTuningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if config.num_prompts > 1:  # deltatune's own layout: the k prompts, once
        return tensors
    return {k: file_blocks(config, v) if k == CONTAINER else v for k, v in tensors.items()}


def from_file(model: nn.Module, name: str, config: PromptTuningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    if CONTAINER in out and config.num_prompts == 1:
        out[CONTAINER] = first_block(config, out[CONTAINER], config.num_virtual_tokens)
    return out


# ---------------------------------------------------------------- injecting rows of input embeddings


# transformers 5.24 renamed the models' and generate()'s `past_key_values` argument to `cache` (the old
# name is a deprecated alias that loses to the new one when both are given); 4.x and remote code take
# `past_key_values`. A transform reads the cache under either name and writes it under the one the
# receiving forward takes.
CACHE_KEYS = ("cache", "past_key_values")


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a forward call carries, under either name."""
    return next((kwargs[k] for k in CACHE_KEYS if kwargs.get(k) is not None), None)


def cache_key(module: nn.Module) -> str:
    """The name module.forward takes its cache by: `cache` (transformers >= 5.24) or `past_key_values`;
    for a task head that only passes **kwargs on (5.x BertForSequenceClassification), its base model's."""
    base = getattr(module, "base_model", None)
    for candidate in (module, base if isinstance(base, nn.Module) else None):
        params = inspect.signature(candidate.forward).parameters if candidate is not None else {}
        for key in CACHE_KEYS:
            if key in params:
                return key
    return "past_key_values"


def cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def extend_mask(mask: torch.Tensor | None, n: int, target: int) -> torch.Tensor | None:
    """Prepend n ones to a 2-D mask that is n short of `target` columns."""
    if mask is None or mask.dim() != 2 or mask.shape[1] != target - n:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


# Per-row inputs of a forward call, repeated for every prompt of an ensemble. The input ids of an
# encoder-decoder are repeated by the encoder's hook (generate() calls the encoder on its own).
_ROW_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "labels", "token_type_ids")
_DECODER_ROW_INPUTS = ("attention_mask", "labels", "decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask")


def _repeat_rows(kwargs: dict[str, Any], keys: tuple[str, ...], rows: int, k: int) -> None:
    """Repeat each per-row input of `rows` rows k times, as k blocks of the batch."""
    for key in keys:
        value = kwargs.get(key)
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == rows:
            kwargs[key] = value.repeat(k, *([1] * (value.dim() - 1)))


def _rows(kwargs: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = kwargs.get(key)
        if torch.is_tensor(value):
            return value.shape[0]
    return None


def _cache_rows(cache: Any) -> int | None:
    """Rows of the first layer of a filled cache (a transformers Cache or per-layer tuples)."""
    cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(cache, "layers", None)
    keys = getattr(layers[0], "keys", None) if layers else (cache[0][0] if isinstance(cache, (tuple, list)) and cache else None)
    return keys.shape[0] if torch.is_tensor(keys) else None


def _check_ensemble_cache(kwargs: dict[str, Any], rows: int | None, k: int) -> None:
    cache = given_cache(kwargs)
    if rows is None or cache_length(cache) == 0:
        return
    held = _cache_rows(cache)
    if held is not None and held != k * rows:
        raise DeltaError(
            f"a prompt ensemble of {k} prompts runs {k} rows per input row, but this decoding step's cache holds {held} "
            f"rows for {rows} input rows: beam search reorders the cache by beam, which an ensemble cannot follow; "
            "generate with greedy search or sampling (num_beams=1), or use a single prompt"
        )


def _prepend(model: nn.Module, prompt: torch.Tensor, k: int, kwargs: dict[str, Any]) -> int:
    """Replace input_ids by inputs_embeds with block i of the batch behind prompt i; returns T."""
    ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if ids is None:
            raise DeltaError("prompt tuning needs input_ids or inputs_embeds in the forward call")
        embeds = model.get_input_embeddings()(ids)
    batch, length = embeds.shape[:2]
    prompt = prompt.to(embeds.dtype)  # (k n, d)
    if k == 1:  # a broadcast view: cat copies it once, into the result
        rows = prompt.unsqueeze(0).expand(batch, -1, -1)  # (B, n, d)
    else:  # block i of the batch behind prompt i
        rows = prompt.view(k, 1, -1, prompt.shape[-1]).expand(k, batch // k, -1, -1).reshape(batch, -1, prompt.shape[-1])
    kwargs["inputs_embeds"] = torch.cat([rows, embeds], dim=1)  # (B, n + T, d)
    return length


def _average_blocks(k: int, batch: int) -> Callable[[Any], Any]:
    def average(output: Any) -> Any:
        logits = getattr(output, "logits", None)
        if torch.is_tensor(logits) and logits.shape[0] == k * batch:
            output.logits = logits.view(k, batch, *logits.shape[1:]).mean(0)  # (B, ...)
        return output

    return average


def inject(model: nn.Module, role: str, n: int, k: int, prompt: Callable[[], torch.Tensor], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Put n virtual-token embeddings in front of the input: prompt() gives the (k n, d) rows of k prompts."""
    # Virtual tokens have no positions or segments of their own: let the model number
    # the positions over the longer sequence (peft does the same).
    kwargs.pop("position_ids", None)
    kwargs.pop("cache_position", None)
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    if k > 1:
        if role == "model" and not model.training:
            if kwargs.get("return_dict") is False:
                raise DeltaError("a prompt ensemble averages the logits of a ModelOutput; call the model without return_dict=False")
            batch = _rows(kwargs, ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels"))
            if batch is not None:
                after_forward(model, _average_blocks(k, batch))
        if role == "encoder" or not seq2seq:
            rows = _rows(kwargs, ("input_ids", "inputs_embeds"))
            keys = _ROW_INPUTS
        else:
            rows = _rows(kwargs, ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels"))
            keys = _DECODER_ROW_INPUTS
        if role == "model":
            _check_ensemble_cache(kwargs, rows, k)
        _repeat_rows(kwargs, keys, rows, k)
    if seq2seq:
        if role == "encoder":
            length = _prepend(model, prompt(), k, kwargs)
            kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n, length + n)
        else:  # top-level call: the mask reaches the decoder's cross-attention too
            encoder_outputs = kwargs.get("encoder_outputs")
            mask = kwargs.get("attention_mask")
            if mask is not None:
                target = encoder_outputs[0].shape[1] if encoder_outputs is not None else mask.shape[1] + n
                kwargs["attention_mask"] = extend_mask(mask, n, target)
        return kwargs

    if cache_length(given_cache(kwargs)) > 0:  # a decoding step: the prompt is in the cache
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = extend_mask(mask, n, mask.shape[1] + n)
        return kwargs
    length = _prepend(model, prompt(), k, kwargs)
    kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n, length + n)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == length:  # per-token labels
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
    token_types = kwargs.get("token_type_ids")
    if token_types is not None:
        kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(token_types.shape[0], n), token_types], dim=1)
    return kwargs


def transform_inputs(model: nn.Module, role: str, name: str, config: PromptTuningConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    table = model._modules[CONTAINER][name]
    return inject(model, role, config.num_virtual_tokens, config.num_prompts, lambda: table, kwargs)


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
