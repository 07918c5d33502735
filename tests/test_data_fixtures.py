"""Whole sample files in the shapes LLaMA-Factory, axolotl, TRL and OpenAI users have (tests/fixtures/data,
our own text), each read through the pipeline: `deltatune data` shows it with the trained tokens marked, the
mask is checked token by token against one whole tokenisation, and those a stage trains train a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import transformers as tf

from deltatune.cli import main as cli
from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.data import IGNORE, prepare
from deltatune.pipeline.rows import DataError
from deltatune.pipeline.stages import stage_for
from deltatune.pipeline.train import run
from deltatune.tiny import write_tiny
from pipeline_models import tokenizer_folder

DATA = Path(__file__).parent / "fixtures" / "data"
INFO = DATA / "dataset_info.json"
AXOLOTL_ROLES = {"data.columns": {"messages": "dialogue"}, "data.message_keys": {"role": "speaker", "content": "text"},
                 "data.roles": {"customer": "user", "agent": "assistant"}}

# (source, flags, texts that must be trained, texts that must not be)
CASES = {
    "lf_alpaca": (f"{INFO}#alpaca_en_demo", {}, ["Bonjour.", "Fast."], ["Translate to French", "Good morning"]),
    "lf_system_history": (f"{INFO}#alpaca_system_history", {}, ["Four.", "Sixteen.", "A cat."],
                          ["one word", "two plus two"]),
    "lf_identity": (f"{INFO}#identity", {}, ["My name is {{name}}."], ["What is your name?"]),
    "lf_glaive_tools": (f"{INFO}#glaive_toolcall_en_demo", {}, ["get_weather", "Paris\"}", "It is sunny in Paris"],
                        ["celsius", "What is the weather"]),
    "lf_wiki_txt": (f"{INFO}#wiki_demo", {}, ["The river rises", "towpath"], []),
    "lf_v1_messages": (str(DATA / "v1_sft_demo.jsonl"), {"data.format": "chat"},
                       ["Frozen water.", "Water below zero.", "get_weather", "snowing in Oslo"], ["You are brief", "snow\"}"]),
    "axolotl_chat_template": (str(DATA / "axolotl_chat_template.jsonl"), {"data.format": "chat_template"},
                              ["An apple.", "one two three"], ["how can I help", "You are kind"]),
    "axolotl_input_output": (str(DATA / "axolotl_input_output.jsonl"), {"data.format": "input_output"},
                             ["Answer: frozen water.", "Answer: yes."], ["Question", "(end)"]),
    "axolotl_completion": (str(DATA / "axolotl_completion.jsonl"), {"data.format": "completion"}, ["The river rises"], []),
    "axolotl_pretokenized": (str(DATA / "axolotl_pretokenized.jsonl"), {"data.format": "pretokenized"}, [], []),
    "axolotl_custom_roles": (str(DATA / "axolotl_sharegpt_custom_roles.jsonl"), {"data.format": "chat", **AXOLOTL_ROLES},
                             ["within 30 days"], ["Can I return it"]),
    "openai_tools": (str(DATA / "openai_tools.jsonl"), {"data.format": "chat"}, ["get_weather", "Clear skies"], ['"sky"']),
    "openai_parts": (str(DATA / "openai_parts.jsonl"), {"data.format": "chat"}, ["C-A-T."], ["Spell cat."]),
    "reasoning": (str(DATA / "reasoning.jsonl"), {"data.format": "chat"}, ["Three fours make twelve.", "12."], ["Think first."]),
    # preference pairs (trained by the DPO stage) and KTO rows (by the KTO stage)
    "lf_dpo_sharegpt": (f"{INFO}#dpo_en_demo", {}, ["Yes, the sun is a star."], ["Is the sun a star?"]),
    "lf_dpo_alpaca": (f"{INFO}#dpo_alpaca", {}, ["Yes, it is."], ["Is the sun a star?"]),
    "lf_v1_dpo": (str(DATA / "v1_dpo_demo.jsonl"), {"data.format": "preference"}, ["Yes."], ["Is the sun"]),
    "lf_kto": (f"{INFO}#kto_en_demo", {}, ["Yes, a star."], ["Is the sun a star?"]),
    "trl_preference": (str(DATA / "trl_preference.jsonl"), {"data.format": "preference"}, ["Yes."], ["Is the sun"]),
    "trl_preference_messages": (str(DATA / "trl_preference_messages.jsonl"), {"data.format": "preference"}, ["Yes."], ["Is the sun"]),
    "trl_kto": (str(DATA / "trl_kto.jsonl"), {"data.format": "kto"}, ["Yes."], ["Is the sun"]),
}
KTO_CASES = {"lf_kto", "trl_kto"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="module")
def tokenizer(root):
    return tf.AutoTokenizer.from_pretrained(tokenizer_folder(root))


def long_model(root: Path) -> Path:
    """The tiny llama with 1,024 positions: a tool schema in the system prompt is several hundred tokens."""
    folder = root / "llama-1024"
    if not folder.exists():
        write_tiny("llama", folder, tokenizer=tf.AutoTokenizer.from_pretrained(tokenizer_folder(root)),
                   max_position_embeddings=1024)
    return folder


def flags_for(root: Path, case: str) -> dict:
    source, flags, _, _ = CASES[case]
    return {"model.name": str(long_model(root)), "data.train": source, "train.max_steps": 2,
            "train.batch_size": 2, "train.progress": False, "lora.r": 2, "data.max_length": 1024, "output.dir": str(root / f"out-{case}"), **flags}


def trained_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_format_is_read_with_its_mask_checked_token_by_token(root, tokenizer, case):
    config = load_run_config(None, flags_for(root, case))
    prepared = prepare(config, tokenizer, 1024)
    _, _, must, must_not = CASES[case]
    rows = prepared.renderer
    examples = prepared.train + [e.rejected for e in prepared.train if e.rejected is not None]
    assert examples
    trained = " ".join(trained_text(tokenizer, e.input_ids, e.labels) for e in examples)
    for text in must:
        assert text in trained, (case, text, trained)
    for text in must_not:
        assert text not in trained, (case, text, trained)
    for e in examples:  # labels are the ids or -100, and something is trained
        assert all(label in (IGNORE, token) for token, label in zip(e.input_ids, e.labels))
        assert any(label != IGNORE for label in e.labels)
    if rows.format in ("instruction", "chat"):  # the ids are one whole tokenisation of the rendered row
        from deltatune.pipeline.data import read_rows
        from deltatune.pipeline.rows import check_rows

        first = check_rows(*read_rows(config.data.train, config.data), config.data)[0]
        text = rows.chat.render(first["messages"], first["tools"])
        assert prepared.train[0].input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    if case == "lf_kto":
        assert [e.desirable for e in prepared.train] == [True, False]


def test_the_pretokenized_rows_are_used_as_they_are(root, tokenizer):
    config = load_run_config(None, flags_for(root, "axolotl_pretokenized"))
    [first, second] = prepare(config, tokenizer, 1024).train
    rows = [json.loads(line) for line in (DATA / "axolotl_pretokenized.jsonl").read_text().splitlines()]
    assert first.input_ids == rows[0]["input_ids"] and first.labels == rows[0]["labels"]
    assert second.input_ids == rows[1]["input_ids"][:4]  # trailing padding (attention_mask 0) dropped


@pytest.mark.parametrize("case", ["lf_glaive_tools", "lf_dpo_sharegpt", "lf_kto", "axolotl_input_output"])
def test_deltatune_data_shows_each(root, case, capsys):
    flags = flags_for(root, case)
    argv = ["data"] + [item for key, value in flags.items() if key.startswith(("model.", "data."))
                       for item in (f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value))]
    assert cli(argv + ["--examples", "2"]) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "]]" in out
    for text in CASES[case][2][:1]:
        assert text in out
    if case == "lf_dpo_sharegpt":
        assert "--- rejected" in out and "No, it is a planet." in out
    if case == "lf_kto":
        assert "(KTO: the completion is undesirable)" in out


@pytest.mark.parametrize("source, flags, error, match", [
    (f"{INFO}#mllm_demo", {}, ConfigError, r"mllm_demo: the dataset has images \(column 'images'\); deltatune trains text-only"),
    (str(DATA / "openai_parts_with_image.jsonl"), {"data.format": "chat"}, DataError,
     r"openai_parts_with_image.jsonl: row 1, column 'messages': message 1 \(user\): content part 1 is of type 'image_url'"),
    (str(DATA / "mllm_demo.json"), {"data.format": "chat"}, DataError, r"mllm_demo.json: row 1, column 'images': has images"),
    (str(DATA / "kto_en_demo.json"), {"data.format": "chat"}, DataError, r"kto_en_demo.json: row 1, column 'label'.*data.format: kto"),
    (str(DATA / "axolotl_sharegpt_custom_roles.jsonl"), {"data.format": "chat", "data.columns": {"messages": "dialogue"}},
     DataError, r"row 1, column 'dialogue': message 1 has no 'from' key \(its keys: \['speaker', 'text'\]\); map the keys"),
])
def test_refused_files_name_file_row_and_column(root, tokenizer, source, flags, error, match):
    with pytest.raises(error, match=match):
        config = load_run_config(None, {**flags_for(root, "lf_alpaca"), "data.train": source, **flags})
        prepare(config, tokenizer, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_trainable_format_trains_a_few_steps(root, case):
    result = run(load_run_config(None, flags_for(root, case)), echo=lambda *a, **k: None)
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "log.jsonl").read_text().splitlines()
              if '"loss"' in line and '"eval' not in line]
    assert losses and all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("case", sorted(KTO_CASES))
def test_kto_data_trains_with_the_kto_stage(root, case):
    assert stage_for(load_run_config(None, flags_for(root, case))).name == "kto"


@pytest.mark.slow
def test_the_template_training_used_is_saved_and_generate_chat_prompts_with_it(root, monkeypatch, capsys):
    from deltatune.pipeline import render
    from deltatune.pipeline.chat_templates import template_source

    flags = {**flags_for(root, "openai_parts"), "data.chat_template": "llama3", "output.dir": str(root / "out-template")}
    result = run(load_run_config(None, flags), echo=lambda *a, **k: None)
    assert render.saved_template(result.adapter_dir) == template_source("llama3")
    assert render.saved_template(long_model(root)) != template_source("llama3")  # the base keeps its own

    used = []
    real = render.Renderer

    def recording(tokenizer, data):
        used.append(data.chat_template)
        return real(tokenizer, data)

    monkeypatch.setattr(render, "Renderer", recording)
    lines = ["Spell dog."]

    def typed(prompt=""):
        if not lines:
            raise EOFError
        return lines.pop()

    monkeypatch.setattr("builtins.input", typed)
    assert cli(["generate", "--model", str(long_model(root)), "--adapter", str(result.adapter_dir), "--chat",
                "--max-new-tokens", "2"]) == 0
    assert used == [template_source("llama3")]
    assert "model>" in capsys.readouterr().out
