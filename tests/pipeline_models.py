"""Tiny models saved as folders with a tokenizer, so the pipeline and the CLI can load them by path."""

from __future__ import annotations

import functools
import inspect
import json
import shutil
import textwrap
from pathlib import Path

import torch
import transformers as tf

SPECIALS = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>", "[CLS]", "[SEP]"]


@functools.lru_cache(maxsize=1)
def _corpus() -> list[str]:
    import json as json_module
    import string

    return [inspect.getdoc(m) or "" for m in (json_module, string, textwrap, functools, shutil, inspect)] * 2


@functools.lru_cache(maxsize=None)
def _tokenizer_files(folder: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                      cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(folder)
    return folder


def tokenizer_folder(root: Path) -> Path:
    folder = root / "tokenizer"
    if not folder.exists():
        _tokenizer_files(str(folder))
    return folder


def save_tiny(root: Path, arch: str, seed: int = 0, width: int = 32, **overrides) -> Path:
    """A tiny random model of `arch` with the shared BPE tokenizer, saved at root/arch.

    width: the hidden size (feed-forward twice that); 4-bit bases need 64 (bitsandbytes' CPU block)."""
    folder = root / (f"{arch}-{seed}" if width == 32 else f"{arch}-{seed}-w{width}")
    h, ffn = width, 2 * width
    if folder.exists():
        return folder
    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_folder(root))
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=h, intermediate_size=ffn, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=256, **common, **overrides))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=h, n_layer=2, n_head=4, n_positions=256, **common, **overrides))
    elif arch == "gpt_bigcode":
        model = tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(n_embd=h, n_layer=2, n_head=4, n_positions=256, **common,
                                                             **overrides))
    elif arch == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=h, intermediate_size=ffn, num_hidden_layers=2,
                                                               num_attention_heads=4, max_position_embeddings=256,
                                                               vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                                               **overrides))
    elif arch == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(hidden_size=h, intermediate_size=ffn, num_hidden_layers=2,
                                                                     num_attention_heads=4, max_position_embeddings=260,
                                                                     vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                                                     **overrides))
    elif arch == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=h, d_kv=h // 4, d_ff=ffn, num_layers=2, num_heads=4,
                                                          decoder_start_token_id=tokenizer.pad_token_id, **common, **overrides))
    elif arch == "bart":  # a seq2seq model with bias terms (t5 has none)
        model = tf.BartForConditionalGeneration(tf.BartConfig(d_model=h, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                                                              encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                                              decoder_attention_heads=4, max_position_embeddings=256,
                                                              decoder_start_token_id=tokenizer.eos_token_id,
                                                              bos_token_id=tokenizer.eos_token_id, **common, **overrides))
    else:
        raise ValueError(arch)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
