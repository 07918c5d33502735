"""Trainable-parameter counts on full-size shapes, built on the meta device (no memory).

Each figure is the published one (LoRA paper, BitFit paper, QLoRA/peft benchmarks),
or computed from the architecture's shapes in REFERENCE.md.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import deltatune as dt


def on_meta(config, cls):
    with torch.device("meta"):
        return cls(config)


def trainable(model) -> int:
    return dt.summary(model, print_table=False).trainable


@pytest.fixture(scope="module")
def gpt3_shape():
    # GPT-3 175B's shape in a llama body: 96 layers, width 12288, full multi-head attention.
    config = tf.LlamaConfig(hidden_size=12288, num_hidden_layers=96, num_attention_heads=96, num_key_value_heads=96,
                            intermediate_size=4 * 12288, vocab_size=50257)
    return config


@pytest.mark.parametrize("r,expected", [(1, 4_718_592), (8, 37_748_736)])
def test_lora_on_gpt3_shape_matches_the_lora_paper(gpt3_shape, r, expected):
    model = on_meta(gpt3_shape, tf.LlamaForCausalLM)
    dt.attach(model, dt.LoraConfig(r=r, alpha=r, target_modules=["q_proj", "v_proj"]))
    assert trainable(model) == expected
    assert all(p.device.type == "meta" for p in model.parameters())


def test_lora_on_roberta_base_and_large():
    for hidden, layers, heads, ffn, expected in [(768, 12, 12, 3072, 294_912), (1024, 24, 16, 4096, 786_432)]:
        config = tf.RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=ffn, vocab_size=50265)
        model = on_meta(config, tf.RobertaModel)
        dt.attach(model, dt.LoraConfig(r=8, alpha=16))  # default targets: query, value
        assert trainable(model) == expected


def test_bitfit_on_bert_large_matches_the_bitfit_paper():
    config = tf.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=30522)
    model = on_meta(config, tf.BertModel)
    dt.attach(model, dt.BitFitConfig())
    stats = dt.summary(model, print_table=False)
    assert (stats.trainable, stats.total) == (272_384, 335_141_888)
    assert round(stats.percent, 4) == 0.0813


def test_prompt_tuning_on_t5_xxl_shape():
    config = tf.T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, vocab_size=32128)
    model = on_meta(config, tf.T5ForConditionalGeneration)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=5))
    # 5 x 4096 train, the paper's count; peft's two-block layout exists only in the file.
    assert trainable(model) == 20_480


def test_llama_3b_shape_lora_and_prompt_tuning():
    model = llama_3b()
    dt.attach(model, dt.LoraConfig(r=32, alpha=64))
    assert trainable(model) == 9_175_040
    dt.detach(model)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=200))
    assert trainable(model) == 614_400


def llama_3b():
    config = tf.LlamaConfig(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                            head_dim=128, intermediate_size=8192, vocab_size=128256)
    return on_meta(config, tf.LlamaForCausalLM)


def test_ia3_on_llama_3b_k_v_down():
    model = llama_3b()
    dt.attach(model, dt.IA3Config())  # llama's default: k_proj, v_proj, down_proj (feed-forward)
    # 28 layers x (k: 8 KV heads x 128 = 1024 + v: 1024 + down's input: 8192)
    assert trainable(model) == 28 * (1024 + 1024 + 8192) == 286_720


def test_ia3_on_t0_3b_shape():
    # T0-3B as REFERENCE.md gives it: 24 + 24 layers, d_model 2048, 32 heads x 128, gated FFN 5120
    config = tf.T5Config(d_model=2048, d_kv=128, num_heads=32, d_ff=5120, num_layers=24, num_decoder_layers=24,
                         feed_forward_proj="gated-gelu", vocab_size=32128)
    model = on_meta(config, tf.T5ForConditionalGeneration)
    dt.attach(model, dt.IA3Config())  # t5's default: k, v and wo (feed-forward)
    stats = dt.summary(model, print_table=False)
    # encoder: self-attention k, v (4096 each) + wo's input (5120); decoder adds cross-attention k, v
    assert stats.trainable == 24 * (2 * 4096 + 5120) + 24 * (4 * 4096 + 5120) == 835_584
    # peft 0.21.2 on the same meta model counts the same. This shape totals 3,992,754,176 parameters
    # (T5 v1.1 unties the output head), so the share is 0.021%, not the 0.01% quoted for "3B".
    assert stats.total == 3_992_754_176 and round(stats.percent, 3) == 0.021


# LoHa and LoKr have no published counts: computed by hand below (peft 0.21.2 counts the same).


def test_loha_on_llama_3b_by_hand():
    model = llama_3b()
    dt.attach(model, dt.LoHaConfig(r=8, alpha=16))  # default targets q_proj, v_proj
    # 2r(out + in) per module: q (3072 x 3072) 2*8*6144 = 98,304; v (1024 x 3072) 2*8*4096 = 65,536
    assert trainable(model) == 28 * (98_304 + 65_536) == 4_587_520


def test_lokr_on_llama_3b_by_hand():
    model = llama_3b()
    dt.attach(model, dt.LoKrConfig(r=8, alpha=16))  # default targets q_proj, v_proj
    # 3072 = 48 x 64, 1024 = 32 x 32 (largest divisor up to the square root, and its cofactor).
    # q: W1 48 x 48 = 2,304; W2 64 x 64 has r = 8 < 64/2, so W2a 64 x 8 + W2b 8 x 64 = 1,024.
    # v (out 1024 = 32 x 32, in 48 x 64): W1 32 x 48 = 1,536; W2 (32 x 64) low-rank: 32 x 8 + 8 x 64 = 768.
    assert trainable(model) == 28 * (2_304 + 1_024 + 1_536 + 768) == 157_696
