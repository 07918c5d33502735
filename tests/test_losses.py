"""The fused linear + cross-entropy (deltatune.losses): loss and every gradient equal the standard loss, on
tensors (chunks, ignored rows, label smoothing, soft-capping, bf16) and through whole models (llama, qwen2,
gpt2, Gemma 2's soft-capping, t5), with a delta on the head and with prompts prepended."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import deltatune as dt
from deltatune.config import DeltaError
from deltatune.losses import fused_linear_cross_entropy, lm_loss
from deltatune.tiny import build_model, build_tokenizer


def reference(hidden, weight, bias, labels, smoothing=0.0, softcap=None, scale=1.0):
    z = F.linear(hidden, weight, bias).float() * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), ignore_index=-100, label_smoothing=smoothing)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


@pytest.mark.parametrize("smoothing, softcap, scale", [(0.0, None, 1.0), (0.1, None, 1.0), (0.0, 5.0, 1.0), (0.1, 3.0, 0.5)])
def test_loss_and_gradients_equal_the_standard_loss(smoothing, softcap, scale):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    want = reference(hidden, weight, bias, labels, smoothing, softcap, scale)
    got = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, label_smoothing=smoothing, softcap=softcap,
                                     logit_scale=scale, chunk=4)  # several chunks, the last one short
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(got, [hidden, weight, bias]), grads(want, [hidden, weight, bias])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads(got, [hidden])[0][0, :3].abs().max() == 0  # an ignored row gets no gradient


def test_sum_and_token_weighted_reductions():
    torch.manual_seed(1)
    hidden, weight = torch.randn(10, 8), torch.randn(20, 8)
    labels = torch.randint(0, 20, (10,))
    total = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")
    torch.testing.assert_close(total, F.cross_entropy(hidden @ weight.T, labels, reduction="sum"))
    torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, labels, num_items=40), total / 40)


def test_a_low_rank_addend_trains_as_a_lora_on_the_head():
    torch.manual_seed(2)
    hidden = torch.randn(12, 16, requires_grad=True)
    weight, A, B = torch.randn(30, 16), torch.randn(4, 16, requires_grad=True), torch.randn(30, 4, requires_grad=True)
    labels = torch.randint(0, 30, (12,))
    want = F.cross_entropy(hidden @ weight.T + 0.5 * (hidden @ A.T) @ B.T, labels)
    got = fused_linear_cross_entropy(hidden, weight, labels, low_rank=(hidden @ A.T, B, 0.5), chunk=5)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, [hidden, A, B]), grads(want, [hidden, A, B])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_match_the_standard_bf16_path():
    torch.manual_seed(3)
    hidden = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(100, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 100, (64,))
    want = reference(hidden, weight, None, labels)
    got = fused_linear_cross_entropy(hidden, weight, labels, chunk=16)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    gh, gw = grads(got, [hidden, weight])
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    for a, b in zip((gh, gw), grads(want, [hidden, weight])):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("kwargs, match", [
    ({"labels": torch.tensor([0, 1, 2])}, r"do not line up"),
    ({"labels": torch.tensor([0, 1, 99, 3])}, r"label 99 is outside the vocabulary \(0\.\.19\)"),
    ({"reduction": "max"}, r"reduction = 'max'"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = {"hidden": torch.randn(4, 8), "weight": torch.randn(20, 8), "labels": torch.tensor([0, 1, 2, 3])} | kwargs
    with pytest.raises(DeltaError, match=match):
        fused_linear_cross_entropy(**args)


# ---------------------------------------------------------------- whole models


def gemma2(tokenizer):
    config = tf.Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0,
                             pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return tf.Gemma2ForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def model_for(arch, tokenizer):
    model = gemma2(tokenizer) if arch == "gemma2" else build_model(arch, tokenizer)
    if arch == "bart":  # its bias after the head starts at zero: give it values the loss must add
        model.final_logits_bias.normal_()
    return model


def batch_for(model, tokenizer):
    torch.manual_seed(4)
    ids = torch.randint(5, len(tokenizer), (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100  # answer-only
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels[1, 7:] = -100
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(5, len(tokenizer), (2, 5))}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def assert_same_as_standard(model, batch):
    trained = [p for p in model.parameters() if p.requires_grad]
    want = model(**batch).loss
    want_grads = grads(want, trained)
    got = lm_loss(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], grads(got, trained), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2", "t5", "bart"])
def test_every_weight_gets_the_standard_gradient(tokenizer, arch):
    model = model_for(arch, tokenizer).eval()  # dropout off (functional dropout too): both paths see one network
    assert_same_as_standard(model, batch_for(model, tokenizer))


@pytest.mark.parametrize("config", [
    lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], dropout=0.0),
    lambda: dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    lambda: dt.PromptTuningConfig(num_virtual_tokens=3),
], ids=["lora-on-head", "head-trained-whole", "prompt-tuning"])
def test_a_delta_trains_as_with_the_standard_loss(tokenizer, config):
    model = build_model("llama", tokenizer)
    dt.attach(model, config())
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # LoRA's B starts at zero: make every gradient path carry something
    model.eval()
    assert_same_as_standard(model, batch_for(model, tokenizer))


# ---------------------------------------------------------------- the pipeline's default


@pytest.mark.parametrize("arch, fmt, method", [("llama", "instruction", "lora"), ("t5", "instruction", "lora"),
                                               ("gpt2", "instruction", "full")])
def test_the_pipeline_trains_the_same_with_the_fused_and_the_standard_loss(tmp_path, arch, fmt, method):
    import json

    from safetensors.torch import load_file

    from deltatune.pipeline.config import load_run_config
    from deltatune.pipeline.train import run
    from pipeline_models import save_tiny, write_jsonl

    rows = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in ["alpha", "beta", "gamma", "delta"] * 4]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    results = {}
    for loss in ("fused", "standard"):
        config = load_run_config(None, {"model.name": str(save_tiny(tmp_path, arch)), "data.train": str(data),
                                        "data.format": fmt, "model.task": "seq2seq" if arch == "t5" else "causal_lm",
                                        "method": method, "train.max_steps": 8, "train.batch_size": 4, "train.scheduler": "constant",
                                        "train.lr": 3e-2 if method == "lora" else 1e-3,
                                        "train.log_every": 1, "train.progress": False, "train.loss": loss,
                                        "output.dir": str(tmp_path / loss)})
        out = run(config, echo=lambda *a, **k: None).output_dir
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        folder = out / "adapter"
        weights = folder / ("adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors")
        results[loss] = ([r["loss"] for r in log if "loss" in r], load_file(str(weights)))
    (fused_losses, fused_weights), (standard_losses, standard_weights) = results["fused"], results["standard"]
    assert fused_losses == pytest.approx(standard_losses, rel=1e-4) and fused_losses[-1] < fused_losses[0]
    # 8 AdamW steps at lr 3e-2 move weights by up to ~0.2, and Adam's normalisation magnifies float noise in
    # near-zero gradients (up to 1.2e-3 on transformers 4.56's t5): the same trajectory, not the same bits
    for key, value in standard_weights.items():
        torch.testing.assert_close(fused_weights[key], value, rtol=1e-2, atol=5e-3)


# ---------------------------------------------------------------- the planner models the loss that runs


def test_the_planner_models_the_fused_loss_and_says_what_the_standard_one_would_hold():
    config = tf.Qwen2Config(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    standard = dt.plan(config, "lora", batch=1, seq=2048, dtype="fp32", device="cpu", loss="standard", search=False,
                       task="causal_lm")
    fused = dt.plan(config, "lora", batch=1, seq=2048, dtype="fp32", device="cpu", loss="fused", search=False,
                    task="causal_lm")
    # four logit-sized fp32 buffers (2048 x 151,936 x 4 bytes = 1.16 GiB each) against one chunk at a time
    assert standard.logits > 2 * 2048 * 151_936 * 4 and fused.logits < standard.logits / 10
    assert fused.total < standard.total
    assert any("loss: fused" in note and "standard loss would hold" in note for note in fused.notes)


def test_label_smoothing_is_a_run_setting_of_the_fused_loss(tmp_path):
    from deltatune.pipeline.config import ConfigError, load_run_config

    base = {"model.name": "m", "data.train": "x.jsonl", "output.dir": str(tmp_path / "o")}
    assert load_run_config(None, {**base, "train.label_smoothing": 0.1}).train.label_smoothing == 0.1
    with pytest.raises(ConfigError, match=r"train\.label_smoothing = 0\.1 is applied by the fused loss.*train\.loss: fused"):
        load_run_config(None, {**base, "train.label_smoothing": 0.1, "train.loss": "standard"})
    with pytest.raises(ConfigError, match=r"train\.label_smoothing"):
        load_run_config(None, {**base, "train.label_smoothing": 1.0})
    model = build_model("llama", build_tokenizer()).eval()
    batch = batch_for(model, build_tokenizer())
    logits = model(**batch).logits[:, :-1].float()
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(lm_loss(model, batch, label_smoothing=0.1), want, rtol=1e-5, atol=1e-6)
