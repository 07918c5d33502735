"""Tiny tokenizers in the styles real chat models use, built offline, for the template x tokenizer tests.

    bytelevel   byte-level BPE, no BOS added (GPT-2, Qwen, Llama-3 style)
    metaspace   sentencepiece-style BPE (`▁` for spaces) that adds <s> (Llama-2, Mistral, Gemma style)

Both know every built-in template's marker tokens as special tokens, as the real tokenizers do.
"""

from __future__ import annotations

import functools
from typing import Any

MARKERS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "[INST]", "[/INST]",
           "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
           "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
STYLES = ("bytelevel", "metaspace")


@functools.lru_cache(maxsize=None)
def tokenizer(style: str) -> Any:
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from deltatune.tiny import corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=style == "metaspace"))
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
        specials += alphabet
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus() + ["Hello there, how are you? I am fine. What is the weather in Paris today?"], trainer)
    if style == "metaspace":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": MARKERS})
    return fast
