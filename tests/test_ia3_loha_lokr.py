"""(IA)³, LoHa and LoKr: the formulas, peft files both ways, Conv2d, dropouts, merges, errors.

References are independent of deltatune's code paths: hand-written formulas (explicit
loops for the conv kernels) and the real `peft` package, loading deltatune's files and
writing its own, compared in fp32 at 1e-5.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from packaging.version import Version

import deltatune as dt
import tiny_models
from checks import assert_unchanged, fingerprint
from deltatune.io import delta_state_dict
from deltatune.methods.ia3 import IA3Layer
from deltatune.methods.lokr_loha import LoHaLayer, LoKrLayer, kron_factors
from test_peft_compat import assert_differs, assert_same, assert_same_layout, batch, build, logits, read_files, run

peft = pytest.importorskip("peft")

ATOL = 1e-5
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
QVD = ["q_proj", "v_proj", "down_proj"]


@torch.no_grad()
def nudge(named_params, needles=("ia3_l", "hada_", "lokr_", "modules_to_save"), seed=3, scale=0.3) -> int:
    """Move adapter tensors (and a kept head) off their init so outputs really depend on them."""
    g = torch.Generator().manual_seed(seed)
    changed = 0
    for name, p in named_params:
        if any(s in name for s in needles) and p.is_floating_point():
            p.add_(torch.randn(p.shape, generator=g) * scale)
            changed += 1
    return changed


# ---------------------------------------------------------------- peft, both ways, on transformers models

# (id, arch, deltatune config, peft config)
PEFT_CASES = [
    ("ia3-llama-default", "llama", lambda: dt.IA3Config(), lambda t: peft.IA3Config(task_type=t)),
    ("ia3-gpt2-conv1d", "gpt2", lambda: dt.IA3Config(), lambda t: peft.IA3Config(task_type=t)),
    ("ia3-bert-seqcls", "bert", lambda: dt.IA3Config(), lambda t: peft.IA3Config(task_type=t)),
    ("ia3-t5", "t5", lambda: dt.IA3Config(), lambda t: peft.IA3Config(task_type=t)),
    ("ia3-llama-regex", "llama",
     lambda: dt.IA3Config(target_modules=r".*\.(k_proj|up_proj|down_proj)", feedforward_modules=r".*\.(up|down)_proj"),
     lambda t: peft.IA3Config(task_type=t, target_modules=r".*\.(k_proj|up_proj|down_proj)",
                              feedforward_modules=r".*\.(up|down)_proj")),
    ("loha-llama", "llama", lambda: dt.LoHaConfig(r=4, alpha=8, target_modules=QVD),
     lambda t: peft.LoHaConfig(task_type=t, r=4, alpha=8, target_modules=QVD)),
    ("loha-llama-patterns", "llama",
     lambda: dt.LoHaConfig(r=4, alpha=8, target_modules=QVD, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}),
     lambda t: peft.LoHaConfig(task_type=t, r=4, alpha=8, target_modules=QVD, rank_pattern={"down_proj": 2},
                               alpha_pattern={"v_proj": 3})),
    ("loha-bert-seqcls", "bert", lambda: dt.LoHaConfig(r=2, alpha=4), lambda t: peft.LoHaConfig(task_type=t, r=2, alpha=4)),
    ("lokr-llama-full", "llama", lambda: dt.LoKrConfig(r=4, alpha=8, target_modules=QVD),
     lambda t: peft.LoKrConfig(task_type=t, r=4, alpha=8, target_modules=QVD)),
    ("lokr-llama-both-low-rank", "llama", lambda: dt.LoKrConfig(r=1, alpha=2, decompose_both=True, target_modules=QVD),
     lambda t: peft.LoKrConfig(task_type=t, r=1, alpha=2, decompose_both=True, target_modules=QVD)),
    ("lokr-llama-factor", "llama", lambda: dt.LoKrConfig(r=2, alpha=3, decompose_factor=4, target_modules=QVD),
     lambda t: peft.LoKrConfig(task_type=t, r=2, alpha=3, decompose_factor=4, target_modules=QVD)),
    ("lokr-llama-patterns-lycoris", "llama",
     lambda: dt.LoKrConfig(r=4, alpha=8, target_modules=QVD, rank_pattern={"q_proj": 1}, init_weights="lycoris"),
     lambda t: peft.LoKrConfig(task_type=t, r=4, alpha=8, target_modules=QVD, rank_pattern={"q_proj": 1},
                               init_weights="lycoris")),
    ("lokr-bert-seqcls", "bert", lambda: dt.LoKrConfig(r=2, alpha=4), lambda t: peft.LoKrConfig(task_type=t, r=2, alpha=4)),
]
PEFT_PARAMS = [pytest.param(arch, ours, theirs, id=i) for i, arch, ours, theirs in PEFT_CASES]


@pytest.mark.parametrize("arch,ours,theirs", PEFT_PARAMS)
def test_saved_by_deltatune_loads_in_peft(tmp_path, arch, ours, theirs):
    model = dt.attach(build(arch), ours())
    assert nudge(dt.delta_parameters(model, "default").items())
    model.eval()
    out = logits(model, arch)
    assert_differs(out, logits(build(arch), arch))
    dt.save(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    assert_same(logits(reference, arch), out)


@pytest.mark.parametrize("arch,ours,theirs", PEFT_PARAMS)
def test_saved_by_peft_loads_in_deltatune(tmp_path, arch, ours, theirs):
    reference = peft.get_peft_model(build(arch), theirs(TASK[arch]))
    assert nudge(reference.named_parameters())
    reference.eval()
    expected = logits(reference, arch)
    assert_differs(expected, logits(build(arch), arch))
    reference.save_pretrained(str(tmp_path))
    model = dt.load(build(arch), tmp_path).eval()
    assert_same(logits(model, arch), expected)
    dt.save(model, tmp_path / "again")  # and back out as peft reads it
    again = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "again")).eval()
    assert_same(logits(again, arch), expected)


@pytest.mark.parametrize("arch,ours,theirs", PEFT_PARAMS)
def test_files_match_peft_layout(tmp_path, arch, ours, theirs):
    dt.save(dt.attach(build(arch), ours()), tmp_path / "dt")
    peft.get_peft_model(build(arch), theirs(TASK[arch])).save_pretrained(str(tmp_path / "peft"))
    same = ("peft_type", "task_type", "inference_mode", "exclude_modules")
    mine, theirs_cfg = assert_same_layout(tmp_path / "dt", tmp_path / "peft", same + tuple(
        k for k in ("r", "alpha", "rank_pattern", "alpha_pattern", "decompose_both", "decompose_factor", "init_weights",
                    "rank_dropout", "module_dropout", "use_effective_conv2d", "fan_in_fan_out", "init_ia3_weights")
        if k in read_files(tmp_path / "peft")[0]))
    for key in ("target_modules", "feedforward_modules", "modules_to_save"):
        if key in theirs_cfg:
            want = theirs_cfg[key]
            assert (sorted(mine[key]) if isinstance(mine[key], list) else mine[key]) == (
                sorted(want) if isinstance(want, list) else want), key


def test_ia3_keys_and_shapes_are_peft_s(tmp_path):
    """[out, 1] for output scaling, [1, in] for feed-forward input scaling, in nn.Linear's sense on Conv1D."""

    def read_files_of(model):
        folder = tmp_path / type(model).__name__
        dt.save(model, folder)
        return read_files(folder)

    _, llama, _ = read_files_of(dt.attach(build("llama"), dt.IA3Config()))
    assert llama["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"] == (16, 1)  # 2 KV heads x 8
    assert llama["base_model.model.model.layers.0.mlp.down_proj.ia3_l"] == (1, 64)
    _, gpt2, _ = read_files_of(dt.attach(build("gpt2"), dt.IA3Config()))
    assert gpt2["base_model.model.transformer.h.0.attn.c_attn.ia3_l"] == (96, 1)
    assert gpt2["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"] == (1, 128)
    config, bert, _ = read_files_of(dt.attach(build("bert"), dt.IA3Config()))
    # peft's suffix rule: "output.dense" is the attention output projection too, and both are feed-forward
    assert bert["base_model.model.bert.encoder.layer.0.attention.output.dense.ia3_l"] == (1, 32)
    assert bert["base_model.model.bert.encoder.layer.0.output.dense.ia3_l"] == (1, 64)
    assert bert["base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l"] == (32, 1)
    assert config["feedforward_modules"] == ["output.dense"] and config["fan_in_fan_out"] is False


def test_ia3_default_feedforward_stays_a_subset_of_the_targets(tmp_path):
    """peft's own default would write feedforward_modules=["down_proj"] beside targets [k, v], a file
    peft itself refuses to read back; deltatune writes only the feed-forward modules it targets."""
    model = dt.attach(build("llama"), dt.IA3Config(target_modules=["k_proj", "v_proj"]))
    nudge(dt.delta_parameters(model, "default").items())
    dt.save(model, tmp_path)
    assert read_files(tmp_path)[0]["feedforward_modules"] == []
    reference = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    assert_same(logits(reference, "llama"), logits(model.eval(), "llama"))


# ---------------------------------------------------------------- the formulas, by hand


def _layer(model, path):
    return model.get_submodule(path)


def test_ia3_forward_is_the_formula_on_linear_and_conv1d():
    model = dt.attach(build("llama"), dt.IA3Config())
    nudge(dt.delta_parameters(model, "default").items())
    k, down = _layer(model, "model.layers.0.self_attn.k_proj"), _layer(model, "model.layers.0.mlp.down_proj")
    x, h = torch.randn(3, 5, 32), torch.randn(3, 5, 64)
    torch.testing.assert_close(k(x), (x @ k.base_layer.weight.T) * k.ia3_l["default"][:, 0])
    torch.testing.assert_close(down(h), (h * down.ia3_l["default"][0]) @ down.base_layer.weight.T)
    gpt2 = dt.attach(build("gpt2"), dt.IA3Config())
    nudge(dt.delta_parameters(gpt2, "default").items())
    attn, proj = _layer(gpt2, "transformer.h.0.attn.c_attn"), _layer(gpt2, "transformer.h.0.mlp.c_proj")
    x, h = torch.randn(2, 4, 32), torch.randn(2, 4, 128)
    W, b = attn.base_layer.weight, attn.base_layer.bias  # Conv1D: (in, out)
    torch.testing.assert_close(attn(x), (x @ W + b) * attn.ia3_l["default"][:, 0])
    W, b = proj.base_layer.weight, proj.base_layer.bias
    torch.testing.assert_close(proj(h), (h * proj.ia3_l["default"][0]) @ W + b)


def test_loha_forward_is_the_formula():
    model = dt.attach(build("gpt2"), dt.LoHaConfig(r=3, alpha=5, init_weights=False))  # c_attn, a Conv1D
    layer = _layer(model, "transformer.h.0.attn.c_attn")
    assert isinstance(layer, LoHaLayer)
    p = {n: getattr(layer, n)["default"] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * (5 / 3)  # (out, in)
    x = torch.randn(2, 4, 32)
    expected = x @ (layer.base_layer.weight + delta.T) + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("config", [dict(r=4), dict(r=1, decompose_both=True), dict(r=2, decompose_factor=2)],
                         ids=["full", "both-low-rank", "factor-2"])
def test_lokr_forward_is_the_kronecker_formula(config):
    model = dt.attach(build("llama"), dt.LoKrConfig(alpha=3, init_weights=False, target_modules=["down_proj"], **config))
    layer = _layer(model, "model.layers.1.mlp.down_proj")  # (32, 64)
    with torch.no_grad():
        w1 = layer.lokr_w1["default"] if "default" in layer.lokr_w1 else layer.lokr_w1_a["default"] @ layer.lokr_w1_b["default"]
        w2 = layer.lokr_w2["default"] if "default" in layer.lokr_w2 else layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]
    (a, c), (b, d) = w1.shape, w2.shape
    assert a * b == 32 and c * d == 64
    delta = torch.zeros(32, 64)
    for i in range(a):  # the Kronecker product written out: block (i, l) is w1[i, l] * w2
        for l in range(c):
            delta[i * b:(i + 1) * b, l * d:(l + 1) * d] = w1[i, l] * w2
    x = torch.randn(3, 5, 64, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, x @ (layer.base_layer.weight + delta * 3 / layer_r(config)).T)
    out.sum().backward()  # gradients reach every factor of the layer
    factors = [getattr(layer, c)["default"] for c in layer.containers if "default" in getattr(layer, c)]
    assert factors and all(p.grad is not None and p.grad.abs().sum() > 0 for p in factors)


def layer_r(config):
    return config["r"]


def test_kron_factors_follow_lycoris_rule():
    from peft.tuners.lokr.layer import factorization

    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 7, 8, 16, 64):
            assert kron_factors(dim, factor) == factorization(dim, factor), (dim, factor)
    assert kron_factors(3072) == (48, 64) and kron_factors(1024) == (32, 32) and kron_factors(127) == (1, 127)


def test_lokr_shapes_follow_the_rank_rule():
    model = dt.attach(build("llama"), dt.LoKrConfig(r=2, target_modules=["q_proj", "down_proj"]))
    q, down = _layer(model, "model.layers.0.self_attn.q_proj"), _layer(model, "model.layers.0.mlp.down_proj")
    # q (32, 32): a, b = 4, 8 and c, d = 4, 8; r=2 < max(8, 8) / 2, so W2 is low-rank; W1 stays full
    assert q.lokr_w1["default"].shape == (4, 4) and q.lokr_w2_a["default"].shape == (8, 2)
    assert q.lokr_w2_b["default"].shape == (2, 8) and "default" not in q.lokr_w2
    # down (32, 64): out 4 x 8, in 8 x 8: W1 (4, 8) full; W2 (8, 8) low-rank
    assert down.lokr_w1["default"].shape == (4, 8) and down.lokr_w2_a["default"].shape == (8, 2)
    assert torch.count_nonzero(q.lokr_w1["default"]) == 0  # W1 starts at zero: outputs unchanged at attach


# ---------------------------------------------------------------- Conv2d


class TinyConvNet(nn.Module):
    """Three convolutions: 3x3, a grouped 3x3 and a 1x1, and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=False)
        self.conv3 = nn.Conv2d(12, 6, 1, stride=2)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(self.conv3(x).flatten(1))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNet().eval()


CONV_X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
CONVS = ["conv1", "conv2", "conv3"]
CONV_CASES = [
    ("ia3", lambda t: dt.IA3Config(target_modules=t, feedforward_modules=["conv2"]),
     lambda t: peft.IA3Config(target_modules=t, feedforward_modules=["conv2"])),
    ("loha", lambda t: dt.LoHaConfig(r=2, alpha=3, target_modules=t),
     lambda t: peft.LoHaConfig(r=2, alpha=3, target_modules=t)),
    ("loha-effective", lambda t: dt.LoHaConfig(r=2, alpha=3, target_modules=t, use_effective_conv2d=True),
     lambda t: peft.LoHaConfig(r=2, alpha=3, target_modules=t, use_effective_conv2d=True)),
    ("lokr-full", lambda t: dt.LoKrConfig(r=4, alpha=3, target_modules=t),
     lambda t: peft.LoKrConfig(r=4, alpha=3, target_modules=t)),
    ("lokr-low-rank", lambda t: dt.LoKrConfig(r=1, alpha=3, decompose_both=True, target_modules=t),
     lambda t: peft.LoKrConfig(r=1, alpha=3, decompose_both=True, target_modules=t)),
    ("lokr-effective", lambda t: dt.LoKrConfig(r=1, alpha=3, target_modules=t, use_effective_conv2d=True),
     lambda t: peft.LoKrConfig(r=1, alpha=3, target_modules=t, use_effective_conv2d=True)),
]
CONV_PARAMS = [pytest.param(i, ours, theirs, id=i) for i, ours, theirs in CONV_CASES]
# peft < 0.20 sizes a grouped Conv2d's LoHa / LoKr factors for all its input channels, not in_channels /
# groups, so it cannot load (or build) them for conv2; there the comparison with peft leaves conv2 out.
# deltatune's own grouped-conv deltas are still checked: merged here, against the hand formula below.
PEFT_GROUPED_CONV = Version(peft.__version__) >= Version("0.20.0")


def peft_conv_targets(case: str) -> list[str]:
    return CONVS if PEFT_GROUPED_CONV or case == "ia3" else [c for c in CONVS if c != "conv2"]


def conv_out(model):
    with torch.no_grad():
        return model(CONV_X.clone())


@pytest.mark.parametrize("case,ours,theirs", CONV_PARAMS)
def test_conv2d_both_ways_with_peft_and_merged(tmp_path, case, ours, theirs):
    model = dt.attach(conv_net(), ours(CONVS))
    nudge(dt.delta_parameters(model, "default").items())
    out = conv_out(model)
    assert_differs(out, conv_out(conv_net()))
    dt.merge(model)
    torch.testing.assert_close(conv_out(model), out, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)
    torch.testing.assert_close(conv_out(model), out, rtol=1e-5, atol=1e-5)

    targets = peft_conv_targets(case)
    if targets != CONVS:
        model = dt.attach(conv_net(), ours(targets))
        nudge(dt.delta_parameters(model, "default").items())
        out = conv_out(model)
        assert_differs(out, conv_out(conv_net()))
    dt.save(model, tmp_path / "dt")
    reference = peft.PeftModel.from_pretrained(conv_net(), str(tmp_path / "dt")).eval()
    assert_same(conv_out(reference), out)

    theirs_model = peft.get_peft_model(conv_net(), theirs(targets))
    nudge(theirs_model.named_parameters())
    theirs_model.eval()
    theirs_model.save_pretrained(str(tmp_path / "peft"))
    loaded = dt.load(conv_net(), tmp_path / "peft")
    assert_same(conv_out(loaded), conv_out(theirs_model))
    assert read_files(tmp_path / "dt")[1] == read_files(tmp_path / "peft")[1]  # same keys and shapes


def _cp(core, wa, wb):
    """(out, in, kh, kw) = sum over a, b of core[a, b] * wa[a, o] * wb[b, i], written out."""
    out = torch.zeros(wa.shape[1], wb.shape[1], *core.shape[2:])
    for a in range(core.shape[0]):
        for b in range(core.shape[1]):
            out += core[a, b][None, None] * (wa[a][:, None] * wb[b][None, :])[:, :, None, None]
    return out


def _kron4(w1, w2):
    """Kronecker product of a (a, c) matrix with a (b, d, kh, kw) kernel: block (i, l) is w1[i, l] * w2."""
    (a, c), (b, d) = w1.shape, w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:])
    for i in range(a):
        for l in range(c):
            out[i * b:(i + 1) * b, l * d:(l + 1) * d] = w1[i, l] * w2
    return out


@pytest.mark.parametrize("effective", [False, True], ids=["flat", "effective"])
def test_conv2d_loha_and_lokr_are_the_hand_formula(effective):
    x = torch.randn(2, 8, 6, 6)
    model = dt.attach(conv_net(), dt.LoHaConfig(r=2, alpha=3, target_modules=["conv2"], use_effective_conv2d=effective,
                                                init_weights=False))
    layer = model.conv2
    with torch.no_grad():
        p = {n: getattr(layer, n)["default"] for n in layer.containers if "default" in getattr(layer, n)}
        if effective:
            delta = _cp(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * _cp(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            delta = ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).view(12, 4, 3, 3)
        expected = F.conv2d(x, layer.base_layer.weight + delta * 1.5, None, padding=1, groups=2)
        torch.testing.assert_close(layer(x), expected)

    model = dt.attach(conv_net(), dt.LoKrConfig(r=1, alpha=3, target_modules=["conv2"], use_effective_conv2d=effective,
                                                init_weights=False))
    layer = model.conv2  # weight (12, 4, 3, 3): out 3 x 4, in 2 x 2; r=1 < 4/2, so W2 is low-rank
    with torch.no_grad():
        w1 = layer.lokr_w1["default"]
        if effective:
            w2 = _cp(layer.lokr_t2["default"], layer.lokr_w2_a["default"], layer.lokr_w2_b["default"])
        else:
            w2 = (layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]).view(4, 2, 3, 3)
        expected = F.conv2d(x, layer.base_layer.weight + _kron4(w1, w2) * 3, None, padding=1, groups=2)
        torch.testing.assert_close(layer(x), expected)


def test_conv2d_ia3_feedforward_merge_respects_groups():
    model = dt.attach(conv_net(), dt.IA3Config(target_modules=["conv2"], feedforward_modules=["conv2"]))
    nudge(dt.delta_parameters(model, "default").items())
    x = torch.randn(2, 8, 6, 6)
    layer = model.conv2
    with torch.no_grad():
        expected = F.conv2d(x * layer.ia3_l["default"], layer.base_layer.weight, None, padding=1, groups=2)
        torch.testing.assert_close(layer(x), expected)
        dt.merge(model)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: dt.IA3Config(target_modules=CONVS), lambda: dt.LoHaConfig(r=2, target_modules=CONVS),
                                  lambda: dt.LoKrConfig(r=1, target_modules=CONVS)], ids=["ia3", "loha", "lokr"])
def test_conv2d_mixed_batch_rows_get_their_own_adapter(make):
    model = conv_net()
    base = conv_out(model)
    dt.attach(model, make(), name="a")
    nudge(dt.delta_parameters(model, "a").items(), seed=1)
    out_a = conv_out(model)
    dt.attach(model, make(), name="b")
    nudge(dt.delta_parameters(model, "b").items(), seed=2)
    out_b = conv_out(model)
    with torch.no_grad():
        mixed = model(CONV_X.clone(), adapter_names=["b", "__base__"])
    torch.testing.assert_close(mixed[0], out_b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=1e-5)
    with dt.mixed_batch(model, ["a", "b"]), torch.no_grad():
        mixed = model(CONV_X.clone())
    torch.testing.assert_close(mixed[0], out_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], out_b[1], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- merging (IA)³


def test_ia3_merges_and_unmerges_exactly_even_with_zero_entries():
    model = build("bert")  # linear layers with biases
    dt.attach(model, dt.IA3Config())
    nudge(dt.delta_parameters(model, "default").items())
    key = _layer(model, "bert.encoder.layer.0.attention.self.key")
    dense = _layer(model, "bert.encoder.layer.0.output.dense")
    with torch.no_grad():
        key.ia3_l["default"][3] = 0.0  # output row 3 (and its bias) erased by a merge
        dense.ia3_l["default"][0, 5] = 0.0  # input column 5 erased
    original = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    out = logits(model, "bert")
    dt.merge(model)
    assert key.base_layer.weight[3].abs().sum() == 0 and key.base_layer.bias[3] == 0
    torch.testing.assert_close(logits(model, "bert"), out, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)
    for k, v in model.state_dict().items():
        if k in original:
            torch.testing.assert_close(v, original[k], rtol=1e-6, atol=1e-7, msg=k)
    assert torch.equal(key.base_layer.weight[3], original["bert.encoder.layer.0.attention.self.key.base_layer.weight"][3])


def test_ia3_adapters_multiply_and_merge_in_any_order():
    model = build("llama")
    data = "llama"
    dt.attach(model, dt.IA3Config(), name="a")
    nudge(dt.delta_parameters(model, "a").items(), seed=1)
    dt.attach(model, dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=[]), name="b")
    nudge(dt.delta_parameters(model, "b").items(), seed=2)
    dt.set_active(model, ["a", "b"])
    down = _layer(model, "model.layers.0.mlp.down_proj")
    assert down.feedforward == {"a": True, "b": False}  # input scaling and output scaling on one layer
    h = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = ((h * down.ia3_l["a"][0]) @ down.base_layer.weight.T) * down.ia3_l["b"][:, 0]
        torch.testing.assert_close(down(h), expected)
    both = logits(model, data)
    dt.merge(model, "b")
    dt.merge(model, "a")
    torch.testing.assert_close(logits(model, data), both, rtol=1e-5, atol=1e-5)
    dt.unmerge(model, "b")  # merged first, taken out first: IA3 factors commute
    torch.testing.assert_close(logits(model, data), both, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, data), logits(build("llama"), data), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- training-time dropouts


@pytest.mark.parametrize("method", ["loha", "lokr", "lokr_scaled"])
def test_rank_dropout_drops_whole_output_rows_in_training_only(method):
    cls = dt.LoHaConfig if method == "loha" else dt.LoKrConfig
    extra = {"rank_dropout_scale": True} if method == "lokr_scaled" else {}
    model = dt.attach(build("llama"), cls(r=2, rank_dropout=0.5, init_weights=False, target_modules=["down_proj"], **extra))
    layer = _layer(model, "model.layers.0.mlp.down_proj")
    x = torch.randn(4, 64)
    with torch.no_grad():
        base = x @ layer.base_layer.weight.T
        model.eval()
        full = layer(x) - base
        model.train()
        torch.manual_seed(0)
        dropped = layer(x) - base
    kept = dropped.abs().sum(0) > 0  # per output feature: all tokens kept or all dropped
    assert 0 < kept.sum() < 32
    assert torch.all(dropped[:, ~kept] == 0)
    ratio = dropped[:, kept] / full[:, kept]
    rescale = 32 / kept.sum().item() if method in ("loha", "lokr_scaled") else 1.0  # LoHa always rescales by 1/mean
    torch.testing.assert_close(ratio, torch.full_like(ratio, rescale), rtol=1e-4, atol=1e-4)


def test_module_dropout_skips_the_whole_adapter_in_training_only():
    model = dt.attach(build("llama"), dt.LoHaConfig(r=2, module_dropout=0.5, init_weights=False, target_modules=["q_proj"]))
    layer = _layer(model, "model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 32)
    with torch.no_grad():
        base = x @ layer.base_layer.weight.T
        full = layer(x)
        model.train()
        torch.manual_seed(0)
        outs = [layer(x) for _ in range(20)]
    skipped = sum(torch.equal(o, base) for o in outs)
    applied = sum(torch.allclose(o, full) for o in outs)
    assert skipped + applied == 20 and skipped > 2 and applied > 2


# ---------------------------------------------------------------- precision, training


@pytest.mark.parametrize("make", [lambda: dt.IA3Config(), lambda: dt.LoHaConfig(r=2, init_weights=False),
                                  lambda: dt.LoKrConfig(r=2, init_weights=False)], ids=["ia3", "loha", "lokr"])
def test_half_precision_base_keeps_fp32_trainables(make):
    model = build("llama").to(torch.bfloat16)
    reference = build("llama")
    data = batch("llama", labels=True)
    dt.attach(model, make())
    dt.attach(reference, make())
    nudge(dt.delta_parameters(model, "default").items())
    nudge(dt.delta_parameters(reference, "default").items())
    for (n, p), (_, q) in zip(dt.delta_parameters(model, "default").items(), dt.delta_parameters(reference, "default").items()):
        assert p.dtype == torch.float32
        with torch.no_grad():
            q.copy_(p)
    out = model(**data)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), run(reference, data).logits, rtol=0.05, atol=0.05)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in dt.delta_parameters(model, "default").values())


# ---------------------------------------------------------------- configs and errors


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda: dt.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "must be a subset of target_modules"),
        (lambda: dt.IA3Config(init_weights="ones"), "IA3Config.init_weights = 'ones' is not allowed"),
        (lambda: dt.LoKrConfig(decompose_factor=0), "decompose_factor = 0 is not allowed"),
        (lambda: dt.LoKrConfig(init_weights="gaussian"), "one of 'lycoris'"),
        (lambda: dt.LoHaConfig(rank_dropout=1.0), "must be >= 0 and < 1"),
        (lambda: dt.LoHaConfig(module_dropout=-0.1), "must be >= 0 and < 1"),
        (lambda: dt.LoKrConfig(rank_pattern={"q_proj": 0}), "0 must be > 0"),
        (lambda: dt.LoHaConfig(r=0), "0 must be > 0"),
    ],
)
def test_bad_configs_are_named(make, fragment):
    with pytest.raises(dt.DeltaError, match=fragment):
        make()


def test_ia3_on_an_unknown_architecture_needs_targets_but_no_feedforward():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(dt.DeltaError, match="no default target modules for ia3"):
        dt.attach(net, dt.IA3Config())
    dt.attach(net, dt.IA3Config(target_modules=["0", "2"]))
    assert dt.attached(net)["default"].feedforward_modules == []
    assert net[0].ia3_l["default"].shape == (6, 1)


def test_chatglm_gets_ia3_defaults_peft_lacks():
    import types

    from deltatune.targets import IA3_FEEDFORWARD, default_targets

    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="chatglm"))
    assert default_targets("ia3", fake) == ["query_key_value", "dense_4h_to_h"]
    assert IA3_FEEDFORWARD["chatglm"] == ["dense_4h_to_h"]
    assert default_targets("loha", fake) == default_targets("lokr", fake) == ["query_key_value"]


def test_ia3_cannot_stack_on_a_lora_layer_and_says_so():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["k_proj"]), name="lora")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"k_proj is already wrapped by LoraLayer; stacking IA3Layer"):
        dt.attach(model, dt.IA3Config(), name="ia3")
    assert_unchanged(model, before)
    dt.attach(model, dt.IA3Config(target_modules=["v_proj", "down_proj"]), name="ia3")  # other modules are fine
    assert isinstance(_layer(model, "model.layers.0.self_attn.v_proj"), IA3Layer)


def test_trained_deltas_round_trip_and_detach_restores(tmp_path):
    """A short training run per method, then save, load into a fresh model, and detach."""
    data = batch("llama", labels=True)
    for config in (dt.IA3Config(), dt.LoHaConfig(r=2), dt.LoKrConfig(r=2)):
        base = build("llama")
        model = dt.attach(copy.deepcopy(base), config)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        losses = []
        for _ in range(8):
            loss = model(**data).loss
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert losses[-1] < losses[0], (config.method, losses)
        folder = tmp_path / config.method
        dt.save(model, folder)
        loaded = dt.load(copy.deepcopy(base), folder)
        torch.testing.assert_close(logits(loaded, "llama"), logits(model, "llama"), rtol=0, atol=0)
        dt.detach(model)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_lokr_count_by_hand_on_a_tiny_llama():
    # q (32x32): W1 4x4 + W2a 8x2 + W2b 2x8 = 48; v (16x32): 16 = 2 x 8, 32 = 4 x 8: W1 2x4 + 8x2 + 2x8 = 40
    model = dt.attach(build("llama"), dt.LoKrConfig(r=2))
    assert dt.summary(model, print_table=False).trainable == 2 * (48 + 40)
    model = dt.attach(build("llama"), dt.LoHaConfig(r=2))  # 2r(out + in) per module
    assert dt.summary(model, print_table=False).trainable == 2 * (2 * 2 * (32 + 32) + 2 * 2 * (16 + 32))
    assert math.isclose(_layer(model, "model.layers.0.self_attn.q_proj").scaling["default"], 8 / 2)


# ---------------------------------------------------------------- defaults on every architecture


@pytest.mark.parametrize("arch", [a for a in tiny_models.ARCHS if a != "chatglm"])  # peft has no chatglm default
def test_ia3_defaults_give_peft_s_keys_and_shapes_on_every_architecture(arch):
    """The same vectors, with the same feed-forward choice ([1, in] vs [out, 1]), as peft's defaults."""
    ours = dt.attach(tiny_models.build(arch), dt.IA3Config())
    mine = {k: tuple(v.shape) for k, v in delta_state_dict(ours, "default").items() if k.endswith("ia3_l")}
    theirs = peft.get_peft_model(tiny_models.build(arch), peft.IA3Config())
    expected = {k.replace(".default", ""): tuple(p.shape) for k, p in theirs.named_parameters() if "ia3_l" in k}
    assert mine and mine == expected
