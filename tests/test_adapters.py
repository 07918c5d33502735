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
    got = first(layer(x, attention_mask=None))
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


FAMILIES = {"llama": llama_block, "gpt2": gpt2_block, "bert": bert_block, "roberta": bert_block,
            "bart": bart_encoder_block, "bart-decoder": bart_decoder_block, "t5": t5_ff_block}
PLACEMENTS = [("houlsby", "relu", 1.0), ("pfeiffer", "swish", 1.0), ("parallel", "gelu", 4.0)]


@pytest.mark.parametrize("placement,nonlinearity,scaling", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_block_computes_the_placement_formula(family, placement, nonlinearity, scaling):
    arch = family.split("-")[0]
    pristine, model = build(arch), build(arch)
    dt.attach(model, dt.AdapterConfig(placement=placement, bottleneck_size=6, nonlinearity=nonlinearity, scaling=scaling))
    perturb(model, scale=0.3)  # a non-zero up-projection
    A = lambda layer: adapter(layer, scaling=scaling, nonlinearity=nonlinearity)  # noqa: E731
    with torch.no_grad():
        got, expected = FAMILIES[family](model, pristine, placement, A)
        assert not torch.allclose(got, FAMILIES[family](pristine, pristine, placement, lambda _: lambda z: 0 * z)[1], atol=1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
