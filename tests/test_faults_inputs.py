"""Part of the fault catalogue (see test_faults.py): the user's inputs.

Run configs (duplicate YAML keys, bytes that are not UTF-8, numbers out of range, unusable
optimizers, an empty output.dir), data files (empty, not UTF-8, JSON in any layout, an
eval_fraction that leaves nothing to train on), base models (a mistyped folder, pickle-only
weights, impossible config sizes for the planner), adapter names and the model card. Each
case asserts the error type, that the message names the key, file, line or value at fault
and says what to do, and, through the CLI, exit code 2 with one `deltatune CMD: error:` line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.config import DeltaError
from deltatune.model_files import check_base_model
from deltatune.pipeline.config import ConfigError, load_run_config, read_yaml
from deltatune.pipeline.data import DataError, prepare, read_rows
from deltatune.pipeline.train import load_base, make_optimizer
from deltatune.planner import plan
from pipeline_models import save_tiny, tokenizer_folder, write_jsonl
from tiny_models import build


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inputs")


def cli_error(capsys, argv: list[str], command: str) -> str:
    """Run the CLI; it must exit 2 with one error line and no traceback. Returns the message."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deltatune {command}: error: "), err
    return lines[0]


def minimal(tmp_path: Path, **flags):
    return load_run_config(None, {"model.name": "m", "data.train": str(tmp_path / "t.jsonl"), **flags})


# ---------------------------------------------------------------- run configs


def test_a_yaml_key_given_twice_names_the_key_and_both_lines(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: m}\ndata: {train: t.jsonl}\ntrain:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 5.0e-4\n")
    with pytest.raises(ConfigError, match=r"run.yaml: key 'lr' is given on line 4 and again on line 6 .*delete one"):
        load_run_config(path)
    assert "key 'lr' is given on line 4 and again on line 6" in cli_error(capsys, ["train", str(path)], "train")
    path.write_text("model: {name: m}\nmodel: {name: n}\ndata: {train: t.jsonl}\n")  # a whole section twice
    with pytest.raises(ConfigError, match=r"key 'model' is given on line 1 and again on line 2"):
        load_run_config(path)
    with pytest.raises(ConfigError, match=r"--lora.target_modules.*key 'a' is given twice on line 1"):
        load_run_config(None, ["--model.name", "m", "--data.train", "t.jsonl", "--lora.target_modules", "{a: 1, a: 2}"])
    # YAML's merge key is an override the format allows, not a duplicate
    assert read_yaml("a: &x {lr: 1, b: 2}\nc:\n  <<: *x\n  lr: 3\n")["c"] == {"lr": 3, "b": 2}


def test_a_config_that_is_not_utf8_names_the_line_and_byte(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"model: {name: m}\ndata: {train: caf\xe9.jsonl}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: line 2, byte 18 \(offset 34 in the file\) is not UTF-8 "
                                          r"\(byte 0xe9\); save the file as UTF-8"):
        load_run_config(path)
    assert "save the file as UTF-8" in cli_error(capsys, ["train", str(path)], "train")


@pytest.mark.parametrize("key,value,message", [
    ("train.epochs", float("inf"), r"train.epochs = inf is not allowed: it must be a finite number"),
    ("train.epochs", float("nan"), r"train.epochs = nan is not allowed"),
    ("train.lr", float("inf"), r"train.lr = inf is not allowed: it must be a finite number"),
    ("train.seed", -1, r"train.seed = -1 is not allowed: a seed goes from 0 to 2\*\*32 - 1 \(4294967295\)"),
    ("train.seed", 2**40, r"train.seed = 1099511627776 is not allowed: a seed goes from 0 to 2\*\*32 - 1"),
    ("train.optimizer", "lbfgs", r"train.optimizer = 'lbfgs' cannot be used: LBFGS needs a closure .* choose another"),
    ("train.optimizer", "SparseAdam", r"train.optimizer = 'SparseAdam' cannot be used: SparseAdam takes sparse"),
    ("output.dir", "", r"output.dir is empty, which would write the run into the current folder; name a folder"),
    ("output.dir", "  ", r"output.dir is empty"),
])
def test_settings_out_of_range_are_config_errors(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        minimal(tmp_path, **{key: value})


def test_settings_at_the_ends_of_their_range_are_accepted(tmp_path):
    assert minimal(tmp_path, **{"train.seed": 2**32 - 1}).train.seed == 2**32 - 1
    assert minimal(tmp_path, **{"train.seed": 0, "train.optimizer": "sgd"}).train.optimizer == "sgd"


def test_settings_from_yaml_inf_and_through_the_cli(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: m}\ndata: {train: t.jsonl}\ntrain: {epochs: .inf}\n")
    assert "train.epochs = inf is not allowed: it must be a finite number" in cli_error(capsys, ["train", str(path)], "train")
    line = cli_error(capsys, ["train", str(path), "--train.epochs", "1", "--train.optimizer", "lbfgs"], "train")
    assert "adamw" in line and "closure" in line


def test_make_optimizer_lists_what_can_be_used():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(DeltaError, match=r"'lbfgs' cannot be used here: LBFGS needs a closure.*choose one of .*adamw.*sgd"):
        make_optimizer("lbfgs", params, 1e-3, 0.0)
    with pytest.raises(DeltaError, match=r"'rprop' has no weight decay, but train.weight_decay = 0.1; set "
                                         r"train.weight_decay: 0"):
        make_optimizer("rprop", params, 1e-3, 0.1)
    assert type(make_optimizer("rprop", params, 1e-3, 0.0)).__name__ == "Rprop"
    listing = str(pytest.raises(DeltaError, make_optimizer, "nope", params, 1e-3, 0.0).value)
    assert "lbfgs" not in listing and "sparseadam" not in listing and "adamw" in listing


# ---------------------------------------------------------------- data files


def test_an_empty_jsonl_says_the_file_is_empty(tmp_path):
    config = minimal(tmp_path)
    for text in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(DataError, match=r"empty.jsonl: the file is empty.*put the training rows in it"):
            read_rows(str(tmp_path / "empty.jsonl"), config.data)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv: the file is empty"):
        read_rows(str(tmp_path / "empty.csv"), config.data)


def test_data_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    config = minimal(tmp_path)
    (tmp_path / "rows.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl: line 2, byte 14 \(offset 28 in the file\) is not UTF-8 \(byte "
                                        r"0xe9\); save the file as UTF-8"):
        read_rows(str(tmp_path / "rows.jsonl"), config.data)
    (tmp_path / "rows.csv").write_bytes(b"text,label\nok,1\ncaf\xe9,0\n")
    with pytest.raises(DataError, match=r"rows.csv: line 3, byte 4 \(offset 19 in the file\) is not UTF-8.*as UTF-8"):
        read_rows(str(tmp_path / "rows.csv"), config.data)


def test_json_is_read_whatever_its_layout(tmp_path):
    config = minimal(tmp_path)
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    layouts = {
        "pretty.json": json.dumps(rows, indent=2),  # an array of objects over many lines
        "columns.json": json.dumps({"text": ["a", "b"], "label": [1, 0]}, indent=2),  # an object of columns
        "array.jsonl": json.dumps(rows, indent=2),  # a .jsonl holding a JSON array
        "lines.json": "".join(json.dumps(r) + "\n" for r in rows),  # JSONL under .json
    }
    for name, text in layouts.items():
        (tmp_path / name).write_text(text)
        assert read_rows(str(tmp_path / name), config.data)[0] == rows, name
    (tmp_path / "sparse.json").write_text(json.dumps([{"text": "a"}, {"text": "b", "extra": 1}], indent=1))
    assert read_rows(str(tmp_path / "sparse.json"), config.data)[0] == [{"text": "a", "extra": None},
                                                                        {"text": "b", "extra": 1}]


@pytest.mark.parametrize("text,message", [
    ('[\n {"text": "a"},\n {"text": \n]\n', r"not valid JSON \(Expecting value at line 4, column 1\); it is read as one "
                                           r"JSON document"),
    ('{"text": "ok"}\n{"text": "broken\n', r"line 2 is not valid JSON .*one complete object per line"),
    ('{\n "text": ["a", "b"],\n "label": [1]\n}\n', r"the columns have different lengths \(text: 2, label: 1\)"),
    ('{\n "text": "a",\n "label": 1\n}\n', r"one JSON object over several lines, read as columns, but its key 'text' is "
                                          r"not a list of values; .*JSONL \(one whole object per line\)"),
    ("[1, 2]", r"item 1 of the JSON array is a JSON int, not an object with columns"),
    ("7", r"holds a single JSON int; write one object per line"),
])
def test_json_that_cannot_be_rows_says_exactly_why(tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(DataError, match=r"bad.json.*" + message):
        read_rows(str(tmp_path / "bad.json"), minimal(tmp_path).data)


def test_an_eval_fraction_that_leaves_no_training_row(root, tmp_path):
    data = write_jsonl(tmp_path / "two.jsonl", [{"text": "one"}, {"text": "two"}])
    config = load_run_config(None, {"model.name": str(save_tiny(root, "llama")), "data.train": str(data),
                                    "data.eval_fraction": 0.9})
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_folder(root))
    with pytest.raises(DataError, match=r"two.jsonl: data.eval_fraction 0.9 of 2 row\(s\) holds out 2 for eval and "
                                        r"leaves no training rows; add rows, lower data.eval_fraction"):
        prepare(config, tokenizer, 256)


# ---------------------------------------------------------------- the CLI's own inputs


def test_data_examples_must_not_be_negative_and_zero_prints_statistics(root, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(4)])
    flags = ["--model.name", str(save_tiny(root, "llama")), "--data.train", str(data)]
    line = cli_error(capsys, ["data", "--examples", "-1", *flags], "data")
    assert "--examples -1: give how many training examples to print, 0 or more" in line
    assert main(["data", "--examples", "0", *flags]) == 0
    out = capsys.readouterr().out
    assert "token lengths of 4 examples" in out and "--- example" not in out
    assert main(["data", "--examples", "9", *flags]) == 0  # more than there are: all of them, said so
    out = capsys.readouterr().out
    assert "the first 4 training examples" in out and out.count("--- example") == 4


def test_a_prompts_file_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_bytes(b"hello\nna\xefve\n")
    # the file is read before the model is loaded, so even a missing model is not reached
    line = cli_error(capsys, ["generate", "--model", str(tmp_path / "no-model"), "--file", str(tmp_path / "prompts.txt")],
                     "generate")
    assert "prompts.txt: line 2, byte 3 (offset 8 in the file) is not UTF-8 (byte 0xef); save the file as UTF-8" in line


# ---------------------------------------------------------------- base models


@pytest.mark.parametrize("name", ["./models/tiny", "models/tiny/v2", "/no/such/model/folder"])
def test_a_missing_model_folder_says_so_in_train_info_and_plan(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}])
    for argv, command in ((["train", "--model.name", name, "--data.train", "rows.jsonl"], "train"),
                          (["data", "--model.name", name, "--data.train", "rows.jsonl"], "data"),
                          (["info", name], "info"), (["plan", "--model", name], "plan")):
        line = cli_error(capsys, argv, command)
        assert f"no model folder at {(tmp_path / name).resolve() if not name.startswith('/') else name}" in line, line
        assert "fix the path, or give a Hugging Face model id" in line and "Repo id" not in line


def test_a_partly_existing_path_is_a_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    line = cli_error(capsys, ["info", "models/tiny"], "info")  # one slash, like a hub id, but models/ is here
    assert f"no model folder at {tmp_path / 'models' / 'tiny'} ({tmp_path / 'models'} exists, tiny does not)" in line


def test_a_base_model_with_only_pickle_weights_is_refused(root, tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    source = save_tiny(root, "gpt2")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            (folder / name).write_bytes((source / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(DeltaError, match=r"pytorch_model.bin, and deltatune reads safetensors only: a pickle can run "
                                         r"arbitrary code .*save_pretrained\(.*safe_serialization=True\)"):
        check_base_model(str(folder))
    config = load_run_config(None, {"model.name": str(folder), "data.train": "rows.jsonl"})
    with pytest.raises(DeltaError, match=r"model.name = .*pickled.*only weights are pytorch_model.bin"):
        load_base(config, tokenizer=None)
    line = cli_error(capsys, ["generate", "--model", str(folder), "--prompt", "hi"], "generate")
    assert "--model = " in line and "safetensors only" in line
    check_base_model(str(source))  # a safetensors folder passes
    (folder / "config.json").unlink()
    with pytest.raises(DeltaError, match=r"has no config.json, so it is not a transformers model folder"):
        check_base_model(str(folder))


@pytest.mark.parametrize("changes,message", [
    ({"hidden_size": 0}, r"hidden_size = 0 is not allowed: it must be a positive whole number; fix it in the model's "
                         r"config.json"),
    ({"vocab_size": 0}, r"vocab_size = 0 is not allowed: it must be a positive whole number"),
    ({"num_hidden_layers": -2}, r"num_hidden_layers = -2 is not allowed"),
    ({"hidden_size": 30}, r"hidden_size = 30 is not divisible by num_attention_heads = 4, so the width does not split "
                          r"into whole attention heads; make it a multiple"),
])
def test_the_planner_refuses_impossible_sizes_naming_the_key(tmp_path, capsys, changes, message):
    config = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(DeltaError, match=r"config.json: " + message):
        plan(str(tmp_path / "config.json"), batch=1, seq=8)
    with pytest.raises(DeltaError, match=r"config.json: " + message):
        plan(str(tmp_path), batch=1, seq=8)  # the folder
    assert "config.json: " in cli_error(capsys, ["plan", "--model", str(tmp_path)], "plan")


def test_the_planner_names_the_keys_as_the_file_spells_them(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 30, "n_head": 4, "n_layer": 2,
                                                      "vocab_size": 100}))
    with pytest.raises(DeltaError, match=r"n_embd = 30 is not divisible by n_head = 4"):
        plan(str(tmp_path / "config.json"), batch=1, seq=8)
    # a config that gives its head size splits its width as it likes (T5: d_kv)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 30, "num_heads": 4, "d_kv": 8,
                                                      "num_layers": 1, "d_ff": 16, "vocab_size": 100,
                                                      "decoder_start_token_id": 0}))
    assert plan(str(tmp_path / "config.json"), batch=1, seq=8, target_seq=8).total > 0


# ---------------------------------------------------------------- adapters


def test_a_long_adapter_name_is_refused_saying_the_limit():
    model = build("gpt2")
    with pytest.raises(DeltaError, match=r"adapter name 'aaaa.*\.\.\. \(300 characters\) cannot be used: it is 300 bytes "
                                         r"long \(UTF-8\) and the limit is 128: save writes an adapter into a folder"):
        dt.attach(model, dt.LoraConfig(r=2), name="a" * 300)
    assert not any("lora" in n for n, _ in model.named_parameters())  # nothing attached
    with pytest.raises(DeltaError, match=r"is 129 bytes long"):
        dt.attach(model, dt.LoraConfig(r=2), name="é" * 64 + "a")  # bytes, not characters
    dt.attach(model, dt.LoraConfig(r=2), name="a" * 128)


def test_the_model_card_describes_what_was_saved_last(tmp_path):
    model = build("gpt2")
    dt.attach(model, dt.LoraConfig(r=2))
    dt.save(model, tmp_path)
    assert "A LORA adapter" in (tmp_path / "README.md").read_text()
    model = build("gpt2")
    dt.attach(model, dt.METHODS["bitfit"].config_cls())
    dt.save(model, tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "A BITFIT adapter" in card and "LORA" not in card and "- bitfit" in card
    (tmp_path / "README.md").write_text(card + "\nMy notes on this run.\n")  # a card someone edited stays theirs
    dt.save(model, tmp_path)
    assert (tmp_path / "README.md").read_text().endswith("My notes on this run.\n")


def test_a_model_folder_without_a_tokenizer_says_so(root, tmp_path, capsys):
    # transformers 5 would build an empty tokenizer from config.json (every text: no tokens); 4 asks for protobuf
    source, folder = save_tiny(root, "llama"), tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((source / name).read_bytes())
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}])
    line = cli_error(capsys, ["data", "--model.name", str(folder), "--data.train", str(data)], "data")
    assert "the folder has no tokenizer (none of tokenizer.json" in line and "tokenizer.save_pretrained(folder)" in line


def test_deltatune_loads_bases_without_hub_kernels(tmp_path, monkeypatch):
    """transformers 5.25 kernelizes every from_pretrained by default (layers swapped for kernels from the Hub,
    through the `kernels` package); deltatune's loaders keep the modules' own forward, which its deltas wrap."""
    from deltatune.cli import _load_for_adapter
    from deltatune.pipeline.train import load_base

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # transformers' own default
    folder = save_tiny(tmp_path, "llama")
    models = [dt.load_base(str(folder)), _load_for_adapter(str(folder), "CAUSAL_LM", False)[0],
              load_base(load_run_config(None, {"model.name": str(folder), "data.train": "unused.jsonl"}), None)]
    for model in models:
        assert getattr(model, "use_kernels", False) is False
