"""LoRA specifics: the formula, several adapters, mixed batches, half precision, embeddings, DoRA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import deltatune as dt
from deltatune.methods.lora import LoraLayer
from tiny_models import batch, build, logits


def perturb(model, seed=0, scale=0.1):
    """Give every delta parameter a random value, so deltas are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_forward_is_the_lora_formula():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=4, alpha=12, target_modules=["q_proj"], init="none"))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 32)
    W, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ W.T + (12 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)


def test_rslora_scales_by_alpha_over_sqrt_r():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(16))


def test_gaussian_and_kaiming_inits():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=64, init="gaussian", target_modules=["q_proj"]))
    A = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert A.std().item() == pytest.approx(1 / 64, rel=0.15)
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=64, target_modules=["q_proj"]))
    A = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert A.abs().max().item() <= bound and A.abs().max().item() > 0.9 * bound


def test_rank_and_alpha_patterns_override_per_module():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"],
                                   rank_pattern={"layers.1.self_attn.q_proj": 8}, alpha_pattern={"v_proj": 16}))
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert q0.lora_A["default"].weight.shape[0] == 4 and q1.lora_A["default"].weight.shape[0] == 8
    assert q1.scaling["default"] == 4 / 8
    assert model.model.layers[0].self_attn.v_proj.scaling["default"] == 16 / 4


def test_layers_to_transform_restricts_to_chosen_layers():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert wrapped == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_set_active_switches_between_named_adapters():
    model = build("llama")
    data = batch("llama")
    base = logits(model, data)
    dt.attach(model, dt.LoraConfig(r=4, init="none"), name="a")
    out_a = logits(model, data)
    dt.attach(model, dt.LoraConfig(r=2, alpha=4, init="none"), name="b")
    assert dt.active(model) == ["b"]
    out_b = logits(model, data)
    assert not torch.allclose(out_a, out_b)
    dt.set_active(model, "a")
    torch.testing.assert_close(logits(model, data), out_a, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)
    dt.set_active(model, [])
    torch.testing.assert_close(logits(model, data), base, rtol=0, atol=0)
    dt.set_active(model, ["a", "b"])  # both at once: each layer adds both deltas
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    expected = x @ (q.base_layer.weight + q.delta_weight("a") + q.delta_weight("b")).T
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(dt.DeltaError, match="no delta named 'c'"):
        dt.set_active(model, "c")


def test_mixed_batch_rows_use_their_own_adapter():
    model = build("llama")
    data = {"input_ids": torch.randint(3, 96, (4, 6))}
    base = logits(model, data)
    dt.attach(model, dt.LoraConfig(r=4, init="none"), name="a")
    out_a = logits(model, data)
    dt.attach(model, dt.LoraConfig(r=4, init="none", use_dora=True), name="b")
    out_b = logits(model, data)
    with torch.no_grad():
        mixed = model(**data, adapter_names=["a", "b", "__base__", "a"]).logits
    torch.testing.assert_close(mixed[0], out_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], out_b[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[3], out_a[3], rtol=0, atol=1e-5)
    # the names do not stick: the next forward uses the active adapter again
    torch.testing.assert_close(logits(model, data), out_b, rtol=0, atol=0)
    with pytest.raises(dt.DeltaError, match="3 entries but the batch has 4 rows"):
        model(**data, adapter_names=["a", "b", "a"])
    with pytest.raises(dt.DeltaError, match="'zzz', which is not attached"):
        model(**data, adapter_names=["a", "b", "a", "zzz"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_trainables(dtype):
    model = build("llama").to(dtype)
    dt.attach(model, dt.LoraConfig(r=4, init="none"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == dtype for p in model.parameters() if not p.requires_grad)
    data = batch("llama")
    out = model(**data)
    assert out.logits.dtype == dtype
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in trainable)
    unmerged = logits(model, data).float()
    dt.merge(model)
    torch.testing.assert_close(logits(model, data).float(), unmerged, rtol=0.05, atol=0.05)


def test_embedding_lora_starts_as_identity_and_merges():
    model = build("llama")
    data = batch("llama")
    base = logits(model, data)
    dt.attach(model, dt.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    emb = model.model.embed_tokens
    assert isinstance(emb, LoraLayer) and emb.lora_embedding_A["default"].abs().sum() == 0
    torch.testing.assert_close(logits(model, data), base, rtol=0, atol=0)
    perturb(model)
    unmerged = logits(model, data)
    assert not torch.allclose(unmerged, base)
    ids = data["input_ids"]
    A, B = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]
    torch.testing.assert_close(emb(ids), emb.base_layer(ids) + A.T[ids] @ B.T * emb.scaling["default"])
    dt.merge(model)
    torch.testing.assert_close(logits(model, data), unmerged, rtol=1e-5, atol=1e-5)


def test_embedding_lora_round_trips_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = build("llama")
    data = batch("llama")
    dt.attach(model, dt.LoraConfig(r=4, target_modules=["embed_tokens", "v_proj"]))
    perturb(model)
    dt.save(model, tmp_path)
    fresh = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    torch.testing.assert_close(logits(fresh, data), logits(model, data), rtol=0, atol=1e-5)


def test_dora_with_dropout_trains_and_matches_formula_in_eval():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=4, use_dora=True, dropout=0.1, target_modules=["q_proj"]))
    perturb(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 32)
    W, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"], layer.scaling["default"]
    adapted = W + s * B @ A
    expected = x @ (m.unsqueeze(1) * adapted / adapted.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    model.train()
    torch.manual_seed(0)
    out = model(**batch("llama"))
    out.loss.backward()
    assert layer.lora_magnitude_vector["default"].grad is not None


def test_dora_on_embedding_is_refused():
    with pytest.raises(dt.DeltaError, match="DoRA on an embedding"):
        dt.attach(build("llama"), dt.LoraConfig(use_dora=True, target_modules=["embed_tokens"]))


def test_wrapped_module_still_exposes_base_attributes():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(target_modules=["q_proj"]))
    q = model.model.layers[0].self_attn.q_proj
    assert q.in_features == 32 and q.weight is q.base_layer.weight


def test_generate_with_lora_matches_merged_model():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=4, init="none"))
    ids = torch.randint(3, 96, (1, 5))
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    merged = copy.deepcopy(model)
    dt.detach(merged, merge=True)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert torch.equal(gen, merged.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_works_with_a_plain_torch_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    before = net(x)
    dt.attach(net, dt.LoraConfig(r=2, target_modules=["0", "2"]))
    torch.testing.assert_close(net(x), before)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        "0.lora_A.default.weight", "0.lora_B.default.weight", "2.lora_A.default.weight", "2.lora_B.default.weight"}


def test_generate_serves_a_different_adapter_per_row():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=4, init="none"), name="a")
    dt.attach(model, dt.LoraConfig(r=4, init="none", use_rslora=True), name="b")
    ids = torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with dt.mixed_batch(model, ["a", "b", "__base__"]):
        mixed = model.generate(ids, **kw)
    singles = []
    for active in (["a"], ["b"], []):
        dt.set_active(model, active)
        singles.append(model.generate(ids, **kw))
    for row, single in enumerate(singles):
        assert torch.equal(mixed.sequences[row], single.sequences[row])
        for step_mixed, step_single in zip(mixed.scores, single.scores):
            torch.testing.assert_close(step_mixed[row], step_single[row], rtol=0, atol=1e-5)
    with pytest.raises(dt.DeltaError, match="'c', which is not attached"):
        with dt.mixed_batch(model, ["a", "c", "b"]):
            pass


def test_quantised_linear_layers_are_refused_by_name():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[1].weight = nn.Parameter(torch.zeros(4, 2, dtype=torch.uint8), requires_grad=False)  # a packed 4-bit weight
    with pytest.raises(dt.DeltaError, match=r"lora cannot wrap 1 \(Linear\).*supported type instead: 0"):
        dt.attach(net, dt.LoraConfig(target_modules=["0", "1"]))


def test_several_dora_adapters_merge_to_what_they_compute_unmerged():
    model = build("llama")
    data = batch("llama")
    dt.attach(model, dt.LoraConfig(r=2, use_dora=True), name="a")
    perturb(model, seed=0)
    dt.attach(model, dt.LoraConfig(r=2, use_dora=True), name="b")
    perturb(model, seed=1)
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="c")
    dt.set_active(model, ["c", "a", "b"])  # adapters apply in this order; DoRA's step does not commute
    unmerged = logits(model, data)
    dt.merge(model)
    torch.testing.assert_close(logits(model, data), unmerged, rtol=0, atol=1e-5)
    with pytest.raises(dt.DeltaError, match=r"cannot unmerge 'a' .*\['b'\] were merged after it"):
        dt.unmerge(model, "a")
    dt.unmerge(model, "b")  # the last one applied comes out alone
    torch.testing.assert_close(logits(model, data), unmerged, rtol=0, atol=1e-5)
    dt.unmerge(model)
    with pytest.raises(dt.DeltaError, match=r"cannot merge 'b' .*\['c', 'a'\] apply before it"):
        dt.merge(model, "b")
    dt.merge(model, "c")
    dt.merge(model, "a")
    torch.testing.assert_close(logits(model, data), unmerged, rtol=0, atol=1e-5)
