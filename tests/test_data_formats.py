"""The data users already have: every format read into its canonical rows, and every refusal named.

Rows are written here in the shapes of LLaMA-Factory's, axolotl's, TRL's and OpenAI's files (with
our own text); tests/fixtures/data holds whole sample files in those shapes, trained end to end in
test_data_fixtures.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.pipeline.config import ConfigError, DataSection, load_run_config
from deltatune.pipeline.data import read_rows
from deltatune.pipeline.rows import DataError, check_rows


def rows_of(fmt: str, rows: list[dict], **data) -> list[dict]:
    notes: list[str] = []
    out = check_rows(rows, "f.jsonl", DataSection(format=fmt, **data), notes=notes)
    return out


def refused(fmt: str, rows: list[dict], match: str, **data) -> None:
    with pytest.raises(DataError, match=match):
        rows_of(fmt, rows, **data)


# ---------------------------------------------------------------- alpaca


def test_alpaca_system_and_history_become_turns():
    [row] = rows_of("alpaca", [{"instruction": "And four?", "input": "", "output": "Eight.", "system": "Be exact.",
                                "history": [["Two plus two?", "Four."]]}])
    assert row["messages"] == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And four?"},
        {"role": "assistant", "content": "Eight."}]


def test_system_prompt_column_and_a_default_system():
    [row] = rows_of("chat", [{"system_prompt": "You are terse.", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    assert row["messages"][0] == {"role": "system", "content": "You are terse."}
    [row] = rows_of("instruction", [{"instruction": "hi", "output": "yo"}], system="Default.")
    assert row["messages"][0] == {"role": "system", "content": "Default."}


@pytest.mark.parametrize("rows, match", [
    ([{"instruction": "q", "output": "a", "history": [["only one"]]}], r"row 1, column 'history': item 1 is not an"),
    ([{"instruction": "q", "output": "a", "history": "q a"}], r"column 'history': expected a list"),
    ([{"instruction": "q", "output": "a", "system": 3}], r"column 'system': expected the system prompt as text"),
])
def test_bad_alpaca_columns_name_row_and_column(rows, match):
    refused("instruction", rows, match)


# ---------------------------------------------------------------- sharegpt, OpenAI, roles


def test_role_names_map_the_same_for_role_and_from_keys():
    a = rows_of("chat", [{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}])
    b = rows_of("chat", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    assert a == b and a[0]["messages"][0]["role"] == "user"


def test_custom_keys_and_roles():
    rows = [{"dialog": [{"speaker": "customer", "text": "hi"}, {"speaker": "agent", "text": "yo"}]}]
    [row] = rows_of("chat", rows, columns={"messages": "dialog"}, message_keys={"role": "speaker", "content": "text"},
                    roles={"customer": "user", "agent": "assistant"})
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    refused("chat", rows, r"row 1, column 'dialog': message 1: unknown speaker 'customer'.*data.roles",
            columns={"messages": "dialog"}, message_keys={"role": "speaker", "content": "text"})


def test_llama_factory_tool_turns():
    tools = json.dumps([{"name": "get_weather", "description": "weather", "parameters": {"type": "object"}}])
    [row] = rows_of("sharegpt", [{"tools": tools, "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "{\"sky\": \"sunny\"}"},
        {"from": "gpt", "value": "Sunny."}]}])
    assert row["tools"] == [{"type": "function", "function": json.loads(tools)[0]}]
    call = row["messages"][1]
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert row["messages"][2]["role"] == "tool"


def test_openai_tool_calls_with_json_string_arguments_and_content_parts():
    [row] = rows_of("chat", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}])
    assert row["messages"][0]["content"] == "Weather in Paris?"
    assert row["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert row["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, {"role": "assistant", "content": "a"}],
     r"row 1, column 'messages': message 1 \(user\): content part 1 is of type 'image_url'.*text-only"),
    ([{"role": "user", "content": "q"}, {"from": "function_call", "value": "not json"}],
     r"message 2: a function_call turn holds JSON"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
     r"message 2: tool call 1 \(f\): its arguments are not JSON"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}],
     r"no assistant turn to train"),
    ([{"role": "user", "content": "q", "train": True}, {"role": "assistant", "content": "a"}],
     r"message 1: train: true on a user turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}], r"weight 0.5"),
    ([{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "a"}], r"unknown speaker 'narrator'"),
])
def test_bad_messages_name_row_column_and_message(messages, match):
    refused("chat", [{"messages": messages}], match)


def test_axolotl_per_message_train_and_weight():
    [row] = rows_of("chat_template", [{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "weight": 0},
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "c"}]}])
    assert [m.get("train", True) for m in row["messages"] if m["role"] == "assistant"] == [False, False, True]


def test_reasoning_content_is_kept():
    [row] = rows_of("chat", [{"messages": [{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "a", "reasoning_content": "think"}]}])
    assert row["messages"][1]["reasoning_content"] == "think"


# ---------------------------------------------------------------- columns that must not be ignored


@pytest.mark.parametrize("fmt, row, match", [
    ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "images": ["a.png"]},
     r"row 1, column 'images': has images.*text-only"),
    ("instruction", {"instruction": "q", "output": "a", "kto_tag": True}, r"column 'kto_tag': has KTO labels"),
    ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": False},
     r"column 'label'.*KTO feedback.*data.format: kto"),
    ("instruction", {"instruction": "q", "output": "a", "chosen": "x", "rejected": "y"}, r"column 'chosen': has preference pairs"),
])
def test_columns_that_would_change_training_are_never_skipped_in_silence(fmt, row, match):
    refused(fmt, [row], match)


def test_other_unread_columns_are_reported():
    notes: list[str] = []
    check_rows([{"instruction": "q", "output": "a", "id": 7, "source": "web"}], "f.jsonl", DataSection(format="instruction"), notes=notes)
    assert notes == ["f.jsonl: column(s) not read by data.format 'instruction': id, source"]


# ---------------------------------------------------------------- axolotl segments and pre-tokenized rows


def test_input_output_segments():
    [row] = rows_of("input_output", [{"segments": [{"label": False, "text": "Q: hi\n"}, {"label": True, "text": "A: yo"}]}])
    assert row["segments"] == [("Q: hi\n", False), ("A: yo", True)]
    refused("input_output", [{"segments": [{"label": False, "text": "x"}]}], r"no segment has label: true")
    refused("input_output", [{"segments": [{"label": "yes", "text": "x"}]}], r"segment 1: label 'yes'")


def test_pretokenized_rows():
    [row] = rows_of("tokenized", [{"input_ids": [5, 6, 7, 0], "labels": [-100, 6, 7, -100], "attention_mask": [1, 1, 1, 0]}])
    assert row == {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    refused("tokenized", [{"input_ids": [5, 6], "labels": [5]}], r"column 'labels': has 1 values but input_ids has 2")
    refused("tokenized", [{"input_ids": [5, 6], "attention_mask": [0, 1]}], r"has a 0 at position 1 before later 1s")
    refused("tokenized", [{"input_ids": [5, "6"]}], r"column 'input_ids': expected a list of integers")


# ---------------------------------------------------------------- preference and KTO


def test_preference_pairs_in_every_form():
    trl = rows_of("preference", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])[0]
    alpaca = rows_of("preference", [{"instruction": "2+2?", "chosen": "4", "rejected": "5"}])[0]
    sharegpt = rows_of("preference", [{"conversations": [{"from": "human", "value": "2+2?"}],
                                       "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}])[0]
    implicit = rows_of("preference", [{"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                                       "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}])[0]
    assert trl == alpaca == sharegpt == implicit
    assert trl["prompt"] == [{"role": "user", "content": "2+2?"}] and trl["chosen"] == [{"role": "assistant", "content": "4"}]
    refused("preference", [{"prompt": "q", "chosen": "a"}], r"row 1 has no column 'rejected'")
    refused("preference", [{"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}],
            r"column 'chosen': a completion holds assistant turns only")


def test_kto_rows_in_trl_and_llama_factory_forms():
    trl = rows_of("kto", [{"prompt": "2+2?", "completion": "4", "label": True}])[0]
    lf = rows_of("kto", [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                          "kto_tag": True}])[0]
    assert trl == lf and trl["label"] is True
    refused("kto", [{"prompt": "q", "completion": "a", "label": "good"}], r"column 'label': expected true or false")


# ---------------------------------------------------------------- sources: .txt, dataset_info.json


def test_txt_files_split_by_blank_lines_lines_or_files(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text("First paragraph\nstill first.\n\nSecond one.\n\n\nThird.\n")
    rows, _ = read_rows(str(path), DataSection(format="text"))
    assert [r["text"] for r in rows] == ["First paragraph\nstill first.", "Second one.", "Third."]
    rows, _ = read_rows(str(path), DataSection(format="text", text_split="line"))
    assert len(rows) == 4
    (tmp_path / "b.txt").write_text("Another document.")
    rows, _ = read_rows(str(tmp_path), DataSection(format="text", text_split="file"))
    assert [r["text"] for r in rows] == ["Another document.", "First paragraph\nstill first.\n\nSecond one.\n\n\nThird.\n".strip("\n")]
    with pytest.raises(DataError, match=r"a .txt file holds plain text, read with data.format: text"):
        read_rows(str(path), DataSection(format="chat"))


def dataset_info(tmp_path: Path, entry: dict, rows: list[dict], name: str = "demo") -> str:
    (tmp_path / "demo.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({name: {"file_name": "demo.json", **entry}}))
    return f"{tmp_path / 'dataset_info.json'}#{name}"


def test_a_dataset_info_entry_sets_format_columns_and_tags(tmp_path):
    source = dataset_info(tmp_path, {"formatting": "sharegpt", "columns": {"messages": "turns", "system": "sys"},
                                     "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "client",
                                              "assistant_tag": "agent"}},
                          [{"turns": [{"speaker": "client", "text": "hi"}, {"speaker": "agent", "text": "yo"}], "sys": "Be kind."}])
    config = load_run_config(None, {"model.name": "m", "data.train": source})
    data = config.data
    assert data.train == str(tmp_path / "demo.json") and data.format == "chat"
    assert data.columns == {"messages": "turns", "system": "sys"}
    rows, where = read_rows(data.train, data)
    [row] = check_rows(rows, where, data)
    assert row["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "yo"}]


def test_dataset_info_alpaca_columns_ranking_and_kto(tmp_path):
    source = dataset_info(tmp_path, {"columns": {"prompt": "q", "response": "a"}}, [{"q": "hi", "a": "yo"}])
    config = load_run_config(None, {"model.name": "m", "data.train": source})
    assert config.data.format == "instruction" and config.data.columns == {"instruction": "q", "output": "a"}
    source = dataset_info(tmp_path, {"ranking": True, "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
                          [{"instruction": "hi", "chosen": "yo", "rejected": "go away"}])
    assert load_run_config(None, {"model.name": "m", "data.train": source}).data.format == "preference"
    source = dataset_info(tmp_path, {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
                                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                              "assistant_tag": "assistant"}},
                          [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "label": True}])
    config = load_run_config(None, {"model.name": "m", "data.train": source})
    assert config.data.format == "kto" and config.data.columns["label"] == "label"


@pytest.mark.parametrize("entry, name, match", [
    ({"formatting": "alpaca"}, "dem", r"has no dataset 'dem' \(did you mean 'demo'\?\); it describes: demo"),
    ({"formatting": "vicuna"}, "demo", r"formatting 'vicuna'; LLaMA-Factory's formattings are alpaca and sharegpt"),
    ({"columns": {"prompt": "q", "images": "pics"}}, "demo", r"has images \(column 'pics'\); deltatune trains text-only"),
    ({"ms_hub_url": "x/y", "file_name": None}, "demo", r"ms_hub_url sources are not read"),
    ({"columns": {"question": "q"}}, "demo", r"column key 'question' is not one of alpaca's"),
])
def test_bad_dataset_info_entries(tmp_path, entry, name, match):
    source = dataset_info(tmp_path, entry, [{"q": "hi", "a": "yo"}]).replace("#demo", f"#{name}")
    with pytest.raises(ConfigError, match=match):
        load_run_config(None, {"model.name": "m", "data.train": source})


def test_a_format_contradicting_the_entry_is_an_error(tmp_path):
    source = dataset_info(tmp_path, {"formatting": "alpaca"}, [{"instruction": "hi", "output": "yo"}])
    with pytest.raises(ConfigError, match=r"data.format = 'chat', but .* describes instruction data"):
        load_run_config(None, {"model.name": "m", "data.train": source, "data.format": "chat"})


def test_format_aliases_and_a_misspelt_format():
    config = load_run_config(None, {"model.name": "m", "data.train": "t.jsonl", "data.format": "sharegpt"})
    assert config.data.format == "chat"
    with pytest.raises(ConfigError, match=r"data.format = 'alpacca' is not a format \(did you mean 'alpaca'\?\)"):
        load_run_config(None, {"model.name": "m", "data.train": "t.jsonl", "data.format": "alpacca"})
