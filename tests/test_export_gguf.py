"""GGUF export: the file holds the merged model under llama.cpp's names and RoPE convention, with its tokenizer,
the drift check reads it back, and the command refuses what it cannot write without writing anything."""

from __future__ import annotations

import copy
import errno
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

import deltatune as dt  # noqa: E402
from deltatune.cli import main  # noqa: E402
from deltatune.config import DeltaError  # noqa: E402
from deltatune.export.gguf import _pairs_permutation, export_gguf, read_gguf_weights  # noqa: E402
from deltatune.files import WriteFailed  # noqa: E402
from deltatune.api import get_state  # noqa: E402
from deltatune.tiny import build_model, build_tokenizer  # noqa: E402
from pipeline_models import save_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def lora_model(arch: str, tokenizer, **overrides) -> torch.nn.Module:
    """A tiny model with a LoRA on every attention projection, its B moved off zero (as after training)."""
    model = build_model(arch, tokenizer, **overrides)
    dt.attach(model, dt.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def field(path: Path, key: str):
    value = gguf.GGUFReader(path).fields[key]
    return value.contents()


# --- the RoPE convention, checked against transformers' own rotation (not against our reader) --------------------

def rope_pairs(x: torch.Tensor, position: int, base: float) -> torch.Tensor:
    """llama.cpp's rotation for its `llama` architecture: adjacent pairs (x[2j], x[2j+1]) by angle pos * base^(-2j/d)."""
    d = x.shape[-1]
    angle = position * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    even, odd = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty(x.shape, dtype=torch.float64)
    out[..., 0::2] = even * angle.cos() - odd * angle.sin()
    out[..., 1::2] = odd * angle.cos() + even * angle.sin()
    return out


def test_permuted_rows_under_pairs_rope_equal_transformers_rotation_permuted():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, d, position, base = 3, 8, 5, 10000.0
    q = torch.randn(1, heads, 1, d, dtype=torch.float64)  # (B, heads, T, d): one head's rows of q_proj's output
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat([position * inv, position * inv])[None, None, :]  # transformers' halves layout, (1, T, d)
    hf, _ = apply_rotary_pos_emb(q, q, emb.cos(), emb.sin())
    perm = _pairs_permutation(heads * d, heads)  # over q_proj's rows, head after head
    q_rows, hf_rows = q.reshape(-1), hf.reshape(-1)
    cpp = rope_pairs(q_rows[perm].reshape(heads, d), position, base).reshape(-1)
    torch.testing.assert_close(cpp, hf_rows[perm])  # the same rotated vector, in the permuted order
    # hence every q.k product attention takes is unchanged
    k = torch.randn(1, heads, 1, d, dtype=torch.float64)
    _, hf_k = apply_rotary_pos_emb(k, k, emb.cos(), emb.sin())
    cpp_k = rope_pairs(k.reshape(-1)[perm].reshape(heads, d), position, base)
    torch.testing.assert_close((cpp.reshape(heads, d) * cpp_k).sum(-1), (hf * hf_k).sum(-1).reshape(heads))


# --- what the file holds ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_f32_file_is_the_merged_model_and_reads_back_exactly(tmp_path, tokenizer, arch):
    model = lora_model(arch, tokenizer)
    before = copy.deepcopy(model.state_dict())
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    # the model is left as it was: unmerged, delta attached
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert get_state(model).deltas and not get_state(model).merged()
    assert report.drift.max_abs_logit < 1e-4 and report.drift.top1_agreement == 1.0
    merged = dt.detach(copy.deepcopy(model), merge=True)
    held = tensors(tmp_path / "m.gguf")
    q = torch.from_numpy(held["blk.1.attn_q.weight"].data.copy())
    expected = merged.model.layers[1].self_attn.q_proj.weight.detach()
    if arch in ("llama", "mistral"):  # llama.cpp's llama architecture: q rows in adjacent-pairs order
        expected = expected[_pairs_permutation(expected.shape[0], model.config.num_attention_heads)]
    torch.testing.assert_close(q.reshape(expected.shape), expected)
    down = torch.from_numpy(held["blk.0.ffn_down.weight"].data.copy())
    torch.testing.assert_close(down.reshape(-1), merged.model.layers[0].mlp.down_proj.weight.detach().reshape(-1))
    assert ("blk.0.attn_q.bias" in held) == (arch == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in held) == (arch == "qwen3")  # Qwen3's per-head q/k norms
    prefix = {"mistral": "llama"}.get(arch, arch)  # llama.cpp runs Mistral as its llama architecture
    assert field(tmp_path / "m.gguf", "general.architecture") == prefix
    assert field(tmp_path / "m.gguf", f"{prefix}.block_count") == model.config.num_hidden_layers
    assert field(tmp_path / "m.gguf", f"{prefix}.attention.head_count_kv") == model.config.num_key_value_heads
    state = read_gguf_weights(tmp_path / "m.gguf", model.config)
    torch.testing.assert_close(state["model.layers.1.self_attn.k_proj.weight"],
                               merged.model.layers[1].self_attn.k_proj.weight.detach())


def test_the_drift_check_sees_a_wrong_fold(tmp_path, tokenizer):
    """A file written without the delta differs from the unmerged model: the check measures, it does not assume."""
    model = lora_model("llama", tokenizer)
    with dt.disabled(model):
        export_gguf(model, tokenizer, tmp_path / "base.gguf", "f32", check=False)
    from deltatune.export.gguf import measure_drift

    drift = measure_drift(model, tmp_path / "base.gguf")
    assert drift.max_abs_logit > 1e-2 and drift.mean_kl > 0


def test_quantised_types_cost_a_little_drift_and_less_space(tmp_path, tokenizer):
    model = lora_model("llama", tokenizer, width=64)
    reports = {kind: export_gguf(model, tokenizer, tmp_path / f"{kind}.gguf", kind) for kind in ("f16", "bf16", "q8_0")}
    assert reports["q8_0"].bytes < reports["f16"].bytes
    assert tensors(tmp_path / "q8_0.gguf")["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors(tmp_path / "q8_0.gguf")["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    for report in reports.values():
        assert 0 < report.drift.max_abs_logit < 0.1 and report.drift.mean_kl < 1e-3
    assert reports["q8_0"].drift.max_abs_logit > reports["f16"].drift.max_abs_logit


def test_tokenizer_is_in_the_file(tmp_path, tokenizer):
    # an embedding padded past the tokenizer, as Qwen's is: the extra rows get unused placeholder tokens
    model = lora_model("qwen2", tokenizer, vocab_size=len(tokenizer) + 5)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", check=False)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == model.config.vocab_size
    assert tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert set(types[len(tokenizer):]) == {gguf.TokenType.UNUSED}
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 100


def test_tied_embeddings_write_no_output_tensor(tmp_path, tokenizer):
    model = lora_model("qwen2", tokenizer, tie_word_embeddings=True)
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert "output.weight" not in tensors(tmp_path / "m.gguf")
    assert report.drift.max_abs_logit < 1e-4


def test_llama3_rope_scaling_writes_transformers_frequencies(tmp_path, tokenizer):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = lora_model("llama", tokenizer, rope_scaling=scaling, max_position_embeddings=512)
    if getattr(model.config, "rope_parameters", None) is not None:  # transformers 5 spells it so
        model.config.rope_parameters = {**model.config.rope_parameters, **scaling}
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    factors = torch.from_numpy(tensors(tmp_path / "m.gguf")["rope_freqs.weight"].data.copy())
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    torch.testing.assert_close(factors, plain / scaled, rtol=1e-5, atol=1e-6)
    assert report.drift.max_abs_logit < 1e-4


def test_refusals_name_the_problem(tmp_path, tokenizer):
    gpt2 = build_model("gpt2", tokenizer)
    with pytest.raises(DeltaError, match="'gpt2'.*deltatune merge"):
        export_gguf(gpt2, tokenizer, tmp_path / "m.gguf")
    prompt = build_model("llama", tokenizer)
    dt.attach(prompt, dt.PromptTuningConfig(num_virtual_tokens=4))
    with pytest.raises(DeltaError, match="cannot be merged"):
        export_gguf(prompt, tokenizer, tmp_path / "m.gguf")
    with pytest.raises(DeltaError, match="q4_k.*f32, f16"):
        export_gguf(lora_model("llama", tokenizer), tokenizer, tmp_path / "m.gguf", "q4_k")
    assert not (tmp_path / "m.gguf").exists()


def test_a_failed_write_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(WriteFailed, match="the disk is full.*Nothing was half-written"):
        export_gguf(lora_model("llama", tokenizer), tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# --- the command ---------------------------------------------------------------------------------------------------

def test_command_exports_an_adapter_and_refuses_to_overwrite(tmp_path, tokenizer, capsys):
    base = save_tiny(tmp_path, "llama")
    model = build_model("llama", tokenizer)
    model = type(model).from_pretrained(base)
    dt.attach(model, dt.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    dt.save(model, tmp_path / "adapter")
    out = tmp_path / "m.gguf"
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--type", "f32"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "drift from the unmerged model: max |Δlogit|" in printed
    state = read_gguf_weights(out, model.config)
    merged = dt.detach(copy.deepcopy(model), merge=True)
    torch.testing.assert_close(state["model.layers.0.self_attn.v_proj.weight"],
                               merged.model.layers[0].self_attn.v_proj.weight.detach())
    stamp = out.stat().st_mtime_ns
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp
    assert main(["export", "--model", str(base), "--out", str(tmp_path / "m.bin")]) == 2
    assert "ends in .gguf" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["export", "--model", str(save_tiny(tmp_path, "gpt2")), "--out", str(tmp_path / "g.gguf")]) == 2
    assert "'gpt2'" in capsys.readouterr().err and not (tmp_path / "g.gguf").exists()


# --- a LoRA adapter alone, for llama.cpp's --lora --------------------------------------------------------------------

def test_lora_file_folds_each_modules_scale_so_llama_cpp_alpha_over_r_gives_it_back(tmp_path, tokenizer):
    from deltatune.export.gguf import export_gguf_lora, read_gguf_lora

    model = build_model("llama", tokenizer)
    # every scale differs: rsLoRA (alpha / sqrt(r)), a rank and an alpha pattern
    dt.attach(model, dt.LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                   rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    report = export_gguf_lora(model, tmp_path / "a.gguf")
    assert report.drift.max_abs_logit < 1e-4 and report.drift.top1_agreement == 1.0
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    held = {t.name: t for t in reader.tensors}
    assert len(held) == 2 * 4 * model.config.num_hidden_layers
    layer = model.model.layers[1].self_attn.v_proj
    A = torch.from_numpy(held["blk.1.attn_v.weight.lora_a"].data.copy())
    B = torch.from_numpy(held["blk.1.attn_v.weight.lora_b"].data.copy())
    assert A.shape == (2, 32) and B.shape == (16, 2)  # as llama.cpp checks: lora_a (r, in), lora_b (out, r)
    # llama.cpp's alpha / r, with r the rows of lora_a, times the written B, is deltatune's scale times its B
    torch.testing.assert_close((alpha / 2) * B, layer.scaling["default"] * layer.lora_B["default"].weight.detach())
    # and the update the reader rebuilds is exactly what the layer adds, for the rope-permuted q too
    updates = read_gguf_lora(tmp_path / "a.gguf", model.config)
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(updates["model.layers.0.self_attn.q_proj.weight"], q.delta_weight("default"))


def test_lora_file_refuses_what_it_cannot_carry(tmp_path, tokenizer):
    from deltatune.export.gguf import export_gguf_lora

    cases = [(dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
             (dt.LoraConfig(r=4, target_modules=["q_proj"], init="pissa"), "PiSSA"),
             (dt.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]), "ia3"),
             (dt.LoraConfig(r=4, target_modules=["embed_tokens"]), "embedding")]
    for config, words in cases:
        model = build_model("llama", tokenizer)
        dt.attach(model, config)
        with pytest.raises(DeltaError, match=words):
            export_gguf_lora(model, tmp_path / "a.gguf")
    model = build_model("llama", tokenizer)
    dt.attach(model, dt.LoraConfig(r=4, target_modules=["q_proj"]), name="one")
    dt.attach(model, dt.LoraConfig(r=4, target_modules=["v_proj"]), name="two")
    dt.set_active(model, ["one", "two"])
    with pytest.raises(DeltaError, match="2 deltas are active"):
        export_gguf_lora(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_command_writes_a_lora_file(tmp_path, tokenizer, capsys):
    base = save_tiny(tmp_path, "qwen2")
    model = type(build_model("qwen2", tokenizer)).from_pretrained(base)
    dt.attach(model, dt.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    dt.save(model, tmp_path / "adapter")
    out = tmp_path / "a.gguf"
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--format", "gguf-lora", "--type", "f32"]) == 0
    assert "drift from the unmerged model" in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["general.type"].contents() == "adapter"
    assert main(["export", "--model", str(base), "--out", str(tmp_path / "b.gguf"), "--format", "gguf-lora"]) == 2
    assert "--adapter" in capsys.readouterr().err


def test_a_bf16_model_is_merged_and_checked_at_its_own_dtype(tmp_path, tokenizer):
    model = lora_model("llama", tokenizer).to(torch.bfloat16)
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    # the file's model runs in bf16 as the model does: the drift is bf16's rounding, not a wrong weight
    assert report.drift.max_abs_logit < 0.1 and report.drift.top1_agreement >= 0.9
    assert next(model.parameters()).dtype == torch.bfloat16 and get_state(model).deltas
