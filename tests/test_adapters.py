"""Bottleneck adapters: placement per architecture against hand-written block forwards, options, errors.

Each formula test builds two copies of a tiny model, attaches an adapter to one and gives its
up-projection non-zero values, then runs one block of it and compares with a forward of that
block written out here from the other copy's untouched sublayers (attention, feed-forward, layer
norms) and the adapter's weights:

    A(z) = s · (W_up σ(W_down z + b_down) + b_up)
    Houlsby   y1 = LN1(x + h1 + A1(h1)),  y = LN2(y1 + h2 + A2(h2))
    Pfeiffer  y = LN2(y1 + h2 + A(LN2(y1 + h2)))    (post-LN)     y = y1 + h2 + A(y1 + h2)   (pre-LN)
    parallel  y = LN2(y1 + h2 + A(u2))              u2 the FFN's input
with LN the identity where a pre-LN block has none after the residual add.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from checks import assert_unchanged, fingerprint
from deltatune.methods.adapters import AdapterLayer
from test_lora import perturb
from tiny_models import batch, build, logits

ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}


def adapter(layer: AdapterLayer, name: str = "default", scaling: float = 1.0, nonlinearity: str = "relu"):
    """A(z) written out from the layer's weights."""
    assert isinstance(layer, AdapterLayer)
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    return lambda z: scaling * (ACT[nonlinearity](z @ down.weight.T + down.bias) @ up.weight.T + up.bias)


def first(out):
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------- one block per family, written out


def llama_block(model, pristine, placement, A):
    layer, ref = model.model.layers[0], pristine.model.layers[0]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    pe = pristine.model.rotary_emb(x, torch.arange(5).unsqueeze(0))
    got = first(layer(x, attention_mask=None, position_embeddings=pe))
    h1 = ref.self_attn(ref.input_layernorm(x), attention_mask=None, position_embeddings=pe)[0]
    if placement == "houlsby":
        y1 = x + h1 + A(layer.self_attn.o_proj)(h1)
        h2 = ref.mlp(ref.post_attention_layernorm(y1))
        return got, y1 + h2 + A(layer.mlp.down_proj)(h2)
    y1 = x + h1
    u2 = ref.post_attention_layernorm(y1)
    h2 = ref.mlp(u2)
    if placement == "pfeiffer":
        return got, y1 + h2 + A(layer.mlp.down_proj)(y1 + h2)
    return got, y1 + h2 + A(layer.mlp.down_proj)(u2)


def gpt2_block(model, pristine, placement, A):
    layer, ref = model.transformer.h[0], pristine.transformer.h[0]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    got = first(layer(x))
    h1 = ref.attn(ref.ln_1(x))[0]
    if placement == "houlsby":
        y1 = x + h1 + A(layer.attn.c_proj)(h1)
        h2 = ref.mlp(ref.ln_2(y1))
        return got, y1 + h2 + A(layer.mlp.c_proj)(h2)
    y1 = x + h1
    u2 = ref.ln_2(y1)
    h2 = ref.mlp(u2)
    if placement == "pfeiffer":
        return got, y1 + h2 + A(layer.mlp.c_proj)(y1 + h2)
    return got, y1 + h2 + A(layer.mlp.c_proj)(u2)


def bert_block(model, pristine, placement, A):  # RoBERTa's blocks are BERT's
    encoder = model.bert if hasattr(model, "bert") else model.roberta
    layer = encoder.encoder.layer[0]
    ref = (pristine.bert if hasattr(pristine, "bert") else pristine.roberta).encoder.layer[0]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    got = first(layer(x))
    h1 = ref.attention.output.dense(ref.attention.self(x)[0])
    if placement == "houlsby":
        y1 = ref.attention.output.LayerNorm(x + h1 + A(layer.attention.output.dense)(h1))
        h2 = ref.output.dense(ref.intermediate(y1))
        return got, ref.output.LayerNorm(y1 + h2 + A(layer.output.dense)(h2))
    y1 = ref.attention.output.LayerNorm(x + h1)
    h2 = ref.output.dense(ref.intermediate(y1))
    if placement == "pfeiffer":
        ln = ref.output.LayerNorm
        return got, ln(y1 + h2 + A(layer.output.LayerNorm)(ln(y1 + h2)))
    return got, ref.output.LayerNorm(y1 + h2 + A(layer.output.dense)(y1))


def bart_encoder_block(model, pristine, placement, A):
    layer, ref = model.model.encoder.layers[0], pristine.model.encoder.layers[0]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    # transformers < 5 takes a positional layer_head_mask
    extra = {"layer_head_mask": None} if "layer_head_mask" in inspect.signature(layer.forward).parameters else {}
    got = first(layer(x, attention_mask=None, **extra))
    h1 = ref.self_attn(hidden_states=x, attention_mask=None)[0]
    ffn = lambda u: ref.fc2(ref.activation_fn(ref.fc1(u)))  # noqa: E731
    if placement == "houlsby":
        y1 = ref.self_attn_layer_norm(x + h1 + A(layer.self_attn.out_proj)(h1))
        h2 = ffn(y1)
        return got, ref.final_layer_norm(y1 + h2 + A(layer.fc2)(h2))
    y1 = ref.self_attn_layer_norm(x + h1)
    h2 = ffn(y1)
    if placement == "pfeiffer":
        ln = ref.final_layer_norm
        return got, ln(y1 + h2 + A(layer.final_layer_norm)(ln(y1 + h2)))
    return got, ref.final_layer_norm(y1 + h2 + A(layer.fc2)(y1))


def bart_decoder_block(model, pristine, placement, A):
    """A decoder block with cross-attention: adapters after self-attention and the FFN, none after cross-attention."""
    layer, ref = model.model.decoder.layers[0], pristine.model.decoder.layers[0]
    g = torch.Generator().manual_seed(3)
    x, memory = torch.randn(2, 5, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    got = first(layer(x, attention_mask=None, encoder_hidden_states=memory))
    h1 = ref.self_attn(hidden_states=x, attention_mask=None)[0]
    y1 = ref.self_attn_layer_norm(x + h1 + (A(layer.self_attn.out_proj)(h1) if placement == "houlsby" else 0))
    c = ref.encoder_attn(hidden_states=y1, key_value_states=memory)[0]
    y2 = ref.encoder_attn_layer_norm(y1 + c)
    h3 = ref.fc2(ref.activation_fn(ref.fc1(y2)))
    ln = ref.final_layer_norm
    if placement == "houlsby":
        return got, ln(y2 + h3 + A(layer.fc2)(h3))
    if placement == "pfeiffer":
        return got, ln(y2 + h3 + A(layer.final_layer_norm)(ln(y2 + h3)))
    return got, ln(y2 + h3 + A(layer.fc2)(y2))


def t5_ff_block(model, pristine, placement, A):
    """T5's feed-forward sublayer (pre-LN, RMS norm): y = x + F(LN(x))."""
    layer, ref = model.encoder.block[0].layer[1], pristine.encoder.block[0].layer[1]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    got = layer(x)
    u = ref.layer_norm(x)
    h = ref.DenseReluDense(u)
    wo = layer.DenseReluDense.wo
    return got, x + h + {"houlsby": lambda: A(wo)(h), "pfeiffer": lambda: A(wo)(x + h), "parallel": lambda: A(wo)(u)}[placement]()


def opt_block(model, pristine, placement, A):
    """OPT: pre-LN (125m and most sizes) or post-LN (350m, do_layer_norm_before=False); the FFN runs on (B*T, H) rows."""
    layer, ref = model.model.decoder.layers[0], pristine.model.decoder.layers[0]
    pre = ref.do_layer_norm_before
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    got = first(layer(x, attention_mask=None))
    h1 = ref.self_attn(hidden_states=ref.self_attn_layer_norm(x) if pre else x, attention_mask=None)[0]
    y1 = x + h1 + (A(layer.self_attn.out_proj)(h1) if placement == "houlsby" else 0)
    y1 = y1 if pre else ref.self_attn_layer_norm(y1)
    rows = y1.reshape(-1, 32)  # (B*T, H)
    u2 = ref.final_layer_norm(rows) if pre else rows
    h2 = ref.fc2(ref.activation_fn(ref.fc1(u2)))
    ln = (lambda t: t) if pre else ref.final_layer_norm  # noqa: E731
    if placement == "houlsby":
        y = ln(rows + h2 + A(layer.fc2)(h2))
    elif placement == "pfeiffer":
        y = rows + h2 + A(layer.fc2)(rows + h2) if pre else ln(rows + h2 + A(layer.final_layer_norm)(ln(rows + h2)))
    else:
        y = ln(rows + h2 + A(layer.fc2)(u2))
    return got, y.view(2, 5, 32)


FAMILIES = {"llama": llama_block, "opt": opt_block, "opt-post_ln": opt_block, "gpt2": gpt2_block, "bert": bert_block, "roberta": bert_block,
            "bart": bart_encoder_block, "bart-decoder": bart_decoder_block, "t5": t5_ff_block}
PLACEMENTS = [("houlsby", "relu", 1.0), ("pfeiffer", "swish", 1.0), ("parallel", "gelu", 4.0)]


@pytest.mark.parametrize("placement,nonlinearity,scaling", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_block_computes_the_placement_formula(family, placement, nonlinearity, scaling):
    arch = family.split("-")[0]
    pristine, model = build(arch), build(arch)
    if family == "opt-post_ln":
        for m in (pristine, model):
            for layer in m.model.decoder.layers:
                layer.do_layer_norm_before = False
            m.config.do_layer_norm_before = False
    dt.attach(model, dt.AdapterConfig(placement=placement, bottleneck_size=6, nonlinearity=nonlinearity, scaling=scaling))
    perturb(model, scale=0.3)  # a non-zero up-projection
    A = lambda layer: adapter(layer, scaling=scaling, nonlinearity=nonlinearity)  # noqa: E731
    with torch.no_grad():
        got, expected = FAMILIES[family](model, pristine, placement, A)
        assert not torch.allclose(got, FAMILIES[family](pristine, pristine, placement, lambda _: lambda z: 0 * z)[1], atol=1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- sizes, layers, options


def test_bottleneck_size_reduction_factor_and_target_layers():
    model = build("llama")  # hidden 32, 2 layers
    dt.attach(model, dt.AdapterConfig(reduction_factor=8), name="r8")
    dt.attach(model, dt.AdapterConfig(bottleneck_size=5, target_layers=[1]), name="m5")
    dt.attach(model, dt.AdapterConfig(reduction_factor=100), name="tiny")
    o_proj = model.model.layers[1].self_attn.o_proj
    assert (o_proj.adapter_down["r8"].out_features, o_proj.adapter_down["m5"].out_features,
            o_proj.adapter_down["tiny"].out_features) == (4, 5, 1)
    assert "m5" not in model.model.layers[0].self_attn.o_proj.adapter_down
    # per module 2dm + m + d: two modules per layer, and m5 in one layer only
    assert sum(p.numel() for p in dt.delta_parameters(model, "m5").values()) == 2 * (2 * 32 * 5 + 5 + 32)
    with pytest.raises(dt.DeltaError, match=r"target_layers = \[7\] selects no block of LlamaForCausalLM; its blocks are numbered \[0, 1\]"):
        dt.attach(model, dt.AdapterConfig(target_layers=[7]), name="nowhere")


def test_decoder_cross_attention_gets_no_adapter():
    for arch, cross in (("t5", "EncDecAttention"), ("bart", "encoder_attn")):
        model = build(arch)
        dt.attach(model, dt.AdapterConfig(placement="houlsby"))
        wrapped = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
        assert len(wrapped) == 8 and not any(cross in n for n in wrapped), wrapped  # 2 per block, 2 + 2 blocks


def test_an_unknown_architecture_is_matched_by_module_names():
    model, known = build("llama"), build("llama")
    model.config.model_type = "my_llama_variant"
    for m in (model, known):
        dt.attach(m, dt.AdapterConfig(placement="parallel"))
    assert [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)] == \
        [n for n, m in known.named_modules() if isinstance(m, AdapterLayer)]

    class Mystery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "mystery"})()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    net = Mystery()
    with pytest.raises(dt.DeltaError, match=r"no bottleneck adapter sites are known for model_type 'mystery'.*ADAPTER_SITES.*Linear modules in this model: 0"):
        dt.attach(net, dt.AdapterConfig())
    assert not dt.attached(net)


def test_train_layer_norms_trains_saves_and_restores_the_blocks_norms(tmp_path):
    model = build("bert")
    data = batch("bert")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = logits(model, data)
    dt.attach(model, dt.AdapterConfig(placement="pfeiffer", train_layer_norms=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if "LayerNorm" in n and "adapter_" not in n}
    # both norms of both blocks (the wrapped output norm's parameters sit under base_layer); not the embeddings' norm
    assert len(norms) == 2 * 2 * 2 and not any("embeddings" in n for n in norms)
    assert trainable == set(dt.delta_parameters(model, "default"))
    perturb(model)
    adapted = logits(model, data)
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, data), base_out, rtol=0, atol=0)
    with pytest.raises(dt.DeltaError, match="'default' \\(bottleneck_adapter\\) is named in adapter_names, but it trains 8 parameter tensors of the base model itself.*cannot be applied per row"):
        model(**data, adapter_names=["default", "__base__"])
    dt.save(model, tmp_path)
    keys = set(load_keys(tmp_path))
    assert "base_model.model.bert.encoder.layer.0.output.LayerNorm.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.output.LayerNorm.bias" in keys
    fresh = build("bert")
    dt.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, data), adapted, rtol=0, atol=1e-6)
    with pytest.raises(dt.DeltaError, match="is already selected by delta .default."):
        dt.attach(model, dt.AdapterConfig(train_layer_norms=True), name="second")
    dt.detach(model)
    got = model.state_dict()
    assert all(torch.equal(got[k], base_state[k]) for k in base_state)


def load_keys(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_files_use_their_own_peft_type_and_say_who_reads_them(tmp_path):
    import json

    model = build("llama")
    dt.attach(model, dt.AdapterConfig(placement="parallel", bottleneck_size=4))
    dt.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK_ADAPTER" and config["placement"] == "parallel"
    card = (tmp_path / "README.md").read_text()
    assert "library_name: deltatune" in card and "deltatune can load it (the peft package has no such method)" in card
    import peft

    with pytest.raises(KeyError, match="BOTTLENECK_ADAPTER"):  # as the card says
        peft.PeftModel.from_pretrained(build("llama"), str(tmp_path))
    assert set(load_keys(tmp_path)) == {f"base_model.model.model.layers.{i}.mlp.down_proj.adapter_{w}.{t}"
                                        for i in range(2) for w in ("down", "up") for t in ("weight", "bias")}


def test_stacking_with_lora_on_other_modules_and_on_a_tapped_one():
    model = build("llama")
    data = batch("llama")
    base = logits(model, data)
    dt.attach(model, dt.AdapterConfig(placement="parallel"), name="par")
    perturb(model)
    adapted = logits(model, data)
    # LoRA wrapping the module whose input the parallel adapter reads: the tap still sees it
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["up_proj", "q_proj"]), name="lora")
    dt.set_active(model, ["par", "lora"])
    torch.testing.assert_close(logits(model, data), adapted, rtol=0, atol=1e-6)  # LoRA's B is zero
    dt.detach(model, "lora")
    torch.testing.assert_close(logits(model, data), adapted, rtol=0, atol=1e-6)
    with pytest.raises(dt.DeltaError, match="o_proj is already wrapped by LoraLayer; stacking AdapterLayer"):
        other = build("llama")
        dt.attach(other, dt.LoraConfig(r=2, target_modules=["o_proj"]))
        dt.attach(other, dt.AdapterConfig(placement="houlsby"), name="houlsby")
    dt.detach(model)
    torch.testing.assert_close(logits(model, data), base, rtol=0, atol=0)
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_gradient_checkpointing_reaches_every_adapter(placement, reentrant):
    model = build("gpt2")
    dt.attach(model, dt.AdapterConfig(placement=placement))
    perturb(model)  # with W_up = 0 the down-projection's gradient is exactly zero
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
    model.train()
    plain = copy.deepcopy(model)
    plain.gradient_checkpointing_disable()
    for m in (model, plain):
        torch.manual_seed(0)  # the same dropout masks (checkpointing replays the RNG state when it recomputes)
        m(**batch("gpt2")).loss.backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_generate_with_adapters_matches_the_uncached_forward():
    model = build("gpt2")
    dt.attach(model, dt.AdapterConfig(placement="pfeiffer", bottleneck_size=8))
    perturb(model, scale=0.3)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(input_ids=out.sequences, use_cache=False).logits
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, full[:, 5 + step - 1], rtol=0, atol=1e-5)


def test_half_precision_base_keeps_fp32_adapters():
    model, reference = build("llama").to(torch.bfloat16), build("llama")
    for m in (model, reference):
        torch.manual_seed(1)  # the same adapter init for both
        dt.attach(m, dt.AdapterConfig(placement="parallel"))
        perturb(m)
    assert all(p.dtype == torch.float32 for p in dt.delta_parameters(model, "default").values())
    data = batch("llama")
    out = model(**data)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), logits(reference, data), rtol=0.05, atol=0.05)


def test_copies_and_pickles_keep_working_taps():
    import io

    model = build("opt")
    data = batch("opt")
    dt.attach(model, dt.AdapterConfig(placement="parallel"))
    perturb(model)
    expected = logits(model, data)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(logits(twin, data), expected, rtol=0, atol=0)
        dt.detach(twin)  # removes the twin's taps, not the original's
        assert all(not m._forward_pre_hooks for m in twin.modules())
        torch.testing.assert_close(logits(model, data), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- AdapterFusion


def _two_trained_adapters(arch="llama", placement="houlsby"):
    model = build(arch)
    for seed, name in enumerate(("a", "b")):
        dt.attach(model, dt.AdapterConfig(placement=placement, bottleneck_size=4), name=name)
        perturb(model, seed=seed, scale=0.3)
    return model


def test_fusion_layer_computes_the_fusion_formula_and_starts_as_the_average():
    model = _two_trained_adapters()
    dt.attach(model, dt.AdapterFusionConfig(adapters=["a", "b"]), name="f")
    layer = model.model.layers[0].self_attn.o_proj  # serial: z is the projection's output
    u = torch.randn(2, 5, 32)
    with torch.no_grad():
        z = layer.base_layer(u)
        a, b = adapter(layer, "a")(z), adapter(layer, "b")(z)
        torch.testing.assert_close(layer(u), z + (a + b) / 2, rtol=0, atol=1e-6)  # V = I, K = 0: the average
        perturb(model, seed=5)  # now every fusion weight is non-trivial
        Q, K, V = layer.fusion_query["f"], layer.fusion_key["f"], layer.fusion_value["f"]
        q = z @ Q.weight.T + Q.bias
        scores = torch.stack([(q * (x @ K.weight.T + K.bias)).sum(-1) for x in (a, b)], -1) / 32 ** 0.5
        alpha = scores.softmax(-1)
        expected = z + alpha[..., :1] * (a @ V.weight.T) + alpha[..., 1:] * (b @ V.weight.T)
        torch.testing.assert_close(layer(u), expected, rtol=1e-5, atol=1e-5)


def test_fusion_freezes_its_adapters_and_trains_only_its_weights():
    model = _two_trained_adapters()
    dt.attach(model, dt.AdapterFusionConfig(adapters=["a", "b"]), name="f")
    assert dt.active(model) == ["f"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusion_" in n and ".f." in n for n in trainable)
    per_layer = 3 * 32 * 32 + 2 * 32  # Q and K with bias, V without
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * per_layer  # Houlsby: 4 modules
    dt.set_active(model, ["f", "a"])  # naming a fused adapter still leaves it frozen
    assert not any(".a." in n for n, p in model.named_parameters() if p.requires_grad)


def test_fusion_saves_only_its_weights_and_loads_after_its_adapters(tmp_path):
    import json

    model = _two_trained_adapters("bert", "pfeiffer")
    dt.attach(model, dt.AdapterFusionConfig(adapters=["a", "b"]), name="f")
    perturb(model, seed=9)
    data = batch("bert")
    expected = logits(model, data)
    dt.save(model, tmp_path)  # a/ b/ f/
    config = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTER_FUSION" and config["adapters"] == ["a", "b"] and config["placement"] == "pfeiffer"
    keys = set(load_keys(tmp_path / "f"))
    assert keys and all(".fusion_" in k or ".classifier." in k for k in keys)
    fresh = build("bert")
    before = fingerprint(fresh)
    with pytest.raises(dt.DeltaError, match=r"AdapterFusion 'f' fuses \['a', 'b'\], but \['a', 'b'\] are not attached; .*dt.load\(model, folder, name='a'\)"):
        dt.load(fresh, tmp_path / "f", name="f")
    assert_unchanged(fresh, before)
    dt.load(fresh, tmp_path / "a", name="a")
    with pytest.raises(dt.DeltaError, match=r"but \['b'\] is not attached"):
        dt.load(fresh, tmp_path / "f", name="f")
    dt.load(fresh, tmp_path / "b", name="b")
    dt.load(fresh, tmp_path / "f", name="f")
    torch.testing.assert_close(logits(fresh, data), expected, rtol=0, atol=1e-6)
    # adapters of the same names placed otherwise: the weights would fit, the meaning would not
    other = build("bert")
    for name in ("a", "b"):
        dt.attach(other, dt.AdapterConfig(placement="parallel", bottleneck_size=4), name=name)
    with pytest.raises(dt.DeltaError, match="'f' was trained on pfeiffer adapters, but \\['a', 'b'\\] are parallel adapters"):
        dt.load(other, tmp_path / "f", name="f")


def test_fusion_regularization_is_the_distance_of_v_from_the_identity():
    model = _two_trained_adapters()
    dt.attach(model, dt.AdapterFusionConfig(adapters=["a", "b"], regularization=0.5), name="f")
    assert dt.regularization(model).item() == 0.0
    perturb(model, seed=3)
    values = [m.fusion_value["f"].weight for m in model.modules() if isinstance(m, AdapterLayer)]
    expected = 0.5 * sum(((v - torch.eye(32)) ** 2).sum() for v in values)
    torch.testing.assert_close(dt.regularization(model), expected)
    dt.regularization(model).backward()
    assert all(v.grad is not None for v in values)


def test_mixed_batch_rows_can_use_a_fusion_an_adapter_or_nothing():
    model = _two_trained_adapters("gpt2", "parallel")
    dt.attach(model, dt.AdapterFusionConfig(adapters=["a", "b"]), name="f")
    perturb(model, seed=4)
    data = batch("gpt2")
    data = {k: torch.cat([v, v[:1]]) for k, v in data.items()}  # three rows
    outs = {}
    for name in ("f", "a"):
        dt.set_active(model, name)
        outs[name] = logits(model, data)
    with dt.disabled(model):
        outs["__base__"] = logits(model, data)
    with torch.no_grad():
        mixed = model(**data, adapter_names=["f", "a", "__base__"]).logits
    for row, name in enumerate(["f", "a", "__base__"]):
        torch.testing.assert_close(mixed[row], outs[name][row], rtol=0, atol=1e-5)


def _task(which: int, rows: int, seed: int) -> dict[str, torch.Tensor]:
    """Task 0: tokens 4..11, always predict token 5; task 1: tokens 50..57, always predict token 9."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4 if which == 0 else 50, 12 if which == 0 else 58, (rows, 8), generator=g)
    labels = torch.full_like(ids, 5 if which == 0 else 9)
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels}


def _fit(model, batches, steps):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        loss = model(**batches(i)).loss + dt.regularization(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def test_fusion_learns_to_weight_the_adapter_of_each_task():
    import transformers as tf

    torch.manual_seed(0)
    # initializer_range 0.15: the tiny default (0.02) makes logits too small for any adapter to fit a task
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15)).eval()
    for which, name in enumerate(("task0", "task1")):
        dt.attach(model, dt.AdapterConfig(placement="pfeiffer", bottleneck_size=16), name=name)
        _fit(model, lambda i: _task(which, 16, 100 * which + i), steps=60)
    for which, (own, other) in enumerate((("task0", "task1"), ("task1", "task0"))):  # each adapter does its own task only
        dt.set_active(model, own)
        good = model(**_task(which, 32, 7)).loss.item()
        dt.set_active(model, other)
        assert good < 1.0 < model(**_task(which, 32, 7)).loss.item() - 2
    dt.attach(model, dt.AdapterFusionConfig(adapters=["task0", "task1"]), name="fusion")

    def mixed(i):
        rows = [_task(0, 8, 1000 + i), _task(1, 8, 2000 + i)]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    _fit(model, mixed, steps=100)
    for which in (0, 1):
        with torch.no_grad(), dt.fusion_attention(model) as weights:
            model(**_task(which, 32, 5000 + which))
        per_layer = torch.stack([w.mean(dim=(0, 1)) for w in weights["fusion"].values()])  # (layers, adapters)
        assert per_layer.shape == (2, 2)
        assert per_layer[:, which].mean() > 0.8 and (per_layer[:, which] > 0.6).all(), per_layer
    for wrong, message in ((build("llama"), "has no AdapterFusion attached"), ("model", "expects a torch.nn.Module")):
        with pytest.raises(dt.DeltaError, match=message):
            with dt.fusion_attention(wrong):
                pass


def test_save_pretrained_with_adapters_writes_the_base_model(tmp_path):
    import transformers as tf

    model = build("bert")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, dt.AdapterConfig(placement="pfeiffer", train_layer_norms=True))
    perturb(model)  # trained adapters, trained layer norms, trained head
    with pytest.warns(UserWarning, match="without the unmerged delta"):
        model.save_pretrained(tmp_path)
    got = tf.BertForSequenceClassification.from_pretrained(tmp_path).state_dict()
    assert set(got) == set(base) and all(torch.equal(got[k], base[k]) for k in base)
