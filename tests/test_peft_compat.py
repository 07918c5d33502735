"""File-format compatibility with the real `peft` package, both directions.

Every test builds tiny random transformers models from configs with fixed seeds
(no downloads), runs them in fp32, and compares deltatune against a reference
computed by peft itself:

* LoRA / rsLoRA / DoRA saved by deltatune load in peft with the same logits, and
  adapters saved by peft load in deltatune with the same logits (llama, GPT-2 with
  its Conv1D / fan_in_fan_out, BERT sequence classification with its head saved
  through modules_to_save);
* the files themselves: adapter_config.json key set, safetensors key names and
  shapes, safetensors metadata;
* prompt tuning both ways for causal LM, sequence classification and seq2seq,
  plus greedy generation for the causal LM;
* a peft SEQ_CLS adapter lists modules_to_save ["classifier", "score"] although
  the model has only one of the two heads: deltatune must accept it;
* AdaLoRA trained by each library's own loop (the budget falls to target_r) and saved
  with its pruned ranks, loaded by the other (llama, GPT-2, BERT);
* PiSSA and OLoRA adapters converted to plain LoRA relative to the original weights
  (peft's path_initial_model_for_weight_conversion, deltatune's relative_to_original)
  and saved as they are (the init re-runs on load), both ways.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from safetensors import safe_open

import deltatune as dt
from deltatune.formats.peft import LORA_EXTRA, PEFT_FORMAT_VERSION

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = RTOL = 1e-5
VOCAB = 64
N_VIRTUAL = 4

TASK = {
    "llama": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "bert": "SEQ_CLS",
    "llama_cls": "SEQ_CLS",
    "t5": "SEQ_2_SEQ_LM",
}
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],  # Conv1D: weights stored [in, out]
    "bert": ["query", "value"],  # Linear with bias (DoRA subtracts it)
    "llama_cls": ["q_proj", "v_proj"],
}
VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}
LORA_CASES = [pytest.param(a, v, id=f"{a}-{v}") for a in ("llama", "gpt2", "bert") for v in VARIANTS]


# ---------------------------------------------------------------- helpers


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model; the same (arch, seed) always gives the same weights."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(seed)
    llama = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**llama))
    elif arch == "llama_cls":
        model = LlamaForSequenceClassification(LlamaConfig(**llama, num_labels=3))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64))
    elif arch == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=3,
        )  # fmt: skip
        model = BertForSequenceClassification(cfg)
    elif arch == "t5":
        cfg = T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
            num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        model = T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(arch)
    return model.float().eval()


def batch(arch: str, labels: bool = False) -> dict[str, torch.Tensor]:
    """Two rows; the second is right-padded (attention_mask zeros at the end)."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        if labels:
            out["labels"] = torch.randint(2, VOCAB, (2, 5), generator=g)
        else:
            out["decoder_input_ids"] = torch.randint(2, VOCAB, (2, 5), generator=g)
    elif labels and TASK[arch] == "SEQ_CLS":
        out["labels"] = torch.tensor([0, 2])
    elif labels:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out


@torch.no_grad()
def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    out = model(**{k: v.clone() for k, v in inputs.items()})
    return out


def logits(model: torch.nn.Module, arch: str) -> torch.Tensor:
    return run(model, batch(arch)).logits


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    """Guard: the adapter really changes the output, so an equality check means something."""
    assert a.shape != b.shape or (a - b).abs().max() > 1e-3


@torch.no_grad()
def perturb(named_params, needles: tuple[str, ...], seed: int = 7) -> int:
    """Move the parameters whose name contains a needle away from their init.

    DoRA magnitudes start as the row norms (so DoRA == LoRA at init) and a
    classification head kept by modules_to_save starts as a copy of the base head:
    both must differ from their init for the comparison to test them.
    Returns how many tensors were changed.
    """
    g = torch.Generator().manual_seed(seed)
    changed = 0
    for name, p in named_params:
        if not any(s in name for s in needles):
            continue
        if "magnitude" in name:
            p.mul_(0.5 + torch.rand(p.shape, generator=g))
        else:
            p.add_(0.5 * torch.randn(p.shape, generator=g))
        changed += 1
    return changed


def dt_perturb(model: torch.nn.Module, name: str = "default") -> int:
    return perturb(dt.delta_parameters(model, name).items(), ("lora_magnitude_vector", "modules_to_save"))


def peft_perturb(model: torch.nn.Module) -> int:
    return perturb(model.named_parameters(), ("lora_magnitude_vector", "modules_to_save.default"))


def dt_lora(arch: str, variant: str) -> dt.LoraConfig:
    return dt.LoraConfig(r=4, alpha=8, target_modules=LORA_TARGETS[arch], init="none", **VARIANTS[variant])


def peft_lora(arch: str, variant: str):
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], init_lora_weights=False,
        task_type=TASK[arch], **VARIANTS[variant],
    )  # fmt: skip


def expected_perturbed(arch: str, variant: str) -> int:
    n = 0
    if variant == "dora":
        n += 2 * len(LORA_TARGETS[arch])  # one magnitude per targeted module, 2 layers
    if TASK[arch] == "SEQ_CLS":
        n += 2  # head weight and bias
    return n


def read_files(folder: Path) -> tuple[dict, dict[str, tuple[int, ...]], dict]:
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        metadata = f.metadata()
    return config, shapes, metadata


# Fields newer peft releases write, with the value deltatune writes when it keeps peft's default:
# peft_type (None: any type) -> {field: (a peft release that writes it, value)}. Where the first such
# release was not looked up, the release whose format deltatune writes stands in for it.
ADDED_FIELDS = {
    None: {"peft_version": (PEFT_FORMAT_VERSION, PEFT_FORMAT_VERSION), **{k: (PEFT_FORMAT_VERSION, v) for k, v in LORA_EXTRA.items()}},
    "PREFIX_TUNING": {"init_weights": ("0.19.0", None)},  # peft 0.19 added PrefixTuningConfig.init_weights
}
PEFT_VERSION = Version(peft.__version__)
# transformers 5.24 renamed the models' and generate()'s past_key_values to cache; peft up to 0.21.2 (the newest
# checked) still looks for past_key_values: it refuses prefix tuning on a head whose forward does not name it, and
# its generate() finds no cache, so it puts the soft prompt in front of every decoding step. No reference there.
TRANSFORMERS_NAMES_CACHE = "past_key_values" not in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
PEFT_STALE_CACHE_SKIP = pytest.mark.skipif(
    TRANSFORMERS_NAMES_CACHE and PEFT_VERSION <= Version("0.21.2"),
    reason=f"peft {peft.__version__} passes and reads soft-prompt caches as past_key_values, which transformers "
           f"{transformers.__version__} calls cache: its prefix tuning on task heads and its soft-prompt generate() are wrong",
)


def newer_fields(peft_type: str) -> dict:
    """The fields deltatune writes that the installed peft does not know yet, with their default values."""
    tables = [ADDED_FIELDS[None], ADDED_FIELDS.get(peft_type, {})]
    return {k: v for table in tables for k, (release, v) in table.items() if PEFT_VERSION < Version(release)}


def assert_same_layout(ours_dir: Path, peft_dir: Path, same_value_keys: tuple[str, ...]) -> tuple[dict, dict]:
    """Same config key set, same tensor keys and shapes, peft's metadata, and equal values for the given keys."""
    ours_cfg, ours_shapes, ours_meta = read_files(ours_dir)
    peft_cfg, peft_shapes, peft_meta = read_files(peft_dir)
    only_ours, only_peft = sorted(set(ours_cfg) - set(peft_cfg)), sorted(set(peft_cfg) - set(ours_cfg))
    # An older peft writes fewer fields and drops (with a warning) those it does not know;
    # deltatune writes them with their defaults, so only those may be extra.
    newer = newer_fields(ours_cfg["peft_type"])
    only_ours = [k for k in only_ours if k not in newer or ours_cfg[k] != newer[k]]
    assert not only_ours and not only_peft, f"only in deltatune: {only_ours}; only in peft: {only_peft}"
    assert ours_shapes == peft_shapes
    assert peft_meta == {"format": "pt"} and ours_meta == {"format": "pt", "deltatune_config_sha256": ours_meta["deltatune_config_sha256"]}
    for key in same_value_keys:
        if key in newer and key not in peft_cfg:  # a field this peft does not have yet: checked above
            continue
        assert ours_cfg[key] == peft_cfg[key], (key, ours_cfg[key], peft_cfg[key])
    return ours_cfg, peft_cfg


# ---------------------------------------------------------------- 1. LoRA: deltatune -> peft


@pytest.mark.parametrize("arch,variant", LORA_CASES)
def test_lora_saved_by_deltatune_loads_in_peft(tmp_path, arch, variant):
    base_logits = logits(build(arch), arch)

    model = build(arch)
    dt.attach(model, dt_lora(arch, variant))
    assert dt_perturb(model) == expected_perturbed(arch, variant)
    model.eval()
    ours = logits(model, arch)
    assert_differs(ours, base_logits)
    dt.save(model, tmp_path)

    reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    assert_same(logits(reference, arch), ours)


# ---------------------------------------------------------------- 2. LoRA: peft -> deltatune


@pytest.mark.parametrize("arch,variant", LORA_CASES)
def test_lora_saved_by_peft_loads_in_deltatune(tmp_path, arch, variant):
    base_logits = logits(build(arch), arch)

    reference = peft.get_peft_model(build(arch), peft_lora(arch, variant))
    assert peft_perturb(reference) == expected_perturbed(arch, variant)
    reference.eval()
    expected = logits(reference, arch)
    assert_differs(expected, base_logits)
    reference.save_pretrained(str(tmp_path))

    model = dt.load(build(arch), tmp_path)
    model.eval()
    assert_same(logits(model, arch), expected)


# ---------------------------------------------------------------- 3. the files themselves


@pytest.mark.parametrize("arch,variant", LORA_CASES)
def test_saved_files_match_peft_layout(tmp_path, arch, variant):
    ours_dir, peft_dir = tmp_path / "dt", tmp_path / "peft"
    model = dt.attach(build(arch), dt_lora(arch, variant))
    dt.save(model, ours_dir)
    peft.get_peft_model(build(arch), peft_lora(arch, variant)).save_pretrained(str(peft_dir))

    # The fields that change what peft computes must carry the same values.
    ours_cfg, peft_cfg = assert_same_layout(ours_dir, peft_dir, (
        "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out",
        "inference_mode", "bias", "lora_bias", "init_lora_weights", "rank_pattern", "alpha_pattern"))  # fmt: skip
    assert sorted(ours_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])
    assert sorted(ours_cfg["modules_to_save"] or []) == sorted(peft_cfg["modules_to_save"] or [])
    assert ours_cfg["fan_in_fan_out"] is (arch == "gpt2")
    # peft's own writer: indent 2, sorted keys
    text = (ours_dir / "adapter_config.json").read_text()
    assert text == json.dumps(ours_cfg, indent=2, sort_keys=True)


# ---------------------------------------------------------------- 4. prompt tuning

# For prompt-learning methods peft's PeftModel.base_model is the transformers model itself,
# so a SEQ_CLS head is keyed "base_model.classifier.weight" (no "model."): bert covers that.
PROMPT_ARCHS = ["llama", "bert", "t5"]


def peft_prompt(arch: str):
    return peft.PromptTuningConfig(task_type=TASK[arch], num_virtual_tokens=N_VIRTUAL)


def compare_prompt_outputs(model, reference, arch: str) -> None:
    """Logits (attention_mask given) and, with labels, the loss."""
    for with_labels in (False, True):
        inputs = batch(arch, labels=with_labels)
        ours, ref = run(model, inputs), run(reference, inputs)
        assert_same(ours.logits, ref.logits)
        if with_labels:
            assert_same(ours.loss, ref.loss)


@pytest.mark.parametrize("arch", PROMPT_ARCHS)
def test_prompt_tuning_saved_by_deltatune_loads_in_peft(tmp_path, arch):
    base_logits = logits(build(arch), arch)

    model = dt.attach(build(arch), dt.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL))
    dt_perturb(model)  # the SEQ_CLS head; the prompt itself starts random
    model.eval()
    ours = logits(model, arch)
    assert_differs(ours, base_logits)
    dt.save(model, tmp_path)

    reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    compare_prompt_outputs(model, reference, arch)


@pytest.mark.parametrize("arch", PROMPT_ARCHS)
def test_prompt_tuning_saved_by_peft_loads_in_deltatune(tmp_path, arch):
    base_logits = logits(build(arch), arch)

    reference = peft.get_peft_model(build(arch), peft_prompt(arch))  # prompt embeddings start random
    peft_perturb(reference)
    reference.eval()
    assert_differs(logits(reference, arch), base_logits)
    reference.save_pretrained(str(tmp_path))

    model = dt.load(build(arch), tmp_path).eval()
    compare_prompt_outputs(model, reference, arch)


@pytest.mark.parametrize("arch", PROMPT_ARCHS)
def test_prompt_tuning_files_match_peft_layout(tmp_path, arch):
    ours_dir, peft_dir = tmp_path / "dt", tmp_path / "peft"
    dt.save(dt.attach(build(arch), dt.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL)), ours_dir)
    peft.get_peft_model(build(arch), peft_prompt(arch)).save_pretrained(str(peft_dir))

    assert_same_layout(ours_dir, peft_dir, (
        "peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
        "num_layers", "num_attention_heads", "prompt_tuning_init"))  # fmt: skip


def _new_tokens(sequences: torch.Tensor, n: int) -> torch.Tensor:
    return sequences[:, -n:]


@PEFT_STALE_CACHE_SKIP
@pytest.mark.parametrize("direction", ["dt_to_peft", "peft_to_dt"])
def test_prompt_tuning_generate_matches_peft(tmp_path, direction):
    arch = "llama"
    if direction == "dt_to_peft":
        model = dt.attach(build(arch), dt.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL)).eval()
        dt.save(model, tmp_path)
        reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    else:
        reference = peft.get_peft_model(build(arch), peft_prompt(arch)).eval()
        reference.save_pretrained(str(tmp_path))
        model = dt.load(build(arch), tmp_path).eval()

    g = torch.Generator().manual_seed(4321)
    ids = torch.randint(2, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding, as for batched generation
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(input_ids=ids.clone(), attention_mask=mask.clone(), **kw)
        ref = reference.generate(input_ids=ids.clone(), attention_mask=mask.clone(), **kw)
        base = build(arch).generate(input_ids=ids.clone(), attention_mask=mask.clone(), **kw)
    assert ours.shape[1] >= 5 and ref.shape[1] >= 5
    assert torch.equal(_new_tokens(ours, 5), _new_tokens(ref, 5)), (ours, ref)
    # deltatune returns the prompt ids in front, as the bare model's generate does
    assert torch.equal(ours[:, : ids.shape[1]], ids)
    # guard: the prompt changes what is generated (else the check above proves little)
    assert not torch.equal(_new_tokens(base, 5), _new_tokens(ref, 5))


# ---------------------------------------------------------------- 5. SEQ_CLS heads listed by peft


@pytest.mark.parametrize("arch,head", [("bert", "classifier"), ("llama_cls", "score")])
def test_seq_cls_adapter_listing_both_heads_loads(tmp_path, arch, head):
    reference = peft.get_peft_model(build(arch), peft_lora(arch, "lora"))
    assert peft_perturb(reference) == (2 if arch == "bert" else 1)  # the one existing head: weight (+ bias for bert)
    reference.eval()
    reference.save_pretrained(str(tmp_path))
    config, shapes, _ = read_files(tmp_path)
    assert sorted(config["modules_to_save"]) == ["classifier", "score"]  # what peft writes for SEQ_CLS
    assert f"base_model.model.{head}.weight" in shapes

    model = dt.load(build(arch), tmp_path).eval()
    assert dt.attached(model)["default"].task_type == "SEQ_CLS"
    inputs = batch(arch)
    assert_same(run(model, inputs).logits, run(reference, inputs).logits)

    # and the file deltatune writes back is still the same adapter for peft
    dt.save(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "again")).eval()
    assert_same(run(again, inputs).logits, run(reference, inputs).logits)


# ---------------------------------------------------------------- 6. the file decides, not the model class


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_file_without_task_type_loads_into_a_sequence_classifier(tmp_path, variant):
    """peft with task_type=None wraps a BertForSequenceClassification without training its head;
    the file has no head, and deltatune must not infer SEQ_CLS from the class and ask for one."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["bert"], init_lora_weights=False,
                             task_type=None, **VARIANTS[variant])
    reference = peft.get_peft_model(build("bert"), config)
    peft_perturb(reference)
    reference.eval()
    reference.save_pretrained(str(tmp_path))
    saved, shapes, _ = read_files(tmp_path)
    assert saved["task_type"] is None and not any("classifier" in k for k in shapes)

    model = dt.load(build("bert"), tmp_path).eval()
    loaded = dt.attached(model)["default"]
    assert loaded.task_type is None and loaded.modules_to_save is None
    assert_same(logits(model, "bert"), logits(reference, "bert"))
    dt.save(model, tmp_path / "again")  # and it goes back out as it came in
    assert read_files(tmp_path / "again")[0]["task_type"] is None


# ---------------------------------------------------------------- 7. peft's saved embedding base weights


@pytest.mark.parametrize("changed_base", [False, True], ids=["same-base", "changed-base"])
def test_embedding_lora_saved_with_its_base_layer_loads(tmp_path, changed_base):
    """peft's default save_embedding_layers="auto" writes embed_tokens.base_layer.weight beside the LoRA."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False,
                             task_type="CAUSAL_LM")
    reference = peft.get_peft_model(build("llama"), config)
    if changed_base:  # e.g. new tokens trained into the vocabulary before the adapter
        with torch.no_grad():
            reference.base_model.model.model.embed_tokens.base_layer.weight.normal_()
    reference.eval()
    reference.save_pretrained(str(tmp_path))
    _, shapes, _ = read_files(tmp_path)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in shapes

    model = build("llama")
    original = model.model.embed_tokens.weight.detach().clone()
    dt.load(model, tmp_path)
    model.eval()
    assert_same(logits(model, "llama"), logits(reference, "llama"))
    if changed_base:
        with dt.disabled(model):  # guard: the file's base embedding really was loaded in
            assert_differs(logits(model, "llama"), logits(build("llama"), "llama"))
    dt.save(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path / "again")).eval()
    assert_same(logits(again, "llama"), logits(reference, "llama"))
    dt.detach(model)
    assert torch.equal(model.model.embed_tokens.weight, original)  # the base comes back bit for bit


# ---------------------------------------------------------------- 8. AdaLoRA, pruned to its final ranks

ADALORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}
ADALORA_SCHEDULE = dict(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2)


def _train_with_allocation(model, arch: str, allocate) -> None:
    """8 steps of the AdaLoRA loop (the budget falls from 4 to 2 per module), then eval mode."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for t in range(9):
        loss = run_grad(model, batch(arch, labels=True))
        loss.backward()
        opt.step()
        allocate(t)
        opt.zero_grad()
    model.eval()


def run_grad(model, inputs):
    return model(**inputs).loss


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_adalora_saved_by_deltatune_loads_in_peft(tmp_path, arch):
    model = build(arch)
    dt.attach(model, dt.AdaLoraConfig(alpha=8, target_modules=ADALORA_TARGETS[arch], **ADALORA_SCHEDULE))
    dt_perturb(model)  # the SEQ_CLS head
    _train_with_allocation(model, arch, lambda t: dt.step(model, t))
    pattern = dt.attached(model)["default"].rank_pattern
    assert sum(map(sum, pattern.values())) == 2 * len(pattern)
    dt.save(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    ranks = {n: p.shape[0] for n, p in reference.named_parameters() if n.endswith("lora_E.default")}
    assert sorted(ranks.values()) == sorted(sum(k) for k in pattern.values())  # peft built the pruned ranks
    assert_differs(logits(model, arch), logits(build(arch), arch))
    assert_same(logits(reference, arch), logits(model, arch))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_adalora_saved_by_peft_loads_in_deltatune(tmp_path, arch):
    reference = peft.get_peft_model(build(arch), peft.AdaLoraConfig(
        lora_alpha=8, target_modules=ADALORA_TARGETS[arch], task_type=TASK[arch], **ADALORA_SCHEDULE))  # fmt: skip
    peft_perturb(reference)
    _train_with_allocation(reference, arch, reference.base_model.update_and_allocate)
    reference.save_pretrained(str(tmp_path))
    model = dt.load(build(arch), tmp_path).eval()
    saved, shapes, _ = read_files(tmp_path)
    assert sum(shape[0] for key, shape in shapes.items() if key.endswith("lora_E")) == 2 * len(saved["rank_pattern"])
    assert {k: tuple(p.shape) for k, p in dt.io.file_keys(model, "default").items()} == shapes
    assert_same(logits(model, arch), logits(reference, arch))
    dt.save(model, tmp_path / "again")  # and back out, the same adapter for peft
    again = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "again")).eval()
    assert_same(logits(again, arch), logits(reference, arch))


def test_adalora_files_match_peft_layout(tmp_path):
    ours_dir, peft_dir = tmp_path / "dt", tmp_path / "peft"
    dt.save(dt.attach(build("llama"), dt.AdaLoraConfig(target_modules=ADALORA_TARGETS["llama"], **ADALORA_SCHEDULE)), ours_dir)
    peft.get_peft_model(build("llama"), peft.AdaLoraConfig(
        target_modules=ADALORA_TARGETS["llama"], task_type="CAUSAL_LM", **ADALORA_SCHEDULE)).save_pretrained(str(peft_dir))
    assert_same_layout(ours_dir, peft_dir, (
        "peft_type", "task_type", "r", "lora_alpha", "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
        "orth_reg_weight", "total_step", "rank_pattern", "init_lora_weights", "fan_in_fan_out", "lora_dropout"))  # fmt: skip


# ---------------------------------------------------------------- 9. PiSSA and OLoRA, both ways, converted or not

INIT_CASES = [pytest.param(a, i, id=f"{a}-{i}") for a, i in
              [("llama", "pissa"), ("llama", "olora"), ("llama", "pissa_niter_4"), ("gpt2", "pissa"), ("bert", "olora")]]


def _dt_init(init: str) -> dict:
    return {"init": "pissa", "pissa_niter": int(init.rsplit("_", 1)[1])} if "niter" in init else {"init": init}


def _perturb_lora(named_params, seed: int = 3) -> None:
    """Training stand-in: move A, B (and a kept head) away from their init."""
    assert perturb(named_params, ("lora_A", "lora_B", "modules_to_save"), seed=seed) > 0


@pytest.mark.parametrize("arch,init", INIT_CASES)
def test_init_adapter_converted_by_peft_loads_in_deltatune_on_the_original_base(tmp_path, arch, init):
    reference = peft.get_peft_model(build(arch), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], init_lora_weights=init, task_type=TASK[arch]))  # fmt: skip
    reference.peft_config["default"].init_lora_weights = True  # peft's recipe: the initial adapter, saved as plain LoRA
    reference.save_pretrained(str(tmp_path / "initial"))
    _perturb_lora(reference.named_parameters())
    reference.eval()
    reference.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    saved, shapes, _ = read_files(tmp_path / "converted")
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    if TASK[arch] == "SEQ_CLS":
        # peft's conversion keeps only lora_A / lora_B: the trained head listed in modules_to_save is not in the
        # file (peft itself would load the untrained head with a warning); deltatune names what is missing
        assert not any("classifier" in k for k in shapes) and saved["modules_to_save"]
        with pytest.raises(dt.DeltaError, match=r"key base_model.model.classifier.weight is missing from the file"):
            dt.load(build(arch), tmp_path / "converted")
        return

    model = dt.load(build(arch), tmp_path / "converted").eval()
    assert_differs(logits(model, arch), logits(build(arch), arch))
    assert_same(logits(model, arch), logits(reference, arch))


@pytest.mark.parametrize("arch,init", INIT_CASES)
def test_init_adapter_converted_by_deltatune_loads_in_peft_on_the_original_base(tmp_path, arch, init):
    model = dt.attach(build(arch), dt.LoraConfig(r=4, alpha=8, target_modules=LORA_TARGETS[arch], **_dt_init(init)))
    _perturb_lora(dt.delta_parameters(model, "default").items())
    model.eval()
    dt.save(model, tmp_path, relative_to_original=True)
    reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    assert_differs(logits(model, arch), logits(build(arch), arch))
    assert_same(logits(reference, arch), logits(model, arch))


UNCONVERTED_CASES = [pytest.param(a, i, id=f"{a}-{i}") for a, i in [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")]]


@pytest.mark.parametrize("arch,init", UNCONVERTED_CASES)
@pytest.mark.parametrize("direction", ["dt_to_peft", "peft_to_dt"])
def test_init_adapter_saved_as_is_runs_its_init_again_on_load(tmp_path, arch, init, direction):
    """Without conversion the file says init_lora_weights="pissa"/"olora": both libraries re-run the
    (deterministic) decomposition on the original base at load, then load A and B."""
    if direction == "dt_to_peft":
        model = dt.attach(build(arch), dt.LoraConfig(r=4, alpha=8, target_modules=LORA_TARGETS[arch], init=init))
        _perturb_lora(dt.delta_parameters(model, "default").items())
        dt.save(model, tmp_path)
        other = peft.PeftModel.from_pretrained(build(arch), str(tmp_path))
    else:
        model = peft.get_peft_model(build(arch), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], init_lora_weights=init, task_type=TASK[arch]))  # fmt: skip
        _perturb_lora(model.named_parameters())
        model.save_pretrained(str(tmp_path))
        other = dt.load(build(arch), tmp_path)
    assert read_files(tmp_path)[0]["init_lora_weights"] == init
    model.eval(), other.eval()
    assert_same(logits(other, arch), logits(model, arch))


# ---------------------------------------------------------------- 10. P-tuning and prefix tuning (P-tuning v2)

SOFT_ARCHS = ["llama", "gpt2", "bert", "t5"]


def dt_soft(kind: str):
    return {
        "p_tuning_mlp": lambda: dt.PTuningConfig(num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=12),
        "p_tuning_lstm": lambda: dt.PTuningConfig(num_virtual_tokens=N_VIRTUAL, encoder="lstm", encoder_hidden_size=6),
        "prefix_projection": lambda: dt.PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, projection_hidden_size=12),
        "p_tuning_v2": lambda: dt.PTuningV2Config(num_virtual_tokens=N_VIRTUAL),
    }[kind]()


def peft_soft(kind: str, arch: str):
    task = TASK[arch]
    return {
        "p_tuning_mlp": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=12),
        "p_tuning_lstm": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=6,
                                                          encoder_reparameterization_type="LSTM"),
        "prefix_projection": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N_VIRTUAL, prefix_projection=True,
                                                             encoder_hidden_size=12),
        "p_tuning_v2": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N_VIRTUAL),
    }[kind]()


SOFT_KINDS = ["p_tuning_mlp", "p_tuning_lstm", "prefix_projection", "p_tuning_v2"]
SOFT_CASES = [pytest.param(a, k, id=f"{a}-{k}") for a in SOFT_ARCHS for k in SOFT_KINDS]
# peft < 0.18 builds an encoder-decoder's prefix cache with DynamicCache.key_cache, which transformers 4.56
# removed: peft itself cannot run T5 prefix tuning there, so there is no reference to compare with.
PEFT_RUNS_SEQ2SEQ_PREFIXES = PEFT_VERSION >= Version("0.18.0") or hasattr(transformers.DynamicCache(), "key_cache")
PEFT_SEQ2SEQ_PREFIX_SKIP = pytest.mark.skipif(
    not PEFT_RUNS_SEQ2SEQ_PREFIXES,
    reason=f"peft {peft.__version__} reads DynamicCache.key_cache for an encoder-decoder's prefixes, which transformers "
           f"{transformers.__version__} no longer has (fixed in peft 0.18): no reference output",
)
def _soft_marks(arch: str, kind: str) -> list:
    prefix = kind in ("prefix_projection", "p_tuning_v2")
    return [PEFT_SEQ2SEQ_PREFIX_SKIP] * (arch == "t5" and prefix) + [PEFT_STALE_CACHE_SKIP] * (arch == "bert" and prefix)


SOFT_RUN_CASES = [pytest.param(a, k, id=f"{a}-{k}", marks=_soft_marks(a, k)) for a in SOFT_ARCHS for k in SOFT_KINDS]


@pytest.mark.parametrize("arch,kind", SOFT_RUN_CASES)
def test_soft_prompts_saved_by_deltatune_load_in_peft(tmp_path, arch, kind):
    base_logits = logits(build(arch), arch)
    model = dt.attach(build(arch), dt_soft(kind))
    dt_perturb(model)
    model.eval()
    assert_differs(logits(model, arch), base_logits)
    dt.save(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    compare_prompt_outputs(model, reference, arch)


@pytest.mark.parametrize("arch,kind", SOFT_RUN_CASES)
def test_soft_prompts_saved_by_peft_load_in_deltatune(tmp_path, arch, kind):
    base_logits = logits(build(arch), arch)
    reference = peft.get_peft_model(build(arch), peft_soft(kind, arch))
    peft_perturb(reference)
    reference.eval()
    assert_differs(logits(reference, arch), base_logits)
    reference.save_pretrained(str(tmp_path))
    model = dt.load(build(arch), tmp_path).eval()
    compare_prompt_outputs(model, reference, arch)
    # what was loaded is the folded rows or prefixes alone: nothing of the encoder or projection
    assert set(dt.delta_parameters(model, "default")) <= {"prompt_embeddings.default", "prefix_embeddings.default"} | {
        n for n in dt.delta_parameters(model, "default") if "modules_to_save" in n}


@pytest.mark.parametrize("arch,kind", SOFT_CASES)
def test_soft_prompt_files_match_peft_layout(tmp_path, arch, kind):
    ours_dir, peft_dir = tmp_path / "dt", tmp_path / "peft"
    dt.save(dt.attach(build(arch), dt_soft(kind)), ours_dir)
    peft.get_peft_model(build(arch), peft_soft(kind, arch)).save_pretrained(str(peft_dir))
    keys = ["peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_layers",
            "num_attention_heads", "encoder_hidden_size"]
    keys += ["encoder_reparameterization_type", "encoder_num_layers"] if kind.startswith("p_tuning_") and kind != "p_tuning_v2" \
        else ["prefix_projection", "init_weights"]
    assert_same_layout(ours_dir, peft_dir, tuple(keys))


@PEFT_STALE_CACHE_SKIP
@pytest.mark.parametrize("direction", ["dt_to_peft", "peft_to_dt"])
@pytest.mark.parametrize("kind", ["prefix_projection", "p_tuning_mlp"])
def test_soft_prompt_generate_matches_peft(tmp_path, direction, kind):
    arch = "llama"
    if direction == "dt_to_peft":
        model = dt.attach(build(arch), dt_soft(kind)).eval()
        dt.save(model, tmp_path)
        reference = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    else:
        reference = peft.get_peft_model(build(arch), peft_soft(kind, arch)).eval()
        reference.save_pretrained(str(tmp_path))
        model = dt.load(build(arch), tmp_path).eval()
    g = torch.Generator().manual_seed(4321)
    ids = torch.randint(2, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding, as for batched generation
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours = model.generate(input_ids=ids.clone(), attention_mask=mask.clone(), **kw)
        ref = reference.generate(input_ids=ids.clone(), attention_mask=mask.clone(), **kw)
        base = build(arch).generate(input_ids=ids.clone(), attention_mask=mask.clone(), **kw)
    # peft < 0.19 drops the position_ids generate() computes from the mask (prefix tuning, like peft >= 0.19
    # and deltatune, moves them up by n): its left-padded row then counts the padding. Only the unpadded row
    # has a reference there.
    rows = slice(None) if kind != "prefix_projection" or PEFT_VERSION >= Version("0.19.0") else slice(0, 1)
    assert torch.equal(_new_tokens(ours.sequences, 5)[rows], _new_tokens(ref.sequences, 5)[rows])
    for mine, theirs in zip(ours.scores, ref.scores):
        assert_same(mine[rows], theirs[rows])
    assert not torch.equal(_new_tokens(base.sequences, 5), _new_tokens(ref.sequences, 5))


@pytest.mark.parametrize("kind", [pytest.param("prefix_projection", marks=PEFT_STALE_CACHE_SKIP), "p_tuning_mlp"])
def test_soft_prompts_on_unpadded_llama_classifier_match_peft(tmp_path, kind):
    """peft scores the last position of a right-padded LlamaForSequenceClassification batch fed
    inputs_embeds (a padding position); on unpadded rows both libraries score the last token."""
    arch = "llama_cls"
    reference = peft.get_peft_model(build(arch), peft_soft(kind, arch))
    peft_perturb(reference)
    reference.eval()
    reference.save_pretrained(str(tmp_path))
    model = dt.load(build(arch), tmp_path).eval()
    inputs = {"input_ids": batch(arch)["input_ids"][:, :5] + 1}  # no pad id (0) anywhere, no padding
    assert_same(run(model, inputs).logits, run(reference, inputs).logits)
