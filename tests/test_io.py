"""Saving and loading: layout, config round trip, wrong models, damaged files, atomic writes."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch

import deltatune as dt
from deltatune.io import CONFIG_NAME, WEIGHTS_NAME
from tiny_models import batch, build, logits
from test_lora import perturb


def saved_lora(tmp_path, arch="llama", **kw):
    model = build(arch)
    dt.attach(model, dt.LoraConfig(r=4, **kw))
    perturb(model)
    dt.save(model, tmp_path)
    return model


@pytest.mark.parametrize(
    "config",
    [
        dt.LoraConfig(r=4, alpha=16, target_modules="all-linear", rank_pattern={"q_proj": 2}, use_dora=True),
        dt.PromptTuningConfig(num_virtual_tokens=4, init="text", init_text="hello"),
        dt.BitFitConfig(target_modules=["query", "value"]),
    ],
)
def test_config_json_round_trip(config):
    assert dt.config_from_json(config.to_json()) == config
    assert json.loads(config.to_json())["method"] == config.method


def test_config_errors_name_the_field():
    with pytest.raises(dt.DeltaError, match=r"LoraConfig.r = 0 is not allowed: 0 must be > 0"):
        dt.LoraConfig(r=0)
    with pytest.raises(dt.DeltaError, match="has no field.*lora_alpha"):
        dt.config_from_dict({"method": "lora", "lora_alpha": 4})
    with pytest.raises(dt.DeltaError, match="unknown method 'nope'"):
        dt.config_from_dict({"method": "nope"})


def test_saved_files_and_metadata(tmp_path):
    saved_lora(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, "README.md"}
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True and config["r"] == 4
    with open(tmp_path / WEIGHTS_NAME, "rb") as f:
        header = json.loads(f.read(8 + int.from_bytes(open(tmp_path / WEIGHTS_NAME, "rb").read(8), "little"))[8:])
    digest = hashlib.sha256((tmp_path / CONFIG_NAME).read_bytes()).hexdigest()
    assert header["__metadata__"] == {"format": "pt", "deltatune_config_sha256": digest}  # ties the pair together
    keys = set(safetensors.torch.load_file(tmp_path / WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 8


def test_several_adapters_save_in_peft_layout_and_load_by_name(tmp_path):
    model = build("llama")
    data = batch("llama")
    dt.attach(model, dt.LoraConfig(r=4, init="none"))
    out_default = logits(model, data)
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="other")
    out_other = logits(model, data)
    dt.save(model, tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / "other" / CONFIG_NAME).is_file()
    fresh = build("llama")
    dt.load(fresh, tmp_path)
    dt.load(fresh, tmp_path / "other", name="other")
    assert dt.active(fresh) == ["other"]
    torch.testing.assert_close(logits(fresh, data), out_other, rtol=0, atol=0)
    dt.set_active(fresh, "default")
    torch.testing.assert_close(logits(fresh, data), out_default, rtol=0, atol=0)


def test_loaded_delta_is_frozen_unless_asked(tmp_path):
    saved_lora(tmp_path)
    frozen = dt.load(build("llama"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = dt.load(build("llama"), tmp_path, trainable=True)
    assert dt.summary(trainable, print_table=False).trainable == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)


def test_loading_into_a_different_model_names_the_first_bad_key(tmp_path):
    saved_lora(tmp_path)
    wider = build("llama")
    import transformers as tf

    torch.manual_seed(0)
    wider = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(dt.DeltaError) as err:
        dt.load(wider, tmp_path)
    message = str(err.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "[4, 32] in the file but [4, 64] in the model" in message
    assert "_deltatune_state" not in wider.__dict__  # nothing left attached
    assert all(p.requires_grad for p in wider.parameters())


def test_loading_into_a_model_with_fewer_layers_names_the_extra_key(tmp_path):
    saved_lora(tmp_path)
    import transformers as tf

    shallow = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(dt.DeltaError, match=r"the file has key base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"):
        dt.load(shallow, tmp_path)


def test_truncated_weights_are_a_clear_error(tmp_path):
    saved_lora(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(dt.DeltaError, match="corrupted or truncated"):
        dt.load(build("llama"), tmp_path)


def test_corrupted_config_is_a_clear_error(tmp_path):
    saved_lora(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(dt.DeltaError, match="not valid JSON"):
        dt.load(build("llama"), tmp_path)


def test_missing_folder_and_unsupported_peft_options(tmp_path):
    with pytest.raises(dt.DeltaError, match="no adapter folder at .*nowhere"):
        dt.load(build("llama"), tmp_path / "nowhere")
    saved_lora(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["layer_replication"] = [[0, 1]]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(dt.DeltaError, match="do not belong together"):  # edited after the save
        dt.load(build("llama"), tmp_path)
    with pytest.raises(dt.DeltaError, match="peft option layer_replication"):
        dt.load(build("llama"), tmp_path, verify=False)
    config["peft_type"] = "BOFT"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(dt.DeltaError, match="'BOFT' are not supported"):
        dt.load(build("llama"), tmp_path, verify=False)


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = saved_lora(tmp_path)
    data = batch("llama")
    good = logits(model, data)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    perturb(model, seed=5)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("deltatune.io.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        dt.save(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left either
    torch.testing.assert_close(logits(dt.load(build("llama"), tmp_path), data), good, rtol=0, atol=0)


def test_lora_on_a_tied_embedding_saves_loads_and_refuses_to_merge(tmp_path):
    model = build("gpt2")  # GPT-2 ties lm_head to wte
    dt.attach(model, dt.LoraConfig(target_modules=["wte"], r=2))
    perturb(model)
    data = batch("gpt2")
    dt.save(model, tmp_path)
    torch.testing.assert_close(logits(dt.load(build("gpt2"), tmp_path), data), logits(model, data), rtol=0, atol=0)
    with pytest.raises(dt.DeltaError, match=r"cannot merge .default. into transformer.wte: its weight is shared \(tied\) with lm_head.weight"):
        dt.merge(model)


def test_bitfit_saves_only_the_biases(tmp_path):
    model = build("bert")
    data = batch("bert")
    dt.attach(model, dt.BitFitConfig(target_modules=["query", "value"]))
    perturb(model)
    dt.save(model, tmp_path)
    keys = set(safetensors.torch.load_file(tmp_path / WEIGHTS_NAME))
    assert all(k.endswith("bias") or ".classifier." in k for k in keys)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.bias" in keys
    assert "base_model.model.classifier.weight" in keys  # the sequence-classification head trains whole
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["peft_type"] == "BITFIT"
    torch.testing.assert_close(logits(dt.load(build("bert"), tmp_path), data), logits(model, data), rtol=0, atol=0)
