"""Prompt tuning (inputs, inits, generate) and BitFit (selection, errors, switching)."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tiny_models import batch, build, logits
from test_lora import perturb


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_prompt_tuning_generate_matches_uncached_forward(arch):
    model = build(arch)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4, init="sample_vocab"))
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    # Each cached decoding step scores the next token exactly as one uncached forward over
    # prompt + text so far does (the virtual tokens shift every position by 4).
    with torch.no_grad():
        full = model(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences), use_cache=False).logits
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, full[:, 4 + 5 + step - 1], rtol=0, atol=1e-5)
    with dt.disabled(model):
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               output_scores=True, return_dict_in_generate=True)
    assert not torch.allclose(plain.scores[0], out.scores[0])


def test_prompt_tuning_seq2seq_generate_uses_the_prompt():
    model = build("t5")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4, init="sample_vocab"))
    ids = torch.randint(3, 96, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    # teacher-forced forward over the generated tokens picks the same next tokens
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=generated[:, :-1]).logits
    assert torch.equal(out.argmax(-1), generated[:, 1:])


def test_prompt_mask_and_labels_are_extended():
    model = build("llama")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=3))
    seen = {}
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    data = batch("llama")
    out = model(**data)
    assert seen["inputs_embeds"].shape[1] == 3 + 8 and seen["attention_mask"].shape == (2, 11)
    assert seen["attention_mask"][:, :3].eq(1).all()
    assert out.logits.shape == (2, 11, 96)
    # no loss on virtual positions: the last virtual token predicts the first real one, and so on
    shifted = out.logits[:, 2:-1].reshape(-1, 96)
    labels = data["labels"].reshape(-1)
    expected = torch.nn.functional.cross_entropy(shifted, labels, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_prompt_init_from_text_and_vocabulary():
    model = build("llama")

    class Tokenizer:
        def __call__(self, text):
            return {"input_ids": [5, 6, 7]}

    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="abc", tokenizer=Tokenizer()))
    table = model.get_input_embeddings().weight
    torch.testing.assert_close(model.prompt_embeddings["default"], table[[5, 6, 7, 5, 6]])
    assert "tokenizer" not in dt.attached(model)["default"].to_dict()
    torch.manual_seed(0)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4, init="sample_vocab"), name="vocab")
    rows = model.prompt_embeddings["vocab"]
    assert all(any(torch.equal(row, t) for t in table) for row in rows)
    with pytest.raises(dt.DeltaError, match="needs init_text"):
        dt.PromptTuningConfig(init="text")


def test_prompt_fills_model_dims_for_peft():
    model = build("t5")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4))
    config = dt.attached(model)["default"]
    assert (config.token_dim, config.num_transformer_submodules, config.num_layers, config.num_attention_heads) == (32, 2, 2, 4)
    assert model.prompt_embeddings["default"].shape == (4, 32)  # only the encoder's rows train


def test_bitfit_on_a_model_without_biases_is_a_clear_error():
    model = build("llama")
    with pytest.raises(dt.DeltaError, match="LlamaForCausalLM has no bias terms, so BitFit has nothing to train"):
        dt.attach(model, dt.BitFitConfig())
    assert "_deltatune_state" not in model.__dict__


def test_bitfit_chosen_modules_and_unmatched_names():
    model = build("bert")
    dt.attach(model, dt.BitFitConfig(target_modules=["query"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("classifier")} == {
        f"bert.encoder.layer.{i}.attention.self.query.bias" for i in range(2)}
    with pytest.raises(dt.DeltaError, match="matched no module with a bias; modules with biases: .*query"):
        dt.attach(build("bert"), dt.BitFitConfig(target_modules=["q_proj"]))


def test_bitfit_with_lora_on_the_same_layers():
    model = build("bert")
    data = batch("bert")
    base = logits(model, data)
    dt.attach(model, dt.BitFitConfig(), name="bias")
    perturb(model)
    dt.attach(model, dt.LoraConfig(r=2, init="none"), name="lora")
    dt.set_active(model, ["bias", "lora"])
    both = logits(model, data)
    dt.set_active(model, "lora")
    only_lora = logits(model, data)
    assert not torch.allclose(both, only_lora)
    dt.set_active(model, ["bias", "lora"])
    torch.testing.assert_close(logits(model, data), both, rtol=0, atol=0)
    dt.detach(model)
    torch.testing.assert_close(logits(model, data), base, rtol=0, atol=0)


def test_loading_a_text_initialised_prompt_needs_no_tokenizer(tmp_path):
    model = build("llama")

    class Tokenizer:
        def __call__(self, text):
            return {"input_ids": [5, 6]}

    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=3, init="text", init_text="hi", tokenizer=Tokenizer(),
                                           tokenizer_name_or_path="/nonexistent/tokenizer"))
    perturb(model)
    dt.save(model, tmp_path)
    fresh = dt.load(build("llama"), tmp_path)  # the saved rows are used; no tokenizer is loaded
    data = batch("llama")
    torch.testing.assert_close(logits(fresh, data), logits(model, data), rtol=0, atol=0)
    assert dt.attached(fresh)["default"].init == "text"
