"""P-tuning, prefix tuning, P-tuning v2 and prompt ensembles: the math, generate, padding,
checkpointing, files. Parity with the peft package is in test_peft_compat.py."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune.methods.prefix import _PrefixCheckpoint
from tiny_models import VOCAB, ChatGLMStyleConfig, ChatGLMStyleForCausalLM, batch, build, logits
from test_lora import perturb

N = 3


def _left_padded(seed: int = 0, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions as generate() numbers them from a 2-D mask (padding at 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------- prefix tuning: the math


def _hand_prefixes(matrix: torch.Tensor, layers: int, heads: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Layer l's keys and values, element by element from P's columns: K_l[b, h, i, d] = P[i, 2 l w + h D + d]."""
    n, width = matrix.shape
    w = width // (2 * layers)
    head_dim = w // heads
    out = []
    for layer in range(layers):
        keys = torch.stack([matrix[:, 2 * layer * w + h * head_dim: 2 * layer * w + (h + 1) * head_dim] for h in range(heads)])
        values = torch.stack([matrix[:, (2 * layer + 1) * w + h * head_dim: (2 * layer + 1) * w + (h + 1) * head_dim]
                              for h in range(heads)])
        out.append((keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)))  # (B, H, n, D)
    return out


@pytest.mark.parametrize("arch", ["llama", "chatglm"])
def test_prefix_is_keys_and_values_in_front_of_every_layer(arch):
    model = build(arch)
    data = {k: v for k, v in batch(arch).items() if k != "labels"}
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=N, projection_hidden_size=8))
    config = dt.attached(model)["default"]
    rows, projection = model.prefix_embeddings["default"], model.prefix_projection["default"]
    W1, b1, W2, b2 = projection[0].weight, projection[0].bias, projection[2].weight, projection[2].bias
    with torch.no_grad():
        matrix = torch.tanh(rows @ W1.T + b1) @ W2.T + b2  # (n, L 2 w)
        ours = model(**data).logits
        base = build(arch)
        kv = _hand_prefixes(matrix, config.num_layers, config.num_attention_heads, 2)
        if arch == "llama":  # GQA: 2 kv heads of 8, so w = 16
            assert (config.token_dim, config.num_attention_heads) == (16, 2) and rows.shape == (N, 16)
            cache = tf.DynamicCache(kv)
        else:
            cache = tuple(kv)
        mask = torch.cat([torch.ones(2, N, dtype=torch.long), data["attention_mask"]], 1)
        expected = base(input_ids=data["input_ids"], attention_mask=mask, past_key_values=cache).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_p_tuning_v2_on_the_chatglm_style_model_trains_the_prefixes_only(tmp_path):
    model = build("chatglm")
    data = batch("chatglm")
    dt.attach(model, dt.PTuningV2Config(num_virtual_tokens=4))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prefix_embeddings.default"}
    assert model.prefix_embeddings["default"].shape == (4, 2 * 2 * 32)  # n x (L 2 w): 2 layers, width 32
    opt = torch.optim.Adam([model.prefix_embeddings["default"]], lr=0.1)
    losses = []
    for _ in range(10):
        loss = model(**data).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.01
    dt.save(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["prefix_projection"] is False
    torch.testing.assert_close(logits(dt.load(build("chatglm"), tmp_path), data), logits(model, data), rtol=0, atol=0)


def test_prefix_tuning_refuses_a_model_that_takes_no_cache():
    class NoCache(ChatGLMStyleForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
            return super().forward(input_ids, attention_mask, inputs_embeds, labels)

    model = NoCache(ChatGLMStyleConfig())
    for config, name in ((dt.PrefixTuningConfig(num_virtual_tokens=2), "prefix tuning"),
                         (dt.PTuningV2Config(num_virtual_tokens=2), "P-tuning v2")):
        with pytest.raises(dt.DeltaError, match=rf"{name} passes its prefixes as past_key_values, but NoCache.forward takes "
                                                rf"no past_key_values argument, so {name} cannot work on this architecture"):
            dt.attach(model, config)
    assert "_deltatune_state" not in model.__dict__ and not hasattr(model, "prefix_embeddings")


class _NamedArgsHead(tf.BertForSequenceClassification):
    """A task head as transformers 4.x writes them: named arguments only, no cache among them."""

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _named_args_head() -> _NamedArgsHead:
    bert = build("bert")
    head = _NamedArgsHead(bert.config).eval()
    head.load_state_dict(bert.state_dict())
    return head


def test_prefixes_reach_the_base_model_of_a_head_that_takes_no_cache():
    model = _named_args_head()
    dt.attach(model, dt.PTuningV2Config(num_virtual_tokens=N))
    perturb(model, scale=0.5)
    config = dt.attached(model)["default"]
    data = batch("bert")
    with torch.no_grad():
        ours = model(**data).logits
        base = build("bert")
        kv = _hand_prefixes(model.prefix_embeddings["default"], config.num_layers, config.num_attention_heads, 2)
        mask = torch.cat([torch.ones(2, N, dtype=torch.long), data["attention_mask"]], 1)
        pooled = base.bert(input_ids=data["input_ids"], attention_mask=mask, past_key_values=tf.DynamicCache(kv)).pooler_output
        expected = base.classifier(pooled)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, logits(base, data), atol=1e-3)
    model.train()
    model(**data).loss.backward()
    assert model.prefix_embeddings["default"].grad.abs().sum() > 0
    assert not model.bert._forward_pre_hooks  # the per-forward hook on the base model is gone


def test_prefix_tuning_refuses_a_head_and_base_model_that_take_no_cache():
    class NarrowBase(tf.BertModel):
        def forward(self, input_ids=None, attention_mask=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask)

    model = _named_args_head()
    model.bert = NarrowBase(model.config)
    with pytest.raises(dt.DeltaError, match=r"_NamedArgsHead.forward takes no past_key_values argument \(nor does its base "
                                            r"model's, NarrowBase.forward\), so P-tuning v2 cannot work on this architecture"):
        dt.attach(model, dt.PTuningV2Config(num_virtual_tokens=2))
    assert "_deltatune_state" not in model.__dict__ and not hasattr(model, "prefix_embeddings")


def test_prefix_tuning_refuses_decoders_deeper_than_their_encoder():
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                      num_decoder_layers=3, num_heads=4, decoder_start_token_id=0))
    with pytest.raises(dt.DeltaError, match="its decoder has 3 layers and its encoder 2; peft's prefix layout"):
        dt.attach(model, dt.PTuningV2Config(num_virtual_tokens=2))


def test_prefix_projection_trains_and_only_the_prefix_is_saved(tmp_path):
    model = build("llama")
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=N, projection_hidden_size=8))
    # E (3 x 16) + Linear(16 -> 8) + Linear(8 -> 2 layers x 2 x 16)
    assert dt.summary(model, print_table=False).trainable == 3 * 16 + (16 * 8 + 8) + (8 * 64 + 64)
    dt.save(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (N, 64)
    loaded = dt.load(build("llama"), tmp_path, trainable=True)
    assert dt.summary(loaded, print_table=False).trainable == N * 64  # the prefixes alone
    assert not hasattr(loaded, "prefix_projection")
    data = batch("llama")
    torch.testing.assert_close(logits(loaded, data), logits(model, data), rtol=0, atol=0)
    dt.save(loaded, tmp_path / "again")  # a loaded adapter saves the same prefix again
    assert torch.equal(load_file(tmp_path / "again" / "adapter_model.safetensors")["prompt_embeddings"],
                       saved["prompt_embeddings"])


# ---------------------------------------------------------------- prefix tuning: generate and padding

DECODERS = ["llama", "gpt2", "opt", "bloom", "gpt_neox", "gpt_bigcode", "qwen2"]


@pytest.mark.parametrize("arch", DECODERS)
def test_prefix_generate_matches_uncached_forward_with_left_padding(arch):
    model = build(arch)
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=N, projection_hidden_size=8))
    perturb(model, scale=0.5)
    ids, mask = _left_padded()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
    with torch.no_grad():  # one uncached forward over prompt + text so far, positions numbered as generate does
        full = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=_positions(full_mask),
                     use_cache=False).logits
        alone = model.generate(input_ids=ids[1:, 2:], max_new_tokens=6, do_sample=False, pad_token_id=0,
                               output_scores=True, return_dict_in_generate=True)
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, full[:, 6 + step - 1], rtol=0, atol=1e-4)
        torch.testing.assert_close(scores[1], alone.scores[step][0], rtol=0, atol=1e-4)  # the padded row as if alone
    with dt.disabled(model):
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               output_scores=True, return_dict_in_generate=True)
    assert not torch.allclose(plain.scores[0], out.scores[0])


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("config", [dt.PrefixTuningConfig(num_virtual_tokens=N), dt.PTuningV2Config(num_virtual_tokens=N)],
                         ids=["prefix", "p_tuning_v2"])
def test_prefix_seq2seq_generate_matches_teacher_forcing(arch, config):
    model = build(arch)
    dt.attach(model, config)
    perturb(model, scale=0.5)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        forced = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1], use_cache=False).logits
    for step, scores in enumerate(out.logits):  # raw logits: BART's generation config forces some tokens
        torch.testing.assert_close(scores, forced[:, step], rtol=0, atol=1e-4)
    with dt.disabled(model):
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
    assert not torch.allclose(plain.logits[0], out.logits[0])


def _classifier(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
        return tf.LlamaForSequenceClassification(config).eval()
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=3, pad_token_id=0)
    return tf.GPT2ForSequenceClassification(config).eval()


SOFT = {
    "prompt_tuning": lambda: dt.PromptTuningConfig(num_virtual_tokens=N),
    "prompt_ensemble": lambda: dt.PromptTuningConfig(num_virtual_tokens=N, num_prompts=3),
    "p_tuning": lambda: dt.PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=8),
    "prefix_tuning": lambda: dt.PrefixTuningConfig(num_virtual_tokens=N, projection_hidden_size=8),
    "p_tuning_v2": lambda: dt.PTuningV2Config(num_virtual_tokens=N),
}


@pytest.mark.parametrize("method", list(SOFT))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_classifier_scores_the_last_real_token_of_right_padded_rows(arch, method):
    model = _classifier(arch)
    dt.attach(model, SOFT[method]())
    perturb(model, scale=0.5)
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 3), (2, 1)):
        ids[row, -pad:], mask[row, -pad:] = 0, 0
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, labels=labels)
        rows = [model(input_ids=ids[i:i + 1, : int(mask[i].sum())]).logits for i in range(3)]
        loss = torch.nn.functional.cross_entropy(torch.cat(rows), labels)
    torch.testing.assert_close(padded.logits, torch.cat(rows), rtol=0, atol=1e-5)
    if method != "prompt_ensemble":  # an ensemble's loss is the mean of its prompts' losses
        torch.testing.assert_close(padded.loss, loss, rtol=0, atol=1e-5)
    with dt.disabled(model):  # the bare model is untouched by the fix
        bare = model(input_ids=ids, attention_mask=mask).logits
        bare_rows = [model(input_ids=ids[i:i + 1, : int(mask[i].sum())]).logits for i in range(3)]
    torch.testing.assert_close(bare, torch.cat(bare_rows), rtol=0, atol=1e-5)
    assert not model.score._forward_hooks  # the per-forward hook is gone


# ---------------------------------------------------------------- gradient checkpointing

CHECKPOINTED = [("llama", "prefix"), ("llama", "v2"), ("gpt2", "prefix"), ("bert", "prefix"), ("t5", "prefix"),
                ("bart", "v2"), ("llama", "p_tuning")]


def _soft(kind: str):
    return {"prefix": dt.PrefixTuningConfig(num_virtual_tokens=N, projection_hidden_size=8),
            "v2": dt.PTuningV2Config(num_virtual_tokens=N),
            "p_tuning": dt.PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=4)}[kind]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("arch,kind", CHECKPOINTED, ids=[f"{a}-{k}" for a, k in CHECKPOINTED])
def test_gradient_checkpointing_gives_the_same_gradients(arch, kind, reentrant):
    def grads(checkpointing: bool):
        model = build(arch)
        dt.attach(model, _soft(kind))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        loss = model(**batch(arch)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, expected = grads(False)
    loss_ckpt, got = grads(True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert expected and set(got) == set(expected)
    for name in expected:
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- P-tuning


def test_p_tuning_mlp_encoder_is_the_formula_and_folds_into_the_file(tmp_path):
    model = build("llama")
    dt.attach(model, dt.PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=8))
    encoder = model.prompt_encoder["default"]
    e = encoder.embedding.weight
    (W1, b1), (W2, b2), (W3, b3) = [(encoder.mlp_head[i].weight, encoder.mlp_head[i].bias) for i in (0, 2, 4)]
    with torch.no_grad():
        rows = torch.relu(torch.relu(e @ W1.T + b1) @ W2.T + b2) @ W3.T + b3  # (n, d)
        data = batch("llama")
        embeds = model.get_input_embeddings()(data["input_ids"])
        mask = torch.cat([torch.ones(2, N, dtype=torch.long), data["attention_mask"]], 1)
        with dt.disabled(model):
            expected = model(inputs_embeds=torch.cat([rows.expand(2, -1, -1), embeds], 1), attention_mask=mask).logits
    torch.testing.assert_close(logits(model, data), expected, rtol=0, atol=1e-6)
    # n d + (d h + h) + (h h + h) + (h d + d) with n 3, d 32, h 8
    assert dt.summary(model, print_table=False).trainable == 3 * 32 + (32 * 8 + 8) + (8 * 8 + 8) + (8 * 32 + 32)
    dt.save(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    torch.testing.assert_close(saved["prompt_embeddings"], rows, rtol=0, atol=0)
    loaded = dt.load(build("llama"), tmp_path, trainable=True)
    assert list(dt.delta_parameters(loaded, "default")) == ["prompt_embeddings.default"]
    assert dt.attached(loaded)["default"].inference_mode and dt.attached(loaded)["default"].encoder == "mlp"


def test_p_tuning_lstm_saves_its_rows_without_dropout(tmp_path):
    model = build("gpt2")
    dt.attach(model, dt.PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=4, encoder_dropout=0.5))
    model.train()  # dropout between the LSTM layers is on while training...
    dt.save(model, tmp_path)
    model.eval()  # ...and off in what is saved, which is what the model computes at inference
    data = batch("gpt2")
    torch.testing.assert_close(logits(dt.load(build("gpt2"), tmp_path), data), logits(model, data), rtol=0, atol=1e-6)
    assert model.prompt_encoder["default"].training is False


# ---------------------------------------------------------------- prompt ensembles


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_ensemble_averages_the_logits_of_its_prompts(arch):
    model = build(arch)
    data = batch(arch)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=N, num_prompts=3))
    prompts = model.prompt_embeddings["default"].detach()
    assert prompts.shape == (3 * N, 32)
    singles, losses = [], []
    for i in range(3):
        single = build(arch)
        dt.attach(single, dt.PromptTuningConfig(num_virtual_tokens=N))
        with torch.no_grad():
            single.prompt_embeddings["default"].copy_(prompts[i * N:(i + 1) * N])
            out = single(**data)
        singles.append(out.logits)
        losses.append(out.loss)
    with torch.no_grad():
        out = model(**data)
    torch.testing.assert_close(out.logits, torch.stack(singles).mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), rtol=0, atol=1e-6)
    model.train()  # training: every prompt's rows, one batch of 3 x 2 rows
    out = model(**data)
    assert out.logits.shape[0] == 6
    if arch == "llama":  # no dropout, so training rows compute what inference does
        torch.testing.assert_close(out.logits[2:4], singles[1], rtol=0, atol=1e-5)
    out.loss.backward()
    grad = model.prompt_embeddings["default"].grad
    assert all(grad[i * N:(i + 1) * N].abs().sum() > 0 for i in range(3))


def test_ensemble_generate_decodes_from_the_averaged_logits():
    model = build("llama")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=N, num_prompts=2, init="sample_vocab"))
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 9)
    with torch.no_grad():
        full = model(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences), use_cache=False).logits
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, full[:, 5 + step - 1 + N], rtol=0, atol=1e-5)


def test_ensemble_seq2seq_generate_runs_every_prompt():
    model = build("t5")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=N, num_prompts=2, init="sample_vocab"))
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        forced = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1]).logits
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, forced[:, step], rtol=0, atol=1e-5)


def test_ensemble_file_holds_every_prompt_and_is_for_deltatune_only(tmp_path):
    model = build("t5")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=N, num_prompts=4))
    dt.save(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PROMPT_TUNING_ENSEMBLE" and saved["num_prompts"] == 4
    assert "deltatune can load it (the peft package has no such method)" in (tmp_path / "README.md").read_text()
    from safetensors.torch import load_file

    assert load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"].shape == (4 * N, 32)
    data = batch("t5")
    loaded = dt.load(build("t5"), tmp_path)
    assert dt.attached(loaded)["default"].num_prompts == 4
    torch.testing.assert_close(logits(loaded, data), logits(model, data), rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    with pytest.raises(Exception):
        peft.PeftModel.from_pretrained(build("t5"), str(tmp_path))
    # a single prompt still writes exactly peft's fields
    single = build("t5")
    dt.attach(single, dt.PromptTuningConfig(num_virtual_tokens=N))
    dt.save(single, tmp_path / "single")
    assert "num_prompts" not in json.loads((tmp_path / "single" / "adapter_config.json").read_text())


def test_ensemble_bad_inputs():
    with pytest.raises(dt.DeltaError, match="num_prompts=3, init='text'.*identical prompts train identically"):
        dt.PromptTuningConfig(num_prompts=3, init="text", init_text="x")
    with pytest.raises(dt.DeltaError, match=r"PromptTuningConfig.num_prompts = 0 is not allowed: 0 must be > 0"):
        dt.PromptTuningConfig(num_prompts=0)
    model = build("llama")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=N, num_prompts=2))
    with pytest.raises(dt.DeltaError, match="averages the logits of a ModelOutput"):
        model(**batch("llama"), return_dict=False)
    assert not dt.active(model) == [] and model(**batch("llama")).logits.shape[0] == 2  # still works afterwards


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_ensemble_refuses_beam_search(arch):
    model = build(arch)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=N, num_prompts=2))
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(dt.DeltaError, match="beam search reorders the cache by beam, which an ensemble cannot follow"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, num_beams=2, pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, pad_token_id=0)
    assert out.shape[0] == 2  # the model is fine afterwards


@pytest.mark.parametrize("config", [dt.PrefixTuningConfig(num_virtual_tokens=N), dt.PTuningConfig(num_virtual_tokens=N)],
                         ids=["prefix", "p_tuning"])
def test_beam_search_keeps_the_best_greedy_path_score(config):
    """With one beam, beam search is greedy search; with two it must still run over the prefixed cache."""
    model = build("llama")
    dt.attach(model, config)
    perturb(model, scale=0.5)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=0, do_sample=False)
    greedy = model.generate(**kw)
    assert torch.equal(model.generate(**kw, num_beams=1), greedy)
    beams = model.generate(**kw, num_beams=3, num_return_sequences=3, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():  # each returned beam's score is its length-normalised log-likelihood under the adapted model
        seqs = beams.sequences
        logp = model(input_ids=seqs, attention_mask=torch.ones_like(seqs), use_cache=False).logits.log_softmax(-1)
        shift = N if isinstance(config, dt.PTuningConfig) else 0  # P-tuning's virtual tokens are positions of the output
        steps = logp[:, shift + 4:-1].gather(-1, seqs[:, 5:, None]).squeeze(-1).sum(-1) / seqs[:, 5:].shape[1]
    torch.testing.assert_close(beams.sequences_scores, steps, rtol=0, atol=1e-4)


def test_prefix_tuning_refuses_a_static_cache():
    model = build("llama")
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=N))
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(dt.DeltaError, match="a fixed-size StaticCache .* has no room for them; generate without "
                                            "cache_implementation='static'"):
        model.generate(**kw, cache_implementation="static")
    assert model.generate(**kw).shape == (2, 8)


def test_transformers_trainer_trains_a_prefix_with_gradient_checkpointing(tmp_path):
    from test_integration import FixedBatches

    model = build("llama")
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=N, projection_hidden_size=8))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = batch("llama")
    before = model(**data).loss.item()
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=10, learning_rate=2e-2, per_device_train_batch_size=2,
                                report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                gradient_checkpointing=True)
    tf.Trainer(model=model, args=args, train_dataset=FixedBatches(data)).train()
    assert model.model.layers[0].gradient_checkpointing  # the Trainer turned it on
    model.eval()
    assert model(**data).loss.item() < before - 0.01
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not any("_can_checkpoint_with_cache" in m.__dict__ for m in model.modules())
    assert not any(isinstance(getattr(m, "_gradient_checkpointing_func", None), _PrefixCheckpoint) for m in model.modules())
