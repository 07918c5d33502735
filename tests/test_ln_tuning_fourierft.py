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
