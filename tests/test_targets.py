"""Target selection: names, suffixes, regexes, all-linear, layer indices, defaults, errors."""

from __future__ import annotations

import types

import pytest
import torch.nn as nn

import deltatune as dt
from deltatune.methods.lora import LoraLayer
from deltatune.targets import DEFAULT_TARGETS, default_targets, layer_index, pattern_value
from tiny_models import ARCHS, build


def wrapped(model):
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_listed_architecture_has_working_default_targets(arch):
    model = build(arch)
    dt.attach(model, dt.LoraConfig())
    names = wrapped(model)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert leaves == set(DEFAULT_TARGETS["lora"][model.config.model_type])
    assert dt.attached(model)["default"].target_modules == DEFAULT_TARGETS["lora"][model.config.model_type]


def test_starcoder_and_chatglm_defaults():
    assert DEFAULT_TARGETS["lora"]["gpt_bigcode"] == ["c_attn", "c_proj"]
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="chatglm"))
    assert default_targets("lora", fake) == ["query_key_value"]


def test_unknown_architecture_asks_for_targets_and_lists_linear_modules():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(dt.DeltaError, match=r"no default target modules .* pass target_modules=.*Linear modules in this model: 0"):
        dt.attach(net, dt.LoraConfig())


def test_exact_name_suffix_and_regex():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(target_modules=["model.layers.0.self_attn.q_proj", "down_proj"]))
    assert wrapped(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    model = build("llama")
    dt.attach(model, dt.LoraConfig(target_modules=r".*\.1\.self_attn\.(k|o)_proj"))
    assert wrapped(model) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]


def test_all_linear_skips_the_output_head_and_classifier():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(target_modules="all-linear"))
    names = wrapped(model)
    assert len(names) == 2 * 7 and "lm_head" not in names
    model = build("bert")
    dt.attach(model, dt.LoraConfig(target_modules="all-linear"))
    assert not any(n.startswith("classifier") for n in wrapped(model))
    gpt2 = build("gpt2")
    dt.attach(gpt2, dt.LoraConfig(target_modules="all-linear"))
    assert len(wrapped(gpt2)) == 2 * 4  # Conv1D c_attn, c_proj, c_fc, mlp.c_proj per block


def test_exclude_modules():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(target_modules="all-linear", exclude_modules=["gate_proj", "up_proj", "down_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in wrapped(model)} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_unmatched_target_lists_the_modules_that_exist():
    model = build("llama")
    with pytest.raises(dt.DeltaError) as err:
        dt.attach(model, dt.LoraConfig(target_modules=["query", "value"]))
    message = str(err.value)
    assert "matched no module of LlamaForCausalLM" in message
    for leaf in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]:
        assert leaf in message
    assert not wrapped(model) and all(p.requires_grad for p in model.parameters())  # nothing half-done


def test_unsupported_module_type_is_named():
    model = build("llama")
    with pytest.raises(dt.DeltaError, match=r"lora cannot wrap model.layers.0.mlp \(LlamaMLP\)"):
        dt.attach(model, dt.LoraConfig(target_modules=["mlp"]))


def test_layer_restriction_that_matches_nothing_says_so():
    with pytest.raises(dt.DeltaError, match=r"within layers \[7\] matched no module"):
        dt.attach(build("llama"), dt.LoraConfig(layers_to_transform=7))


def test_layer_index_and_pattern_helpers():
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("encoder.block.2.layer.0.SelfAttention.q") == 2
    assert layer_index("lm_head") is None
    assert layer_index("model.layers.5.mlp", layers_pattern="layers") == 5
    assert pattern_value("model.layers.1.self_attn.q_proj", {"v_proj": 1, r"layers\.1\..*q_proj": 16}, 8) == 16
    assert pattern_value("model.layers.1.self_attn.k_proj", {"v_proj": 1}, 8) == 8


def test_attaching_the_same_name_twice_is_an_error():
    model = build("llama")
    dt.attach(model, dt.LoraConfig())
    with pytest.raises(dt.DeltaError, match="already attached; pass another name"):
        dt.attach(model, dt.LoraConfig())
