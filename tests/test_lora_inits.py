"""LoRA initialisations that move part of the base weight into the adapter: PiSSA and OLoRA.

What they compute (against an independent SVD / QR), that the true base comes back whenever
the delta is not in effect (inactive, disabled, detached, save_pretrained), the export
relative to the original weights, and the combinations that are refused.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from checks import assert_unchanged, fingerprint
from test_lora import perturb
from tiny_models import batch, build, logits


def q_layer(model):
    return model.model.layers[0].self_attn.q_proj


def same_state(model, reference) -> bool:
    """The model's own tensors (delta parameters left out, wrappers seen through) equal the reference's, bit for bit."""
    got = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    want = reference.state_dict()
    return list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_pissa_takes_the_principal_singular_triplets():
    base = build("llama")
    W0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = copy.deepcopy(base)
    dt.attach(model, dt.LoraConfig(r=4, alpha=8, init="pissa", target_modules=["q_proj"]))
    layer = q_layer(model)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    U, S, Vh = torch.linalg.svd(W0.double())
    principal = (U[:, :4] * S[:4]) @ Vh[:4]  # (out, in), the best rank-4 approximation
    torch.testing.assert_close((s * B @ A).double(), principal, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight.double(), W0.double() - principal, rtol=0, atol=1e-5)
    # the residual keeps the other singular values; A's rows are orthogonal with squared norms S_i / s
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight.double())[:4], S[4:8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((A @ A.T).double(), torch.diag(S[:4] / s), rtol=1e-4, atol=1e-5)


def test_olora_takes_the_leading_qr_factors():
    base = build("llama")
    W0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = copy.deepcopy(base)
    dt.attach(model, dt.LoraConfig(r=4, alpha=4, init="olora", target_modules=["q_proj"]))
    layer = q_layer(model)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(B.T @ B, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal columns
    assert torch.equal(A, A.triu())  # R is upper triangular
    Q, R = torch.linalg.qr(W0.double())
    torch.testing.assert_close(B.double().abs(), Q[:, :4].abs(), rtol=0, atol=1e-5)  # up to the signs of the columns
    torch.testing.assert_close(layer.base_layer.weight.double() + (B @ A).double(), W0.double(), rtol=0, atol=1e-6)


def test_gpt2_conv1d_weights_are_decomposed_in_their_out_by_in_orientation():
    base = build("gpt2")
    W0 = base.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out) = (32, 96)
    for init in ("pissa", "olora"):
        model = copy.deepcopy(base)
        dt.attach(model, dt.LoraConfig(r=4, alpha=8, init=init))
        layer = model.transformer.h[0].attn.c_attn
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.shape == (4, 32) and B.shape == (96, 4)
        torch.testing.assert_close(layer.base_layer.weight + (layer.scaling["default"] * B @ A).T, W0, rtol=0, atol=1e-6)


def test_pissa_niter_uses_a_fast_svd_and_is_repeatable():
    base = build("llama")
    W0 = base.model.layers[0].self_attn.q_proj.weight.detach().double()
    twins = []
    for _ in range(2):
        model = copy.deepcopy(base)
        torch.manual_seed(len(twins))  # the global seed must not matter
        dt.attach(model, dt.LoraConfig(r=4, init="pissa", pissa_niter=4, target_modules=["q_proj"]))
        twins.append(model)
    first, second = twins[0].state_dict(), twins[1].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    layer = q_layer(twins[0])
    approx = (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double()
    S = torch.linalg.svdvals(W0)
    # a near-best rank-4 approximation: its error is close to the tail of the spectrum
    assert torch.linalg.matrix_norm(W0 - approx) < 1.05 * S[4:].norm()


def test_the_true_base_runs_whenever_the_delta_is_not_in_effect(tmp_path):
    base = build("llama")
    data = batch("llama")
    reference = logits(base, data)
    model = copy.deepcopy(base)
    dt.attach(model, dt.LoraConfig(r=4, init="pissa"), name="p")
    perturb(model)
    trained = logits(model, data)
    with dt.disabled(model):
        assert torch.equal(logits(model, data), reference)
        assert same_state(model, base)  # the original weights, bit for bit
    assert torch.equal(logits(model, data), trained)
    dt.set_active(model, [])
    assert torch.equal(logits(model, data), reference)
    dt.set_active(model, "p")
    assert torch.equal(logits(model, data), trained)
    # a second (plain) delta becomes the active one: it runs on the original weights
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="plain")
    plain = copy.deepcopy(base)
    dt.attach(plain, dt.LoraConfig(r=2, init="none"), name="plain")
    with torch.no_grad():
        for name, p in dt.delta_parameters(model, "plain").items():
            dict(plain.named_parameters())[name].copy_(p)
    torch.testing.assert_close(logits(model, data), logits(plain, data), rtol=0, atol=0)
    # save_pretrained writes the base model, not the residual, while the delta is unmerged ...
    dt.set_active(model, "p")
    with pytest.warns(UserWarning, match="without the unmerged delta"):
        model.save_pretrained(tmp_path / "base")
    assert torch.equal(logits(type(base).from_pretrained(tmp_path / "base"), data), reference)
    # ... and the trained model once merged
    dt.merge(model)
    model.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(type(base).from_pretrained(tmp_path / "merged"), data), trained, rtol=0, atol=1e-5)
    dt.detach(model)
    assert same_state(model, base)


def test_detach_with_merge_keeps_the_trained_model_even_when_inactive():
    base = build("llama")
    data = batch("llama")
    model = copy.deepcopy(base)
    dt.attach(model, dt.LoraConfig(r=4, init="olora"), name="o")
    perturb(model)
    trained = logits(model, data)
    dt.attach(model, dt.LoraConfig(r=2), name="other")  # "o" is now inactive: the original weights are in place
    dt.detach(model, merge=True)
    torch.testing.assert_close(logits(model, data), trained, rtol=0, atol=1e-5)  # "other" starts at zero


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns"])
def test_saved_relative_to_the_original_weights_is_a_plain_lora(tmp_path, init, variant):
    kw = {"plain": {}, "rslora": {"use_rslora": True},
          "patterns": {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 3.0}}}[variant]
    base = build("llama")
    data = batch("llama")
    model = copy.deepcopy(base)
    dt.attach(model, dt.LoraConfig(r=4, alpha=8, init=init, **kw))
    perturb(model)
    trained = logits(model, data)
    dt.save(model, tmp_path, relative_to_original=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    factor = math.sqrt(2) if kw.get("use_rslora") else 2
    assert config["init_lora_weights"] is True and config["r"] == 8
    assert config["lora_alpha"] == pytest.approx(8 * factor)
    assert config["rank_pattern"] == {k: 2 * v for k, v in kw.get("rank_pattern", {}).items()}
    assert config["alpha_pattern"] == pytest.approx({k: v * factor for k, v in kw.get("alpha_pattern", {}).items()})
    fresh = dt.load(copy.deepcopy(base), tmp_path)  # onto the original, unmodified weights
    torch.testing.assert_close(logits(fresh, data), trained, rtol=0, atol=1e-5)
    assert not fresh.__dict__["_deltatune_state"].deltas["default"].rewrites  # a plain LoRA: nothing rewritten
    # the plain file mixes with other adapters, per row
    dt.attach(fresh, dt.LoraConfig(r=2, init="none"), name="other")
    with torch.no_grad():
        mixed = fresh(**data, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], trained[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], logits(base, data)[1], rtol=0, atol=1e-5)


def test_saved_as_is_the_init_runs_again_on_load(tmp_path):
    base = build("llama")
    data = batch("llama")
    model = copy.deepcopy(base)
    dt.attach(model, dt.LoraConfig(r=4, init="pissa", pissa_niter=2))
    perturb(model)
    dt.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "pissa_niter_2" and "pissa_niter" not in config
    fresh = dt.load(copy.deepcopy(base), tmp_path)
    assert dt.attached(fresh)["default"].init == "pissa" and dt.attached(fresh)["default"].pissa_niter == 2
    assert torch.equal(logits(fresh, data), logits(model, data))
    dt.save(fresh, tmp_path / "again", relative_to_original=True)  # the reloaded delta still knows its initial A0, B0
    torch.testing.assert_close(logits(dt.load(copy.deepcopy(base), tmp_path / "again"), data), logits(model, data),
                               rtol=0, atol=1e-5)


# ---------------------------------------------------------------- refused combinations


def test_what_cannot_work_is_refused_and_changes_nothing():
    model = build("gpt2")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"init='pissa' rewrites lm_head's weight, which is shared \(tied\) with transformer.wte"):
        dt.attach(model, dt.LoraConfig(r=2, init="pissa", target_modules=["lm_head", "c_attn"]))
    with pytest.raises(dt.DeltaError, match=r"init='olora' on an embedding \(transformer.wpe\) is not supported"):
        dt.attach(model, dt.LoraConfig(r=2, init="olora", target_modules=["wpe"]))
    with pytest.raises(dt.DeltaError, match=r"needs r <= min\(in, out\) = 32 for transformer.h.0.attn.c_attn, got r=40"):
        dt.attach(model, dt.LoraConfig(r=40, init="pissa"))
    assert_unchanged(model, before)
    with pytest.raises(dt.DeltaError, match="pissa_niter = 4 only applies to init='pissa'"):
        dt.LoraConfig(init="olora", pissa_niter=4)
    with pytest.raises(dt.DeltaError, match=r"pissa_niter = 0 is not allowed"):
        dt.LoraConfig(init="pissa", pissa_niter=0)
    import transformers as tf

    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(dt.DeltaError, match="needs the values of model.layers.0.self_attn.q_proj's weight, which is on the meta"):
        dt.attach(meta, dt.LoraConfig(init="pissa"))


def test_one_delta_at_a_time_may_rewrite_a_layer():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2, init="pissa"), name="p")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"model.layers.0.self_attn.q_proj's base weight was already rewritten by delta 'p' "
                                            r"\(init='pissa'\).*relative_to_original=True"):
        dt.attach(model, dt.LoraConfig(r=2, init="olora"), name="o")
    assert_unchanged(model, before)
    dt.attach(model, dt.LoraConfig(r=2, init="olora", target_modules=["k_proj"]), name="o")  # other layers are fine


def test_mixed_batches_and_merges_that_would_break_the_swap_are_refused():
    base = build("llama")
    data = batch("llama")
    model = copy.deepcopy(base)
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="plain")
    dt.attach(model, dt.LoraConfig(r=2, init="pissa"), name="p")
    perturb(model)
    dt.set_active(model, ["plain", "p"])
    with pytest.raises(dt.DeltaError, match=r"'p' is named in adapter_names, but it rewrote the base weights .*init='pissa'"):
        model(**data, adapter_names=["p", "plain"])
    with pytest.raises(dt.DeltaError, match=r"'p' is active, but it rewrote the base weights"):
        model(**data, adapter_names=["plain", "__base__"])
    out = logits(model, data)
    dt.merge(model, "plain")  # merging into the residual is fine: the sum is the same
    torch.testing.assert_close(logits(model, data), out, rtol=0, atol=1e-5)
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"cannot deactivate 'p': .*\['plain'\] are merged into that weight; "
                                            r"dt.unmerge\(model, 'plain'\) first"):
        dt.set_active(model, "plain")
    with pytest.raises(dt.DeltaError, match=r"cannot detach 'p': .*dt.unmerge\(model, 'plain'\) first"):
        dt.detach(model, "p")
    assert_unchanged(model, before)
    dt.detach(model)  # everything at once: the merged delta comes out first, then the original weights go back
    assert same_state(model, base)
    # attaching a rewriting delta onto a layer with a merge is refused as well
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="plain")
    dt.merge(model)
    with pytest.raises(dt.DeltaError, match=r"has \['plain'\] merged into its base weight, which init='olora' would rewrite"):
        dt.attach(model, dt.LoraConfig(r=2, init="olora"), name="o")


def test_relative_to_original_refusals():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2, init="pissa", use_dora=True))
    with pytest.raises(dt.DeltaError, match="uses DoRA, whose magnitude is not a low-rank difference"):
        dt.save(model, "unused", relative_to_original=True)
    with pytest.raises(dt.DeltaError, match="relative_to_original=True or False"):
        dt.save(model, "unused", relative_to_original="yes")


def test_relative_to_original_leaves_other_deltas_as_they_are(tmp_path):
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2, init="none"))
    dt.save(model, tmp_path / "plain")
    dt.save(model, tmp_path / "flag", relative_to_original=True)
    assert (tmp_path / "plain" / "adapter_config.json").read_bytes() == (tmp_path / "flag" / "adapter_config.json").read_bytes()
    plain, flagged = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("plain", "flag"))
    assert plain.keys() == flagged.keys() and all(torch.equal(plain[k], flagged[k]) for k in plain)
