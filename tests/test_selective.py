"""Layer freezing and full fine-tuning: what trains, the whole-model folder, the originals."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import transformers as tf

import deltatune as dt
import deltatune.model_files as model_files
from checks import assert_unchanged, fingerprint, folder_bytes
from deltatune.io import CONFIG_NAME
from test_lora import perturb
from tiny_models import ARCHS, batch, build, logits

MARKER = model_files.MARKER


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def params_under(model, *prefixes) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in prefixes)}


# ---------------------------------------------------------------- freezing: what trains


def test_top_k_blocks_train():
    model = build("gpt2")
    dt.attach(model, dt.FreezeConfig(trainable_layers=1, train_head=False))
    assert trainable(model) == params_under(model, "transformer.h.1")
    dt.detach(model)
    dt.attach(model, dt.FreezeConfig(trainable_layers=2, train_head=False))
    assert trainable(model) == params_under(model, "transformer.h.0", "transformer.h.1")


def test_block_indices_apply_to_each_stack_of_an_encoder_decoder():
    model = build("t5")
    dt.attach(model, dt.FreezeConfig(trainable_layers=[0], train_head=False))
    # T5's blocks hold a ModuleList named "layer" of their own: only the outer stacks count
    assert trainable(model) == params_under(model, "encoder.block.0", "decoder.block.0")


def test_named_modules_and_regexes_train_whole():
    model = build("bert")
    dt.attach(model, dt.FreezeConfig(trainable_modules=["embeddings", "LayerNorm"], train_head=False))
    norms = {n for n in trainable(model) if ".LayerNorm." in n and "embeddings" not in n}
    assert norms == {f"bert.encoder.layer.{i}.{part}.LayerNorm.{w}" for i in range(2)
                     for part in ("attention.output", "output") for w in ("weight", "bias")}
    assert params_under(model, "bert.embeddings") <= trainable(model)
    # the sequence classifier's new head trains whole, as with every method
    assert {n for n in trainable(model) if n.startswith("classifier")} == {
        "classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}
    assert len(trainable(model)) == len(params_under(model, "bert.embeddings")) + len(norms) + 2
    other = build("llama")
    dt.attach(other, dt.FreezeConfig(trainable_modules=r".*layers\.1\.mlp\.(up|down)_proj", train_head=False))
    assert trainable(other) == {"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def test_a_linear_probe_trains_only_the_head():
    model = build("bert")
    data = batch("bert")
    dt.attach(model, dt.FreezeConfig(trainable_layers=0))
    assert trainable(model) == {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}
    lm = build("llama")
    dt.attach(lm, dt.FreezeConfig(trainable_layers=0))
    assert trainable(lm) == {"lm_head.weight"}
    tied = build("gpt2")  # lm_head is the embedding matrix: it is listed (and trains) under its first name
    dt.attach(tied, dt.FreezeConfig(trainable_layers=0))
    assert trainable(tied) == {"transformer.wte.weight"}
    base = logits(build("bert"), data)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad()
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, data), base, rtol=0, atol=0)


def test_freezing_saves_only_the_trained_tensors(tmp_path):
    model = build("gpt2")
    dt.attach(model, dt.FreezeConfig(trainable_layers=1, train_head=False))
    perturb(model)
    dt.save(model, tmp_path)
    keys = set(safetensors.torch.load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {"base_model.model." + n for n in params_under(model, "transformer.h.1")}
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "FREEZE" and config["trainable_layers"] == 1
    assert "deltatune can load it (the peft package has no such method)" in (tmp_path / "README.md").read_text()
    fresh = dt.load(build("gpt2"), tmp_path)
    torch.testing.assert_close(logits(fresh, batch("gpt2")), logits(model, batch("gpt2")), rtol=0, atol=0)


@pytest.mark.parametrize(
    "config,message",
    [
        (dt.FreezeConfig(trainable_layers=3), r"trainable_layers=3: transformer.h has 2 blocks \(indices 0 to 1\)"),
        (dt.FreezeConfig(trainable_layers=[0, 2]), r"trainable_layers=\[0, 2\]: transformer.h has 2 blocks"),
        (dt.FreezeConfig(trainable_modules=["encoder"]), r"trainable_modules=\['encoder'\] matched no module of GPT2LMHeadModel; .*ln_f"),
        (dt.FreezeConfig(trainable_layers=0, train_head=False), "leaves nothing to train in GPT2LMHeadModel"),
    ],
)
def test_freezing_mistakes_are_named(config, message):
    model = build("gpt2")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=message):
        dt.attach(model, config)
    assert_unchanged(model, before)


def test_a_model_without_a_block_stack_says_so():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(dt.DeltaError, match="has no stack of transformer blocks .* trainable_modules instead"):
        dt.attach(net, dt.FreezeConfig(trainable_layers=1))
    dt.attach(net, dt.FreezeConfig(trainable_modules=["1"]))
    assert trainable(net) == {"1.weight", "1.bias"}


def test_selective_deltas_do_not_overlap_and_wrap_deltas_do_not_merge_into_them():
    model = build("gpt2")
    dt.attach(model, dt.FreezeConfig(trainable_layers=1, train_head=False), name="top")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"transformer.h.1.ln_1.bias is already selected by delta 'top'.*detach that delta"):
        dt.attach(model, dt.BitFitConfig(), name="bias")
    assert_unchanged(model, before)
    # LoRA beside it: its own parameters are not selected, and it trains over the frozen-and-trained weight
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["c_attn"], init="none"), name="lora")
    dt.set_active(model, ["top", "lora"])
    with pytest.raises(dt.DeltaError, match=r"cannot merge 'lora' into transformer.h.1.attn.c_attn: its weight is trained by "
                                            r"the selective delta 'top'"):
        dt.merge(model)
    # ... and a selective delta cannot take a weight a merged delta lives in
    other = build("gpt2")
    dt.attach(other, dt.LoraConfig(r=2, target_modules=["c_attn"], init="none"), name="lora")
    dt.merge(other)
    with pytest.raises(dt.DeltaError, match=r"holds the merged delta 'lora'.*dt.unmerge\(model\) first"):
        dt.attach(other, dt.FullConfig(), name="full")


# ---------------------------------------------------------------- full fine-tuning


def test_full_fine_tuning_trains_every_parameter():
    model = build("llama")
    dt.attach(model, dt.FullConfig())
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    stats = dt.summary(model, print_table=False)
    assert stats.trainable == stats.total == sum(p.numel() for p in build("llama").parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_full_save_is_a_model_folder_from_pretrained_loads(arch, tmp_path):
    model = build(arch)
    data = batch(arch)
    dt.attach(model, dt.FullConfig())
    perturb(model, scale=0.02)
    trained = logits(model, data)
    dt.save(model, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", MARKER, "README.md"} <= names and CONFIG_NAME not in names
    reloaded = type(model).from_pretrained(tmp_path).eval()  # no deltatune involved
    torch.testing.assert_close(logits(reloaded, data), trained, rtol=0, atol=1e-6)
    fresh = dt.load(build(arch), tmp_path)
    torch.testing.assert_close(logits(fresh, data), trained, rtol=0, atol=1e-6)
    with dt.disabled(fresh):
        torch.testing.assert_close(logits(fresh, data), logits(build(arch), data), rtol=0, atol=0)


def test_the_full_folder_says_what_it_is(tmp_path):
    model = build("gpt2")
    dt.attach(model, dt.FullConfig(originals="same_device"))
    dt.save(model, tmp_path)
    marker = json.loads((tmp_path / MARKER).read_text())
    assert marker["peft_type"] == "FULL" and marker["originals"] == "same_device" and marker["task_type"] == "CAUSAL_LM"
    assert set(marker[model_files.FILES_KEY]) == {"config.json", "generation_config.json", "model.safetensors"}
    card = (tmp_path / "README.md").read_text()
    assert "library_name: transformers" in card and "from_pretrained loads it" in card and "peft package cannot" in card
    # the tied head is written once, under the name save_pretrained keeps
    assert len(safetensors.torch.load_file(tmp_path / "model.safetensors")) == len(dict(model.named_parameters()))


def test_a_full_delta_switched_off_saves_its_trained_weights(tmp_path):
    model = build("gpt2")
    data = batch("gpt2")
    dt.attach(model, dt.FullConfig(), name="full")
    perturb(model)
    trained = logits(model, data)
    dt.attach(model, dt.LoraConfig(r=2), name="lora")  # switches "full" off: the originals are back in place
    torch.testing.assert_close(logits(model, data), logits(build("gpt2"), data), rtol=0, atol=0)
    assert all(t.device.type == "cpu" for t in model._deltatune_state.deltas["full"].stash.values())
    dt.save(model, tmp_path, name="full")
    reloaded = tf.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, data), trained, rtol=0, atol=1e-6)
    dt.set_active(model, "full")
    torch.testing.assert_close(logits(model, data), trained, rtol=0, atol=0)


def test_a_full_classifier_saves_its_trained_head(tmp_path):
    model = build("bert")
    data = batch("bert")
    dt.attach(model, dt.FullConfig())
    assert "classifier.base_layer.weight" not in trainable(model)  # the head trains as its kept-whole copy
    perturb(model, scale=0.05)
    trained = logits(model, data)
    dt.save(model, tmp_path)
    reloaded = tf.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, data), trained, rtol=0, atol=1e-6)
    fresh = dt.load(build("bert"), tmp_path)
    torch.testing.assert_close(logits(fresh, data), trained, rtol=0, atol=1e-6)


def test_half_precision_full_folder_keeps_the_dtype(tmp_path):
    model = build("llama").to(torch.bfloat16)
    dt.attach(model, dt.FullConfig())
    perturb(model, scale=0.05)
    dt.save(model, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    fresh = dt.load(build("llama").to(torch.bfloat16), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_originals_are_kept_on_the_cpu_or_beside_the_weights():
    model = build("llama")
    dt.attach(model, dt.FullConfig())
    delta = model._deltatune_state.deltas["default"]
    assert all(t.device.type == "cpu" and t.data_ptr() != delta.selected[n].data_ptr() for n, t in delta.originals.items())
    dt.detach(model)
    dt.attach(model, dt.FullConfig(originals="same_device"))
    assert len(model._deltatune_state.deltas["default"].originals) == len(list(model.parameters()))
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(build("llama").config)
    dt.attach(meta, dt.FullConfig())  # nothing to copy on the meta device, and nothing fails
    assert all(t.device.type == "meta" for t in meta._deltatune_state.deltas["default"].originals.values())


def test_without_originals_the_delta_cannot_be_switched_off_but_merges(tmp_path):
    model = build("gpt2")
    data = batch("gpt2")
    dt.attach(model, dt.FullConfig(originals="none"))
    assert model._deltatune_state.deltas["default"].originals == {}
    perturb(model)
    trained = logits(model, data)
    before = fingerprint(model)
    for call, doing in [(lambda: dt.set_active(model, []), "switch it off"), (lambda: dt.detach(model), "detach it without merge"),
                        (lambda: dt.attach(model, dt.LoraConfig(r=2), name="lora"), "switch it off")]:
        with pytest.raises(dt.DeltaError, match=rf"cannot {doing}: delta 'default' \(full\) was attached with originals='none'"):
            call()
        assert_unchanged(model, before)
    with pytest.raises(dt.DeltaError, match="originals='none'"):
        with dt.disabled(model):
            pass
    assert_unchanged(model, before)
    model.save_pretrained(tmp_path / "plain")  # the trained weights are the model now: no warning, no originals
    torch.testing.assert_close(logits(tf.GPT2LMHeadModel.from_pretrained(tmp_path / "plain").eval(), data), trained, rtol=0, atol=1e-6)
    dt.merge(model)  # part of the base now: another delta can be attached beside it
    dt.attach(model, dt.LoraConfig(r=2), name="lora")
    dt.detach(model, "lora")
    dt.detach(model, merge=True)
    torch.testing.assert_close(logits(model, data), trained, rtol=0, atol=0)


def test_layouts_never_share_a_folder(tmp_path):
    full, lora = build("gpt2"), build("gpt2")
    dt.attach(full, dt.FullConfig())
    dt.attach(lora, dt.LoraConfig(r=2))
    dt.save(lora, tmp_path / "adapter")
    dt.save(full, tmp_path / "model")
    with pytest.raises(dt.DeltaError, match=r"holds an adapter \(adapter_config.json\); a whole-model save cannot go there"):
        dt.save(full, tmp_path / "adapter")
    with pytest.raises(dt.DeltaError, match=r"holds a whole-model save \(deltatune_config.json\); an adapter cannot go there"):
        dt.save(lora, tmp_path / "model")
    build("gpt2").save_pretrained(tmp_path / "plain")
    with pytest.raises(dt.DeltaError, match="is a transformers model folder, not a delta .* load it with from_pretrained"):
        dt.load(build("gpt2"), tmp_path / "plain")


def test_a_model_folder_checks_its_files(tmp_path):
    one, two = build("gpt2"), build("gpt2")
    for model, folder, seed in ((one, "one", 1), (two, "two", 2)):
        dt.attach(model, dt.FullConfig())
        perturb(model, seed=seed)
        dt.save(model, tmp_path / folder)
    (tmp_path / "one" / "model.safetensors").write_bytes((tmp_path / "two" / "model.safetensors").read_bytes())
    with pytest.raises(dt.DeltaError, match=r"model.safetensors and .*deltatune_config.json do not belong together"):
        dt.load(build("gpt2"), tmp_path / "one")
    fresh = dt.load(build("gpt2"), tmp_path / "one", verify=False)  # read anyway: the files say what they hold
    torch.testing.assert_close(logits(fresh, batch("gpt2")), logits(two, batch("gpt2")), rtol=0, atol=1e-6)
    (tmp_path / "two" / "model.safetensors").unlink()
    with pytest.raises(dt.DeltaError, match=r"model.safetensors is missing: .* says the save wrote it"):
        dt.load(build("gpt2"), tmp_path / "two")
    (tmp_path / "two" / MARKER).write_text('{"peft_type": "LORA", "deltatune_files": {}}')
    with pytest.raises(dt.DeltaError, match="names a LORA delta, which is saved as an adapter"):
        dt.load(build("gpt2"), tmp_path / "two", verify=False)


def test_a_save_killed_before_its_marker_reads_as_the_new_model(tmp_path, monkeypatch):
    model = build("gpt2")
    data = batch("gpt2")
    dt.attach(model, dt.FullConfig())
    dt.save(model, tmp_path)
    perturb(model)
    new = logits(model, data)
    real_replace = model_files.os.replace

    def killed_at_the_marker(src, dst):
        if str(dst).endswith(MARKER):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(model_files.shutil, "rmtree", lambda *a, **k: None)  # a kill leaves the temporary folder
    monkeypatch.setattr(model_files.os, "replace", killed_at_the_marker)
    with pytest.raises(KeyboardInterrupt):
        dt.save(model, tmp_path)
    monkeypatch.undo()
    assert len(list(tmp_path.glob(".deltatune-save.*.tmp"))) == 1  # the new marker waits there
    torch.testing.assert_close(logits(dt.load(build("gpt2"), tmp_path), data), new, rtol=0, atol=1e-6)
    model_files.finish_interrupted(tmp_path)  # what the next save does first
    assert not list(tmp_path.glob(".deltatune-save.*")) and json.loads((tmp_path / MARKER).read_text())["peft_type"] == "FULL"
    torch.testing.assert_close(logits(dt.load(build("gpt2"), tmp_path, verify=True), data), new, rtol=0, atol=1e-6)


def test_sharded_saves_load_and_a_later_save_removes_stale_shards(tmp_path, monkeypatch):
    model = build("gpt2")
    data = batch("gpt2")
    dt.attach(model, dt.FullConfig())
    perturb(model)
    (tmp_path / "tokenizer.json").write_text("{}")  # the user's own files stay
    real = model_files.save_pretrained
    monkeypatch.setattr(model_files, "save_pretrained", lambda m, folder, sd: type(m).save_pretrained(
        m, str(folder), state_dict=sd, max_shard_size="40KB", save_original_format=False))
    dt.save(model, tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(logits(dt.load(build("gpt2"), tmp_path), data), logits(model, data), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(tf.GPT2LMHeadModel.from_pretrained(tmp_path).eval(), data), logits(model, data),
                               rtol=0, atol=1e-6)
    monkeypatch.setattr(model_files, "save_pretrained", real)
    dt.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", MARKER, "generation_config.json",
                                                           "model.safetensors", "tokenizer.json"]
    torch.testing.assert_close(logits(dt.load(build("gpt2"), tmp_path), data), logits(model, data), rtol=0, atol=1e-6)


def test_full_fine_tuning_loss_falls_and_detach_restores():
    model = build("gpt2")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    data = batch("gpt2")
    dt.attach(model, dt.FullConfig())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model(**data).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.1
    dt.detach(model)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_saving_a_full_delta_of_a_plain_module_is_a_clear_error(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    dt.attach(net, dt.FullConfig())
    files = folder_bytes(tmp_path)
    with pytest.raises(dt.DeltaError, match="Sequential has no save_pretrained; save model.state_dict"):
        dt.save(net, tmp_path)
    assert folder_bytes(tmp_path) == files


def test_loading_a_full_folder_is_undoable_whatever_its_originals(tmp_path, monkeypatch):
    model = build("gpt2")
    data = batch("gpt2")
    dt.attach(model, dt.FullConfig(originals="none"))
    perturb(model)
    dt.save(model, tmp_path)
    fresh = build("gpt2")
    base = logits(fresh, data)
    before = fingerprint(fresh)
    import deltatune.io as io

    real = io.load_state_into

    def fail_after_copying(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("injected fault")

    monkeypatch.setattr(io, "load_state_into", fail_after_copying)
    with pytest.raises(RuntimeError, match="injected"):
        dt.load(fresh, tmp_path)
    assert_unchanged(fresh, before)  # the weights the failed load had copied in are taken back out
    monkeypatch.undo()
    dt.load(fresh, tmp_path)
    assert dt.attached(fresh)["default"].originals == "none"  # a re-save writes what was read
    with dt.disabled(fresh):
        torch.testing.assert_close(logits(fresh, data), base, rtol=0, atol=0)
    before = fingerprint(fresh)
    with pytest.raises(dt.DeltaError, match=r"transformer.wte.weight is already selected by delta 'default' \(and \d+ more\)"):
        dt.load(fresh, tmp_path, name="again")
    assert_unchanged(fresh, before)
