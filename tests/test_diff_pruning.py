"""Diff pruning: the hard-concrete gate and its penalty by hand, the projection, the sparse file."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
import transformers as tf

import deltatune as dt
from checks import assert_unchanged, fingerprint
from deltatune.io import WEIGHTS_NAME
from deltatune.methods.diff_pruning import DiffPruningLayer, kept_entries
from test_lora import perturb
from tiny_models import batch, build, logits


def diff_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DiffPruningLayer)]


def randomize(model, seed=0):
    """w random, alpha spread over the range where the gate is partly open, so every case of the gate occurs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".diff_w." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif ".diff_log_alpha." in n:
                p.copy_(torch.empty(p.shape).uniform_(-3, 4, generator=g))


def test_default_targets_are_every_module_with_weights_but_heads_and_tied_ones():
    model = build("gpt2")
    dt.attach(model, dt.DiffPruningConfig())
    wrapped = {n for n, _ in diff_layers(model)}
    assert "transformer.wte" not in wrapped and "lm_head" not in wrapped  # tied to each other
    assert {"transformer.wpe", "transformer.ln_f", "transformer.h.0.ln_1", "transformer.h.1.mlp.c_proj"} <= wrapped
    layer = model.transformer.h[0].attn.c_attn
    assert layer.names == ("weight", "bias")
    names = set(dt.delta_parameters(model, "default"))
    assert "transformer.h.0.attn.c_attn.diff_w.default.weight" in names
    assert "transformer.h.0.attn.c_attn.diff_log_alpha.default.bias" in names
    # w starts at zero and alpha at 5, in fp32
    assert torch.equal(layer.diff_w["default"]["weight"], torch.zeros(32, 96))
    assert torch.equal(layer.diff_log_alpha["default"]["weight"], torch.full((32, 96), 5.0))


def test_the_forward_is_theta0_plus_gate_times_w():
    model = build("llama")
    dt.attach(model, dt.DiffPruningConfig(target_modules=["q_proj"], limit_l=-0.1, limit_r=1.1))
    randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    W0, w, alpha = layer.base_layer.weight, layer.diff_w["default"]["weight"], layer.diff_log_alpha["default"]["weight"]
    x = torch.randn(3, 5, 32)
    z = torch.clamp(torch.sigmoid(alpha) * 1.2 - 0.1, 0, 1)  # eval: the deterministic gate
    assert 0 < (z == 0).sum() < z.numel() and 0 < (z == 1).sum() < z.numel()  # every case of the clamp occurs
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (W0 + z * w).T)
    layer.train()
    torch.manual_seed(7)
    sampled = layer(x)
    torch.manual_seed(7)
    u = torch.rand_like(alpha).clamp(1e-6, 1 - 1e-6)
    z = torch.clamp(torch.sigmoid(torch.log(u) - torch.log(1 - u) + alpha) * 1.2 - 0.1, 0, 1)  # beta = 1
    torch.testing.assert_close(sampled, x @ (W0 + z * w).T)


def test_the_temperature_divides_the_logit():
    model = build("llama")
    dt.attach(model, dt.DiffPruningConfig(target_modules=["q_proj"], temperature=2 / 3))
    randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    alpha = layer.diff_log_alpha["default"]["weight"]
    torch.manual_seed(3)
    z = layer.gate("default", "weight", stochastic=True)
    torch.manual_seed(3)
    u = torch.rand_like(alpha).clamp(1e-6, 1 - 1e-6)
    expected = torch.clamp(torch.sigmoid((torch.log(u) - torch.log(1 - u) + alpha) * 1.5) * 3 - 1.5, 0, 1)
    torch.testing.assert_close(z, expected)


def test_the_penalty_is_the_expected_l0_norm():
    model = build("llama")
    config = dt.DiffPruningConfig(target_modules=["q_proj", "input_layernorm"], limit_l=-0.1, limit_r=1.1,
                                  temperature=2 / 3, l0_penalty=1e-3)
    dt.attach(model, config)
    randomize(model)
    alphas = [p for n, p in model.named_parameters() if ".diff_log_alpha." in n]
    assert len(alphas) == 4
    expected = 1e-3 * sum(torch.sigmoid(a - (2 / 3) * math.log(0.1 / 1.1)).sum() for a in alphas)
    penalty = dt.regularization(model)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    a = alphas[0]
    s = torch.sigmoid(a.detach() - (2 / 3) * math.log(0.1 / 1.1))
    torch.testing.assert_close(a.grad, 1e-3 * s * (1 - s))
    assert dt.regularization(build("llama")) == 0.0  # no delta, no penalty
    dt.set_trainable(model, "default", False)
    assert dt.regularization(model) == 0.0  # a frozen delta adds nothing


def test_finalize_keeps_the_largest_entries_of_the_whole_diff():
    model = build("gpt2")
    data = batch("gpt2")
    dt.attach(model, dt.DiffPruningConfig(target_sparsity=0.01))
    randomize(model)
    layers = diff_layers(model)
    deltas = {(n, p): layer.diff("default", p).detach().clone() for n, layer in layers for p in layer.names}
    total = sum(d.numel() for d in deltas.values())
    k = kept_entries(model)
    assert k == round(0.01 * total)
    threshold = torch.cat([d.abs().flatten() for d in deltas.values()]).topk(k).values.min()
    dt.finalize(model)
    kept = 0
    for (n, p), before in deltas.items():
        layer = model.get_submodule(n)
        mask = layer.diff_mask["default"].get_buffer(p)
        kept += int(mask.sum())
        assert (before.abs()[mask] >= threshold).all() and (before.abs()[~mask] <= threshold).all()
        # w is delta on the kept entries, 0 elsewhere; the gate is the mask from now on
        assert torch.equal(layer.diff_w["default"][p], torch.where(mask, before, torch.zeros(())))
        assert torch.equal(layer.gate("default", p, stochastic=True), mask.float())
    assert kept == k
    assert dt.regularization(model) == 0.0
    masks = [layer.diff_mask["default"].get_buffer(p).clone() for _, layer in layers for p in layer.names]
    dt.finalize(model)  # a second projection of the projected diff keeps the same entries
    assert all(torch.equal(m, layer.diff_mask["default"].get_buffer(p))
               for m, (layer, p) in zip(masks, [(layer, p) for _, layer in layers for p in layer.names]))
    # outputs are theta0 + the projected diff, computed by hand on one layer
    layer = model.transformer.h[0].mlp.c_fc
    x = torch.randn(2, 32)
    mask = layer.diff_mask["default"].get_buffer("weight")
    W = layer.base_layer.weight + torch.where(mask, deltas[("transformer.h.0.mlp.c_fc", "weight")], torch.zeros(()))
    b = layer.base_layer.bias + torch.where(layer.diff_mask["default"].get_buffer("bias"),
                                            deltas[("transformer.h.0.mlp.c_fc", "bias")], torch.zeros(()))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W + b)  # Conv1D: weight is (in, out)
    # training with the mask fixed moves only the kept entries, and alpha not at all
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        (model(**data).loss + dt.regularization(model)).backward()
        opt.step()
        opt.zero_grad()
    for n, layer in layers:
        for p in layer.names:
            mask = layer.diff_mask["default"].get_buffer(p)
            w = layer.diff_w["default"][p]
            assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
            assert torch.equal(layer.diff_log_alpha["default"][p], before[f"{n}.diff_log_alpha.default.{p}"])
    assert kept_entries(model) == k


def _wide_gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=256, n_layer=2, n_head=4, n_positions=64)).eval()


def test_the_file_is_sparse_and_small(tmp_path):
    model = _wide_gpt2()
    dt.attach(model, dt.DiffPruningConfig(target_sparsity=0.005))
    randomize(model)
    dt.finalize(model)
    dt.save(model, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.transformer.h.0.attn.c_attn.diff_w.weight"
    assert tensors[key + ".indices"].dtype == torch.int32 and tensors[key + ".values"].dtype == torch.float32
    assert tensors[key + ".shape"].tolist() == [256, 768]
    assert not any(".diff_log_alpha." in k for k in tensors)
    dense_bytes = 4 * sum(getattr(layer.base_layer, p).numel() for _, layer in diff_layers(model) for p in layer.names)
    stored = sum(len(t) for k, t in tensors.items() if k.endswith(".indices"))
    assert stored == kept_entries(model)
    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    assert size < 0.02 * dense_bytes, (size, dense_bytes)
    data = batch("gpt2")
    torch.testing.assert_close(logits(dt.load(_wide_gpt2(), tmp_path), data), logits(model, data), rtol=0, atol=0)


def test_round_trip_and_merge_is_theta0_plus_delta(tmp_path):
    model = build("bert")
    data = batch("bert")
    dt.attach(model, dt.DiffPruningConfig(target_sparsity=0.02))
    perturb(model)
    randomize(model)
    dt.finalize(model)
    expected = logits(model, data)
    dt.save(model, tmp_path)
    fresh = dt.load(build("bert"), tmp_path)
    torch.testing.assert_close(logits(fresh, data), expected, rtol=0, atol=0)
    for (n, a), (_, b) in zip(diff_layers(model), diff_layers(fresh)):
        for p in a.names:
            assert torch.equal(a.diff_mask["default"].get_buffer(p), b.diff_mask["default"].get_buffer(p)), n
    # merge: theta0 + delta, exactly as computed by hand
    layer = fresh.bert.encoder.layer[0].attention.self.query
    theta0 = layer.base_layer.weight.detach().clone()
    delta = layer.diff("default", "weight").detach().clone()
    dt.merge(fresh)
    assert torch.equal(layer.base_layer.weight, theta0 + delta)
    torch.testing.assert_close(logits(fresh, data), expected, rtol=1e-5, atol=1e-5)
    dt.detach(fresh, merge=True)
    assert not diff_layers(fresh)
    torch.testing.assert_close(logits(fresh, data), expected, rtol=1e-5, atol=1e-5)


def test_an_unfinalized_diff_saves_its_nonzero_entries(tmp_path):
    model = build("gpt2")
    data = batch("gpt2")
    dt.attach(model, dt.DiffPruningConfig())
    randomize(model)
    nonzero = sum(int((layer.diff("default", p) != 0).sum()) for _, layer in diff_layers(model) for p in layer.names)
    dt.save(model, tmp_path)
    stored = sum(len(t) for k, t in safetensors.torch.load_file(tmp_path / WEIGHTS_NAME).items() if k.endswith(".indices"))
    assert stored == nonzero
    torch.testing.assert_close(logits(dt.load(build("gpt2"), tmp_path), data), logits(model, data), rtol=0, atol=0)


def test_half_precision_base_keeps_fp32_diffs():
    model = build("llama").to(torch.bfloat16)
    data = batch("llama")
    before = logits(model, data)
    dt.attach(model, dt.DiffPruningConfig())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    torch.testing.assert_close(logits(model, data), before, rtol=0, atol=0)
    model(**data).loss.backward()


def test_finalize_and_step_on_the_meta_device_and_merged_deltas():
    config = tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)
    with torch.device("meta"):
        model = tf.BertModel(config)
    dt.attach(model, dt.DiffPruningConfig(target_sparsity=0.01))
    dt.finalize(model)  # shapes only: nothing to compute, nothing fails
    dt.step(model, 3)  # no step hook: a no-op
    with pytest.raises(dt.DeltaError, match="global step as an int >= 0"):
        dt.step(model, -1)
    small = build("gpt2")
    dt.attach(small, dt.DiffPruningConfig())
    dt.merge(small)
    with pytest.raises(dt.DeltaError, match=r"merged into the base weights; dt.unmerge\(model\) before dt.finalize"):
        dt.finalize(small)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda t, k: t.pop(k + ".shape"), r"\.diff_w\.weight\.shape is missing"),
        (lambda t, k: t.__setitem__(k + ".indices", t[k + ".indices"] + 10**6), "has an entry outside a tensor of shape"),
        (lambda t, k: t.__setitem__(k + ".indices", torch.zeros_like(t[k + ".indices"])), "repeats an entry"),
        (lambda t, k: t.__setitem__(k + ".values", t[k + ".values"][:1]), "must be 1-D .* of one length"),
        (lambda t, k: t.__setitem__(k + ".shape", torch.tensor([-1, 4])), "must be a list of sizes"),
    ],
    ids=["missing-part", "out-of-range", "repeated", "lengths", "shape"],
)
def test_damaged_sparse_files_are_refused(tmp_path, damage, message):
    model = build("gpt2")
    dt.attach(model, dt.DiffPruningConfig(target_sparsity=0.2))
    randomize(model)
    dt.finalize(model)
    dt.save(model, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    damage(tensors, "base_model.model.transformer.h.0.attn.c_attn.diff_w.weight")
    safetensors.torch.save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    fresh = build("gpt2")
    before = fingerprint(fresh)
    with pytest.raises(dt.DeltaError, match=message):
        dt.load(fresh, tmp_path, verify=False)
    assert_unchanged(fresh, before)


def test_a_tied_weight_targeted_by_name_is_refused_at_merge():
    model = build("gpt2")
    dt.attach(model, dt.DiffPruningConfig(target_modules=["wte"]))
    perturb(model)
    with pytest.raises(dt.DeltaError, match=r"its weight is shared \(tied\) with lm_head.weight"):
        dt.merge(model)
