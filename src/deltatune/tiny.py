"""Tiny random-init models with a tokenizer, built offline: what `deltatune tiny` writes and the tests load.

A tiny model has the real architecture's module names and shapes (hidden size 32, two layers, four heads)
and a 400-token byte-level BPE tokenizer trained on a few standard-library docstrings, so every example
YAML, the pipeline and the CLI can run end to end with no download. The weights are random: a run on one
shows that the machinery works, not what a method achieves.
"""

from __future__ import annotations

import inspect
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import DeltaError
from .files import fsync_dir

SPECIALS = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>", "[CLS]", "[SEP]"]
VOCAB_SIZE = 400


def corpus() -> list[str]:
    """The tokenizer's training text: docstrings of a few stdlib modules every Python carries."""
    import functools
    import json
    import string
    import textwrap

    return [inspect.getdoc(m) or "" for m in (json, string, textwrap, functools, shutil, inspect)] * 2


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer (any text encodes) with pad, eos, unk, chat and [CLS]/[SEP] specials."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                      cls_token="[CLS]", sep_token="[SEP]")


@dataclass(frozen=True)
class Tiny:
    """One architecture: transformers' config and model class names, and its config fields at hidden size h."""

    config: str
    model: str
    fields: Callable[[int], dict[str, Any]]
    eos: bool = True  # decoders and encoder-decoders end with the tokenizer's eos; encoders classify


def _tiny(config: str, model: str, eos: bool = True, **fields: Any) -> Tiny:
    # a callable field is a function of h, the hidden size
    return Tiny(config, model, lambda h: {k: (v(h) if callable(v) else v) for k, v in fields.items()}, eos)


_LLAMA_LIKE = dict(hidden_size=lambda h: h, intermediate_size=lambda h: 2 * h, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)
_GPT2_LIKE = dict(n_embd=lambda h: h, n_layer=2, n_head=4, n_positions=256)
_BERT_LIKE = dict(hidden_size=lambda h: h, intermediate_size=lambda h: 2 * h, num_hidden_layers=2, num_attention_heads=4)

# Encoders carry a classification head (the task their examples train); the rest their language-model head.
ARCHITECTURES: dict[str, Tiny] = {
    "llama": _tiny("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE),
    "mistral": _tiny("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE),
    "qwen2": _tiny("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE),
    "qwen3": _tiny("Qwen3Config", "Qwen3ForCausalLM", **_LLAMA_LIKE, head_dim=lambda h: h // 4),
    "starcoder2": _tiny("Starcoder2Config", "Starcoder2ForCausalLM", **_LLAMA_LIKE),
    "gpt2": _tiny("GPT2Config", "GPT2LMHeadModel", **_GPT2_LIKE),
    "gpt_bigcode": _tiny("GPTBigCodeConfig", "GPTBigCodeForCausalLM", **_GPT2_LIKE),
    "bert": _tiny("BertConfig", "BertForSequenceClassification", eos=False, **_BERT_LIKE, max_position_embeddings=256),
    # RoBERTa's positions start after the pad id, hence the few extra
    "roberta": _tiny("RobertaConfig", "RobertaForSequenceClassification", eos=False, **_BERT_LIKE,
                     max_position_embeddings=260),
    "t5": _tiny("T5Config", "T5ForConditionalGeneration", d_model=lambda h: h, d_kv=lambda h: h // 4,
                d_ff=lambda h: 2 * h, num_layers=2, num_heads=4),
    "bart": _tiny("BartConfig", "BartForConditionalGeneration", d_model=lambda h: h, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=lambda h: 2 * h,
                  decoder_ffn_dim=lambda h: 2 * h, max_position_embeddings=256),
}


def _unknown(model_type: str) -> DeltaError:
    return DeltaError(f"no tiny model of type {model_type!r}: choose one of {', '.join(sorted(ARCHITECTURES))}")


def build_model(model_type: str, tokenizer: Any, seed: int = 0, width: int = 32, **overrides: Any) -> Any:
    """A random-init model of `model_type` sized for `tokenizer`; `overrides` are extra config fields.

    width: the hidden size (feed-forward twice that); 4-bit bases need 64 (bitsandbytes' CPU block)."""
    import torch
    import transformers as tf

    if model_type not in ARCHITECTURES:
        raise _unknown(model_type)
    if width < 4 or width % 4:
        raise DeltaError(f"width {width}: use a positive multiple of 4 (the models have four attention heads)")
    tiny = ARCHITECTURES[model_type]
    ids: dict[str, Any] = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if tiny.eos:  # bos too: GPT-2's default (50256) lies outside a 400-token vocabulary
        ids["eos_token_id"] = ids["bos_token_id"] = tokenizer.eos_token_id
    if model_type == "t5":
        ids["decoder_start_token_id"] = tokenizer.pad_token_id
    config = getattr(tf, tiny.config)(**{**tiny.fields(width), **ids, **overrides})
    torch.manual_seed(seed)
    return getattr(tf, tiny.model)(config)


def write_tiny(model_type: str, folder: str | Path, seed: int = 0, width: int = 32, tokenizer: Any = None,
               **overrides: Any) -> Path:
    """Save a tiny `model_type` model and its tokenizer at `folder`, atomically; returns the folder.

    The files are written into a temporary sibling that is renamed into place, so `folder` either holds a
    whole model or is left as it was. A folder that exists and is not empty is refused, never overwritten."""
    folder = Path(folder)
    if model_type not in ARCHITECTURES:  # before any work, and before touching the disk
        raise _unknown(model_type)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "is not empty" if folder.is_dir() else "is a file"
        raise DeltaError(f"{folder} already exists and {what}: choose a new folder (nothing was written)")
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    model = build_model(model_type, tokenizer, seed=seed, width=width, **overrides)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{secrets.token_hex(4)}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            folder.rmdir()  # empty (checked above): the rename needs the name free
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    fsync_dir(folder.parent)
    return folder
