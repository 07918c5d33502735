"""VeRA: the formula, the shared projections, and parity with the real peft package both ways.

Tiny random models from fixed seeds (the helpers of test_peft_compat), fp32, no downloads.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.methods.vera import ROOT, VeraLayer
from test_peft_compat import assert_differs, assert_same, assert_same_layout, build, logits, read_files

peft = pytest.importorskip("peft")

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],  # (32, 32), (16, 32), (32, 64): in_max 64, out_max 32
    "gpt2": ["c_attn", "c_fc"],  # Conv1D, weights stored [in, out]
    "bert": ["query", "value"],  # Linear with bias; the head kept with modules_to_save
}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
R, SEED = 8, 3
ARCHS = list(TARGETS)


def dt_vera(arch: str, **kw) -> dt.VeraConfig:
    return dt.VeraConfig(r=R, target_modules=TARGETS[arch], projection_prng_key=SEED, **kw)


def peft_vera(arch: str, **kw):
    return peft.VeraConfig(r=R, target_modules=TARGETS[arch], projection_prng_key=SEED, task_type=TASK[arch], **kw)


@torch.no_grad()
def set_lambdas(named_params, seed: int = 11) -> int:
    """Give every lambda vector (and a kept head) a random value; the same values for the same names in order."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in named_params:
        if "vera_lambda" in name or "modules_to_save" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            n += 1
    return n


def vera_layers(model: torch.nn.Module) -> dict[str, VeraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, VeraLayer)}


# ---------------------------------------------------------------- the math


def test_forward_is_the_vera_formula():
    model = dt.attach(build("llama"), dt.VeraConfig(r=R, target_modules=["q_proj", "down_proj"], projection_prng_key=SEED))
    set_lambdas(dt.delta_parameters(model, "default").items())
    A = model.vera_projections["default"].vera_A  # (r, in_max)
    B = model.vera_projections["default"].vera_B  # (out_max, r)
    assert A.shape == (R, 64) and B.shape == (32, R)
    layer = model.model.layers[0].mlp.down_proj  # (32 x 64)
    x = torch.randn(2, 5, 64)
    lb, ld = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    expected = layer.base_layer(x) + lb * (((x @ A[:, :64].T) * ld) @ B[:32].T)
    torch.testing.assert_close(layer(x), expected)
    q = model.model.layers[0].self_attn.q_proj  # (32 x 32): the top-left corner of the same pair
    y = torch.randn(3, 32)
    lb, ld = q.vera_lambda_b["default"], q.vera_lambda_d["default"]
    torch.testing.assert_close(q(y), q.base_layer(y) + lb * (((y @ A[:, :32].T) * ld) @ B[:32].T))


def test_init_and_parameter_count():
    model = dt.attach(build("llama"), dt.VeraConfig(r=R, target_modules=TARGETS["llama"], d_initial=0.25))
    params = dt.delta_parameters(model, "default")
    # per layer r + out: q (8 + 32), v (8 + 16), down (8 + 32), two blocks
    assert sum(p.numel() for p in params.values()) == 2 * ((R + 32) + (R + 16) + (R + 32))
    for name, p in params.items():
        assert torch.all(p == (0.0 if "vera_lambda_b" in name else 0.25)), name
    buffers = dict(model.named_buffers())
    assert not any(b.requires_grad for b in buffers.values())
    assert not any(k.startswith(ROOT) for k in model.state_dict())  # non-persistent: the base's state dict is untouched


def test_merge_matches_peft_merge_and_unload():
    ours = dt.attach(build("llama"), dt_vera("llama"))
    reference = peft.get_peft_model(build("llama"), peft_vera("llama"))
    set_lambdas(dt.delta_parameters(ours, "default").items())
    set_lambdas(reference.named_parameters())
    dt.detach(ours, merge=True)
    merged = reference.merge_and_unload()
    for (key, a), (key_b, b) in zip(ours.state_dict().items(), merged.state_dict().items()):
        assert key == key_b
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_each_adapter_has_its_own_pair_and_detach_removes_it():
    model = build("llama")
    dt.attach(model, dt.VeraConfig(r=R, target_modules=["q_proj"]), name="a")
    dt.attach(model, dt.VeraConfig(r=4, target_modules=["q_proj", "down_proj"], projection_prng_key=1), name="b")
    pairs = model.vera_projections
    assert pairs["a"].vera_A.shape == (R, 32) and pairs["b"].vera_A.shape == (4, 64)
    dt.detach(model, "a")
    assert list(model.vera_projections) == ["b"]
    dt.detach(model)
    assert not hasattr(model, ROOT)


# ---------------------------------------------------------------- parity with peft


@pytest.mark.parametrize("arch", ARCHS)
def test_same_config_gives_peft_projections_and_outputs(arch):
    base = logits(build(arch), arch)
    ours = dt.attach(build(arch), dt_vera(arch))
    reference = peft.get_peft_model(build(arch), peft_vera(arch)).eval()
    ours.eval()
    assert torch.equal(ours.vera_projections["default"].vera_A, reference.base_model.vera_A["default"])
    assert torch.equal(ours.vera_projections["default"].vera_B, reference.base_model.vera_B["default"])
    assert_same(logits(ours, arch), base)  # lambda_b = 0: unchanged at attach
    assert_same(logits(reference, arch), base)
    n = set_lambdas(dt.delta_parameters(ours, "default").items())
    assert set_lambdas(reference.named_parameters()) == n
    assert_differs(logits(ours, arch), base)
    assert_same(logits(ours, arch), logits(reference, arch))


@pytest.mark.parametrize("save_projection", [True, False], ids=["with_projection", "seed_only"])
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_by_deltatune_loads_in_peft(tmp_path, arch, save_projection):
    model = dt.attach(build(arch), dt_vera(arch, save_projection=save_projection)).eval()
    set_lambdas(dt.delta_parameters(model, "default").items())
    expected = logits(model, arch)
    assert_differs(expected, logits(build(arch), arch))
    dt.save(model, tmp_path)
    _, shapes, _ = read_files(tmp_path)
    assert ("base_model.vera_A" in shapes) == save_projection
    reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    assert_same(logits(reference, arch), expected)


@pytest.mark.parametrize("save_projection", [True, False], ids=["with_projection", "seed_only"])
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_by_peft_loads_in_deltatune(tmp_path, arch, save_projection):
    reference = peft.get_peft_model(build(arch), peft_vera(arch, save_projection=save_projection)).eval()
    set_lambdas(reference.named_parameters())
    expected = logits(reference, arch)
    reference.save_pretrained(str(tmp_path))
    model = dt.load(build(arch), tmp_path).eval()
    assert_same(logits(model, arch), expected)


def test_projection_in_the_file_wins_over_the_seed(tmp_path):
    """A file's saved pair is what loads, whatever the seed would draw (peft's save_projection guarantee)."""
    reference = peft.get_peft_model(build("llama"), peft_vera("llama")).eval()
    set_lambdas(reference.named_parameters())
    with torch.no_grad():
        reference.base_model.vera_A["default"].mul_(-2.0)
    expected = logits(reference, "llama")
    reference.save_pretrained(str(tmp_path))
    model = dt.load(build("llama"), tmp_path).eval()
    assert_same(logits(model, "llama"), expected)


def test_files_match_peft_layout(tmp_path):
    ours_dir, peft_dir = tmp_path / "dt", tmp_path / "peft"
    dt.save(dt.attach(build("gpt2"), dt_vera("gpt2")), ours_dir)
    peft.get_peft_model(build("gpt2"), peft_vera("gpt2")).save_pretrained(str(peft_dir))
    ours, theirs = assert_same_layout(ours_dir, peft_dir, ("r", "projection_prng_key", "save_projection", "vera_dropout",
                                                           "d_initial", "fan_in_fan_out", "bias"))
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])  # peft writes a set, in any order
    assert ours["peft_type"] == "VERA" and ours["fan_in_fan_out"] is True
    _, shapes, _ = read_files(ours_dir)
    assert shapes["base_model.vera_A"] == (R, 32) and shapes["base_model.vera_B"] == (128, R)
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.vera_lambda_b"] == (96,)
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.vera_lambda_d"] == (R,)


def test_a_projection_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    dt.save(dt.attach(build("llama"), dt_vera("llama")), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :32].contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})  # as peft would write it: no pairing hash
    model = build("llama")
    with pytest.raises(dt.DeltaError, match=r"does not fit LlamaForCausalLM: key base_model.vera_A has shape \[8, 32\] in the file"):
        dt.load(model, tmp_path)
    assert not hasattr(model, ROOT) and not vera_layers(model)  # the failed load left the model as it was
