"""Answer masks from one whole tokenisation, for every built-in template and both tokenizer styles.

The contract: an example's ids are the ids of tokenising the whole rendered conversation (what
inference sees), its labels equal those ids at the trained positions and -100 elsewhere, the trained
tokens cover every trained answer and its end-of-turn marker and nothing of a prompt, and the
generation prompt of each answer tokenises to the ids that precede it in training.
"""

from __future__ import annotations

import pytest

from data_tokenizers import STYLES, tokenizer
from deltatune.pipeline.chat_templates import TEMPLATES
from deltatune.pipeline.config import DataSection
from deltatune.pipeline.data import IGNORE
from deltatune.pipeline.render import Renderer
from deltatune.pipeline.rows import DataError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Fine, thanks."}, {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Sunny today."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CHAT = [{"role": "user", "content": "What is the weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "{\"sky\": \"sunny\"}"},
             {"role": "assistant", "content": "Sunny today."}]
TOOL_TEMPLATES = ("chatml", "qwen2.5", "qwen3", "llama3", "mistral")


def renderer(template: str, style: str, **data) -> Renderer:
    return Renderer(tokenizer(style), DataSection(chat_template=template, **data))


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def check_contract(r: Renderer, messages: list[dict], tools=None) -> tuple[list[int], list[int]]:
    tok = r.tokenizer
    ids, labels = r.conversation(messages, tools, train_all=False)
    whole = r.render(messages, tools)
    assert ids == tok(whole, add_special_tokens=False)["input_ids"]
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels))
    answers = [m for m in messages if m["role"] == "assistant" and m.get("train", True)]
    runs = trained_runs(ids, labels)
    assert len(runs) == len(answers), (tok.decode(ids), [tok.decode(run) for run in runs])
    eot = r.end_of_turn().strip()
    for run, answer in zip(runs, answers):
        text = tok.decode(run)
        assert answer["content"] in text
        for call in answer.get("tool_calls", []):
            assert call["function"]["name"] in text
        if eot:
            assert eot in text, (eot, text)
    for message in messages:
        if message["role"] != "assistant" and message["content"]:
            assert not any(message["content"] in tok.decode(run) for run in runs)
    return ids, labels


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_trained_tokens_are_the_whole_conversations_tokens(template, style):
    r = renderer(template, style)
    ids, labels = check_contract(r, CHAT)
    if template == "qwen3":
        return  # its prompts rewrite earlier turns: test_qwen3_* below
    # generation is prompted with exactly the ids that precede each answer in training
    starts = [i for i in range(len(ids)) if labels[i] != IGNORE and (i == 0 or labels[i - 1] == IGNORE)]
    for start, turn in zip(starts, [i for i, m in enumerate(CHAT) if m["role"] == "assistant"]):
        assert r.render(CHAT).startswith(r.prompt(CHAT[:turn]))
        prompt = r.prompt_ids(CHAT[:turn])
        # equal ids up to the seam: a byte-level tokenizer may split a prompt's final "\n\n" otherwise when
        # the answer follows it, as the real tokenizers do; never more than that last token differs
        assert prompt[:-1] == ids[:len(prompt) - 1], (template, style)
        assert len(prompt) - 1 <= start  # nothing of the prompt is trained


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("template", TOOL_TEMPLATES)
def test_tool_calls_are_trained_and_tool_results_never(template, style):
    r = renderer(template, style)
    ids, labels = check_contract(r, TOOL_CHAT, TOOLS)
    trained = r.tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert "Paris" in trained and "sunny" not in trained  # the call's arguments yes, the result no


def test_a_template_without_tools_refuses_a_tool_row_instead_of_dropping_the_tools():
    r = renderer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}", "bytelevel")
    with pytest.raises(DataError, match="does not render the tools column; use a template that takes tools"):
        r.conversation(TOOL_CHAT, TOOLS, train_all=False)


@pytest.mark.parametrize("style", STYLES)
def test_qwen3_multi_turn_rows_train_and_empty_think_blocks_do_not(style):
    r = renderer("qwen3", style)
    ids, labels = check_contract(r, CHAT)
    whole = r.render(CHAT)
    assert "<think>\n\n</think>" in whole  # the template inserts one before the last answer
    trained = r.tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert "<think>" not in trained
    with_think = renderer("qwen3", style, train_empty_think=True)
    ids2, labels2 = with_think.conversation(CHAT, None, train_all=False)
    assert ids2 == ids and "<think>" in r.tokenizer.decode([t for t, label in zip(ids2, labels2) if label != IGNORE])


def test_qwen3_reasoning_of_the_last_answer_is_trained_and_earlier_reasoning_dropped_as_the_template_does():
    r = renderer("qwen3", "bytelevel")
    messages = [dict(m) for m in CHAT]
    messages[2]["reasoning_content"] = "They greet me."
    messages[4]["reasoning_content"] = "Look it up."
    ids, labels = r.conversation(messages, None, train_all=False)
    text = r.tokenizer.decode(ids)
    assert "They greet me." not in text and "Look it up." in text
    trained = r.tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert "<think>\nLook it up.\n</think>" in trained and "Sunny today." in trained


def test_a_template_that_drops_reasoning_is_an_error_not_a_silent_loss():
    r = renderer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}", "bytelevel")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "reasoning_content": "be casual"}]
    with pytest.raises(DataError, match="does not render assistant turn 2's reasoning_content"):
        r.conversation(messages, None, train_all=False)


def test_turns_marked_not_to_train_are_context():
    r = renderer("chatml", "bytelevel")
    messages = [dict(m) for m in CHAT]
    messages[2]["train"] = False
    ids, labels = r.conversation(messages, None, train_all=False)
    trained = r.tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert "Fine, thanks." not in trained and "Sunny today." in trained


@pytest.mark.parametrize("template", ["llama3", "llama2", "mistral", "gemma"])
def test_chat_prompts_start_with_one_bos(template):
    """generate --chat tokenises the rendered prompt without adding special tokens again."""
    from deltatune.cli import chat_renderer

    tok = tokenizer("metaspace")
    r = chat_renderer(tok, template)
    ids = r.prompt_ids([{"role": "user", "content": "Hello there"}])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's bos_token, once


def test_stop_ids_include_the_templates_end_of_turn():
    r = renderer("chatml", "bytelevel")
    assert r.tokenizer.convert_tokens_to_ids("<|im_end|>") in r.stop_ids()
    assert r.tokenizer.eos_token_id in r.stop_ids()
