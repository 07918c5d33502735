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


def test_adalora_on_roberta_base_at_init_and_at_the_target_budget():
    config = tf.RobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              vocab_size=50265)
    ada = dt.AdaLoraConfig(init_r=12, target_r=8, total_step=1000, target_modules=["query", "value"])
    # Each module adapts a 768 x 768 weight with P (768 x r), lambda (r x 1), Q (r x 768): r x (768 + 768 + 1) = 1537 r.
    # At init: 24 modules x 12 x 1537 = 442,656.
    model = on_meta(config, tf.RobertaModel)
    dt.attach(model, ada)
    assert trainable(model) == 442_656
    # At the target budget the total rank is 8 x 24 = 192, however it is spread: 192 x 1537 = 295,104.
    # Here the queries keep 4 triplets and the values all 12 (a saved adapter's rank_pattern).
    pattern = {f"encoder.layer.{i}.attention.self.{m}.lora_E": [True] * k + [False] * (12 - k)
               for i in range(12) for m, k in (("query", 4), ("value", 12))}
    model = on_meta(config, tf.RobertaModel)
    dt.attach(model, ada.replace(rank_pattern=pattern))
    assert trainable(model) == 295_104


BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=30522)


def test_full_fine_tuning_of_bert_large_trains_every_parameter():
    model = on_meta(tf.BertConfig(**BERT_LARGE), tf.BertModel)
    dt.attach(model, dt.FullConfig())
    stats = dt.summary(model, print_table=False)
    assert (stats.trainable, stats.total) == (335_141_888, 335_141_888)


def test_diff_pruning_of_bert_large_keeps_half_a_percent():
    from deltatune.methods.diff_pruning import kept_entries

    model = on_meta(tf.BertConfig(**BERT_LARGE), tf.BertModel)
    dt.attach(model, dt.DiffPruningConfig(target_sparsity=0.005))
    # BertModel has no head and no tied weight, so the diff covers all 335,141,888 parameters
    # (BitFit's total above); w and alpha train for each: 2 x 335,141,888 = 670,283,776.
    stats = dt.summary(model, print_table=False)
    assert stats.trainable == 670_283_776
    # kept at 0.5%: round(0.005 x 335,141,888) = round(1,675,709.44) = 1,675,709
    assert kept_entries(model) == 1_675_709
    dt.finalize(model)  # the projection runs on shapes alone here


def llama_3b():
    config = tf.LlamaConfig(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                            head_dim=128, intermediate_size=8192, vocab_size=128256)
    return on_meta(config, tf.LlamaForCausalLM)


_llama_3b = llama_3b


def test_ia3_on_llama_3b_k_v_down():
    model = llama_3b()
    dt.attach(model, dt.IA3Config())  # llama's default: k_proj, v_proj, down_proj (feed-forward)
    # 28 layers x (k: 8 KV heads x 128 = 1024 + v: 1024 + down's input: 8192)
    assert trainable(model) == 28 * (1024 + 1024 + 8192) == 286_720


def test_vera_on_roberta_base_and_large_as_published():
    # VeRA paper, Table 2 (GLUE): 0.043M on RoBERTa-base at r=1024, 0.061M on RoBERTa-large at r=256, query and value
    for (hidden, layers, heads, r), published in [((768, 12, 12, 1024), 43_008), ((1024, 24, 16, 256), 61_440)]:
        config = tf.RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=4 * hidden, vocab_size=50265)
        model = on_meta(config, tf.RobertaModel)
        dt.attach(model, dt.VeraConfig(r=r))  # roberta's default: query, value
        assert trainable(model) == layers * 2 * (r + hidden) == published
        pair = model.vera_projections["default"]  # one frozen pair for all 2 x layers targets, not trained
        assert pair.vera_A.shape == (r, hidden) and pair.vera_B.shape == (hidden, r)


def test_vera_on_llama_3b_q_v():
    model = llama_3b()
    dt.attach(model, dt.VeraConfig())  # r=256 on llama's default q_proj (3072 out), v_proj (8 x 128 = 1024 out)
    assert trainable(model) == 28 * ((256 + 3072) + (256 + 1024)) == 129_024


def test_hra_on_llama_3b_q_v():
    model = llama_3b()
    dt.attach(model, dt.HRAConfig())  # r=8 vectors of length 3072 (the input) on q_proj and v_proj alike
    assert trainable(model) == 28 * 2 * 8 * 3072 == 1_376_256


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
# ---------------------------------------------------------------- bottleneck adapters and AdapterFusion
# One adapter module on width d with bottleneck m: W_down (m x d) + b_down (m) + W_up (d x m) + b_up (d)
# = 2dm + m + d. Houlsby puts two per block, Pfeiffer and parallel one. A fusion adds per adapted
# module Q and K (d x d with bias) and V (d x d): 3d² + 2d.

BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=30522)
LLAMA_3B = dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                intermediate_size=8192, vocab_size=128256)


def test_houlsby_adapters_on_bert_large_match_the_houlsby_paper():
    model = on_meta(tf.BertConfig(**BERT_LARGE), tf.BertModel)
    dt.attach(model, dt.AdapterConfig(placement="houlsby"))  # reduction 16: m = 1024 / 16 = 64
    assert trainable(model) == 24 * 2 * (2 * 1024 * 64 + 64 + 1024) == 6_343_680
    dt.detach(model)
    # The paper trains the layer norms too and reports 2.1% for m = 64 (Table 1, "Adapters (64)"),
    # relative to the transformer layers (24 x 12,596,224 parameters; embeddings and pooler aside).
    # Its 3.6% is the mean over tasks of per-task sizes m in {8, 64, 256}.
    dt.attach(model, dt.AdapterConfig(placement="houlsby", bottleneck_size=64, train_layer_norms=True))
    layers = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.") and not p.requires_grad)
    norms = 24 * 2 * 2 * 1024
    assert trainable(model) == 6_343_680 + norms == 6_441_984
    assert layers + norms == 24 * 12_596_224 == 302_309_376
    assert round(100 * trainable(model) / (layers + norms), 1) == 2.1


def test_pfeiffer_and_parallel_adapters_on_llama_3b_shape():
    model = on_meta(tf.LlamaConfig(**LLAMA_3B), tf.LlamaForCausalLM)
    dt.attach(model, dt.AdapterConfig(placement="pfeiffer"))  # m = 3072 / 16 = 192
    assert trainable(model) == 28 * (2 * 3072 * 192 + 192 + 3072) == 33_121_536
    dt.detach(model)
    dt.attach(model, dt.AdapterConfig(placement="parallel", bottleneck_size=512, scaling=4.0))  # He et al.'s MAM size
    assert trainable(model) == 28 * (2 * 3072 * 512 + 512 + 3072) == 88_180_736


def test_adapter_fusion_on_bert_base():
    config = tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522)
    model = on_meta(config, tf.BertModel)
    for name in ("a", "b"):
        dt.attach(model, dt.AdapterConfig(placement="pfeiffer"), name=name)
    dt.attach(model, dt.AdapterFusionConfig(adapters=["a", "b"]), name="fusion")
    assert trainable(model) == 12 * (3 * 768 * 768 + 2 * 768) == 21_252_096  # the adapters are frozen
def test_llama_3b_shape_prefix_tuning_and_p_tuning_v2():
    # n x L x 2 x w, w = 8 kv heads x 128 = 1024 (grouped-query): 200 x 28 x 2 x 1024
    model = _llama_3b()
    dt.attach(model, dt.PTuningV2Config(num_virtual_tokens=200))
    assert trainable(model) == 11_468_800
    dt.detach(model)
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=200, projection=False))
    assert trainable(model) == 11_468_800
    dt.detach(model)
    # with the projection (h = w = 1024) training: E 200 x 1024, Linear(1024 -> 1024), Linear(1024 -> 57,344)
    # = 204,800 + (1,048,576 + 1,024) + (58,720,256 + 57,344) = 60,032,000; the file and a loaded adapter hold 11,468,800
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=200))
    assert trainable(model) == 60_032_000
    assert all(p.device.type == "meta" for p in model.parameters())


def test_llama_3b_shape_p_tuning_and_prompt_ensemble():
    model = _llama_3b()
    # n d + three Linear(3072 -> 3072): 200 x 3072 + 3 x (3072 x 3072 + 3072) = 614,400 + 28,320,768;
    # folded for saving and inference: 614,400
    dt.attach(model, dt.PTuningConfig(num_virtual_tokens=200))
    assert trainable(model) == 28_935_168
    dt.detach(model)
    # LSTM encoder, h = 256: BiLSTM of 2 layers (4 (h (in + h) + 2 h) per direction, in = 3072 then 512),
    # then Linear(512 -> 512) and Linear(512 -> 3072)
    dt.attach(model, dt.PTuningConfig(num_virtual_tokens=200, encoder="lstm", encoder_hidden_size=256))
    lstm = 2 * 4 * (256 * (3072 + 256) + 2 * 256) + 2 * 4 * (256 * (512 + 256) + 2 * 256)
    assert trainable(model) == 614_400 + lstm + (512 * 512 + 512) + (512 * 3072 + 3072)
    dt.detach(model)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=200, num_prompts=4))  # 4 prompts of 200 x 3072
    assert trainable(model) == 2_457_600
