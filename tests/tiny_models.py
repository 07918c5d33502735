"""Tiny random transformers models, one per architecture family, built in code (no downloads)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

warnings.filterwarnings("ignore")
tf.logging.set_verbosity_error()

VOCAB = 96
SEQ = 8


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], torch.nn.Module]
    kind: str  # "causal", "seq_cls", "seq2seq"
    has_bias: bool = True


def _causal(config_cls, model_cls, **kw):
    return lambda: model_cls(config_cls(vocab_size=VOCAB, **kw))


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("llama", _causal(tf.LlamaConfig, tf.LlamaForCausalLM, num_key_value_heads=2, **SMALL), "causal", has_bias=False),
        Arch("mistral", _causal(tf.MistralConfig, tf.MistralForCausalLM, num_key_value_heads=2, **SMALL), "causal", has_bias=False),
        Arch("qwen2", _causal(tf.Qwen2Config, tf.Qwen2ForCausalLM, num_key_value_heads=2, **SMALL), "causal"),
        Arch("gpt2", _causal(tf.GPT2Config, tf.GPT2LMHeadModel, n_embd=32, n_layer=2, n_head=4, n_positions=64), "causal"),
        Arch("gpt_bigcode", _causal(tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, n_embd=32, n_layer=2, n_head=4, n_positions=64), "causal"),
        Arch("gpt_neox", _causal(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, **SMALL), "causal"),
        Arch("opt", _causal(tf.OPTConfig, tf.OPTForCausalLM, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                            num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64), "causal"),
        Arch("bloom", _causal(tf.BloomConfig, tf.BloomForCausalLM, hidden_size=32, n_layer=2, n_head=4), "causal"),
        Arch("bert", _causal(tf.BertConfig, tf.BertForSequenceClassification, num_labels=3, **SMALL), "seq_cls"),
        Arch("roberta", _causal(tf.RobertaConfig, tf.RobertaForSequenceClassification, num_labels=3, pad_token_id=1, **SMALL), "seq_cls"),
        Arch("t5", _causal(tf.T5Config, tf.T5ForConditionalGeneration, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                           num_heads=4, decoder_start_token_id=0), "seq2seq", has_bias=False),
        Arch("bart", _causal(tf.BartConfig, tf.BartForConditionalGeneration, d_model=32, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                             max_position_embeddings=64, init_std=0.2), "seq2seq"),
    ]
}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch].build()
    model.eval()  # dropout off: every comparison below is exact
    return model


def batch(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch of two rows, the second padded at the end, with labels for the model's loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, -2:] = 0
    kind = ARCHS[arch].kind
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "causal":
        out["labels"] = ids.masked_fill(mask == 0, -100)
    elif kind == "seq_cls":
        out["labels"] = torch.tensor([0, 2])
    else:
        out["labels"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return out


def logits(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**data).logits
