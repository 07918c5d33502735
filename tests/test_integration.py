"""deltatune on an unwrapped model inside transformers' own machinery."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import deltatune as dt
from tiny_models import ARCHS, batch, build, logits


class FixedBatches(torch.utils.data.Dataset):
    def __init__(self, data):
        self.rows = [{k: v[i] for k, v in data.items()} for i in range(len(data["input_ids"]))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_transformers_trainer_trains_the_delta_only(tmp_path):
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=4, alpha=8))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = batch("llama")
    before = model(**data).loss.item()
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=10, learning_rate=2e-2, per_device_train_batch_size=2,
                                report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    tf.Trainer(model=model, args=args, train_dataset=FixedBatches(data)).train()
    model.eval()
    assert model(**data).loss.item() < before - 0.01
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_save_pretrained_of_a_merged_and_detached_model_reloads(tmp_path):
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=4, init="none"))
    data = batch("llama")
    expected = logits(model, data)
    dt.detach(model, merge=True)
    model.save_pretrained(tmp_path)
    reloaded = tf.LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, data), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "bart", "t5"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_reaches_every_delta(reentrant, arch):
    # Reentrant checkpointing (transformers' default through 4.57.x; 5.0 made it non-reentrant) passes no gradient into a block
    # none of whose inputs requires one; deltatune makes the embeddings' output require it, BART's encoder and decoder
    # embeddings too (in transformers 4.x modules of their own, tied to the shared one).
    # init="none": with B = 0 the gradient of A is exactly zero, which would hide a missing gradient
    for config in [dt.LoraConfig(r=4, init="none"), dt.PromptTuningConfig(num_virtual_tokens=3), dt.BitFitConfig()]:
        if isinstance(config, dt.BitFitConfig) and not ARCHS[arch].has_bias:
            continue
        model = build(arch)
        dt.attach(model, config)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if hasattr(model, "_require_grads_hook"):  # newer transformers does this itself; test ours alone
            model.disable_input_require_grads()
        model.train()
        model(**batch(arch)).loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), type(config).__name__


def test_checkpointing_still_reaches_a_delta_after_an_embedding_delta_is_detached():
    # the embedding hook must sit on the embedding itself, not on a LoRA wrapper that detach removes
    model = build("gpt2")
    dt.attach(model, dt.LoraConfig(r=4, init="none", target_modules=["wte"]), name="emb")
    dt.attach(model, dt.BitFitConfig(), name="bias")
    dt.detach(model, "emb")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if hasattr(model, "_require_grads_hook"):  # newer transformers does this itself; test ours alone
        model.disable_input_require_grads()
    model.train()
    model(**batch("gpt2")).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
