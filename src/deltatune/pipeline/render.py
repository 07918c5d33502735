"""Canonical rows -> token ids and training labels, exactly as inference will see them.

A conversation is rendered once, whole, with the chat template (the tokenizer's own, or
data.chat_template: a built-in name, a Jinja string or a file), and tokenised once, whole, with
no special tokens added (the template writes them). Each trained assistant turn is a span of
characters of that text, and a token is trained when its characters (the tokenizer's offset
mapping) overlap a span. So the ids are those of tokenising the conversation as a whole, which is
what generation is prompted with; tokenising turn by turn gives other ids at the seams (an extra
`▁` with sentencepiece tokenizers, a trailing space split off), and breaks on templates that
rewrite earlier turns (Qwen3 drops earlier answers' reasoning).

Where a turn's span is, without relying on the template rendering a conversation as a prefix of
its continuation:
  * start: the end of the prompt, i.e. render(messages[:i], add_generation_prompt=True), found as a
    prefix of the whole text (or, failing that, the generation prompt's own text just before the answer);
  * the answer's text: render the whole conversation again with this turn's content, reasoning and
    tool calls replaced by marker strings; the two texts differ exactly where the turn's content is;
  * end: after the content, the template's end-of-turn text (`<|im_end|>\\n`, `<|eot_id|>`, `</s>`, ...),
    read once from a probe conversation, so the model learns to stop.
Text the template inserts between the prompt and the answer is trained (it is the model's to
write) unless it is an empty `<think></think>` block (Qwen3's, for answers without reasoning):
set data.train_empty_think to train those too.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

from .rows import DataError

MARK = "\ue000deltatune{}\ue001"  # private-use characters: no real content starts or ends like this
EMPTY_THINK = re.compile(r"\s*<think>\s*</think>\s*")
DEFAULT_TEMPLATE = "chatml"  # for tokenizers with no chat template of their own


class Renderer:
    """Chat rendering and tokenisation with answer masks, for one tokenizer and one data section."""

    def __init__(self, tokenizer: Any, data: Any) -> None:
        from .chat_templates import template_source

        self.tokenizer, self.data = tokenizer, data
        own = getattr(tokenizer, "chat_template", None)
        if data.chat_template is not None:
            self.template: str | None = template_source(data.chat_template)
            self.template_name = data.chat_template if len(data.chat_template) < 60 else "the given template"
        elif own:
            self.template, self.template_name = None, "the tokenizer's own"
        else:
            self.template, self.template_name = template_source(DEFAULT_TEMPLATE), DEFAULT_TEMPLATE
        self.exact = bool(getattr(tokenizer, "is_fast", False))
        # Whether plain tokenisation starts with BOS (add_bos_token is not set on every tokenizer that does):
        # templates written for any tokenizer (alpaca, plain) then write it too, as inference would see it.
        bos = getattr(tokenizer, "bos_token_id", None)
        self.adds_bos = bos is not None and list(tokenizer("a")["input_ids"][:1]) == [bos]
        self._end_of_turn: str | None = None

    def template_to_save(self) -> str | None:
        """The template to save with the tokenizer when it is not the tokenizer's own, so generation renders alike."""
        return self.template

    # ---------------------------------------------------------------- text

    def render(self, messages: list[dict], tools: list[dict] | None = None, generation_prompt: bool = False) -> str:
        kwargs: dict[str, Any] = {"add_bos_token": self.adds_bos}
        if tools:
            kwargs["tools"] = tools
        if self.template is not None:
            kwargs["chat_template"] = self.template
        try:
            return self.tokenizer.apply_chat_template(_plain(messages), tokenize=False,
                                                      add_generation_prompt=generation_prompt, **kwargs)
        except Exception as err:  # noqa: BLE001 - jinja's raise_exception and template bugs alike
            raise DataError(f"the chat template ({self.template_name}) cannot render this conversation: "
                            f"{type(err).__name__}: {str(err)[:300]}") from None

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """What generation is prompted with after these turns (the same text training rendered before an answer)."""
        return self.render(messages, tools, generation_prompt=True)

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.ids(self.prompt(messages, tools))

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def end_of_turn(self) -> str:
        """The text the template writes after an assistant turn's content (read from a probe conversation)."""
        if self._end_of_turn is None:
            mark = MARK.format("eot")
            probe = self.render([{"role": "user", "content": "hello"}, {"role": "assistant", "content": mark}])
            self._end_of_turn = probe[probe.rindex(mark) + len(mark):] if mark in probe else ""
        return self._end_of_turn

    def stop_ids(self) -> list[int]:
        """Token ids that end an answer in generation: the tokenizer's eos and the template's end-of-turn token."""
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        marker = self.end_of_turn().strip()
        if marker:
            ids = self.ids(marker)
            if len(ids) == 1 and ids[0] not in stops:
                stops.append(ids[0])
        return stops

    # ---------------------------------------------------------------- spans

    def spans(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendered conversation and the character spans of its trained assistant turns."""
        full = self.render(messages, tools)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or not message.get("train", True):
                continue
            first, last = self._content(messages, i, tools, full)
            start = self._answer_start(messages, i, tools, full, first)
            inserted = full[start:first]
            if inserted and EMPTY_THINK.fullmatch(inserted) and not self.data.train_empty_think:
                start = first
            self._check_rendered(message, full[start:last], i, last_turn=i == len(messages) - 1)
            end = self._turn_end(messages, i, tools, full, last)
            if spans and start < spans[-1][1]:
                raise DataError(f"the chat template ({self.template_name}) renders assistant turn {i + 1} before the "
                                "end of the previous one, so its answer cannot be found; set data.chat_template")
            spans.append((start, end))
        return full, spans

    def _content(self, messages: list[dict], i: int, tools: list[dict] | None, full: str) -> tuple[int, int]:
        marked = copy.deepcopy(messages)
        turn = marked[i]
        turn["content"] = MARK.format(f"c{i}")
        if turn.get("reasoning_content"):
            turn["reasoning_content"] = MARK.format(f"r{i}")
        for n, call in enumerate(turn.get("tool_calls") or []):
            call["function"]["name"] = MARK.format(f"n{i}.{n}")
            call["function"]["arguments"] = {MARK.format(f"a{i}.{n}"): MARK.format(f"v{i}.{n}")}
        other = self.render(marked, tools)
        prefix = len(os.path.commonprefix([full, other]))
        room = min(len(full), len(other)) - prefix
        suffix = len(os.path.commonprefix([full[::-1], other[::-1]]))
        suffix = min(suffix, room)
        if MARK.format(f"c{i}") not in other:
            raise DataError(f"the chat template ({self.template_name}) does not write assistant turn {i + 1}'s content; "
                            "set data.chat_template to one that renders every turn")
        return prefix, len(full) - suffix

    def _turn_end(self, messages: list[dict], i: int, tools: list[dict] | None, full: str, last: int) -> int:
        """Past the end-of-turn marker that closes turn i (after what the template writes behind the content,
        such as a tool call's closing tag), never into the next message."""
        eot = self.end_of_turn()
        if not eot:
            return last
        if full.startswith(eot, last):
            return last + len(eot)
        bound = self._content(messages, i + 1, tools, full)[0] if i + 1 < len(messages) else len(full)
        at = full.find(eot, last)
        return at + len(eot) if 0 <= at and at + len(eot) <= bound else last

    def _answer_start(self, messages: list[dict], i: int, tools: list[dict] | None, full: str, first: int) -> int:
        prompt = self.render(messages[:i], tools, generation_prompt=True) if i else None
        if prompt is not None and full.startswith(prompt) and len(prompt) <= first:
            return len(prompt)
        # The template rewrites earlier turns once more follow: find its generation prompt just before the answer.
        if i:
            bare = self.render(messages[:i], tools)
            suffix = prompt[len(bare):] if prompt.startswith(bare) else ""
            if suffix:
                at = full.rfind(suffix, 0, first + 1)
                if at >= 0:
                    return at + len(suffix)
        return first

    def _check_rendered(self, message: dict, text: str, i: int, last_turn: bool) -> None:
        """A template that silently leaves out what the turn carries would train on less than the data says.
        (Earlier turns' reasoning may go: Qwen3's template drops it, as its inference prompts do.)"""
        reasoning = (message.get("reasoning_content") or "").strip()
        if reasoning and last_turn and reasoning not in text:
            raise DataError(f"the chat template ({self.template_name}) does not render assistant turn {i + 1}'s "
                            "reasoning_content; set data.chat_template: qwen3 (or another that writes <think> blocks), "
                            "or move the reasoning into the content")
        for call in message.get("tool_calls") or []:
            if call["function"]["name"] not in text:
                raise DataError(f"the chat template ({self.template_name}) does not render assistant turn {i + 1}'s "
                                f"tool call {call['function']['name']!r}; use a template that takes tools "
                                "(data.chat_template: chatml, qwen2.5, qwen3, llama3, mistral)")

    # ---------------------------------------------------------------- ids and labels

    def conversation(self, messages: list[dict], tools: list[dict] | None, train_all: bool) -> tuple[list[int], list[int]]:
        """(ids, labels) of a whole conversation; labels are -100 outside the trained spans (or none, train_all)."""
        if tools and not self._takes_tools(tools):
            raise DataError(f"the chat template ({self.template_name}) does not render the tools column; use a "
                            "template that takes tools (data.chat_template: chatml, qwen2.5, qwen3, llama3, mistral)")
        full, spans = self.spans(messages, tools)
        return self.labelled(full, spans, train_all)

    def labelled(self, text: str, spans: list[tuple[int, int]], train_all: bool = False) -> tuple[list[int], list[int]]:
        from .data import IGNORE

        if self.exact:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            labels = [t if train_all or _overlaps(s, e, spans) else IGNORE for t, (s, e) in zip(ids, enc["offset_mapping"])]
            return ids, labels
        # A slow tokenizer has no offsets: tokenise piece by piece (its seams may differ from a whole tokenisation).
        ids, labels, cursor = [], [], 0
        for start, end in spans + [(len(text), len(text))]:
            for piece, trained in ((text[cursor:start], False), (text[start:end], True)):
                if piece:
                    piece_ids = self.ids(piece)
                    ids += piece_ids
                    labels += piece_ids if trained or train_all else [IGNORE] * len(piece_ids)
            cursor = end
        return ids, labels

    def _takes_tools(self, tools: list[dict]) -> bool:
        name = tools[0]["function"]["name"]
        probe = [{"role": "user", "content": "hello"}]
        return name in self.render(probe, tools, generation_prompt=True)


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return end > start and any(start < b and end > a for a, b in spans)


def _plain(messages: list[dict]) -> list[dict]:
    """Messages as templates expect them: deltatune's own keys (train) removed."""
    return [{k: v for k, v in m.items() if k != "train"} for m in messages]


def saved_template(folder: Any) -> str | None:
    """The chat template saved in a tokenizer folder (an adapter's, after training), or None.

    transformers writes it to chat_template.jinja (5.x) or into tokenizer_config.json (4.x)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, str) else None
    return None
