"""Padding-free packing (pipeline/packing.py): every packed example computes as if it ran alone, on every
architecture that supports it; the rest is refused by name. And length-grouped batching (data.global_batch)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.data import IGNORE, Collator, Example, global_batch, truncate
from deltatune.pipeline.packing import check_model, pack
from deltatune.pipeline.rows import DataError
from deltatune.pipeline.train import run
from deltatune.tiny import build_model, build_tokenizer
from pipeline_models import save_tiny, write_jsonl

CAUSAL = ["llama", "qwen2", "mistral", "gpt2", "starcoder2", "gpt_bigcode"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def examples(n: int, seed: int = 0, low: int = 2, high: int = 20, trained_prefix: int = 0) -> list[Example]:
    """n random examples of lengths in [low, high]; the first `trained_prefix` labels of each are IGNORE (a prompt)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(10, 390) for _ in range(rng.randint(low, high))]
        labels = [IGNORE if t < trained_prefix else x for t, x in enumerate(ids)]
        out.append(Example(ids, labels))
    return out


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(T,) the causal LM's loss at each position (0 where the next label is IGNORE)."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="none")


# ---------------------------------------------------------------- rows


def test_rows_hold_whole_examples_with_restarting_positions_and_no_label_across_a_seam():
    data = examples(40, high=15)
    rows = pack(data, 32)
    assert all(len(r.input_ids) <= 32 for r in rows) and len(rows) < len(data)
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in data)  # nothing cut, nothing added
    seen = []
    for r in rows:
        starts = [t for t, p in enumerate(r.position_ids) if p == 0]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [len(r.input_ids)]):
            assert r.position_ids[a:b] == list(range(b - a))
            assert r.labels[a] == IGNORE  # never predicted from the example before
            seen.append(tuple(r.input_ids[a:b]))
    assert sorted(seen) == sorted(tuple(e.input_ids) for e in data)  # every example once, whole
    assert pack(data, 32)[0].input_ids == rows[0].input_ids  # deterministic


def test_a_batch_of_rows_has_position_ids_no_attention_mask_and_padding_as_a_block_of_its_own():
    rows = pack(examples(6, high=9), 16)
    batch = Collator(pad_id=0, task="causal_lm")(rows)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        assert batch["position_ids"][i, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))
        assert (batch["labels"][i, n:] == IGNORE).all()


def test_an_example_longer_than_max_length_is_truncated_never_split():
    long_one = Example([5] * 20 + [7] * 30, [5] * 20 + [7] * 30)  # ids the other examples never hold
    kept, _ = truncate([long_one] + examples(3, high=5), 20)
    rows = pack(kept, 20)
    assert any(r.input_ids == [5] * 20 for r in rows)  # its first 20 tokens, alone in a row
    assert not any(7 in r.input_ids for r in rows)  # the rest is gone, not carried to another row


# ---------------------------------------------------------------- exactness, per architecture


@pytest.mark.parametrize("arch", CAUSAL)
def test_each_packed_example_gives_the_logits_and_loss_it_gives_alone(arch, tokenizer):
    model = build_model(arch, tokenizer).eval()
    data = examples(9, seed=1, trained_prefix=3)
    rows = pack(data, 48)
    assert any(sum(p == 0 for p in r.position_ids) >= 3 for r in rows)  # real packing, several per row
    batch = Collator(pad_id=tokenizer.pad_token_id, task="causal_lm")(rows)
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        alone = [model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])) for e in data]
    by_ids = {tuple(e.input_ids): (e, out) for e, out in zip(data, alone)}
    worst_logit = worst_loss = 0.0
    for i, r in enumerate(rows):
        starts = [t for t, p in enumerate(r.position_ids) if p == 0] + [len(r.input_ids)]
        for a, b in zip(starts, starts[1:]):
            e, out = by_ids[tuple(r.input_ids[a:b])]
            logits = packed.logits[i, a:b]
            worst_logit = max(worst_logit, (logits - out.logits[0]).abs().max().item())
            mine = per_token_loss(logits, batch["labels"][i, a:b])
            theirs = per_token_loss(out.logits[0], torch.tensor(e.labels))
            worst_loss = max(worst_loss, (mine - theirs).abs().max().item())
    assert worst_logit <= 1e-5 and worst_loss <= 1e-5, (worst_logit, worst_loss)
    # the batch's loss is the token-weighted mean of the examples' losses
    counts = [sum(x != IGNORE for x in e.labels[1:]) for e in data]
    expected = sum(out.loss.item() * n for out, n in zip(alone, counts)) / sum(counts)
    assert abs(packed.loss.item() - expected) <= 1e-5


def test_with_a_cache_attention_would_cross_examples(tokenizer):
    """Why the loop passes use_cache=False: transformers' default silently ignores the packing."""
    model = build_model("llama", tokenizer).eval()
    data = examples(2, seed=3, low=12, high=12)
    batch = Collator(pad_id=tokenizer.pad_token_id, task="causal_lm")(pack(data, 24))
    with torch.no_grad():
        cached = model(**batch, use_cache=True).logits[0, 12:]
        alone = model(input_ids=torch.tensor([batch["input_ids"][0, 12:].tolist()])).logits[0]
    assert (cached - alone).abs().max() > 1e-2


# ---------------------------------------------------------------- refusals


def test_a_model_whose_attention_ignores_position_ids_is_refused_by_name(tokenizer):
    for arch in CAUSAL:
        check_model(build_model(arch, tokenizer), len(tokenizer))  # the supported ones pass
    opt = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))
    with pytest.raises(DataError, match=r"data.packing is not exact with OPTForCausalLM \(model_type 'opt'\).*"
                                        r"set data.packing: false"):
        check_model(opt, len(tokenizer))


def packing_config(root, **flags):
    rows = [{"text": " ".join(["alpha beta gamma"] * random.Random(i).randint(1, 6))} for i in range(40)]
    base = {"model.name": str(save_tiny(root, "llama")), "data.train": str(write_jsonl(root / "text.jsonl", rows)),
            "data.format": "text", "data.packing": True, "data.max_length": 64, "train.max_steps": 12,
            "train.batch_size": 2, "train.lr": 1e-2, "train.progress": False, "train.log_every": 1, "output.dir": str(root / "packed")}
    if flags.get("method", "lora") == "lora":
        base["lora.r"] = 4
    return load_run_config(None, {**base, **flags})


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"])
def test_methods_that_prepend_virtual_tokens_are_refused(tmp_path, method):
    with pytest.raises(ConfigError, match=rf"data.packing cannot be used with method '{method}'.*virtual tokens.*"
                                          r"set data.packing: false"):
        packing_config(tmp_path, method=method)


def test_other_tasks_and_grouping_with_packing_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model.task is 'seq_cls'.*set data.packing: false"):
        packing_config(tmp_path, **{"model.task": "seq_cls", "data.format": "classification"})
    with pytest.raises(ConfigError, match=r"drop one of data.packing and data.group_by_length"):
        packing_config(tmp_path, **{"data.group_by_length": True})


# ---------------------------------------------------------------- a run


def test_a_packed_run_trains(tmp_path, monkeypatch):
    calls: list[dict] = []
    forward = tf.LlamaForCausalLM.forward

    def spy(self, *args, **kwargs):  # what the loop hands the model
        calls.append({k: kwargs.get(k) for k in ("attention_mask", "use_cache")} | {"positions": "position_ids" in kwargs})
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(tf.LlamaForCausalLM, "forward", spy)
    printed: list[str] = []
    result = run(packing_config(tmp_path), echo=printed.append)
    training = [c for c in calls if c["positions"]]
    assert len(training) >= 12 and all(c["attention_mask"] is None and c["use_cache"] is False for c in training)
    note = next(line for line in printed if line.startswith("packing: 40 examples into "))
    assert "rows of up to 64 tokens" in note, note
    losses = [r["loss"] for r in map(json.loads, (result.output_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]


# ---------------------------------------------------------------- length-grouped batches


def lognormal_lengths(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [max(1, min(512, int(x))) for x in torch.exp(4.0 + 0.8 * torch.randn(n, generator=g)).tolist()]


def padding(lengths: list[int], batches: list[list[int]]) -> float:
    """The fraction of a padded batch's cells that are padding."""
    cells = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / cells


def test_grouping_by_length_cuts_padding_and_is_a_function_of_seed_and_offset():
    lengths = lognormal_lengths(1000)
    size, steps = 8, 250  # two epochs
    plain = [global_batch(len(lengths), 7, k * size, size) for k in range(steps)]
    grouped = [global_batch(len(lengths), 7, k * size, size, lengths) for k in range(steps)]
    assert padding(lengths, grouped) < 0.5 * padding(lengths, plain), (padding(lengths, grouped), padding(lengths, plain))
    for epoch in (0, 1):  # each epoch still sees every example once
        assert sorted(i for b in grouped[epoch * 125:(epoch + 1) * 125] for i in b) == list(range(1000))
    # a resumed run asks for the batch at its offset and gets the same one; another seed, another order
    assert all(global_batch(len(lengths), 7, k * size, size, lengths) == grouped[k] for k in (0, 37, 124, 125, 249))
    assert global_batch(len(lengths), 8, 0, size, lengths) != grouped[0]
    assert grouped[0] != grouped[1]  # batches are not in length order


def test_a_length_grouped_run_trains(tmp_path):
    result = run(packing_config(tmp_path, **{"data.packing": False, "data.group_by_length": True}), echo=lambda *a: None)
    losses = [r["loss"] for r in map(json.loads, (result.output_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]


# ---------------------------------------------------------------- the attention kernel


def test_model_attention_picks_the_kernel_and_a_packed_eager_run_trains(tmp_path, monkeypatch):
    seen: list[str] = []
    forward = tf.LlamaForCausalLM.forward

    def spy(self, *args, **kwargs):
        seen.append(self.config._attn_implementation)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(tf.LlamaForCausalLM, "forward", spy)
    result = run(packing_config(tmp_path, **{"model.attention": "eager", "train.max_steps": 4}), echo=lambda *a, **k: None)
    assert seen and set(seen) == {"eager"}  # the packing check's forwards and the training steps alike
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU flash_attention_2 may be usable")
def test_flash_attention_without_a_gpu_is_refused_before_loading(tmp_path):
    config = packing_config(tmp_path, **{"model.attention": "flash_attention_2"})
    with pytest.raises(ConfigError, match=r"flash_attention_2' needs a CUDA GPU.*model.attention: sdpa"):
        run(config, echo=lambda *a, **k: None)
    assert not (tmp_path / "packed" / "adapter").exists()
