"""Quantised bases (bitsandbytes, on the CPU).

QLoRA's contract on every architecture of the contract suite, with the base in NF4 and in
int8 (the tiny models at width 64, see quant_models.py): a QLoRA step lowers the loss and
leaves the quantised weights alone, files round-trip onto the quantised and the
full-precision base, merging re-quantises and unmerging is exact, peft's QLoRA files load
both ways. Then the other wrapping methods on a 4-bit base, the memory formula, the logits
error of the quantised base, k-bit preparation, the optimizers, loading, LoftQ, the merged
export and the pipeline.
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import deltatune as dt  # noqa: E402
from deltatune import quant  # noqa: E402
from deltatune.surgery import DeltaLayer, dequantize_base  # noqa: E402
from deltatune.targets import DEFAULT_TARGETS  # noqa: E402
from quant_models import WIDE, checkpoint, quantized, wide  # noqa: E402
from test_contract import train  # noqa: E402
from test_lora import perturb  # noqa: E402
from tiny_models import ARCHS, batch, logits  # noqa: E402

KINDS = ["nf4", "int8"]
CASES = [pytest.param(arch, kind, id=f"{arch}-{kind}") for arch in WIDE for kind in KINDS]


def qlora() -> dt.LoraConfig:
    return dt.LoraConfig(r=4, alpha=8, target_modules="all-linear")


def stored(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, object]]:
    """Copies of every quantised layer's stored tensors (packed values and scales), by the layer's base name."""
    out = {}
    for name, module in quant.quantized_layers(model):
        snap = quant.snapshot(module)
        scales = snap.state.absmax if hasattr(snap.state, "absmax") else snap.state
        out[name.replace(".base_layer", "")] = (snap.data.clone(), scales.clone())
    return out


def assert_stored_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name


def relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).norm() / reference.norm()).item()


def assert_matches_the_dequantised_model(model: torch.nn.Module, kind: str, data: dict) -> torch.Tensor:
    """The model with its delta against a copy whose quantised layers hold their dequantised weights as plain
    fp32 nn.Linear (the delta on top unchanged): the kernels compute x W^T with W dequantised. A 4-bit
    kernel does exactly that; LLM.int8()'s also rounds its inputs to int8 per row (about 0.7% per layer)."""
    reference = copy.deepcopy(model)
    dequantize_base(reference, torch.float32)
    assert not quant.quantized_layers(reference)
    expected = logits(reference, data)
    if kind == "int8":
        assert relative(logits(model, data), expected) < 0.03
    else:
        torch.testing.assert_close(logits(model, data), expected, rtol=1e-4, atol=1e-4)
    return expected


@functools.lru_cache(maxsize=None)
def base_error(arch: str, kind: str) -> float:
    """The quantised base's own relative logits error against the fp32 base."""
    data = batch(arch)
    return relative(logits(quantized(arch, kind), data), logits(wide(arch), data))


@functools.lru_cache(maxsize=None)
def _trained(arch: str, kind: str, make=qlora):
    model = quantized(arch, kind)
    before = stored(model)
    torch.manual_seed(0)  # the same initial delta whatever ran before
    dt.attach(model, make())
    model.train()
    losses = train(model, batch(arch), lr=5e-3)  # 1e-2 overshoots roberta's two rows at the last steps
    model.eval()
    return model, losses, before


@functools.lru_cache(maxsize=None)
def on_the_fp32_base(arch: str, kind: str) -> torch.nn.Module:
    """The adapter trained on the quantised base, loaded from its files onto the fp32 base (read-only)."""
    model, _, _ = _trained(arch, kind)
    with tempfile.TemporaryDirectory() as folder:
        dt.save(model, folder)
        return dt.load(wide(arch), folder).eval()


def trained(arch: str, kind: str, make=qlora):
    model, losses, before = _trained(arch, kind, make)
    return copy.deepcopy(model), losses, before


# ---------------------------------------------------------------- the contract, every architecture


@pytest.mark.parametrize("arch,kind", CASES)
def test_qlora_step_lowers_the_loss_and_trains_only_the_delta(arch, kind):
    model, losses, before = trained(arch, kind)
    assert losses[-1] < losses[0] - 0.3, losses
    wrapped = [layer for _, layer in model.named_modules() if isinstance(layer, DeltaLayer) and layer.quantized]
    assert wrapped and all(quant.quant_kind(layer.base_layer) == kind for layer in wrapped)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(dt.delta_parameters(model, "default"))
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert_stored_equal(stored(model), before)  # the quantised weights never moved
    assert_matches_the_dequantised_model(model, kind, batch(arch))


@pytest.mark.parametrize("arch,kind", CASES)
def test_files_load_onto_the_quantised_and_the_full_precision_base(arch, kind, tmp_path):
    model, losses, _ = trained(arch, kind)
    data = batch(arch)
    dt.save(model, tmp_path)
    again = quantized(arch, kind)
    dt.load(again, tmp_path)
    torch.testing.assert_close(logits(again, data), logits(model, data), rtol=0, atol=0)
    # onto the unquantised base: the same adapter, the base's quantisation error the only difference
    full = on_the_fp32_base(arch, kind)
    with dt.disabled(model):
        base_error = relative(logits(model, data), logits(wide(arch), data))
    error = relative(logits(full, data), logits(model, data))
    assert error < 3 * base_error + (0.02 if kind == "nf4" else 0.005), (error, base_error)
    with torch.no_grad():
        loss, trained_loss = full(**data).loss.item(), model(**data).loss.item()
    assert loss < losses[0] - 0.3 and abs(loss - trained_loss) < 0.05, (loss, trained_loss, losses)  # it still does its job


@pytest.mark.parametrize("arch,kind", CASES)
def test_merge_requantises_and_unmerge_is_exact(arch, kind):
    model, _, before = trained(arch, kind)
    data = batch(arch)
    unmerged = logits(model, data)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DeltaLayer) and m.quantized}
    exact = {n: (m.base_weight() + m.delta_weight("default")).detach() for n, m in layers.items()}  # Q + s B A
    with pytest.warns(UserWarning, match="re-quantises the merged weights"):
        dt.merge(model)
    merged = logits(model, data)
    # Each merged weight is the exact float merge quantised once more in the layer's format: per weight it
    # loses what quantising the original base weight lost (relative errors; int8 ~0.006, NF4 ~0.09 here).
    for name, layer in layers.items():
        error = relative(quant.dequantize_weight(layer.base_layer), exact[name])
        W = _original_weight(arch, name)
        reference = relative(quant.dequantize_snapshot(layer.base_layer, layer.premerge["default"]["weight"]), W)
        assert 0 < error < 1.25 * reference, (name, error, reference)
    # In the logits that weight error weighs as much as the model's sensitivity to its body weights, which
    # training changes (tiny BLOOM and RoBERTa start at init std 0.02 and barely use their bodies; their
    # trained deltas are as large as W). So the bound is the quantisation error measured on the trained
    # model: its adapter on the fp32 base against on the quantised base (or on the untrained base, if larger).
    trained_error = relative(logits(on_the_fp32_base(arch, kind), data), unmerged)
    bound = 3 * max(base_error(arch, kind), trained_error)
    assert 0 < relative(merged, unmerged) < bound, (relative(merged, unmerged), base_error(arch, kind), trained_error)
    dt.unmerge(model)
    assert_stored_equal(stored(model), before)  # the quantised tensors from before the merge, exactly
    # (T5's wo and ChatGLM's output layer stay full precision: their float merge rounds)
    torch.testing.assert_close(logits(model, data), unmerged, rtol=0, atol=1e-5)
    dt.merge(model)
    dt.detach(model)  # without merge: the original quantised base, bit for bit
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert_stored_equal(stored(model), before)
    torch.testing.assert_close(logits(model, data), logits(quantized(arch, kind), data), rtol=0, atol=1e-5)


def test_save_pretrained_writes_the_quantised_base_or_the_requantised_merged_model(tmp_path):
    model, _, _ = trained("llama", "nf4")
    data = batch("llama")
    with pytest.warns(UserWarning, match="without the unmerged delta"):
        model.save_pretrained(tmp_path / "base")  # the base model's own keys, still quantised
    again = WIDE["llama"][1].from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    quant.keep_trainable_layouts(again)
    assert len(quant.quantized_layers(again)) == 14
    with dt.disabled(model):
        torch.testing.assert_close(logits(again, data), logits(model, data), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="re-quantises"):
        dt.merge(model)
    model.save_pretrained(tmp_path / "merged")
    merged = WIDE["llama"][1].from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    quant.keep_trainable_layouts(merged)
    torch.testing.assert_close(logits(merged, data), logits(model, data), rtol=0, atol=0)


def _targets(arch: str) -> list[str]:
    model_type = wide(arch).config.model_type
    return DEFAULT_TARGETS["lora"][model_type]


def _peft_model(arch: str, kind: str):
    import peft

    task = {"causal": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}[ARCHS[arch].kind]
    model = quantized(arch, kind)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=_targets(arch), task_type=task, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, config)
    quant.keep_trainable_layouts(pm)  # the same kernels as deltatune's (no CPU inference layout)
    return pm.eval()


# peft's causal-LM wrapper needs generation methods the ChatGLM stand-in does not have; int8 on one
# architecture per layout (Linear, Conv1D, encoder, encoder-decoder) keeps the file's time down
PEFT_CASES = [c for c in CASES if c.values[0] != "chatglm" and (c.values[1] == "nf4" or c.values[0] in ("llama", "gpt2", "bert", "t5"))]


@pytest.mark.parametrize("arch,kind", PEFT_CASES)
def test_peft_qlora_adapters_load_both_ways(arch, kind, tmp_path):
    import peft

    data = batch(arch)
    pm = _peft_model(arch, kind)
    pm.save_pretrained(tmp_path / "peft")
    ours = quantized(arch, kind)
    dt.load(ours, tmp_path / "peft")
    assert any(isinstance(m, DeltaLayer) and m.quantized for m in ours.modules())
    torch.testing.assert_close(logits(ours, data), logits(pm, data), rtol=0, atol=1e-5)
    # deltatune's QLoRA adapter, read by peft onto its own quantised base
    model, _, _ = trained(arch, kind, make=lambda: dt.LoraConfig(r=4, alpha=8, target_modules=_targets(arch)))
    dt.save(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(quantized(arch, kind), tmp_path / "ours").eval()
    quant.keep_trainable_layouts(theirs)
    torch.testing.assert_close(logits(theirs, data), logits(model, data), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- every wrapping method on a 4-bit base


WRAPPING = {
    "dora": lambda: dt.LoraConfig(r=4, alpha=8, use_dora=True, target_modules="all-linear"),
    "rslora": lambda: dt.LoraConfig(r=4, alpha=8, use_rslora=True, init="gaussian"),
    "ia3": lambda: dt.IA3Config(),
    "vera": lambda: dt.VeraConfig(r=8),
    "hra": lambda: dt.HRAConfig(r=4, target_modules="all-linear"),
    "loha": lambda: dt.LoHaConfig(r=4, alpha=8),
    "lokr": lambda: dt.LoKrConfig(r=4, alpha=8),
    "adalora": lambda: dt.AdaLoraConfig(init_r=6, target_r=4, alpha=12, total_step=12),
    "adapter_houlsby": lambda: dt.AdapterConfig(placement="houlsby", reduction_factor=8),
    "adapter_parallel": lambda: dt.AdapterConfig(placement="parallel", bottleneck_size=4, scaling=4.0),
}
LR = {"ia3": 0.2, "vera": 5e-2, "hra": 5e-2}
METHOD_CASES = [pytest.param(m, arch, kind, id=f"{m}-{arch}-{kind}") for m in WRAPPING
                for arch, kind in [("llama", "nf4"), ("gpt2", "nf4"), ("bert", "nf4"), ("t5", "nf4"), ("llama", "int8")]]


@functools.lru_cache(maxsize=None)
def _trained_method(method: str, arch: str, kind: str):
    model = quantized(arch, kind)
    before = stored(model)
    torch.manual_seed(0)
    dt.attach(model, WRAPPING[method]())
    model.train()
    losses = train(model, batch(arch), lr=LR.get(method, 1e-2))
    return model.eval(), losses, before


@pytest.mark.parametrize("method,arch,kind", METHOD_CASES)
def test_every_wrapping_method_trains_saves_and_merges_on_a_quantised_base(method, arch, kind, tmp_path):
    model, losses, before = _trained_method(method, arch, kind)
    model = copy.deepcopy(model)
    data = batch(arch)
    assert losses[-1] < losses[0] - 0.05, losses
    if not method.startswith("adapter"):  # adapters wrap blocks and norms as well as linear layers
        assert any(isinstance(m, DeltaLayer) and m.quantized for m in model.modules())
    assert_stored_equal(stored(model), before)
    # (a parallel adapter taps the quantised layer itself, which the dequantised copy replaces)
    expected = assert_matches_the_dequantised_model(model, kind, data) if method != "adapter_parallel" else None
    unmerged = logits(model, data)
    dt.save(model, tmp_path)
    again = quantized(arch, kind)
    dt.load(again, tmp_path)
    torch.testing.assert_close(logits(again, data), unmerged, rtol=0, atol=1e-6)
    if not dt.METHODS[WRAPPING[method]().method].mergeable or method.startswith("adapter"):
        return
    if arch == "gpt2":  # the exact merged export: GPT-2's Conv1D comes back from the quantised layers
        from deltatune.pipeline.export import export_merged

        export_merged(model, None, tmp_path / "merged", dtype=torch.float32)
        plain = WIDE[arch][1].from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(logits(plain, data), expected, rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="re-quantises"):
        dt.merge(model)
    print(f"CAL2 {method} {arch} {kind} ratio={relative(logits(model, data), unmerged)/base_error(arch, kind):.2f}")
    assert relative(logits(model, data), unmerged) < 3 * base_error(arch, kind)
    dt.unmerge(model)
    assert_stored_equal(stored(model), before)
    torch.testing.assert_close(logits(model, data), unmerged, rtol=0, atol=1e-5)
    dt.detach(model)
    assert_stored_equal(stored(model), before)


def test_dora_magnitude_starts_at_the_dequantised_row_norms_and_dropout_uses_the_quantised_kernel():
    model = quantized("llama")
    layer = model.model.layers[0].self_attn.q_proj
    expected = quant.dequantize_weight(layer).norm(dim=1)
    dt.attach(model, dt.LoraConfig(r=4, use_dora=True, dropout=0.1))
    wrapped = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(wrapped.lora_magnitude_vector["default"].detach(), expected, rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(wrapped.base_output(x), x @ quant.dequantize_weight(wrapped.base_layer).T, rtol=1e-5, atol=1e-5)
    model.train()
    losses = train(model, batch("llama"), steps=6)
    assert losses[-1] < losses[0]


def test_a_quantised_classifier_head_trains_as_a_full_precision_copy(tmp_path):
    model = quantized("bert", quantize_heads=True)
    assert quant.is_quantized(model.classifier)
    dt.attach(model, dt.LoraConfig(r=4))
    copy_ = model.classifier.modules_to_save["default"]
    assert type(copy_) is torch.nn.Linear and copy_.weight.dtype == torch.float32 and copy_.weight.requires_grad
    torch.testing.assert_close(copy_.weight.detach(), quant.dequantize_weight(model.classifier.base_layer))
    model.train()
    losses = train(model, batch("bert"))
    assert losses[-1] < losses[0] - 0.3
    dt.save(model, tmp_path)
    again = quantized("bert", quantize_heads=True)
    dt.load(again, tmp_path)
    torch.testing.assert_close(logits(again.eval(), batch("bert")), logits(model.eval(), batch("bert")), rtol=0, atol=1e-6)


def test_what_cannot_train_a_quantised_weight_says_so():
    model = quantized("llama")
    with pytest.raises(dt.DeltaError, match=r"q_proj.weight is quantised \(bitsandbytes\).*cannot train it"):
        dt.attach(model, dt.FullConfig())
    with pytest.raises(dt.DeltaError, match=r"init='pissa' rewrites .*q_proj's base weight, which is quantised \(nf4\)"):
        dt.attach(model, dt.LoraConfig(init="pissa"))
    assert dt.active(model) == []
    bert = quantized("bert")
    dt.attach(bert, dt.BitFitConfig())  # biases stay floating point: they train
    assert all(p.dtype == torch.float32 for p in dt.delta_parameters(bert, "default").values())


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", False)])
@pytest.mark.parametrize("out_f,in_f", [(64, 64), (96, 64), (128, 192), (512, 1024)])
def test_quantised_layers_store_what_the_formula_says(kind, double_quant, out_f, in_f):
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_f, out_f)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=torch.float32, quant_type=kind, compress_statistics=double_quant)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    assert quant.weight_bytes(layer) == quant.weight_bytes_formula(out_f, in_f, kind, double_quant)
    layer(torch.randn(2, in_f))  # an 8-bit layer moves its scales into its state on the first forward
    assert quant.weight_bytes(layer) == quant.weight_bytes_formula(out_f, in_f, kind, double_quant)


def test_bits_per_weight_are_qloras():
    # 4 + 32/64 = 4.5 bits; with double quantisation 4 + 8/64 + 32/(64*256) = 4.127 bits (plus 1 KiB of tables)
    n = 4096 * 4096
    assert quant.weight_bytes_formula(4096, 4096, "nf4") * 8 / n == pytest.approx(4.5, abs=1e-4)
    assert quant.weight_bytes_formula(4096, 4096, "nf4", double_quant=True) * 8 / n == pytest.approx(4.127, abs=1e-3)
    assert quant.weight_bytes_formula(4096, 4096, "int8") * 8 / n == pytest.approx(8 + 32 / 4096)
    model = quantized("llama", "nf4", double_quant=True)
    layers = quant.quantized_layers(model)
    assert sum(quant.weight_bytes(m) for _, m in layers) == sum(
        quant.weight_bytes_formula(m.out_features, m.in_features, "nf4", True) for _, m in layers)


# ---------------------------------------------------------------- the quantised base's own error


ERROR_BOUNDS = {"nf4": 0.2, "fp4": 0.25, "int8": 0.03}  # relative L2 error of the logits


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_quantised_logits_stay_close_to_the_fp32_base(arch, kind):
    data = batch(arch)
    full = logits(wide(arch), data)
    error = relative(logits(quantized(arch, kind), data), full)
    print(f"{arch} {kind}: relative logits error {error:.4f}")  # README's table comes from benchmarks/quant_error.py
    assert 0 < error < ERROR_BOUNDS[kind]
    if kind != "int8":
        error_fp16 = relative(logits(quantized(arch, kind, compute_dtype=torch.bfloat16), data), full)
        assert error_fp16 < ERROR_BOUNDS[kind] + 0.02


# ---------------------------------------------------------------- k-bit preparation


def test_prepare_kbit_puts_norms_and_head_in_fp32_and_checkpoints_non_reentrant():
    config = quant.quantization_config("nf4", torch.bfloat16)
    model = WIDE["llama"][1].from_pretrained(checkpoint("llama"), quantization_config=config, dtype=torch.bfloat16)
    before = stored(model)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    dt.prepare_kbit(model)
    floats = {n: p.dtype for n, p in model.named_parameters() if not quant.is_quantized_parameter(p)}
    assert floats and set(floats.values()) == {torch.float32}
    assert "lm_head.weight" in floats and "model.norm.weight" in floats
    assert_stored_equal(stored(model), before)  # the quantised weights are as they were
    assert model.is_gradient_checkpointing
    func = model.model.layers[0]._gradient_checkpointing_func
    assert func.keywords.get("use_reentrant") is False
    dt.attach(model, dt.LoraConfig(r=4))
    model.train()
    losses = train(model, batch("llama"))
    assert losses[-1] < losses[0] - 0.3
    grads = [p.grad for p in dt.delta_parameters(model, "default").values()]
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_fp16_compute_trains_fp32_deltas_and_keeps_no_dequantised_weight():
    model = dt.load_base(checkpoint("llama"), quant="nf4", dtype="fp16", double_quant=False)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.compute_dtype == torch.float16 and model.model.norm.weight.dtype == torch.float16

    def frozen_bytes() -> int:  # everything the model stores but the delta (quantised weights with their scales)
        delta = {id(p) for p in dt.delta_parameters(model, "default").values()} if dt.active(model) else set()
        tensors = [t for t in model.state_dict(keep_vars=True).values() if torch.is_tensor(t) and id(t) not in delta]
        return sum(t.numel() * t.element_size() for t in tensors)

    dt.prepare_kbit(model)
    before = frozen_bytes()
    dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    losses = train(model, batch("llama"), lr=5e-3)
    assert losses[-1] < losses[0] - 0.3
    assert {p.dtype for p in dt.delta_parameters(model, "default").values()} == {torch.float32}
    assert frozen_bytes() == before  # the base stays packed: no dequantised copy was kept anywhere
    wrapped = model.model.layers[0].mlp.down_proj
    assert not [n for n, t in vars(wrapped).items() if torch.is_tensor(t)] and not wrapped.premerge


def test_prepare_kbit_with_reentrant_checkpointing_reaches_the_first_block():
    model = quantized("llama")
    dt.prepare_kbit(model, use_reentrant=True)
    dt.attach(model, dt.LoraConfig(r=4, init="none"))
    model.train()
    model(**batch("llama")).loss.backward()
    first = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_prepare_kbit_errors():
    with pytest.raises(dt.DeltaError, match="expects a torch.nn.Module"):
        dt.prepare_kbit("model")
    glm = quantized("chatglm")
    with pytest.raises(dt.DeltaError, match="does not support gradient checkpointing.*gradient_checkpointing=False"):
        dt.prepare_kbit(glm)
    dt.prepare_kbit(glm, gradient_checkpointing=False)


def test_the_cpu_inference_layout_never_stops_training():
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(64, 64).state_dict())
    layer = layer.to("cpu").eval()
    expected = quant.dequantize_weight(layer)
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never switches layouts here")
    with torch.no_grad():
        layer(torch.randn(2, 64))  # bitsandbytes switches to its inference layout here
    assert layer.weight.quant_state.packing_format_for_cpu
    net = torch.nn.Sequential(layer)
    dt.attach(net, dt.LoraConfig(r=2, target_modules=["0"], init="none"))
    assert not net[0].base_layer.weight.quant_state.packing_format_for_cpu  # undone when wrapped
    torch.testing.assert_close(quant.dequantize_weight(net[0].base_layer), expected, rtol=0, atol=expected.abs().max().item() / 100)
    net.train()
    x = torch.randn(3, 64, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and net[0].lora_A["default"].weight.grad is not None
    net.eval()
    with torch.no_grad():
        net(torch.randn(2, 64))
    assert not net[0].base_layer.weight.quant_state.packing_format_for_cpu  # and never again


# ---------------------------------------------------------------- optimizers and loading


@pytest.mark.parametrize("name", sorted(quant.OPTIMIZERS))
def test_bitsandbytes_optimizers_train_and_keep_8bit_states(name, tmp_path):
    torch.manual_seed(0)
    big, small = torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(10))
    opt = quant.bnb_optimizer(name, [big, small], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        loss = (big ** 2).sum() + (small ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert (big ** 2).sum() + (small ** 2).sum() < loss
    dtypes = {v.dtype for v in opt.state[big].values() if torch.is_tensor(v) and v.numel() == big.numel()}
    assert dtypes == ({torch.uint8} if "8bit" in name else {torch.float32})
    assert {v.dtype for v in opt.state[small].values() if torch.is_tensor(v) and v.numel() == small.numel()} == {torch.float32}
    # the pipeline's checkpoint (safetensors + JSON, bitsandbytes' nested states included) resumes it exactly
    from safetensors.torch import load_file, save_file

    from deltatune.pipeline.checkpoint import _flatten_optimizer, _unflatten_optimizer

    tensors, skeleton = _flatten_optimizer(opt.state_dict())
    save_file(tensors, str(tmp_path / "opt.safetensors"))
    params = [torch.nn.Parameter(big.detach().clone()), torch.nn.Parameter(small.detach().clone())]
    again = quant.bnb_optimizer(name, params, lr=1e-2, weight_decay=0.0)
    again.load_state_dict(_unflatten_optimizer(load_file(str(tmp_path / "opt.safetensors")), json.loads(json.dumps(skeleton))))
    for o, (b, s) in ((opt, (big, small)), (again, params)):
        ((b ** 2).sum() + (s ** 2).sum()).backward()
        o.step()
    assert torch.equal(params[0], big) and torch.equal(params[1], small)
    with pytest.raises(dt.DeltaError, match="not a bitsandbytes optimizer; choose one of adamw8bit"):
        quant.bnb_optimizer("adamw4bit", [big], lr=1e-2, weight_decay=0.0)


def test_load_base_quantises_the_body_and_keeps_heads():
    model = dt.load_base(checkpoint("llama"), quant="nf4", double_quant=False)
    assert quant.quant_kind(model.model.layers[0].mlp.down_proj) == "nf4"
    assert not model.model.layers[0].mlp.down_proj.weight.quant_state.nested
    assert type(model.lm_head) is torch.nn.Linear
    assert not model.model.layers[0].mlp.down_proj.support_avx512bf16_for_cpu
    int8 = dt.load_base(checkpoint("llama"), quant="int8", int8_threshold=4.0)
    assert int8.model.layers[0].mlp.down_proj.state.threshold == 4.0
    bert = dt.load_base(checkpoint("bert"), quant="fp4", task="seq_cls")
    assert quant.quant_kind(bert.bert.encoder.layer[0].attention.self.query) == "fp4"
    assert type(bert.classifier) is torch.nn.Linear  # a head trained whole stays full precision
    plain = dt.load_base(checkpoint("llama"))
    assert not quant.quantized_layers(plain)
    with pytest.raises(dt.DeltaError, match="quant = 'nf5' is not a quantisation; choose one of nf4, fp4, int8"):
        dt.load_base(checkpoint("llama"), quant="nf5")
    with pytest.raises(dt.DeltaError, match="task = 'lm' is not one of causal_lm, seq_cls, seq2seq"):
        dt.load_base(checkpoint("llama"), task="lm")
    with pytest.raises(dt.DeltaError, match="dtype = 'fp8' is not allowed"):
        dt.load_base(checkpoint("llama"), dtype="fp8")
    with pytest.raises(dt.DeltaError, match="cannot load '/nonexistent/model'"):
        dt.load_base("/nonexistent/model", quant="nf4")
    with pytest.raises(dt.DeltaError, match="int8_threshold = -1 must be >= 0"):
        quant.quantization_config("int8", int8_threshold=-1)


# ---------------------------------------------------------------- LoftQ


def _original_weight(arch: str, name: str) -> torch.Tensor:
    """The unquantised weight of `name` as (out, in): GPT-2's Conv1D stores (in, out), which a square
    weight (attn.c_proj) cannot show by its shape, so the module's type decides."""
    module = wide(arch).get_submodule(name)
    W = module.weight.detach()
    return W.T if type(module).__name__ == "Conv1D" else W


def _loftq_reference(arch: str, name: str, model: torch.nn.Module, r: int) -> torch.Tensor:
    """peft's own low-rank step (its SVD helper runs on the CPU) on W - Q: L R, what s B A must equal."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    W = _original_weight(arch, name)
    out = _low_rank_decomposition(W - quant.dequantize_weight(model.get_submodule(name)), reduced_rank=r)
    return out["L"] @ out["R"]


@pytest.mark.parametrize("arch,kind", [("llama", "nf4"), ("gpt2", "nf4"), ("t5", "nf4"), ("llama", "int8")])
def test_loftq_starts_lora_on_the_quantisation_error(arch, kind):
    model = quantized(arch, kind)
    quantised = {n for n, _ in quant.quantized_layers(model)}
    references = {n: _loftq_reference(arch, n, model, 4) for n in quantised}
    dt.attach(model, dt.LoraConfig(r=4, alpha=8, init="loftq", target_modules="all-linear", loftq_bits=8 if kind == "int8" else 4))
    for name, layer in model.named_modules():
        if not isinstance(layer, DeltaLayer):
            continue
        delta = layer.delta_weight("default").detach()
        if name not in quantised:  # T5's wo stays full precision: no error to start from, the plain init
            assert not delta.any()
            continue
        torch.testing.assert_close(delta, references[name], rtol=1e-4, atol=1e-5)  # peft's own SVD step
        W = _original_weight(arch, name)
        error = W - quant.dequantize_weight(layer.base_layer)
        singular = torch.linalg.svdvals(error)
        # s B A takes the r largest singular directions of W - Q off the error: ||W - Q - s B A||^2 = sum of the rest
        torch.testing.assert_close((error - delta).norm() ** 2, (singular[4:] ** 2).sum(), rtol=1e-3, atol=1e-6)
    model.train()
    losses = train(model, batch(arch), lr=5e-3)
    assert losses[-1] < losses[0] - 0.3


def test_loftq_brings_the_quantised_model_closer_to_the_unquantised_one():
    data = batch("llama")
    full = logits(wide("llama"), data)
    model = quantized("llama")
    before = relative(logits(model, data), full)
    dt.attach(model, dt.LoraConfig(r=16, alpha=32, init="loftq", target_modules="all-linear"))
    assert relative(logits(model, data), full) < 0.75 * before  # 0.109 -> 0.061 measured


def test_loftq_files_both_ways_with_peft(tmp_path, monkeypatch):
    import peft

    model = quantized("llama")
    dt.attach(model, dt.LoraConfig(r=4, alpha=8, init="loftq"))
    dt.save(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    # as peft's LoftQ recipe saves: the file holds A and B, so nothing is to be initialised on load (peft
    # would otherwise run LoftQ again, on CUDA only, over the quantised base layer's weight)
    assert saved["init_lora_weights"] is True and saved["loftq_config"] == {}
    assert "loftq_bits" not in saved and "loftq_iter" not in saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(quantized("llama"), tmp_path / "ours").eval()  # as written
    quant.keep_trainable_layouts(theirs)
    data = batch("llama")
    torch.testing.assert_close(logits(theirs, data), logits(model, data), rtol=0, atol=1e-5)
    # loading a LoftQ adapter initialises nothing: no checkpoint is read
    monkeypatch.setattr(quant, "checkpoint_weights", lambda *a: pytest.fail("a LoftQ file must not re-initialise"))
    again = quantized("llama")
    dt.load(again, tmp_path / "ours")
    torch.testing.assert_close(logits(again, data), logits(model, data), rtol=0, atol=0)
    # peft's LoftQ config file (init_lora_weights="loftq", written by peft's own config class) with peft's weights
    pm = _peft_model("llama", "nf4")
    pm.save_pretrained(tmp_path / "peft")
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=_targets("llama"), task_type="CAUSAL_LM", init_lora_weights="loftq",
                    loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=5)).save_pretrained(tmp_path / "peft")
    ours = quantized("llama")
    dt.load(ours, tmp_path / "peft")
    config = dt.attached(ours)["default"]
    assert (config.loftq_bits, config.loftq_iter) == (4, 5)
    torch.testing.assert_close(logits(ours, data), logits(pm, data), rtol=0, atol=1e-5)
    dt.save(ours, tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_loftq_errors(tmp_path):
    with pytest.raises(dt.DeltaError, match=r"no target is quantised \(model.layers.0.self_attn.q_proj is a Linear\); load"):
        dt.attach(wide("llama"), dt.LoraConfig(init="loftq"))
    with pytest.raises(dt.DeltaError, match="quantised in 4 bits \\(nf4\\).*set loftq_bits=4"):
        dt.attach(quantized("llama"), dt.LoraConfig(init="loftq", loftq_bits=8))
    with pytest.raises(dt.DeltaError, match="loftq_iter = 3: .*set loftq_iter=1"):
        dt.attach(quantized("llama"), dt.LoraConfig(init="loftq", loftq_iter=3))
    with pytest.raises(dt.DeltaError, match="LoraConfig.loftq_bits = 2 is not allowed: expected one of 4, 8"):
        dt.LoraConfig(init="loftq", loftq_bits=2)
    model = quantized("llama")
    model.name_or_path = str(tmp_path)  # a folder without the checkpoint
    before = [type(m) for m in model.modules()]
    with pytest.raises(dt.DeltaError, match="holds no model.safetensors"):
        dt.attach(model, dt.LoraConfig(init="loftq"))
    assert [type(m) for m in model.modules()] == before  # all or nothing
    model.name_or_path = "someone/not-in-the-cache"
    with pytest.raises(dt.DeltaError, match="neither a local folder nor in the local Hugging Face cache"):
        dt.attach(model, dt.LoraConfig(init="loftq"))


# ---------------------------------------------------------------- merged export


@pytest.mark.parametrize("arch,kind", [("llama", "nf4"), ("gpt2", "nf4"), ("t5", "nf4"), ("bert", "int8"), ("llama", "fp4")])
def test_merged_export_dequantises_then_merges_exactly(arch, kind, tmp_path):
    from deltatune.pipeline.export import export_merged

    model, _, before = trained(arch, kind)
    data = batch(arch)
    reference = copy.deepcopy(model)
    export_merged(model, None, tmp_path / "merged", dtype=torch.float32)
    assert_stored_equal(stored(model), before)  # the model is left as it was
    assert dt.active(model) == ["default"] and any(isinstance(m, DeltaLayer) and m.quantized for m in model.modules())
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    plain = WIDE[arch][1].from_pretrained(tmp_path / "merged").eval()
    assert not quant.quantized_layers(plain)
    # the exact reference: every quantised layer dequantised, the adapter unmerged on top
    quant.dequantize_model(reference, torch.float32)
    for _, layer in reference.named_modules():
        if isinstance(layer, DeltaLayer):
            layer.quantized = False
    expected = logits(reference, data)
    torch.testing.assert_close(logits(plain, data), expected, rtol=1e-5, atol=1e-5)
    if kind == "nf4":  # the same export re-quantised to NF4 loses what the README measures
        requantised = WIDE[arch][1].from_pretrained(tmp_path / "merged", quantization_config=quant.quantization_config("nf4"),
                                                             dtype=torch.float32)
        quant.keep_trainable_layouts(requantised)
        assert relative(logits(requantised.eval(), data), expected) > 1e-3


def test_merge_command_folds_a_qlora_adapter_into_the_unquantised_base(tmp_path):
    from deltatune.cli import main as cli

    model, _, _ = trained("llama", "nf4")
    dt.save(model, tmp_path / "adapter")
    assert cli(["merge", "--model", checkpoint("llama"), "--adapter", str(tmp_path / "adapter"),
                "--out", str(tmp_path / "merged"), "--dtype", "bf16"]) == 0
    plain = WIDE["llama"][1].from_pretrained(tmp_path / "merged", dtype="auto")  # the dtype config.json records
    assert plain.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    data = batch("llama")
    reference = wide("llama")
    dt.load(reference, tmp_path / "adapter")
    # the original weights + the adapter, rounded to bf16: no quantisation error at all
    assert relative(logits(plain.float().eval(), data), logits(reference, data)) < 0.01
    # a pre-quantised checkpoint as the base (like the hub's *-bnb-4bit models): dequantised, then merged
    quantized("llama").save_pretrained(tmp_path / "nf4-base")
    assert cli(["merge", "--model", str(tmp_path / "nf4-base"), "--adapter", str(tmp_path / "adapter"),
                "--out", str(tmp_path / "merged-from-nf4"), "--dtype", "fp32"]) == 0
    plain = WIDE["llama"][1].from_pretrained(tmp_path / "merged-from-nf4").eval()
    assert not quant.quantized_layers(plain)
    expected = assert_matches_the_dequantised_model(model, "nf4", data)  # the adapter on the dequantised NF4 base
    torch.testing.assert_close(logits(plain, data), expected, rtol=1e-4, atol=1e-4)
