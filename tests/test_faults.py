"""The fault catalogue: every bad input and fault we know of, and what deltatune does about it.

Each test feeds one mistake or fault and asserts the error type, that the message
names the field, key or file at fault (and says what to do), and that the model
and the files on disk are exactly as before. The generic faults run for every
method of the contract suite's METHODS, so a new method joins the catalogue by
joining that list. Crash safety under SIGKILL is in test_crash_safety.py. The catalogue goes on in
test_faults_runs.py (run folders, checkpoints, resume), test_faults_pipeline.py (evaluation, AdaLoRA,
classifier heads, generate), test_faults_inputs.py (configs, data files, base models, the planner's
sizes, adapter names) and test_faults_commands.py (what `deltatune merge --out` may replace).
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import transformers as tf

import deltatune as dt
from checks import assert_unchanged, fingerprint, folder_bytes
from deltatune.io import CONFIG_NAME, WEIGHTS_NAME
from deltatune.model_files import MARKER
from deltatune.methods.lora import LoraLayer
from deltatune.surgery import DeltaLayer
from test_contract import METHODS, fresh
from test_lora import perturb
from tiny_models import batch, build, logits

GENERIC = [pytest.param(m, id=m.name) for m in METHODS]
# Methods whose file has no tensor shaped by the model: a wider model takes it without a shape to mismatch.
SHAPELESS = {"fourierft": "FourierFT's file holds n coefficients per layer whatever the layer's shape (the seed gives "
                          "the locations), as peft's does: a model with the same module names takes it"}
FITTING = [pytest.param(m, id=m.name, marks=[pytest.mark.skip(reason=SHAPELESS[m.name])] if m.name in SHAPELESS else [])
           for m in METHODS]


def _arch(method) -> str:
    return "gpt2"  # has biases, Conv1D and a tied head: every method applies


def _trained_and_saved(method, folder, name="default"):
    model = fresh(_arch(method), method)
    dt.attach(model, method.make(), name=name)
    perturb(model)
    dt.save(model, folder)
    return model


def _files(method) -> tuple[str, str, set[str]]:
    """(config file, weights file, every file) of the folder the method saves: an adapter, or a whole model."""
    if dt.METHODS[method.make().method].folder == "model":
        return MARKER, "model.safetensors", {MARKER, "model.safetensors", "config.json", "generation_config.json", "README.md"}
    return CONFIG_NAME, WEIGHTS_NAME, {CONFIG_NAME, WEIGHTS_NAME, "README.md"}


def _wider_gpt2(method=None):
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    if method is not None and method.prepare is not None:
        method.prepare(model)  # what the method's file needs attached first (a fusion's adapters)
    return model


# ---------------------------------------------------------------- files: every method


@pytest.mark.parametrize("method", FITTING)
def test_loading_into_the_wrong_model_names_the_key_and_changes_nothing(method, tmp_path):
    _trained_and_saved(method, tmp_path)
    files = folder_bytes(tmp_path)
    wider = _wider_gpt2(method)
    prepared = dict(dt.attached(wider)) if method.prepare else {}
    before = fingerprint(wider)
    with pytest.raises(dt.DeltaError, match=r"does not fit GPT2LMHeadModel: key \S+ (has shape \[.*\] in the file but|is missing)"):
        dt.load(wider, tmp_path)
    assert_unchanged(wider, before)
    assert dt.attached(wider) == prepared
    assert folder_bytes(tmp_path) == files


@pytest.mark.parametrize("method", FITTING)
def test_a_failed_load_leaves_the_active_delta_alone(method, tmp_path):
    _trained_and_saved(method, tmp_path)
    model = _wider_gpt2(method)
    prepared = list(dt.attached(model))
    # on c_fc, which no method's default targets on GPT-2 (two wrapping methods never share a module); a row that
    # targets every linear (hra's) leaves only the head
    everywhere = getattr(method.make(), "target_modules", None) == "all-linear" and method.name != "lora_all_linear"
    dt.attach(model, dt.LoraConfig(r=2, init="none", target_modules=["lm_head" if everywhere else "c_fc"]), name="working")
    data = batch("gpt2")
    out, before = logits(model, data), fingerprint(model)
    with pytest.raises(dt.DeltaError, match="does not fit"):
        dt.load(model, tmp_path, name="broken")
    assert_unchanged(model, before)
    assert dt.active(model) == ["working"] and list(dt.attached(model)) == prepared + ["working"]
    assert torch.equal(logits(model, data), out)


@pytest.mark.parametrize("method", GENERIC)
def test_truncated_weights_are_refused(method, tmp_path):
    _trained_and_saved(method, tmp_path)
    _, weights_name, _ = _files(method)
    weights = tmp_path / weights_name
    weights.write_bytes(weights.read_bytes()[:-40])
    model = fresh(_arch(method), method)
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=f"{weights_name} cannot be read .*corrupted or truncated"):
        dt.load(model, tmp_path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", GENERIC)
def test_files_from_two_saves_are_refused_naming_both(method, tmp_path):
    _trained_and_saved(method, tmp_path / "one")
    other = fresh(_arch(method), method)
    config = method.make()
    # a different config (another init or size) saved elsewhere, then its config copied over
    dt.attach(other, config.replace(base_model_name_or_path="elsewhere"))
    dt.save(other, tmp_path / "two")
    config_name, weights_name, _ = _files(method)
    (tmp_path / "one" / config_name).write_bytes((tmp_path / "two" / config_name).read_bytes())
    with pytest.raises(dt.DeltaError, match=rf"{weights_name} and .*{config_name} do not belong together"):
        dt.load(fresh(_arch(method), method), tmp_path / "one")


@pytest.mark.parametrize("method", GENERIC)
def test_an_interrupted_save_keeps_the_previous_adapter(method, tmp_path, monkeypatch):
    model = _trained_and_saved(method, tmp_path)
    data = batch("gpt2")
    good, files = logits(model, data), folder_bytes(tmp_path)
    perturb(model, seed=5)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("deltatune.io.save_file", crash)
    monkeypatch.setattr("deltatune.model_files.save_pretrained", lambda model, folder, tensors: crash(
        tensors, folder / "model.safetensors"))
    with pytest.raises(KeyboardInterrupt):
        dt.save(model, tmp_path)
    assert folder_bytes(tmp_path) == files  # no temporary files left either
    torch.testing.assert_close(logits(dt.load(fresh("gpt2", method), tmp_path), data), good, rtol=0, atol=0)


@pytest.mark.parametrize("method", GENERIC)
def test_saved_files_have_the_usual_permissions(method, tmp_path):
    old = os.umask(0o022)
    try:
        _trained_and_saved(method, tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.is_file()}  # not a fusion's adapters
    assert modes == dict.fromkeys(_files(method)[2], 0o644)


@pytest.mark.parametrize("method", GENERIC)
def test_the_same_name_twice_and_unknown_names(method):
    model = fresh(_arch(method), method)
    dt.attach(model, method.make())
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match="a delta named 'default' is already attached"):
        dt.attach(model, method.make())
    attached = re.escape(str(list(dt.attached(model))))
    for call in (lambda: dt.set_active(model, "nope"), lambda: dt.set_trainable(model, "nope", True),
                 lambda: dt.merge(model, "nope"), lambda: dt.detach(model, "nope"), lambda: dt.save(model, "x", name="nope"),
                 lambda: dt.delta_parameters(model, "nope")):
        with pytest.raises(dt.DeltaError, match=f"no delta named 'nope' is attached; attached: {attached}"):
            call()
    assert_unchanged(model, before)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "make,field,fragment",
    [
        (lambda: dt.LoraConfig(use_rslora="false"), "use_rslora", "expected True or False"),
        (lambda: dt.LoraConfig(use_dora=1), "use_dora", "expected True or False"),
        (lambda: dt.LoraConfig(rank_pattern={"q_proj": 0}), "rank_pattern", "0 must be > 0"),
        (lambda: dt.LoraConfig(r=-4), "r", "-4 must be > 0"),
        (lambda: dt.LoraConfig(r=2.5), "r", "expected an int"),
        (lambda: dt.LoraConfig(r="8"), "r", "expected an int"),
        (lambda: dt.LoraConfig(r=True), "r", "expected an int"),
        (lambda: dt.LoraConfig(dropout=1.5), "dropout", "must be >= 0 and < 1"),
        (lambda: dt.LoraConfig(target_modules="q_proj("), "target_modules", "not a valid regular expression"),
        (lambda: dt.LoraConfig(target_modules=["q_proj", 3]), "target_modules", "expected a list of a string or a string or None"),
        (lambda: dt.LoraConfig(rank_pattern={"[": 4}), "rank_pattern", "not a valid regular expression"),
        (lambda: dt.LoraConfig(init="xavier"), "init", "one of 'kaiming', 'gaussian', 'none'"),
        (lambda: dt.LoraConfig(task_type="CAUSAL"), "task_type", "one of 'CAUSAL_LM'"),
        (lambda: dt.PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens", "0 must be > 0"),
        (lambda: dt.BitFitConfig(target_modules=7), "target_modules", "expected a list of a string or a string or None"),
        (lambda: dt.FreezeConfig(trainable_layers=-1), "trainable_layers", "-1 must be >= 0"),
        (lambda: dt.FreezeConfig(trainable_layers=[0, -2]), "trainable_layers", "-2 must be >= 0"),
        (lambda: dt.FreezeConfig(trainable_layers=True), "trainable_layers", "expected an int or a list of an int"),
        (lambda: dt.FreezeConfig(trainable_modules="(norm"), "trainable_modules", "not a valid regular expression"),
        (lambda: dt.FreezeConfig(train_head="yes"), "train_head", "expected True or False"),
        (lambda: dt.FullConfig(originals="gpu"), "originals", "one of 'cpu', 'same_device', 'none'"),
        (lambda: dt.DiffPruningConfig(target_sparsity=0), "target_sparsity", "0 must be > 0 and <= 1"),
        (lambda: dt.DiffPruningConfig(target_sparsity=5), "target_sparsity", "5 must be > 0 and <= 1"),
        (lambda: dt.DiffPruningConfig(limit_l=0.1), "limit_l", "0.1 must be < 0"),
        (lambda: dt.DiffPruningConfig(limit_r=1.0), "limit_r", "1.0 must be > 1"),
        (lambda: dt.DiffPruningConfig(temperature=0), "temperature", "0 must be > 0"),
        (lambda: dt.DiffPruningConfig(l0_penalty=-1e-7), "l0_penalty", "must be >= 0"),
        (lambda: dt.AdapterConfig(placement="serial"), "placement", "one of 'houlsby', 'pfeiffer', 'parallel'"),
        (lambda: dt.AdapterConfig(reduction_factor=0), "reduction_factor", "0 must be > 0"),
        (lambda: dt.AdapterConfig(reduction_factor=True), "reduction_factor", "expected a number"),
        (lambda: dt.AdapterConfig(bottleneck_size=0), "bottleneck_size", "0 must be > 0"),
        (lambda: dt.AdapterConfig(bottleneck_size=8.5), "bottleneck_size", "expected an int or None"),
        (lambda: dt.AdapterConfig(nonlinearity="tanh"), "nonlinearity", "one of 'relu', 'gelu', 'swish'"),
        (lambda: dt.AdapterConfig(target_layers=[-1]), "target_layers", "-1 must be >= 0"),
        (lambda: dt.AdapterConfig(train_layer_norms="yes"), "train_layer_norms", "expected True or False"),
        (lambda: dt.AdapterFusionConfig(adapters="ab"), "adapters", "expected a list of a string"),
        (lambda: dt.AdapterFusionConfig(adapters=["a", "b"], regularization=-1.0), "regularization", "-1.0 must be >= 0"),
        (lambda: dt.PromptTuningConfig(num_prompts=0), "num_prompts", "0 must be > 0"),
        (lambda: dt.PTuningConfig(encoder="gru"), "encoder", "one of 'mlp', 'lstm'"),
        (lambda: dt.PTuningConfig(encoder_dropout=1.0), "encoder_dropout", "must be >= 0 and < 1"),
        (lambda: dt.PTuningConfig(encoder_hidden_size=0), "encoder_hidden_size", "0 must be > 0"),
        (lambda: dt.PrefixTuningConfig(num_virtual_tokens=-1), "num_virtual_tokens", "-1 must be > 0"),
        (lambda: dt.PrefixTuningConfig(projection="yes"), "projection", "expected True or False"),
        (lambda: dt.PrefixTuningConfig(init="normal"), "init", "one of 'random', 'zero'"),
        (lambda: dt.PTuningV2Config(num_virtual_tokens=2.5), "num_virtual_tokens", "expected an int"),
    ],
)
def test_configs_validate_types_and_ranges(make, field, fragment):
    with pytest.raises(dt.DeltaError) as err:
        make()
    assert f".{field} = " in str(err.value) or f".{field}: " in str(err.value)
    assert fragment in str(err.value)


def test_configs_validate_on_load_from_json_too(tmp_path):
    text = dt.LoraConfig(r=4).to_json().replace('"use_rslora": false', '"use_rslora": "false"')
    with pytest.raises(dt.DeltaError, match=r"LoraConfig.use_rslora = 'false' is not allowed"):
        dt.config_from_json(text)
    for bad in ("[1, 2]", '"lora"', "{not json"):
        with pytest.raises(dt.DeltaError, match="JSON object|not valid JSON"):
            dt.config_from_json(bad)
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=4))
    dt.save(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["r"] = "4"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(dt.DeltaError, match=r"LoraConfig.r = '4' is not allowed: expected an int"):
        dt.load(build("llama"), tmp_path, verify=False)
    (tmp_path / CONFIG_NAME).write_text("[]")
    with pytest.raises(dt.DeltaError, match="not an object"):
        dt.load(build("llama"), tmp_path, verify=False)


def test_tuples_and_sets_become_lists():
    config = dt.LoraConfig(target_modules=("q_proj", "v_proj"), layers_to_transform={1, 0})
    assert config.target_modules == ["q_proj", "v_proj"] and config.layers_to_transform == [0, 1]
    assert dt.config_from_json(config.to_json()) == config


# ---------------------------------------------------------------- names and arguments


@pytest.mark.parametrize("name,reason", [("my.adapter", "contains '.'"), ("", "non-empty string"), ("training", "attribute name"),
                                         ("__base__", "reserved"), ("a/b", "path separator"), (3, "non-empty string"),
                                         ("keys", "attribute name")])
def test_adapter_names_that_cannot_work_are_refused(name, reason):
    model = build("llama")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=reason):
        dt.attach(model, dt.LoraConfig(), name=name)
    assert_unchanged(model, before)


def test_wrong_argument_types_are_delta_errors(tmp_path):
    model = build("llama")
    with pytest.raises(dt.DeltaError, match="expects a deltatune config"):
        dt.attach(model, {"r": 8})
    with pytest.raises(dt.DeltaError, match="expects a torch.nn.Module"):
        dt.attach("llama", dt.LoraConfig())
    with pytest.raises(dt.DeltaError, match="has no delta attached"):
        dt.detach(model)
    dt.attach(model, dt.LoraConfig())
    with pytest.raises(dt.DeltaError, match="trainable=True or False"):
        dt.set_trainable(model, "default", "yes")
    with pytest.raises(dt.DeltaError, match="list of adapter names"):
        dt.set_active(model, 3)
    with pytest.raises(dt.DeltaError, match="folder path"):
        dt.save(model, 3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(dt.DeltaError, match="it is a file, not a folder"):
        dt.save(model, tmp_path / "file")
    with pytest.raises(dt.DeltaError, match="it is a file; pass its folder"):
        dt.load(build("llama"), tmp_path / "file")
    with pytest.raises(dt.DeltaError, match="list of adapter names, one per row"):
        model(**batch("llama"), adapter_names="default")


# ---------------------------------------------------------------- all-or-nothing, with a failure injected at the end


def _two_adapters():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=4, init="none"), name="a")
    dt.attach(model, dt.LoraConfig(r=2, init="none", target_modules=["q_proj", "k_proj"]), name="b")
    dt.set_active(model, ["a", "b"])
    dt.set_trainable(model, "b", False)
    return model


def _fail_on_call(monkeypatch, owner, attribute, call: int, before: bool = False):
    """Make owner.attribute raise on its call-th call, once: after doing its work, or before it
    (for a layer's merge, which computes the new weight and then writes it in one step)."""
    original = getattr(owner, attribute)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if before and calls["n"] == call:
            raise RuntimeError("injected fault")
        result = original(*args, **kwargs)
        if not before and calls["n"] == call:
            raise RuntimeError("injected fault")
        return result

    monkeypatch.setattr(owner, attribute, failing)
    return calls


def _count_layers(model, adapter):
    return sum(adapter in m.adapter_names() for m in model.modules() if isinstance(m, DeltaLayer))


def test_attach_failing_at_its_last_layer_changes_nothing(monkeypatch):
    model = _two_adapters()
    data = batch("llama")
    out, before = logits(model, data), fingerprint(model)
    _fail_on_call(monkeypatch, LoraLayer, "add", call=4)  # q, v in two layers: the 4th is the last
    with pytest.raises(RuntimeError, match="injected"):
        dt.attach(model, dt.LoraConfig(r=2), name="c")
    assert_unchanged(model, before)
    assert torch.equal(logits(model, data), out)


def test_attach_failing_while_activating_changes_nothing(monkeypatch):
    model = _two_adapters()
    before = fingerprint(model)
    import deltatune.api as api

    _fail_on_call(monkeypatch, api, "_refresh_trainable", call=1)
    with pytest.raises(RuntimeError, match="injected"):
        dt.attach(model, dt.LoraConfig(r=2), name="c")
    assert_unchanged(model, before)


def test_load_failing_after_its_last_tensor_changes_nothing(monkeypatch, tmp_path):
    donor = build("llama")
    dt.attach(donor, dt.LoraConfig(r=4, init="none"))
    dt.save(donor, tmp_path)
    model = _two_adapters()
    data = batch("llama")
    out, before = logits(model, data), fingerprint(model)
    import deltatune.io as io

    _fail_on_call(monkeypatch, io, "load_state_into", call=1)
    with pytest.raises(RuntimeError, match="injected"):
        dt.load(model, tmp_path, name="c")
    assert_unchanged(model, before)
    assert torch.equal(logits(model, data), out)


def test_merge_failing_at_its_last_layer_unmerges_the_rest(monkeypatch):
    model = _two_adapters()
    data = batch("llama")
    out, before = logits(model, data), fingerprint(model)
    layers = _count_layers(model, "a") + _count_layers(model, "b")
    _fail_on_call(monkeypatch, LoraLayer, "merge_delta", call=layers, before=True)
    with pytest.raises(RuntimeError, match="injected"):
        dt.merge(model)
    assert_unchanged(model, before, atol=1e-6)  # merge then unmerge is exact to rounding
    torch.testing.assert_close(logits(model, data), out, rtol=0, atol=1e-5)


def test_unmerge_failing_at_its_last_layer_merges_the_rest_back(monkeypatch):
    model = _two_adapters()
    dt.merge(model)
    before = fingerprint(model)
    _fail_on_call(monkeypatch, LoraLayer, "unmerge_delta", call=_count_layers(model, "a") + _count_layers(model, "b"),
                  before=True)
    with pytest.raises(RuntimeError, match="injected"):
        dt.unmerge(model)
    assert_unchanged(model, before, atol=1e-6)


def test_set_active_failing_at_its_last_layer_changes_nothing(monkeypatch):
    model = _two_adapters()
    before = fingerprint(model)
    layers = sum(isinstance(m, DeltaLayer) for m in model.modules())
    _fail_on_call(monkeypatch, LoraLayer, "set_active", call=layers)
    with pytest.raises(RuntimeError, match="injected"):
        dt.set_active(model, "a")
    assert_unchanged(model, before)


def test_detach_with_merge_failing_at_its_last_layer_changes_nothing(monkeypatch):
    model = _two_adapters()
    before = fingerprint(model)
    layers = _count_layers(model, "a") + _count_layers(model, "b")
    _fail_on_call(monkeypatch, LoraLayer, "merge_delta", call=layers, before=True)
    with pytest.raises(RuntimeError, match="injected"):
        dt.detach(model, merge=True)
    assert_unchanged(model, before, atol=1e-6)


def test_detach_with_merge_checks_every_delta_before_removing_any():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2), name="a")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=2), name="p")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match="'p' is a prompt_tuning delta, which adds inputs rather than weights"):
        dt.detach(model, merge=True)
    assert_unchanged(model, before)


def test_merge_with_an_unmergeable_active_delta_merges_nothing():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="a")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=2), name="p")
    dt.set_active(model, ["a", "p"])
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match="cannot be merged"):
        dt.merge(model)
    assert_unchanged(model, before)


# ---------------------------------------------------------------- merged deltas


def test_a_merged_delta_stays_active_until_unmerged():
    model = build("llama")
    data = batch("llama")
    base = logits(model, data)
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="a")
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="b")
    dt.set_active(model, "a")
    dt.merge(model)
    before = fingerprint(model)
    for names in ([], ["b"]):
        with pytest.raises(dt.DeltaError, match=r"'a' is merged into the base weights.*dt.unmerge\(model, 'a'\) first"):
            dt.set_active(model, names)
    with pytest.raises(dt.DeltaError, match="'b' is not active"):
        dt.merge(model, "b")
    assert_unchanged(model, before)
    dt.set_active(model, ["a", "b"])  # adding one beside the merged delta is fine
    dt.set_active(model, "a")
    dt.unmerge(model)
    dt.set_active(model, [])
    torch.testing.assert_close(logits(model, data), base, rtol=0, atol=1e-5)


def test_attach_and_load_keep_a_merged_delta_active(tmp_path):
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="a")
    dt.save(model, tmp_path)
    dt.merge(model)
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="b")
    assert dt.active(model) == ["a", "b"]
    dt.load(model, tmp_path, name="c")
    assert dt.active(model) == ["a", "c"]


def test_a_training_step_on_a_merged_delta_is_refused():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2))
    dt.merge(model)
    model.train()
    with pytest.raises(dt.DeltaError, match=r"'default' is merged .* a training step would not reach .* dt.unmerge\(model\)"):
        model(**batch("llama"))
    with torch.no_grad():  # inference on the merged model is what merging is for
        model(**batch("llama"))
    dt.unmerge(model)
    model(**batch("llama")).loss.backward()


# ---------------------------------------------------------------- tied weights


def _tied_llama():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


TIED = [("gpt2", build, "lm_head", "transformer.wte"), ("gpt2", build, "wte", "lm_head"),
        ("llama", lambda _: _tied_llama(), "lm_head", "model.embed_tokens"),
        ("llama", lambda _: _tied_llama(), "embed_tokens", "lm_head")]


@pytest.mark.parametrize("arch,make,target,other", TIED, ids=[f"{t[0]}-{t[2]}" for t in TIED])
def test_merging_into_a_tied_weight_is_refused_unless_untied(arch, make, target, other, tmp_path):
    model = make(arch)
    data = batch(arch)
    base_embed = model.get_input_embeddings().weight.detach().clone()
    dt.attach(model, dt.LoraConfig(r=2, target_modules=[target], init="none"))
    perturb(model)
    unmerged = logits(model, data)
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=rf"into \S*{target}: its weight is shared \(tied\) with {other}\S*weight.*untie=True"):
        dt.merge(model)
    assert_unchanged(model, before)
    dt.merge(model, untie=True)
    torch.testing.assert_close(logits(model, data), unmerged, rtol=0, atol=1e-5)
    assert model.config.tie_word_embeddings is False
    if target in ("lm_head",):  # the other side of the tie is untouched
        assert torch.equal(model.get_input_embeddings().weight, base_embed)
    # detach without merge restores the tie itself, bit for bit
    restored = make(arch)
    dt.attach(restored, dt.LoraConfig(r=2, target_modules=[target], init="none"))
    dt.merge(restored, untie=True)
    dt.detach(restored)
    assert restored.get_output_embeddings().weight is restored.get_input_embeddings().weight
    assert restored.config.tie_word_embeddings is True
    assert torch.equal(restored.get_input_embeddings().weight, base_embed)
    # merge-and-unload keeps the untied merged weights, and a plain from_pretrained reads them back
    dt.detach(model, merge=True)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, data), unmerged, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- mixed batches


def test_mixed_batches_refuse_whole_batch_deltas():
    model = build("bert")
    data = batch("bert")
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="a")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=2), name="p")
    dt.attach(model, dt.BitFitConfig(), name="bias")
    dt.set_active(model, "a")
    for names, culprit in ((["a", "p"], "'p' \\(prompt_tuning\\) is named"), (["__base__", "bias"], "'bias' \\(bitfit\\) is named")):
        with pytest.raises(dt.DeltaError, match=culprit + ".*cannot be applied per row"):
            model(**data, adapter_names=names)
        with pytest.raises(dt.DeltaError, match=culprit):
            with dt.mixed_batch(model, names):
                pass
    dt.set_active(model, ["a", "p"])
    with pytest.raises(dt.DeltaError, match="'p' \\(prompt_tuning\\) is active, so it would reach every row"):
        model(**data, adapter_names=["a", "__base__"])
    dt.set_active(model, "a")
    with torch.no_grad():
        mixed = model(**data, adapter_names=["a", "__base__"]).logits
    with dt.disabled(model):
        base = logits(model, data)
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=1e-6)
    dt.merge(model)
    with pytest.raises(dt.DeltaError, match=r"\['a'\] are merged into the base weights, so every row would get them"):
        model(**data, adapter_names=["a", "__base__"])


# ---------------------------------------------------------------- save_pretrained with a delta attached


@pytest.mark.parametrize("config", [dt.LoraConfig(r=2, init="none"), dt.BitFitConfig(), dt.LoraConfig(r=2, init="none", use_dora=True),
                                    dt.IA3Config(), dt.LoHaConfig(r=2)],
                         ids=["lora", "bitfit", "dora", "ia3", "loha"])
def test_save_pretrained_writes_the_base_or_the_merged_model(config, tmp_path):
    model = build("bert")
    data = batch("bert")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, config)
    perturb(model)
    with pytest.warns(UserWarning, match=r"without the unmerged delta\(s\) \['default'\]"):
        model.save_pretrained(tmp_path / "base")
    reloaded = tf.BertForSequenceClassification.from_pretrained(tmp_path / "base")
    got = reloaded.state_dict()
    assert set(got) == set(base_state) and all(torch.equal(got[k], base_state[k]) for k in base_state)
    adapted = logits(model, data)
    dt.merge(model)
    merged_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "merged")
    reloaded = tf.BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, data), adapted, rtol=0, atol=1e-5)  # the trained head came along
    assert model.state_dict().keys() == merged_state.keys()  # state_dict itself is untouched torch behaviour


def test_save_pretrained_with_a_prompt_writes_the_base(tmp_path):
    model = build("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.warns(UserWarning, match="without the unmerged delta"):
        model.save_pretrained(tmp_path)
    got = tf.LlamaForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(got[k], base[k]) for k in base)
    dt.detach(model)
    assert "save_pretrained" not in model.__dict__


# ---------------------------------------------------------------- the existing clear errors


def test_unknown_targets_list_the_modules_that_exist():
    model = build("llama")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"target_modules=\['query'\] matched no module of LlamaForCausalLM.*q_proj"):
        dt.attach(model, dt.LoraConfig(target_modules=["query"]))
    assert_unchanged(model, before)


def test_a_target_of_the_wrong_type_is_named():
    with pytest.raises(dt.DeltaError, match=r"lora cannot wrap model.layers.0.mlp \(LlamaMLP\)"):
        dt.attach(build("llama"), dt.LoraConfig(target_modules=["mlp"]))


def test_bitfit_without_biases_and_dora_on_embeddings():
    model = build("llama")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match="has no bias terms"):
        dt.attach(model, dt.BitFitConfig())
    with pytest.raises(dt.DeltaError, match=r"DoRA on an embedding \(model.embed_tokens\)"):
        dt.attach(model, dt.LoraConfig(use_dora=True, target_modules=["embed_tokens", "q_proj"]))
    assert_unchanged(model, before)


def test_corrupted_config_and_unknown_peft_type(tmp_path):
    _trained_and_saved(METHODS[0], tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(dt.DeltaError, match=f"{CONFIG_NAME} is not valid JSON"):
        dt.load(build("gpt2"), tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "BOFT"}')
    with pytest.raises(dt.DeltaError, match="'BOFT' are not supported; supported: .*LORA"):
        dt.load(build("gpt2"), tmp_path, verify=False)
    (tmp_path / CONFIG_NAME).write_text('{"r": 8}')
    with pytest.raises(dt.DeltaError, match="has no 'peft_type'"):
        dt.load(build("gpt2"), tmp_path, verify=False)


def test_missing_weights_and_pickles_are_never_read(tmp_path):
    _trained_and_saved(METHODS[0], tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not a pickle we would open")
    with pytest.raises(dt.DeltaError, match=f"no {WEIGHTS_NAME} in .*nothing is unpickled"):
        dt.load(build("gpt2"), tmp_path)


def test_functions_given_something_other_than_a_model_say_so():
    for call in (lambda: dt.attached("model"), lambda: dt.active(None), lambda: dt.summary("model"),
                 lambda: dt.merge("model"), lambda: dt.save(None, "x"), lambda: dt.load("model", "x")):
        with pytest.raises(dt.DeltaError, match="torch.nn.Module"):
            call()


def test_a_copied_or_pickled_model_keeps_working_hooks(tmp_path):
    import copy
    import io as bytes_io

    model = build("llama")
    data = batch("llama")
    dt.attach(model, dt.LoraConfig(r=2, init="none"))
    buffer = bytes_io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert torch.equal(logits(twin, data), logits(model, data))
        dt.merge(twin)  # the twin's own weights, not the original's
        twin.save_pretrained(tmp_path)
        reloaded = tf.LlamaForCausalLM.from_pretrained(tmp_path)
        torch.testing.assert_close(logits(reloaded, data), logits(model, data), rtol=0, atol=1e-5)
        assert not dt.attached(model)["default"] is None and model.model.layers[0].self_attn.q_proj.merged == []


# ---------------------------------------------------------------- (IA)³, LoHa, LoKr: their own bad inputs


def test_lokr_and_loha_refuse_torch_conv1d_by_name():
    net = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(2, 2))
    before = fingerprint(net)
    for config in (dt.LoHaConfig(target_modules=["0"]), dt.LoKrConfig(target_modules=["0"])):
        with pytest.raises(dt.DeltaError, match=rf"{config.method} cannot wrap 0 \(Conv1d\).*supported type"):
            dt.attach(net, config)
    assert_unchanged(net, before)


def test_ia3_feedforward_outside_default_targets_is_refused_at_attach():
    model = build("llama")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"feedforward_modules = \['up_proj'\] must be a subset of target_modules = "
                                            r"\['k_proj', 'v_proj', 'down_proj'\]"):
        dt.attach(model, dt.IA3Config(feedforward_modules=["up_proj"]))
    assert_unchanged(model, before)


def test_a_lokr_file_whose_config_was_edited_names_the_missing_key(tmp_path):
    model = dt.attach(build("llama"), dt.LoKrConfig(r=1, decompose_both=True))
    dt.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["decompose_both"] = False  # the file now promises a full W1, but holds lokr_w1_a / lokr_w1_b
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = build("llama")
    before = fingerprint(fresh)
    with pytest.raises(dt.DeltaError, match=r"key \S+lokr_w1 is missing from the file"):
        dt.load(fresh, tmp_path, verify=False)
    assert_unchanged(fresh, before)


# ---------------------------------------------------------------- bottleneck adapters and AdapterFusion


def _two_adapters_to_fuse(arch="llama"):
    model = build(arch)
    for seed, name in enumerate(("a", "b")):
        dt.attach(model, dt.AdapterConfig(bottleneck_size=4), name=name)
        perturb(model, seed=seed)
    return model


def test_adapters_cannot_merge_and_say_why():
    model = build("gpt2")
    dt.attach(model, dt.AdapterConfig())
    perturb(model)
    before = fingerprint(model)
    for call in (lambda: dt.merge(model), lambda: dt.detach(model, merge=True)):
        with pytest.raises(dt.DeltaError, match="'default' is a bottleneck_adapter delta, which is a nonlinear function .* cannot be merged"):
            call()
    assert_unchanged(model, before)


def test_an_adapter_whose_input_did_not_run_says_so():
    model = build("llama")
    dt.attach(model, dt.AdapterConfig(placement="parallel"))
    down_proj = model.model.layers[0].mlp.down_proj
    with pytest.raises(dt.DeltaError, match="parallel adapter on Linear reads the input of a Linear in the same block, which did not run"):
        down_proj(torch.randn(1, 3, 64))


def test_pfeiffer_on_a_residual_after_the_norm_is_refused():
    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4,
                                               apply_residual_connection_post_layernorm=True))
    with pytest.raises(dt.DeltaError, match="apply_residual_connection_post_layernorm=True are not supported"):
        dt.attach(model, dt.AdapterConfig(placement="pfeiffer"))
    dt.attach(model, dt.AdapterConfig(placement="parallel"))


def test_a_fused_adapter_cannot_be_detached_before_its_fusion():
    model = _two_adapters_to_fuse()
    data = batch("llama")
    base = logits(build("llama"), data)
    dt.attach(model, dt.AdapterFusionConfig(adapters=["a", "b"]), name="f")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match="delta 'a' is used by 'f' \\(adapter_fusion\\); detach 'f' first, or both at once"):
        dt.detach(model, "a")
    assert_unchanged(model, before)
    dt.detach(model)  # everything at once: the fusion goes first
    torch.testing.assert_close(logits(model, data), base, rtol=0, atol=0)


def test_fusion_refuses_what_it_cannot_fuse():
    with pytest.raises(dt.DeltaError, match="needs two or more distinct adapter names"):
        dt.AdapterFusionConfig(adapters=["a"])
    with pytest.raises(dt.DeltaError, match="needs two or more distinct adapter names"):
        dt.AdapterFusionConfig(adapters=["a", "a"])
    model = build("llama")
    dt.attach(model, dt.AdapterConfig(placement="houlsby"), name="h")
    dt.attach(model, dt.AdapterConfig(placement="pfeiffer"), name="p")
    dt.attach(model, dt.AdapterConfig(placement="houlsby", target_layers=[0]), name="h0")
    dt.attach(model, dt.LoraConfig(r=2), name="lora")
    before = fingerprint(model)
    for adapters, message in ((["h", "p"], r"'h' \(houlsby, 4 modules\) and 'p' \(pfeiffer, 2 modules\) differ"),
                              (["h", "h0"], r"'h' \(houlsby, 4 modules\) and 'h0' \(houlsby, 2 modules\) differ"),
                              (["h", "lora"], "fuses bottleneck adapters; 'lora' is a lora delta")):
        with pytest.raises(dt.DeltaError, match=message):
            dt.attach(model, dt.AdapterFusionConfig(adapters=adapters), name="f")
        assert_unchanged(model, before)


def test_a_tapped_adapter_failing_at_its_last_layer_leaves_no_hook(monkeypatch):
    from deltatune.methods.adapters import AdapterLayer

    model = build("opt")
    data = batch("opt")
    dt.attach(model, dt.AdapterConfig(placement="parallel"), name="p1")
    perturb(model)
    out, before = logits(model, data), fingerprint(model)
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())  # the model's own + one tap per block
    _fail_on_call(monkeypatch, AdapterLayer, "add", call=2)  # two blocks: the second is the last
    with pytest.raises(RuntimeError, match="injected"):
        dt.attach(model, dt.AdapterConfig(placement="pfeiffer"), name="p2")
    assert_unchanged(model, before)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert torch.equal(logits(model, data), out)
    monkeypatch.undo()
    # two adapters reading the same input share one tap; it goes with the last of them
    dt.attach(model, dt.AdapterConfig(placement="parallel"), name="p3")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    dt.detach(model, "p1")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    dt.detach(model, "p3")
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert hooks == 1 + 2
# ---------------------------------------------------------------- soft prompts and prefixes


def test_soft_prompt_bad_inputs(tmp_path):
    with pytest.raises(dt.DeltaError, match=r"PTuningV2Config trains the prefixes directly.*PrefixTuningConfig\(projection=True\)"):
        dt.PTuningV2Config(projection=True)
    model = build("llama")
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=2), name="prefix")
    with pytest.raises(dt.DeltaError, match="prefix tuning needs input_ids or inputs_embeds"):
        model(attention_mask=torch.ones(2, 3, dtype=torch.long))
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=2), name="prompt")
    dt.set_active(model, ["prompt", "prefix"])
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"'prefix' \(prefix_tuning\) puts its prefixes in the attention cache and cannot "
                                            r"be active together with \['prompt'\] \(prompt_tuning\)"):
        model(**batch("llama"))
    assert_unchanged(model, before)
    dt.set_active(model, "prefix")
    model(**batch("llama"))  # alone it runs
    # a P-tuning file whose encoder type deltatune does not know
    other = build("llama")
    dt.attach(other, dt.PTuningConfig(num_virtual_tokens=2))
    dt.save(other, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["encoder_reparameterization_type"] = "GRU"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(dt.DeltaError, match=r"encoder_reparameterization_type='GRU' is not supported by deltatune"):
        dt.load(build("llama"), tmp_path, verify=False)


@pytest.mark.parametrize("make", [lambda: dt.PrefixTuningConfig(num_virtual_tokens=2), lambda: dt.PTuningConfig(num_virtual_tokens=2)],
                         ids=["prefix", "p_tuning"])
def test_soft_prompt_from_a_model_with_other_dimensions_is_refused(make, tmp_path):
    donor = build("llama")  # 2 kv heads of 8
    dt.attach(donor, make())
    dt.save(donor, tmp_path)
    model = _wider_gpt2()  # width 64: 4 heads of 16
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"does not fit GPT2LMHeadModel: key \S+ has shape \[2, (64|32)\] in the file but "
                                            r"\[2, (256|64)\] in the model"):
        dt.load(model, tmp_path)
    assert_unchanged(model, before)


# ---------------------------------------------------------------- the memory planner's bad inputs


@pytest.mark.parametrize("model,kwargs,message", [
    ("gpt2-config", dict(method="lorra"), r"unknown method 'lorra'; known methods: .*lora"),
    ("gpt2-config", dict(memory="24 GBs"), r"cannot read the memory size '24 GBs': write a number and a unit"),
    ("gpt2-config", dict(memory=0), r"the memory size 0 must be positive"),
    ("gpt2-config", dict(memory=float("nan")), r"the memory size nan must be a finite number of bytes"),
    ("gpt2-config", dict(method={}), r"method as a dict maps adapter names to deltatune configs"),
    ("gpt2-config", dict(method="lora", target_modules=["nope_proj"]), r"lora cannot attach to GPT2LMHeadModel: .*nope_proj"),
    ("gpt2-config", dict(batch=0), r"batch must be a positive integer, got 0"),
    ("gpt2-config", dict(seq=2.5), r"seq must be a positive integer, got 2.5"),
    ("gpt2-config", dict(accum=True), r"accum must be a positive integer, got True"),
    ("gpt2-config", dict(optimizer="adamw9bit"), r"optimizer = 'adamw9bit' is not one the planner knows: choose one of"),
    ("gpt2-config", dict(quant="nf2"), r"quant = 'nf2' is not allowed: expected one of None, 'nf4'"),
    ("gpt2-config", dict(method="lora", alpha_typo=3), r"LoraConfig has no field 'alpha_typo'"),
    ("gpt2-config", dict(task="qa"), r"task = 'qa' is not allowed"),
    ("gpt2-config", dict(method="full", quant="nf4"), r"h.0.attn.c_attn.weight would be quantised \(nf4\), but the method trains it"),
    ("/no/such/model-folder", {}, r"model = '/no/such/model-folder': no model folder at /no/such/model-folder .*fix the path"),
    (12, {}, r"model must be a model id, a folder or a config.json path, got 12"),
])
def test_planner_bad_inputs_name_the_problem(model, kwargs, message):
    if model == "gpt2-config":
        model = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96)
    with pytest.raises(dt.DeltaError, match=message):
        dt.plan(model, **kwargs)


def test_planner_refuses_a_method_that_cannot_attach_to_the_architecture():
    llama = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)
    with pytest.raises(dt.DeltaError, match=r"bitfit cannot attach to LlamaForCausalLM: .*has no bias terms"):
        dt.plan(llama, "bitfit")


# ---------------------------------------------------------------- quantised bases (bitsandbytes)


def test_quantisation_names_are_checked_where_they_are_written(tmp_path):
    pytest.importorskip("bitsandbytes")
    from deltatune.pipeline.config import ConfigError, load_run_config
    from quant_models import checkpoint

    with pytest.raises(dt.DeltaError, match="quant = 'nf5' is not a quantisation; choose one of nf4, fp4, int8"):
        dt.load_base(checkpoint("llama"), quant="nf5")
    with pytest.raises(ConfigError, match=r"model.quant.*nf5.*nf4"):
        load_run_config(None, {"model.name": "x", "data.train": "y.jsonl", "model.quant": "nf5"})
    with pytest.raises(ConfigError, match=r"model.int8_threshold"):
        load_run_config(None, {"model.name": "x", "data.train": "y.jsonl", "model.quant": "int8", "model.int8_threshold": -1})


def test_a_missing_bitsandbytes_says_how_to_install_it(monkeypatch):
    from deltatune import quant
    from deltatune.pipeline.train import make_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of it fails
    install = r"quantised bases need bitsandbytes: pip install 'deltatune\[quant\]' \(or pip install bitsandbytes\)"
    with pytest.raises(dt.DeltaError, match=install):
        dt.load_base("any/model", quant="nf4")
    with pytest.raises(dt.DeltaError, match=install):
        make_optimizer("paged_adamw8bit", [torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0)
    model = build("llama")  # an unquantised model needs no bitsandbytes at all
    dt.attach(model, dt.LoraConfig(r=2))
    dt.merge(model)
    assert not quant.is_quantized(model.model.layers[0].self_attn.q_proj.base_layer)


def test_an_8bit_optimizer_named_wrong_gives_its_spelling():
    from deltatune.pipeline.train import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    for theirs, ours in [("paged_adamw_8bit", "paged_adamw8bit"), ("adamw_bnb_8bit", "adamw8bit"), ("AdamW-8bit", "adamw8bit")]:
        with pytest.raises(dt.DeltaError, match=rf"train.optimizer = '{theirs}' .* spelled '{ours}' here: set train.optimizer: {ours}"):
            make_optimizer(theirs, params, 1e-3, 0.0)
    with pytest.raises(dt.DeltaError, match=r"'adamw4bit' is not a torch.optim optimizer; choose one of .*adamw8bit, adam8bit, paged_adamw8bit"):
        make_optimizer("adamw4bit", params, 1e-3, 0.0)


def test_loftq_on_an_unquantised_base_changes_nothing():
    model = build("llama")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"init='loftq' .* no target is quantised .* load the base quantised first"):
        dt.attach(model, dt.LoraConfig(init="loftq"))
    assert_unchanged(model, before)


def test_merging_into_a_quantised_base_warns_and_unmerge_restores_it(tmp_path):
    pytest.importorskip("bitsandbytes")
    from quant_models import quantized

    model = quantized("llama")
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    perturb(model)
    before = fingerprint(model)
    with pytest.warns(UserWarning, match=r"merging \['default'\] into quantised \(bitsandbytes\) layers re-quantises .* "
                                         r"`deltatune merge --dtype`"):
        dt.merge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.merge(model)  # merged already: nothing happens, no second warning
    dt.unmerge(model)
    assert_unchanged(model, before)
    dt.prepare_kbit(model)
    before = fingerprint(model)
    dt.prepare_kbit(model)  # twice is once
    assert_unchanged(model, before)
    with pytest.raises(dt.DeltaError, match=r"q_proj.base_layer.weight is quantised \(bitsandbytes\).*cannot train it: load "
                                            r"the base unquantised"):
        dt.attach(model, dt.FullConfig(), name="full")
    assert_unchanged(model, before)


def test_what_cannot_train_a_quantised_weight_names_it():
    pytest.importorskip("bitsandbytes")
    from quant_models import quantized

    model = quantized("llama")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"diff pruning .* model.layers.0.self_attn.q_proj \(and 13 more\) is quantised "
                                            r"\(bitsandbytes\) and cannot take one: load the base unquantised"):
        dt.attach(model, dt.DiffPruningConfig())
    with pytest.raises(dt.DeltaError, match=r"q_proj.weight is quantised \(bitsandbytes\) \(and 6 more\), so a freeze delta"):
        dt.attach(model, dt.FreezeConfig(trainable_layers=1))
    with pytest.raises(dt.DeltaError, match=r"init='olora' rewrites .*q_proj's base weight, which is quantised \(nf4\); use "
                                            r"init='loftq'"):
        dt.attach(model, dt.LoraConfig(init="olora"))
    assert_unchanged(model, before)
    dt.attach(model, dt.DiffPruningConfig(target_modules=["input_layernorm"]))  # full-precision targets: fine
