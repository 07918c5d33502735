"""LN tuning and FourierFT against the real `peft` package: same outputs, same files, both ways.

Tiny random models from test_peft_compat (llama with RMSNorm, GPT-2 with LayerNorm and Conv1D,
BERT sequence classification with its head kept through modules_to_save).
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.summary import summary
from test_peft_compat import TASK, assert_differs, batch, assert_same, assert_same_layout, build, logits, peft, read_files

ARCHS = ["llama", "gpt2", "bert"]


@torch.no_grad()
def set_values(named_params, needles: tuple[str, ...], seed: int = 5) -> list[str]:
    """Give the parameters whose name contains a needle fixed values (the same in both libraries:
    parameters are visited in name order with their adapter-free names), as training would."""
    g = torch.Generator().manual_seed(seed)
    params = sorted(((n.replace(".default", ""), p) for n, p in named_params if any(s in n for s in needles)),
                    key=lambda item: item[0].removeprefix("base_model.model."))
    for _, p in params:
        p.copy_(p + 0.5 * torch.randn(p.shape, generator=g))
    return [n.removeprefix("base_model.model.") for n, _ in params]


# ---------------------------------------------------------------- LN tuning

LN_NEEDLES = ("ln_tuning_layers", "modules_to_save")


def ln_targets(arch: str) -> list[str] | None:
    return ["LayerNorm"] if arch == "bert" else None  # peft has no default for bert


def test_ln_tuning_default_targets_are_peft_s():
    for arch in ("llama", "gpt2"):
        ours = dt.attach(build(arch), dt.LNTuningConfig())
        theirs = peft.get_peft_model(build(arch), peft.LNTuningConfig(task_type=TASK[arch]))
        assert sorted(dt.attached(ours)["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)
        assert set_values(dt.delta_parameters(ours, "default").items(), LN_NEEDLES) == \
            set_values([(n, p) for n, p in theirs.named_parameters() if p.requires_grad], LN_NEEDLES)


@pytest.mark.parametrize("arch", ARCHS)
def test_ln_tuning_same_outputs_as_peft_with_the_same_values(arch):
    base = logits(build(arch), arch)
    ours = dt.attach(build(arch), dt.LNTuningConfig(target_modules=ln_targets(arch))).eval()
    theirs = peft.get_peft_model(build(arch), peft.LNTuningConfig(target_modules=ln_targets(arch), task_type=TASK[arch]))
    assert_same(logits(ours, arch), base)  # a copy of the norm computes what the norm did
    theirs.eval()
    if TASK[arch] != "SEQ_CLS":  # peft's new classifier head is not the base's: no identity there
        assert_same(logits(theirs, arch), base)
    names = set_values(dt.delta_parameters(ours, "default").items(), LN_NEEDLES)
    assert names == set_values([(n, p) for n, p in theirs.named_parameters() if p.requires_grad], LN_NEEDLES)
    assert_differs(logits(ours, arch), base)
    assert_same(logits(ours, arch), logits(theirs, arch))
    # the same count of trained parameters, and the copies do not count the frozen originals twice
    s = summary(ours, print_table=False)
    assert s.trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert s.total == sum(p.numel() for p in build(arch).parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_ln_tuning_saved_by_deltatune_loads_in_peft(tmp_path, arch):
    model = dt.attach(build(arch), dt.LNTuningConfig(target_modules=ln_targets(arch))).eval()
    set_values(dt.delta_parameters(model, "default").items(), LN_NEEDLES)
    dt.save(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    assert_differs(logits(model, arch), logits(build(arch), arch))
    assert_same(logits(reference, arch), logits(model, arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_ln_tuning_saved_by_peft_loads_in_deltatune(tmp_path, arch):
    reference = peft.get_peft_model(build(arch), peft.LNTuningConfig(target_modules=ln_targets(arch), task_type=TASK[arch]))
    set_values([(n, p) for n, p in reference.named_parameters() if p.requires_grad], LN_NEEDLES)
    reference.eval()
    reference.save_pretrained(str(tmp_path))
    model = dt.load(build(arch), tmp_path).eval()
    assert_same(logits(model, arch), logits(reference, arch))
    dt.save(model, tmp_path / "again")  # and back out: the same adapter for peft
    again = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "again")).eval()
    assert_same(logits(again, arch), logits(reference, arch))


def test_ln_tuning_files_match_peft_layout(tmp_path):
    ours_dir, peft_dir = tmp_path / "dt", tmp_path / "peft"
    dt.save(dt.attach(build("gpt2"), dt.LNTuningConfig()), ours_dir)
    peft.get_peft_model(build("gpt2"), peft.LNTuningConfig(task_type="CAUSAL_LM")).save_pretrained(str(peft_dir))
    ours, theirs = assert_same_layout(ours_dir, peft_dir, ("peft_type", "task_type", "exclude_modules", "modules_to_save"))
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert "base_model.model.transformer.h.0.ln_1.ln_tuning_layers.bias" in read_files(ours_dir)[1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ln_tuning_merge_matches_peft_merge_and_unmerge_restores_bit_for_bit(arch):
    model = dt.attach(build(arch), dt.LNTuningConfig()).eval()
    set_values(dt.delta_parameters(model, "default").items(), LN_NEEDLES)
    before = {k: v.clone() for k, v in build(arch).state_dict().items()}
    unmerged = logits(model, arch)
    dt.merge(model)
    assert_same(logits(model, arch), unmerged)
    with dt.disabled(model):  # peft's disable_adapters unmerges first; so does deltatune's
        assert_same(logits(model, arch), logits(build(arch), arch))
    dt.unmerge(model)
    merged_away = dt.detach(model)
    assert all(torch.equal(merged_away.state_dict()[k], v) for k, v in before.items())


def test_ln_tuning_two_adapters_switch_and_mix():
    arch = "llama"
    model = build(arch)
    dt.attach(model, dt.LNTuningConfig(), name="a")
    set_values(dt.delta_parameters(model, "a").items(), LN_NEEDLES, seed=1)
    out_a = logits(model, arch)
    dt.attach(model, dt.LNTuningConfig(), name="b")
    set_values(dt.delta_parameters(model, "b").items(), LN_NEEDLES, seed=2)
    out_b = logits(model, arch)
    assert_differs(out_a, out_b)
    dt.set_active(model, ["a"])
    assert_same(logits(model, arch), out_a)
    with torch.no_grad():
        mixed = model(**batch(arch), adapter_names=["b", "__base__"]).logits
    assert_same(mixed[0], out_b[0])
    assert_same(mixed[1], logits(build(arch), arch)[1])


def test_info_counts_ln_tuning(tmp_path):
    from deltatune.info import describe
    from deltatune.tiny import write_tiny
    from test_newcomer import _rows

    folder = write_tiny("llama", tmp_path / "llama")
    model = dt.attach(build_from(folder), dt.LNTuningConfig())
    count = summary(model, print_table=False)
    assert count.trainable == 5 * model.config.hidden_size  # two norms per block, two blocks, and the final one
    assert _rows(describe(str(folder)))["ln_tuning"] == f"{count.trainable:,}  ({count.percent:.4f}%)"


def build_from(folder):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(folder))


# ---------------------------------------------------------------- FourierFT

FFT_NEEDLES = ("fourierft_spectrum", "modules_to_save")
FFT_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["query", "value"]}
N_FREQ = 40


def dt_fourierft(arch: str, **kw) -> dt.FourierFTConfig:
    return dt.FourierFTConfig(n_frequency=N_FREQ, scaling=100.0, target_modules=FFT_TARGETS[arch], **kw)


def peft_fourierft(arch: str, **kw):
    return peft.FourierFTConfig(n_frequency=N_FREQ, scaling=100.0, target_modules=FFT_TARGETS[arch], task_type=TASK[arch],
                                **kw)


def test_fourierft_locations_and_defaults_are_peft_s():
    ours = dt.attach(build("llama"), dt.FourierFTConfig(n_frequency=300, random_loc_seed=11,
                                                        target_modules=["q_proj", "down_proj"]))
    theirs = peft.get_peft_model(build("llama"), peft.FourierFTConfig(n_frequency=300, random_loc_seed=11,
                                                                     target_modules=["q_proj", "down_proj"]))
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        mine, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        assert torch.equal(mine.indices["default"], peft_layer.indices["default"])
        with torch.no_grad():  # the same coefficients give the same ΔW
            mine.fourierft_spectrum["default"].copy_(peft_layer.fourierft_spectrum["default"])
        torch.testing.assert_close(mine.delta_weight("default"), peft_layer.get_delta_weight("default"), rtol=0, atol=0)
    defaults, theirs_cfg = dt.FourierFTConfig(), peft.FourierFTConfig()
    assert (defaults.n_frequency, defaults.scaling, defaults.random_loc_seed, defaults.init_weights) == \
        (theirs_cfg.n_frequency, theirs_cfg.scaling, theirs_cfg.random_loc_seed, theirs_cfg.init_weights)
    gpt2 = dt.attach(build("gpt2"), dt.FourierFTConfig(n_frequency=10))
    assert dt.attached(gpt2)["default"].target_modules == ["mlp.c_proj"]


@pytest.mark.parametrize("arch", ARCHS)
def test_fourierft_same_outputs_as_peft_with_the_same_values(arch):
    base = logits(build(arch), arch)
    ours = dt.attach(build(arch), dt_fourierft(arch, init_weights=True)).eval()
    theirs = peft.get_peft_model(build(arch), peft_fourierft(arch, init_weights=True)).eval()
    assert_same(logits(ours, arch), base)  # zero coefficients: ΔW = 0
    names = set_values(dt.delta_parameters(ours, "default").items(), FFT_NEEDLES)
    assert names == set_values([(n, p) for n, p in theirs.named_parameters() if p.requires_grad], FFT_NEEDLES)
    assert_differs(logits(ours, arch), base)
    assert_same(logits(ours, arch), logits(theirs, arch))
    assert summary(ours, print_table=False).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_fourierft_saved_by_deltatune_loads_in_peft(tmp_path, arch):
    model = dt.attach(build(arch), dt_fourierft(arch)).eval()  # peft's default init: N(0, 1) coefficients
    set_values(dt.delta_parameters(model, "default").items(), ("modules_to_save",))
    assert_differs(logits(model, arch), logits(build(arch), arch))
    dt.save(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    assert_same(logits(reference, arch), logits(model, arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_fourierft_saved_by_peft_loads_in_deltatune(tmp_path, arch):
    reference = peft.get_peft_model(build(arch), peft_fourierft(arch, random_loc_seed=3))
    set_values([(n, p) for n, p in reference.named_parameters() if p.requires_grad], ("modules_to_save",))
    reference.eval()
    assert_differs(logits(reference, arch), logits(build(arch), arch))
    reference.save_pretrained(str(tmp_path))
    model = dt.load(build(arch), tmp_path).eval()
    assert_same(logits(model, arch), logits(reference, arch))
    dt.save(model, tmp_path / "again")  # and back out: the same adapter for peft
    assert read_files(tmp_path / "again")[0]["init_weights"] is False  # what the file said, not the load's shortcut
    again = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "again")).eval()
    assert_same(logits(again, arch), logits(reference, arch))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fourierft_files_match_peft_layout(tmp_path, arch):
    ours_dir, peft_dir = tmp_path / "dt", tmp_path / "peft"
    dt.save(dt.attach(build(arch), dt_fourierft(arch)), ours_dir)
    peft.get_peft_model(build(arch), peft_fourierft(arch)).save_pretrained(str(peft_dir))
    ours, theirs = assert_same_layout(ours_dir, peft_dir, (
        "peft_type", "task_type", "n_frequency", "scaling", "random_loc_seed", "init_weights", "fan_in_fan_out",
        "bias", "n_frequency_pattern", "layers_to_transform", "layers_pattern"))  # fmt: skip
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert ours["fan_in_fan_out"] is (arch == "gpt2")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fourierft_merge_matches_peft_merge(arch):
    from packaging.version import Version

    if arch == "gpt2" and Version(peft.__version__) < Version("0.21"):
        # peft 0.17.1's own FourierFT merge raises a shape error on GPT-2's Conv1D ((96, 32) vs (32, 96): its ΔW is
        # not transposed for fan_in_fan_out); 0.21.2 merges it. Ours is checked against the unmerged output above
        # that version too (test_contract's merge row).
        pytest.skip("peft before 0.21 cannot merge FourierFT on a Conv1D (its own shape error; 0.17.1 measured)")
    ours = dt.attach(build(arch), dt_fourierft(arch)).eval()
    theirs = peft.get_peft_model(build(arch), peft_fourierft(arch)).eval()
    set_values(dt.delta_parameters(ours, "default").items(), FFT_NEEDLES)
    set_values([(n, p) for n, p in theirs.named_parameters() if p.requires_grad], FFT_NEEDLES)
    unmerged = logits(ours, arch)
    dt.merge(ours)
    theirs.merge_adapter()
    assert_same(logits(ours, arch), unmerged)
    ours_weights = {k: v for k, v in dt.detach(copy_of(ours), merge=True).state_dict().items()}
    for key, value in theirs.merge_and_unload().state_dict().items():  # the same merged weights, in the same layout
        torch.testing.assert_close(ours_weights[key], value, rtol=0, atol=1e-6)
    dt.unmerge(ours)
    assert_same(logits(ours, arch), unmerged)
    for key, value in dt.detach(ours).state_dict().items():
        torch.testing.assert_close(value, build(arch).state_dict()[key], rtol=0, atol=1e-6)


def copy_of(model):
    import copy

    return copy.deepcopy(model)


def test_fourierft_n_frequency_beyond_the_spectrum_is_refused():
    refused = r"n_frequency = 600 is more than the 16 x 32 = 512 entries of model.layers.0.self_attn.v_proj"
    with pytest.raises(dt.DeltaError, match=refused):
        dt.attach(build("llama"), dt.FourierFTConfig(n_frequency=600, target_modules=["v_proj"]))
    model = dt.attach(build("llama"), dt.FourierFTConfig(n_frequency=600, target_modules=["q_proj", "v_proj"],
                                                         n_frequency_pattern={"v_proj": 100}))
    sizes = {n: p.numel() for n, p in dt.delta_parameters(model, "default").items()}
    assert sizes["model.layers.0.self_attn.v_proj.fourierft_spectrum.default"] == 100
    assert sizes["model.layers.0.self_attn.q_proj.fourierft_spectrum.default"] == 600


def test_info_counts_fourierft(tmp_path):
    from deltatune.info import describe
    from deltatune.tiny import write_tiny
    from test_newcomer import _rows

    folder = write_tiny("llama", tmp_path / "llama")
    row = _rows(describe(str(folder)))["fourierft"]
    model = build_from(folder)
    q, v = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj
    too_small = min(q.in_features * q.out_features, v.in_features * v.out_features) < 1000
    if too_small:  # the default n_frequency=1000 does not fit a tiny layer: info says why
        assert row.startswith("n/a") and "n_frequency = 1000 is more than" in row
    else:
        count = summary(dt.attach(model, dt.FourierFTConfig()), print_table=False)
        assert row == f"{count.trainable:,}  ({count.percent:.4f}%)"


@pytest.mark.parametrize("make", [lambda: dt.LNTuningConfig(), lambda: dt.FourierFTConfig(n_frequency=64)],
                         ids=["ln_tuning", "fourierft"])
def test_a_bf16_base_keeps_its_dtype_and_trains_fp32_deltas(make):
    model = build("llama").to(torch.bfloat16)
    dt.attach(model, make())
    assert all(p.dtype == torch.float32 for p in dt.delta_parameters(model, "default").values())
    data = batch("llama", labels=True)
    out = model(**data)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dt.delta_parameters(model, "default").values())
    unmerged = logits(model, "llama")
    dt.merge(model)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "default" not in n)
    torch.testing.assert_close(logits(model, "llama"), unmerged, rtol=0.05, atol=0.05)
