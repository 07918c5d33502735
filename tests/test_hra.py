"""HRA: the reflection chain by hand, its init, merging, and parity with the real peft package both ways.

Tiny random models from fixed seeds (the helpers of test_peft_compat), fp32, no downloads.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.methods.hra import HRALayer
from test_peft_compat import assert_differs, assert_same, assert_same_layout, build, logits, read_files

peft = pytest.importorskip("peft")

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],  # in 32, 32, 64
    "bert": ["query", "value"],  # Linear with bias; the head kept with modules_to_save
}
TASK = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}
R = 4
ARCHS = list(TARGETS)
# (apply_GS, init_weights): peft's default; random vectors; Gram-Schmidt (which needs random vectors)
VARIANTS = {"paired": (False, True), "random": (False, False), "gs": (True, False)}


def dt_hra(arch: str, variant: str = "paired", **kw) -> dt.HRAConfig:
    gs, init = VARIANTS[variant]
    return dt.HRAConfig(r=R, target_modules=TARGETS[arch], apply_GS=gs, init_weights=init, **kw)


def peft_hra(arch: str, variant: str = "paired", **kw):
    gs, init = VARIANTS[variant]
    return peft.HRAConfig(r=R, target_modules=TARGETS[arch], apply_GS=gs, init_weights=init, task_type=TASK[arch], **kw)


@torch.no_grad()
def set_vectors(named_params, seed: int = 11) -> int:
    """Give every hra_u (and a kept head) a random value; the same values for the same names in order."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in named_params:
        if "hra_u" in name or "modules_to_save" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            n += 1
    return n


def hra_u(named_params) -> dict[str, torch.Tensor]:
    """hra_u tensors keyed by module path (whatever wraps the model)."""
    out = {}
    for name, p in named_params:
        if "hra_u" in name:
            path = name.split(".hra_u")[0].removeprefix("base_model.model.")
            out[path] = p.detach()
    return out


def hra_layers(model: torch.nn.Module) -> dict[str, HRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, HRALayer)}


# ---------------------------------------------------------------- the math


def test_identity_at_attach_from_paired_vectors():
    base = build("llama")
    before = logits(base, "llama")
    model = dt.attach(base, dt.HRAConfig(target_modules=TARGETS["llama"]))  # peft's default r=8
    for name, layer in hra_layers(model).items():
        u = layer.hra_u["default"]
        assert u.shape == (layer.base_layer.in_features, 8) and u.dtype == torch.float32
        assert torch.equal(u[:, 0::2], u[:, 1::2]), name  # u_1 = u_2, u_3 = u_4, ...
        assert len(torch.unique(u[0, 0::2])) == 4  # four different pairs
        eye = torch.eye(u.shape[0])
        torch.testing.assert_close(layer.reflection("default"), eye, rtol=0, atol=1e-5)
    assert_same(logits(model, "llama"), before)


def test_forward_is_the_reflection_chain_by_hand():
    model = dt.attach(build("llama"), dt.HRAConfig(r=2, target_modules=["q_proj"]))
    q = model.model.layers[0].self_attn.q_proj  # in 32
    e = torch.eye(32)
    with torch.no_grad():
        q.hra_u["default"].copy_(torch.stack([3 * e[0], e[0] + e[1]], dim=1))  # u_1 = 3 e1 (length is irrelevant), u_2 = e1 + e2
    x = torch.randn(2, 5, 32)
    # H_2 x = x - (x1 + x2)(e1 + e2) sends (x1, x2) to (-x2, -x1); then H_1 negates the first: (x2, -x1)
    turned = torch.cat([x[..., 1:2], -x[..., 0:1], x[..., 2:]], dim=-1)
    torch.testing.assert_close(q(x), q.base_layer(turned))
    W = q.base_layer.weight
    H = torch.eye(32)
    H[:2, :2] = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # x -> (x2, -x1, x3, ...)
    torch.testing.assert_close(q.reflection("default"), H, rtol=0, atol=1e-6)
    torch.testing.assert_close(q(x), x @ (W @ H).T)


def test_gram_schmidt_is_one_reflection_of_the_span():
    model = dt.attach(build("llama"), dt.HRAConfig(r=2, apply_GS=True, init_weights=False, target_modules=["q_proj"]))
    q = model.model.layers[0].self_attn.q_proj
    e = torch.eye(32)
    with torch.no_grad():
        q.hra_u["default"].copy_(torch.stack([-2 * e[0], e[0] + e[1]], dim=1))  # orthonormalised: e1, e2 (up to signs)
    x = torch.randn(3, 32)
    flipped = torch.cat([-x[:, :2], x[:, 2:]], dim=-1)  # I - 2 (e1 e1^T + e2 e2^T)
    torch.testing.assert_close(q(x), q.base_layer(flipped))


def test_several_adapters_multiply_and_merge_in_order():
    model = dt.attach(build("llama"), dt.HRAConfig(r=R, init_weights=False, target_modules=["q_proj"]), name="a")
    dt.attach(model, dt.HRAConfig(r=2, init_weights=False, target_modules=["q_proj"]), name="b")
    dt.set_active(model, ["a", "b"])
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 32)
    W = q.base_layer.weight.detach().clone()
    expected = x @ (W @ q.reflection("a") @ q.reflection("b")).T  # W H_a H_b
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    data = logits(model, "llama")
    dt.merge(model)
    torch.testing.assert_close(q.base_layer.weight, W @ q.reflection("a") @ q.reflection("b"), rtol=1e-5, atol=1e-5)
    assert_same(logits(model, "llama"), data)
    dt.unmerge(model)
    torch.testing.assert_close(q.base_layer.weight, W, rtol=0, atol=1e-6)  # H^T H = I, to rounding


def test_mixed_batch_rows_use_their_own_adapter():
    model = build("llama")
    data = {"input_ids": torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(1))}
    base = model(**data).logits.detach()
    outs = {}
    for name, seed in (("a", 1), ("b", 2)):
        dt.attach(model, dt.HRAConfig(r=R, init_weights=False, target_modules=TARGETS["llama"]), name=name)
        set_vectors(dt.delta_parameters(model, name).items(), seed=seed)
        dt.set_active(model, [name])
        outs[name] = model(**data).logits.detach()
    with torch.no_grad():
        mixed = model(**data, adapter_names=["a", "b", "__base__"]).logits
    assert_differs(outs["a"], base), assert_differs(outs["b"], base), assert_differs(outs["a"], outs["b"])
    torch.testing.assert_close(mixed[0], outs["a"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], outs["b"][1], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], rtol=0, atol=1e-5)


def test_conv1d_targets_merge_and_round_trip(tmp_path):
    """GPT-2's Conv1D (weight stored in x out): deltatune's own (peft's HRA takes nn.Linear and Conv2d only)."""
    model = dt.attach(build("gpt2"), dt.HRAConfig(r=R, init_weights=False, target_modules=["c_attn", "c_fc"])).eval()
    set_vectors(dt.delta_parameters(model, "default").items())
    expected = logits(model, "gpt2")
    assert_differs(expected, logits(build("gpt2"), "gpt2"))
    dt.save(model, tmp_path)
    assert_same(logits(dt.load(build("gpt2"), tmp_path).eval(), "gpt2"), expected)
    dt.merge(model)
    assert_same(logits(model, "gpt2"), expected)


def test_odd_rank_and_gram_schmidt_need_random_vectors():
    with pytest.raises(dt.DeltaError, match=r"r=3\): r must be even with init_weights=True"):
        dt.attach(build("llama"), dt.HRAConfig(r=3))
    with pytest.raises(dt.DeltaError, match=r"apply_GS=True\) needs init_weights=False"):
        dt.attach(build("llama"), dt.HRAConfig(apply_GS=True))
    dt.attach(build("llama"), dt.HRAConfig(r=3, init_weights=False))  # fine: no pairs to make


def test_parameter_count():
    model = dt.attach(build("llama"), dt.HRAConfig(r=R, target_modules=TARGETS["llama"]))
    # r x in per target: q (32), v (32), down (64), two blocks
    assert sum(p.numel() for p in dt.delta_parameters(model, "default").values()) == 2 * R * (32 + 32 + 64)


def test_info_counts_hra(tmp_path):
    from deltatune.info import describe
    from deltatune.tiny import write_tiny
    from test_newcomer import _rows

    folder = write_tiny("llama", tmp_path / "llama")
    row = _rows(describe(str(folder)))["hra"]
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(folder)
    # peft's defaults: r = 8 on llama's q_proj and v_proj, each hidden_size long
    expected = config.num_hidden_layers * 2 * 8 * config.hidden_size
    assert row.startswith(f"{expected:,}  ("), row


# ---------------------------------------------------------------- parity with peft


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_peft_vectors_and_outputs(arch, variant):
    base = logits(build(arch), arch)
    ours_model = build(arch)
    torch.manual_seed(5)
    ours = dt.attach(ours_model, dt_hra(arch, variant)).eval()
    reference_model = build(arch)
    torch.manual_seed(5)
    reference = peft.get_peft_model(reference_model, peft_hra(arch, variant)).eval()
    mine, theirs = hra_u(ours.named_parameters()), hra_u(reference.named_parameters())
    assert list(mine) == list(theirs) and mine
    for path in mine:
        assert torch.equal(mine[path], theirs[path]), path
    if variant == "paired":
        assert_same(logits(ours, arch), base)  # the chain cancels: unchanged at attach
        assert_same(logits(reference, arch), base)
    else:  # random vectors turn the inputs (bert's fresh head gives small logits, hence the small margin)
        assert (logits(ours, arch) - base).abs().max() > 1e-5
    assert_same(logits(ours, arch), logits(reference, arch))
    n = set_vectors(ours.named_parameters())
    assert set_vectors(reference.named_parameters()) == n
    assert_differs(logits(ours, arch), base)
    assert_same(logits(ours, arch), logits(reference, arch))


@pytest.mark.parametrize("variant", ["paired", "gs"])
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_by_deltatune_loads_in_peft(tmp_path, arch, variant):
    model = dt.attach(build(arch), dt_hra(arch, variant)).eval()
    set_vectors(dt.delta_parameters(model, "default").items())
    expected = logits(model, arch)
    assert_differs(expected, logits(build(arch), arch))
    dt.save(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    assert_same(logits(reference, arch), expected)


@pytest.mark.parametrize("variant", ["paired", "gs"])
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_by_peft_loads_in_deltatune(tmp_path, arch, variant):
    reference = peft.get_peft_model(build(arch), peft_hra(arch, variant)).eval()
    set_vectors(reference.named_parameters())
    expected = logits(reference, arch)
    reference.save_pretrained(str(tmp_path))
    model = dt.load(build(arch), tmp_path).eval()
    assert_same(logits(model, arch), expected)
    assert dt.attached(model)["default"].init_weights == VARIANTS[variant][1]  # a re-save writes what was read


def test_peft_file_with_an_odd_rank_loads(tmp_path):
    """peft accepts r=3 with its default init (it warns and draws random vectors); the trained file loads here."""
    with pytest.warns(UserWarning, match="odd"):
        reference = peft.get_peft_model(build("llama"), peft.HRAConfig(r=3, target_modules=["q_proj"])).eval()
    set_vectors(reference.named_parameters())
    expected = logits(reference, "llama")
    reference.save_pretrained(str(tmp_path))
    assert_same(logits(dt.load(build("llama"), tmp_path).eval(), "llama"), expected)


def test_files_match_peft_layout(tmp_path):
    ours_dir, peft_dir = tmp_path / "dt", tmp_path / "peft"
    dt.save(dt.attach(build("llama"), dt_hra("llama")), ours_dir)
    peft.get_peft_model(build("llama"), peft_hra("llama")).save_pretrained(str(peft_dir))
    ours, theirs = assert_same_layout(ours_dir, peft_dir, ("r", "apply_GS", "init_weights", "bias", "exclude_modules",
                                                           "layers_to_transform", "layers_pattern"))
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])  # peft writes a set, in any order
    assert ours["peft_type"] == "HRA"
    _, shapes, _ = read_files(ours_dir)
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.hra_u"] == (32, R)
    assert shapes["base_model.model.model.layers.1.mlp.down_proj.hra_u"] == (64, R)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_matches_peft_merge_and_unload(variant):
    ours = dt.attach(build("llama"), dt_hra("llama", variant))
    reference = peft.get_peft_model(build("llama"), peft_hra("llama", variant))
    set_vectors(dt.delta_parameters(ours, "default").items())
    set_vectors(reference.named_parameters())
    dt.detach(ours, merge=True)
    merged = reference.merge_and_unload()
    for (key, a), (key_b, b) in zip(ours.state_dict().items(), merged.state_dict().items()):
        assert key == key_b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_peft_bias_option_is_refused(tmp_path):
    reference = peft.get_peft_model(build("llama"), peft.HRAConfig(r=2, target_modules=["q_proj"], bias="all"))
    reference.save_pretrained(str(tmp_path))
    with pytest.raises(dt.DeltaError, match="bias='all' is not supported"):
        dt.load(build("llama"), tmp_path)


# ---------------------------------------------------------------- Conv2d


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)  # a vector: 3 x 3 x 3 = 27 entries
        self.head = torch.nn.Linear(6 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


IMAGES = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4))


def test_conv2d_chain_turns_the_flattened_weight_and_merges():
    net = ConvNet()
    before = net(IMAGES).detach()
    dt.attach(net, dt.HRAConfig(r=R, target_modules=["conv"]))
    assert net.conv.hra_u["default"].shape == (27, R)
    torch.testing.assert_close(net(IMAGES), before, rtol=0, atol=1e-5)  # the pairs cancel
    set_vectors(dt.delta_parameters(net, "default").items())
    W = net.conv.base_layer.weight.detach().clone()
    turned = (W.reshape(6, 27) @ net.conv.reflection("default")).view(6, 3, 3, 3)
    torch.testing.assert_close(net.conv(IMAGES), torch.nn.functional.conv2d(IMAGES, turned, net.conv.base_layer.bias, padding=1))
    out = net(IMAGES).detach()
    assert_differs(out, before)
    net(IMAGES).sum().backward()  # gradients reach the vectors through the turned weight
    assert net.conv.hra_u["default"].grad.abs().sum() > 0
    net.eval()
    dt.merge(net)
    torch.testing.assert_close(net(IMAGES), out, rtol=1e-5, atol=1e-5)
    dt.unmerge(net)
    torch.testing.assert_close(net.conv.base_layer.weight, W, rtol=0, atol=1e-6)


def test_conv2d_parity_with_peft_both_ways(tmp_path):
    ours = dt.attach(ConvNet(), dt.HRAConfig(r=R, target_modules=["conv"]))
    set_vectors(dt.delta_parameters(ours, "default").items())
    expected = ours(IMAGES).detach()
    dt.save(ours, tmp_path / "dt")
    theirs = peft.PeftModel.from_pretrained(ConvNet(), str(tmp_path / "dt"))
    torch.testing.assert_close(theirs(IMAGES), expected, rtol=1e-5, atol=1e-5)
    reference = peft.get_peft_model(ConvNet(), peft.HRAConfig(r=R, target_modules=["conv"]))
    set_vectors(reference.named_parameters(), seed=12)
    expected = reference(IMAGES).detach()
    reference.save_pretrained(str(tmp_path / "peft"))
    torch.testing.assert_close(dt.load(ConvNet(), tmp_path / "peft")(IMAGES), expected, rtol=1e-5, atol=1e-5)
    merged = reference.merge_and_unload()
    loaded = dt.load(ConvNet(), tmp_path / "peft")
    dt.detach(loaded, merge=True)
    torch.testing.assert_close(loaded.conv.weight, merged.conv.weight, rtol=1e-5, atol=1e-5)


def test_grouped_conv2d_is_not_a_target():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Conv2d(4, 4, 1))
    with pytest.raises(dt.DeltaError, match="hra cannot wrap 0"):
        dt.attach(net, dt.HRAConfig(r=2, target_modules=["0"]))


def test_conv2d_mixed_batch_rows_use_their_own_adapter():
    net = ConvNet().eval()
    base = net(IMAGES).detach()
    outs = {}
    for name, seed in (("a", 1), ("b", 2)):
        dt.attach(net, dt.HRAConfig(r=R, target_modules=["conv"]), name=name)
        set_vectors(dt.delta_parameters(net, name).items(), seed=seed)
        dt.set_active(net, [name])
        outs[name] = net(IMAGES).detach()
    with dt.mixed_batch(net, ["b", "__base__"]), torch.no_grad():
        mixed = net(IMAGES)
    assert_differs(outs["b"], base)
    torch.testing.assert_close(mixed[0], outs["b"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=1e-5)
