"""The vLLM-ready adapter folder: every module's scale folded into B with a file-wide scale of 1, PiSSA written on
the original base, what servers refuse refused here first; the real peft package loads the folder onto a fresh
base and computes what the deltatune model computed."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.config import DeltaError
from deltatune.export.vllm import export_vllm
from deltatune.tiny import build_model, build_tokenizer
from pipeline_models import save_tiny

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def trained(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def peft_logits(base: torch.nn.Module, folder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(base, str(folder)).eval()(input_ids=ids).logits


IDS = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))


def test_per_module_scales_fold_into_b_and_peft_computes_the_same(tmp_path, tokenizer):
    base = build_model("llama", tokenizer)
    model = copy.deepcopy(base)
    dt.attach(model, dt.LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                                   rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}))
    trained(model)
    result = export_vllm(model, tmp_path / "vllm")
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["use_rslora"] is False
    # the rank-2 modules say so twice, so a reader that honours the patterns also gets a scale of 1
    assert set(config["rank_pattern"].values()) == {2} and config["rank_pattern"] == config["alpha_pattern"]
    assert not config.get("use_dora") and not config.get("modules_to_save")
    assert result.rank == 4 and result.max_lora_rank == 8 and result.drift.max_abs_logit < 1e-5
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    torch.testing.assert_close(peft_logits(base, tmp_path / "vllm", IDS), expected, atol=1e-5, rtol=1e-5)
    assert "--enable-lora --lora-modules sql=" in result.command("BASE", "sql")


def test_pissa_is_written_on_the_original_base(tmp_path, tokenizer):
    base = build_model("llama", tokenizer)
    model = copy.deepcopy(base)
    dt.attach(model, dt.LoraConfig(r=4, alpha=8, init="pissa", target_modules=["q_proj", "v_proj"]))
    trained(model)
    result = export_vllm(model, tmp_path / "vllm")
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # rank 2r, a plain LoRA
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    torch.testing.assert_close(peft_logits(base, tmp_path / "vllm", IDS), expected, atol=1e-5, rtol=1e-5)
    assert result.drift.max_abs_logit < 1e-5


def test_what_vllm_refuses_is_refused_with_the_alternative(tmp_path, tokenizer):
    cases = [(dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
             (dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "whole modules"),
             (dt.LoraConfig(r=4, target_modules=["embed_tokens"]), "embedding"),
             (dt.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]), "ia3")]
    for config, words in cases:
        model = build_model("llama", tokenizer)
        dt.attach(model, config)
        with pytest.raises(DeltaError, match=f"{words}.*deltatune merge"):
            export_vllm(model, tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_command_writes_the_folder_and_prints_how_to_serve_it(tmp_path, tokenizer, capsys):
    base = save_tiny(tmp_path, "qwen2")
    model = type(build_model("qwen2", tokenizer)).from_pretrained(base)
    dt.attach(model, dt.LoraConfig(r=32, alpha=16, target_modules=["q_proj", "v_proj"]))
    trained(model)
    dt.save(model, tmp_path / "adapter")
    out = tmp_path / "served"
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--format", "vllm"]) == 0
    printed = capsys.readouterr().out
    assert f"vllm serve {base} --enable-lora --lora-modules adapter={out} --max-lora-rank 32" in printed
    assert "drift from the unmerged model" in printed
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".served")]  # no staging folder left behind
    # a second call without --overwrite leaves the folder alone
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--format", "vllm"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--model", str(base), "--out", str(tmp_path / "x"), "--format", "vllm"]) == 2
    assert "--adapter" in capsys.readouterr().err
