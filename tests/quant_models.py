"""Tiny models for the quantised-base tests: the contract's architectures at width 64.

bitsandbytes' CPU kernels want a 4-bit layer's input width to hold whole blocks of 64 (and
its output rows in multiples of 32), so these are the contract's tiny models (tiny_models.py)
with hidden size 64 and feed-forward width 128; every linear layer then quantises. Each is
saved once per test session to a folder, and loaded from there as transformers loads any
quantised checkpoint: from_pretrained(folder, quantization_config=...).
"""

from __future__ import annotations

import functools
import logging
import tempfile
import warnings

import torch
import transformers as tf

from deltatune import quant
from tiny_models import VOCAB, ARCHS, ChatGLMStyleConfig, ChatGLMStyleForCausalLM

warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" on every 8-bit eval

W = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
GPT = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)

WIDE: dict[str, tuple[type, type, dict]] = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2, **W)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(num_key_value_heads=2, **W)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=2, **W)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, GPT),
    "gpt_bigcode": (tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, GPT),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, W),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM, dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                                  word_embed_proj_dim=64, max_position_embeddings=64)),
    "bloom": (tf.BloomConfig, tf.BloomForCausalLM, dict(hidden_size=64, n_layer=2, n_head=4)),
    "chatglm": (ChatGLMStyleConfig, ChatGLMStyleForCausalLM, dict(hidden_size=64)),
    "bert": (tf.BertConfig, tf.BertForSequenceClassification, dict(num_labels=3, **W)),
    "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification, dict(num_labels=3, pad_token_id=1, **W)),
    "t5": (tf.T5Config, tf.T5ForConditionalGeneration, dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                                           decoder_start_token_id=0)),
    "bart": (tf.BartConfig, tf.BartForConditionalGeneration, dict(d_model=64, encoder_layers=2, decoder_layers=2,
                                                                 encoder_attention_heads=4, decoder_attention_heads=4,
                                                                 encoder_ffn_dim=128, decoder_ffn_dim=128,
                                                                 max_position_embeddings=64, init_std=0.2)),
}
assert set(WIDE) == set(ARCHS)


def wide(arch: str, seed: int = 0) -> torch.nn.Module:
    """The full-precision model (fp32, eval mode)."""
    config_cls, model_cls, kwargs = WIDE[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=VOCAB, **kwargs))
    return model.eval()


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> str:
    """A folder holding wide(arch) as save_pretrained writes it (one per session)."""
    folder = tempfile.mkdtemp(prefix=f"deltatune-quant-{arch}-")
    wide(arch).save_pretrained(folder)
    return folder


def quantized(arch: str, kind: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
              quantize_heads: bool = False) -> torch.nn.Module:
    """wide(arch) loaded from its checkpoint with the base quantised (eval mode). A classifier's head stays
    in full precision, as deltatune.load_base keeps it, unless quantize_heads."""
    _, model_cls, _ = WIDE[arch]
    heads = None if quantize_heads or ARCHS[arch].kind != "seq_cls" else ["lm_head", *quant.CLASSIFIER_HEADS]
    config = quant.quantization_config(kind, compute_dtype, double_quant=double_quant, skip_modules=heads)
    model = model_cls.from_pretrained(checkpoint(arch), quantization_config=config)
    quant.keep_trainable_layouts(model)
    return model.eval()
