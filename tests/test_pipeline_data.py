"""The pipeline's config and data: YAML + flags, validation, formats, answer-only masks, lengths, bad data."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import transformers as tf

from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.data import (IGNORE, DataError, check_rows, global_batch, prepare, read_rows,
                                     recommended_max_length)
from pipeline_models import save_tiny, tokenizer_folder, write_jsonl


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def tokenizer(root):
    return tf.AutoTokenizer.from_pretrained(tokenizer_folder(root))


def config_for(root: Path, fmt: str, rows: list[dict], task: str = "causal_lm", **flags):
    data = write_jsonl(root / f"{fmt}.jsonl", rows)
    arch = {"causal_lm": "llama", "seq_cls": "bert", "seq2seq": "t5"}[task]
    base = {"model.name": str(save_tiny(root, arch)), "model.task": task, "data.train": str(data), "data.format": fmt}
    return load_run_config(None, {**base, **flags})


# ---------------------------------------------------------------- config


def test_yaml_and_flags_make_one_validated_config(root, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: some/model}\ndata: {train: t.jsonl, format: instruction}\nmethod: lora\n"
                    "lora: {r: 4, target_modules: [q_proj, v_proj]}\ntrain: {lr: 5e-3, max_steps: 10}\n")
    config = load_run_config(path, ["--lora.r", "16", "--train.batch_size=2", "--train.gradient_checkpointing"])
    assert config.delta.r == 16 and config.delta.target_modules == ["q_proj", "v_proj"]
    assert config.train.lr == 0.005 and config.train.batch_size == 2 and config.train.gradient_checkpointing is True
    command = config.command()
    assert "--lora.r 16" in command and "--train.lr 0.005" in command and "--model.name some/model" in command
    again = load_run_config(None, shlex.split(command)[2:])
    assert again.as_dict() == config.as_dict()  # the printed command is the same run


@pytest.mark.parametrize("text,flags,message", [
    ("train: {lr: fast}", [], r"run.yaml: train.lr = 'fast' is not allowed: expected a number"),
    ("trian: {lr: 1}", [], r"unknown key 'trian' \(did you mean 'train'\?\)"),
    ("train: {lrr: 1}", [], r"train.lrr is not a setting \(did you mean 'lr'\?\); train settings: .*lr"),
    ("train: {scheduler: cos}", [], r"train.scheduler = 'cos' is not allowed: expected one of 'linear', 'cosine', 'constant'"),
    ("lora: {rank: 4}", [], r"lora.rank is not a LoraConfig field; its fields: .*\br\b"),
    ("lora: {r: 0}", [], r"lora: LoraConfig.r = 0 is not allowed: 0 must be > 0"),
    ("method: lorra", [], r"method = 'lorra' is not allowed: expected one of .*lora"),
    ("prompt_tuning: {num_virtual_tokens: 4}", [], r"section 'prompt_tuning' does not apply: method is 'lora'"),
    ("data: {train: t.jsonl, format: classification}", [], r"data.format = 'classification' does not fit model.task = 'causal_lm'"),
    ("- a\n- b", [], r"must hold a mapping of sections"),
    ("train: [", [], r"is not valid YAML"),
    ("", ["--train.batch_size", "0"], r"train.batch_size = 0 is not allowed: 0 must be > 0"),
    ("", ["train.lr", "1"], r"expected a --key value flag, got 'train.lr'"),
])
def test_bad_settings_name_the_key_the_allowed_values_and_the_file(tmp_path, text, flags, message):
    path = tmp_path / "run.yaml"
    head = "model: {name: m}\n" + ("" if text.startswith("data:") else "data: {train: t.jsonl}\n")  # a key given twice is an error
    path.write_text(head + text if not text.startswith(("-", "train: [")) else text)
    with pytest.raises(ConfigError, match=message):
        load_run_config(path, flags)


def test_required_keys(tmp_path):
    with pytest.raises(ConfigError, match="model.name is required"):
        load_run_config(None, {"data.train": "x.jsonl"})
    with pytest.raises(ConfigError, match="data.train is required"):
        load_run_config(None, {"model.name": "m"})


# ---------------------------------------------------------------- formats and masks


def _trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_instruction_loss_covers_the_answer_only(root, tokenizer):
    config = config_for(root, "instruction", [{"instruction": "Add two and three", "input": "2 + 3", "output": "five"}] * 4)
    prepared = prepare(config, tokenizer, 256)
    example = prepared.train[0]
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>user\nAdd two and three\n\n2 + 3<|im_end|>\n<|im_start|>assistant\n")
    # token by token: exactly the answer and its end-of-turn marker (generation stops on it) are trained
    assert _trained_text(tokenizer, example) == "five<|im_end|>\n"
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    assert all(label == IGNORE for label in example.labels[:first])
    assert example.labels[first:] == example.input_ids[first:]


def test_every_assistant_turn_of_a_chat_is_trained(root, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "bye"}]
    config = config_for(root, "chat", [{"messages": messages}] * 3)
    example = prepare(config, tokenizer, 256).train[0]
    assert _trained_text(tokenizer, example) == "hello<|im_end|>\nbye<|im_end|>\n"
    # sharegpt's from/value rows give the same tokens
    sharegpt = [{"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                    "value": m["content"]} for m in messages]}] * 3
    again = prepare(config_for(root, "chat", sharegpt), tokenizer, 256).train[0]
    assert again.input_ids == example.input_ids and again.labels == example.labels


def test_a_tokenizer_chat_template_is_used_when_present(root, tokenizer):
    templated = tf.AutoTokenizer.from_pretrained(tokenizer_folder(root))
    templated.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    config = config_for(root, "chat", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    example = prepare(config, templated, 256).train[0]
    assert templated.decode(example.input_ids) == "[user] q\n[assistant] a\n"
    # the prompt ends in a space that the whole tokenisation joins to the answer's first token ("Ġa"): trained
    assert _trained_text(templated, example) == " a\n"


def test_answer_only_off_trains_every_token(root, tokenizer):
    config = config_for(root, "instruction", [{"instruction": "x", "output": "y"}] * 2, **{"data.answer_only": False})
    example = prepare(config, tokenizer, 256).train[0]
    assert example.labels == example.input_ids


def test_classification_pairs_labels_and_seq2seq(root, tokenizer):
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i % 3} for i in range(6)]
    config = config_for(root, "classification", rows, task="seq_cls", **{"data.columns": {"text": "sentence1", "text_pair": "sentence2"}})
    prepared = prepare(config, tokenizer, 256)
    assert prepared.labels == ["0", "1", "2"] and [e.labels for e in prepared.train] == [0, 1, 2, 0, 1, 2]
    seq = prepare(config_for(root, "seq2seq", [{"source": "hello there", "target": "bonjour"}] * 2, task="seq2seq"), tokenizer, 256)
    assert tokenizer.decode(seq.train[0].decoder_labels, skip_special_tokens=True) == "bonjour"


def test_packing_fills_rows_with_whole_examples(root, tokenizer):
    config = config_for(root, "text", [{"text": "one two three four five six"}] * 20, **{"data.packing": True, "data.max_length": 64})
    prepared = prepare(config, tokenizer, 256)
    n = prepared.lengths.p50  # every example has this many tokens
    per_row = 64 // n
    assert per_row >= 2 and len(prepared.train) == -(-20 // per_row) and all(len(e.input_ids) <= 64 for e in prepared.train)
    assert sum(len(e.input_ids) for e in prepared.train) == 20 * n  # nothing cut: the tests in test_packing.py
    assert prepared.train[0].position_ids == list(range(n)) * per_row


# ---------------------------------------------------------------- lengths


def test_the_max_length_rule_on_a_known_distribution():
    lengths = [10] * 50 + [20] * 49 + [1000]  # 100 lengths; the 99th percentile is 20, so 1000 is the outlier
    assert recommended_max_length(lengths, None) == 23  # mean(10 x 50, 20 x 49) = 14.95, x 1.5 = 22.4, rounded up
    assert recommended_max_length(lengths, 16) == 16  # capped by the model's limit


def test_lengths_are_reported_and_the_users_max_length_wins(root, tokenizer):
    rows = [{"text": "word " * n} for n in (3, 3, 3, 3, 40)]
    config = config_for(root, "text", rows, **{"data.max_length": 8})
    prepared = prepare(config, tokenizer, 256)
    report = prepared.lengths
    assert report.chosen == 8 and report.truncated == 1 + sum(e.length > 8 for e in prepared.train[:4])
    assert all(len(e.input_ids) <= 8 for e in prepared.train)
    assert "using 8" in " ".join(report.lines())


# ---------------------------------------------------------------- bad data


@pytest.mark.parametrize("fmt,rows,message", [
    ("instruction", [{"instruction": "x", "output": "y"}, {"instruction": "x"}], r"row 2, column 'output': missing"),
    ("text", [{"text": "fine"}, {"text": "   "}], r"row 2, column 'text': empty text"),
    ("text", [{"text": 5}], r"row 1, column 'text': expected text, got int"),
    ("chat", [{"messages": [{"role": "user", "content": "hi"}]}], r"row 1, column 'messages': the conversation has no assistant turn"),
    ("chat", [{"messages": [{"role": "robot", "content": "hi"}]}], r"row 1, column 'messages': message 1: unknown speaker 'robot'.*data.roles"),
    ("instruction", [{"prompt": "x", "output": "y"}], r"row 1 has no column 'instruction'.*its columns are \['output', 'prompt'\]"),
])
def test_bad_rows_name_the_file_row_and_column(root, fmt, rows, message):
    config = config_for(root, fmt, rows)
    with pytest.raises(DataError, match=rf"{fmt}\.jsonl: " + message):
        read = read_rows(config.data.train, config.data)
        check_rows(*read, config.data)


def test_a_label_outside_the_label_set(root, tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "meh"}])
    config = load_run_config(None, {"model.name": str(save_tiny(root, "bert")), "model.task": "seq_cls", "data.train": str(train),
                                    "data.eval": str(evaluation), "data.format": "classification"})
    with pytest.raises(DataError, match=r"eval.jsonl: row 2, column 'label': label 'meh' is not in the label set \['neg', 'pos'\]"):
        prepare(config, tokenizer, 256)


def test_malformed_and_unreadable_files(root, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    config = load_run_config(None, {"model.name": "m", "data.train": str(bad)})
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 is not valid JSON"):
        read_rows(str(bad), config.data)
    weird = tmp_path / "data.xml"
    weird.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '.xml'; use .json, .jsonl, .csv, .parquet or .txt"):
        read_rows(str(weird), config.data)
    with pytest.raises(DataError, match=r"no data file at .*missing.jsonl"):
        read_rows(str(tmp_path / "missing.jsonl"), config.data)
    csv = tmp_path / "rows.csv"
    csv.write_text("text,label\nhello,1\nworld,0\n")
    rows, _ = read_rows(str(csv), config.data)
    assert rows == [{"text": "hello", "label": 1}, {"text": "world", "label": 0}]
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    assert read_rows(str(tmp_path / "rows.parquet"), config.data)[0] == rows
    (tmp_path / "rows.json").write_text(json.dumps(rows))  # a JSON array of objects
    assert read_rows(str(tmp_path / "rows.json"), config.data)[0] == rows


def test_data_order_is_one_resumable_stream():
    first = global_batch(10, seed=3, offset=0, size=4) + global_batch(10, seed=3, offset=4, size=4) + global_batch(10, 3, 8, 4)
    assert sorted(first[:10]) == list(range(10))  # one epoch, then the next epoch's order
    assert global_batch(10, seed=3, offset=0, size=12) == first
    assert global_batch(10, seed=4, offset=0, size=10) != first[:10]
