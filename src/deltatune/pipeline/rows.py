"""Rows as users have them -> the few shapes deltatune trains on.

Every data format is read into one of these canonical rows, checked field by field; the first bad
row is a `DataError` naming the file, the row (1-based) and the column:

    text            {"text"}                                   continued pre-training
    chat            {"messages", "tools"}                      alpaca, sharegpt, OpenAI messages, axolotl chat_template
    segments        {"segments": [(text, trained)]}            axolotl input_output
    tokenized       {"input_ids", "labels"}                    pre-tokenized rows, used as they are
    preference      {"prompt", "chosen", "rejected", "tools",  pairs (TRL, LLaMA-Factory ranking); margin: an
                     "margin"}                                  optional number (TRL's reward trainer), else None
    kto             {"prompt", "completion", "label", "tools"} unpaired feedback (TRL, LLaMA-Factory kto_tag)
    classification  {"text", "text_pair", "label"}
    seq2seq         {"source", "target"}

A message is {"role": system|user|assistant|tool, "content": str} with, on assistant turns,
"tool_calls" ([{"type": "function", "function": {"name", "arguments": dict}}]), "reasoning_content"
and "train" (False: the turn is context, not trained; axolotl's per-message `train`/`weight`).

Speakers are mapped by name (`human`, `gpt`, `function_call`, `observation`, ... and data.roles),
whether a message keys them as role/content (OpenAI) or from/value (sharegpt); content given as a
list of parts keeps its text parts, joined, and refuses any other part. Columns the format does not
read are reported, and those that would change training if read (images, KTO labels, preference
pairs) are errors that say which format reads them.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..config import DeltaError


class DataError(DeltaError):
    """Bad data: the message names the file, the row and the column."""


# The formats a user names, and what each name is read as. LLaMA-Factory's and axolotl's names are aliases.
FORMATS = ("text", "instruction", "chat", "segments", "tokenized", "preference", "kto", "classification", "seq2seq")
ALIASES = {"alpaca": "instruction", "sharegpt": "chat", "openai": "chat", "messages": "chat", "chat_template": "chat",
           "completion": "text", "pretrain": "text", "input_output": "segments", "pretokenized": "tokenized",
           "ranking": "preference", "pairwise": "preference", "dpo": "preference", "unpaired": "kto"}

# Column roles per format (the name of each role's column is data.columns[role], else the role itself).
ROLES: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "instruction": ("instruction", "input", "output", "system", "history", "tools"),
    "chat": ("messages", "system", "tools"),
    "segments": ("segments",),
    "tokenized": ("input_ids", "labels", "attention_mask"),
    "preference": ("prompt", "chosen", "rejected", "instruction", "input", "messages", "system", "history", "tools",
                   "margin"),
    "kto": ("prompt", "completion", "label", "instruction", "input", "output", "messages", "system", "history", "tools"),
    "classification": ("text", "text_pair", "label"),
    "seq2seq": ("source", "target"),
}
REQUIRED = {"text": ("text",), "instruction": ("instruction", "output"), "chat": ("messages",),
            "segments": ("segments",), "tokenized": ("input_ids",), "classification": ("text", "label"),
            "seq2seq": ("source", "target"), "preference": ("chosen", "rejected"), "kto": ("label",)}
# Other names the same columns go by in the wild, tried when the role's own name is absent.
FALLBACK_COLUMNS = {"messages": ("conversations", "conversation"), "system": ("system_prompt",),
                    "label": ("kto_tag",), "chosen": ("chosen_messages",), "rejected": ("rejected_messages",)}
# Columns that would change what is trained if they were read: never skipped in silence.
MEANINGFUL = {"images": "images", "videos": "videos", "audios": "audio", "image": "images", "audio": "audio",
              "kto_tag": "KTO labels (data.format: kto)", "chosen": "preference pairs (data.format: preference)",
              "rejected": "preference pairs (data.format: preference)",
              "chosen_messages": "preference pairs (data.format: preference)",
              "rejected_messages": "preference pairs (data.format: preference)"}

SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
            "model": "assistant", "chatgpt": "assistant", "system": "system", "observation": "tool", "tool": "tool",
            "function": "tool", "ipython": "tool", "function_call": "function_call", "tool_call": "function_call",
            "developer": "system"}
OUR_ROLES = ("system", "user", "assistant", "tool", "function_call")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
TEXT_PARTS = ("text", "input_text", "output_text")


class RowError(Exception):
    """A problem with one column of the row being read; check_rows adds the file and the row."""

    def __init__(self, column: str, problem: str) -> None:
        super().__init__(problem)
        self.column, self.problem = column, problem


def canonical_format(name: str) -> str:
    fmt = ALIASES.get(name, name)
    if fmt not in FORMATS:
        import difflib

        close = difflib.get_close_matches(name, list(FORMATS) + list(ALIASES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"data.format = {name!r} is not a format{hint}; formats: {', '.join(FORMATS)}; "
                        f"LLaMA-Factory and axolotl names read as them: "
                        + ", ".join(f"{a} -> {f}" for a, f in ALIASES.items()))
    return fmt


def column_names(data: Any, first_row: dict[str, Any]) -> dict[str, str]:
    """role -> the column that holds it in these rows (the user's mapping, the role's name, or a known alias)."""
    fmt = canonical_format(data.format)
    known = {r for roles in ROLES.values() for r in roles}
    for role in data.columns:
        if role not in known:
            raise DataError(f"data.columns: {role!r} is not a column role; roles: {', '.join(sorted(known))}")
    names = {}
    for role in ROLES[fmt]:
        if role in data.columns:
            names[role] = data.columns[role]
        elif role not in first_row and any(alt in first_row for alt in FALLBACK_COLUMNS.get(role, ())):
            names[role] = next(alt for alt in FALLBACK_COLUMNS[role] if alt in first_row)
        else:
            names[role] = role
    return names


def check_rows(rows: list[dict[str, Any]], where: str, data: Any, labels: list[str] | None = None,
               notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Every row read into its format's canonical shape; the first bad one is a DataError naming it."""
    fmt = canonical_format(data.format)
    columns = column_names(data, rows[0])
    required = REQUIRED[fmt]
    if fmt == "preference" and "prompt" not in rows[0] and columns["messages"] in rows[0]:
        required = ("messages", "chosen", "rejected")
    if fmt == "kto" and columns["completion"] not in rows[0] and columns["output"] not in rows[0] \
            and columns["messages"] not in rows[0]:
        required = ("completion", "label")
    missing = [columns[r] for r in required if columns[r] not in rows[0]]
    if missing:
        hint = ""
        if fmt == "chat" and "instruction" in rows[0]:
            hint = " (these look like alpaca rows: data.format: instruction)"
        elif fmt == "instruction" and ("messages" in rows[0] or "conversations" in rows[0]):
            hint = " (these look like chat rows: data.format: chat)"
        raise DataError(f"{where}: row 1 has no column {missing[0]!r} (needed by data.format {data.format!r}); "
                        f"its columns are {sorted(rows[0])}; map yours with data.columns{hint}")
    _refuse_meaningful_columns(rows, where, fmt, columns)
    read = set(columns.values())
    unread = [c for c in rows[0] if c not in read and c not in MEANINGFUL]
    if unread and notes is not None:
        notes.append(f"{where}: column(s) not read by data.format {data.format!r}: {', '.join(unread)}")
    reader = Reader(data, columns, labels)
    out = []
    for number, row in enumerate(rows, 1):
        try:
            out.append(reader.row(fmt, row))
        except RowError as err:
            raise DataError(f"{where}: row {number}, column {err.column!r}: {err.problem}") from None
    return out


def _refuse_meaningful_columns(rows: list[dict[str, Any]], where: str, fmt: str, columns: dict[str, str]) -> None:
    read = set(columns.values())
    for column, meaning in MEANINGFUL.items():
        if column in read or column not in rows[0]:
            continue
        for number, row in enumerate(rows, 1):
            value = row.get(column)
            if value not in (None, "", [], {}):
                if meaning in ("images", "videos", "audio"):
                    fix = ("deltatune trains text-only models so far; drop the column (and the <image>-style "
                           "placeholders in the text) to train on the text alone")
                else:
                    fix = f"this column holds {meaning}, which data.format {fmt!r} does not read; set data.format, " \
                          "or drop the column to train without it"
                raise DataError(f"{where}: row {number}, column {column!r}: has {meaning} ({str(value)[:60]!r}); {fix}")
    if fmt in ("chat", "instruction") and "label" in rows[0] and "label" not in read:
        value = rows[0].get("label")
        if isinstance(value, bool):
            raise DataError(f"{where}: row 1, column 'label': a true/false label beside a conversation is KTO "
                            "feedback, which data.format {fmt!r} would ignore; set data.format: kto (or drop the column)")


class Reader:
    """Reads one row of a format into its canonical shape, raising RowError(column, problem)."""

    def __init__(self, data: Any, columns: dict[str, str], labels: list[str] | None) -> None:
        self.data, self.columns, self.labels = data, columns, labels
        self.speakers = dict(SPEAKERS)
        for name, role in (data.roles or {}).items():
            if role not in OUR_ROLES:
                raise DataError(f"data.roles: {name!r} -> {role!r}: a speaker maps to one of {', '.join(OUR_ROLES)}")
            self.speakers[str(name).lower()] = role
        keys = data.message_keys or {}
        unknown = set(keys) - {"role", "content"}
        if unknown:
            raise DataError(f"data.message_keys: {sorted(unknown)[0]!r} is not a message key to map; "
                            "map role and content, e.g. {role: speaker, content: text}")
        self.role_key, self.content_key = keys.get("role"), keys.get("content")

    # ---------------------------------------------------------------- one row per format

    def row(self, fmt: str, row: dict[str, Any]) -> dict[str, Any]:
        return getattr(self, f"_{fmt}")(row)

    def _text(self, row: dict) -> dict:
        return {"text": self.text(row, "text")}

    def _seq2seq(self, row: dict) -> dict:
        return {"source": self.text(row, "source"), "target": self.text(row, "target")}

    def _classification(self, row: dict) -> dict:
        column = self.columns["label"]
        label = row.get(column)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise RowError(column, "missing label")
        label = str(label)
        if self.labels is not None and label not in self.labels:
            raise RowError(column, f"label {label!r} is not in the label set {self.labels}")
        return {"text": self.text(row, "text"), "text_pair": self.text(row, "text_pair", optional=True), "label": label}

    def _instruction(self, row: dict) -> dict:
        messages = self.system(row) + self.history(row) + [
            {"role": "user", "content": self.instruction_prompt(row)},
            {"role": "assistant", "content": self.text(row, "output")}]
        return {"messages": messages, "tools": self.tools(row)}

    def _chat(self, row: dict) -> dict:
        messages = self.messages(row, "messages")
        messages = self.system(row, messages) + messages
        if not any(m["role"] == "assistant" and m.get("train", True) for m in messages):
            raise RowError(self.columns["messages"], "the conversation has no assistant turn to train "
                                                     "(none, or every one marked train: false), so there is nothing to train on")
        return {"messages": messages, "tools": self.tools(row)}

    def _segments(self, row: dict) -> dict:
        column = self.columns["segments"]
        value = row.get(column)
        if not isinstance(value, list) or not value:
            raise RowError(column, f"expected a list of segments [{{\"text\": ..., \"label\": true}}, ...], got {value!r:.60}")
        segments = []
        for i, segment in enumerate(value, 1):
            if not isinstance(segment, dict) or not isinstance(segment.get("text"), str):
                raise RowError(column, f"segment {i} is not an object with a \"text\" string")
            label = segment.get("label", True)
            if not isinstance(label, bool):
                raise RowError(column, f"segment {i}: label {label!r} is not true or false")
            segments.append((segment["text"], label))
        if not any(label and text for text, label in segments):
            raise RowError(column, "no segment has label: true and text, so there is nothing to train on")
        return {"segments": segments}

    def _tokenized(self, row: dict) -> dict:
        ids = self.int_list(row, "input_ids")
        if not ids:
            raise RowError(self.columns["input_ids"], "empty")
        labels_column, mask_column = self.columns["labels"], self.columns["attention_mask"]
        labels = self.int_list(row, "labels") if row.get(labels_column) is not None else list(ids)
        mask = self.int_list(row, "attention_mask") if row.get(mask_column) is not None else [1] * len(ids)
        for column, values in ((labels_column, labels), (mask_column, mask)):
            if len(values) != len(ids):
                raise RowError(column, f"has {len(values)} values but input_ids has {len(ids)}; they go one per token")
        if any(m not in (0, 1) for m in mask):
            raise RowError(mask_column, "holds values other than 0 and 1")
        if 0 in mask:
            first = mask.index(0)
            if any(mask[first:]):
                raise RowError(mask_column, f"has a 0 at position {first + 1} before later 1s; only trailing padding "
                                            "can be masked out (drop padding from pre-tokenized rows: batches are padded here)")
            ids, labels = ids[:first], labels[:first]
        if any(label != -100 and label < 0 for label in labels):
            raise RowError(labels_column, "holds a negative label other than -100 (the not-trained mark)")
        if all(label == -100 for label in labels):
            raise RowError(labels_column, "every label is -100, so there is nothing to train on")
        return {"input_ids": ids, "labels": labels}

    def _preference(self, row: dict) -> dict:
        tools = self.tools(row)
        c = self.columns
        if row.get(c["prompt"]) is not None:
            prompt = self.turns(row, "prompt", "user")
        elif row.get(c["messages"]) is not None:
            prompt = self.messages(row, "messages")
        elif row.get(c["instruction"]) is not None:
            prompt = self.history(row) + [{"role": "user", "content": self.instruction_prompt(row)}]
        else:
            prompt = []  # TRL's implicit prompt: chosen and rejected are whole conversations sharing it
        chosen, rejected = self.turns(row, "chosen", "assistant"), self.turns(row, "rejected", "assistant")
        if not prompt:
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            if not prompt:
                raise RowError(c["prompt"], "no prompt: give a prompt column, or chosen and rejected conversations "
                                            "that start with the same prompt turns")
        prompt = self.system(row, prompt) + prompt
        for role, turns in (("chosen", chosen), ("rejected", rejected)):
            self.check_completion(c[role], prompt, turns)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools, "margin": self.margin(row)}

    def _kto(self, row: dict) -> dict:
        c = self.columns
        label = row.get(c["label"])
        if not isinstance(label, bool):
            raise RowError(c["label"], f"expected true or false (is the completion desirable?), got {label!r:.40}")
        if row.get(c["prompt"]) is not None:
            prompt = self.turns(row, "prompt", "user")
            completion = self.turns(row, "completion", "assistant")
        elif row.get(c["messages"]) is not None:
            messages = self.messages(row, "messages")
            last = len(messages)
            while last and messages[last - 1]["role"] == "assistant":
                last -= 1
            prompt, completion = messages[:last], messages[last:]
            if not completion:
                raise RowError(c["messages"], "the conversation does not end with an assistant turn to judge")
        else:
            prompt = self.history(row) + [{"role": "user", "content": self.instruction_prompt(row)}]
            completion = [{"role": "assistant", "content": self.text(row, "output")}]
        prompt = self.system(row, prompt) + prompt
        self.check_completion(c["completion"], prompt, completion)
        return {"prompt": prompt, "completion": completion, "label": label, "tools": self.tools(row)}

    # ---------------------------------------------------------------- columns

    def text(self, row: dict, role: str, optional: bool = False) -> str | None:
        column = self.columns[role]
        value = row.get(column)
        if value is None and optional:
            return None
        if value is None:
            raise RowError(column, "missing")
        if not isinstance(value, str):
            raise RowError(column, f"expected text, got {type(value).__name__} {value!r:.40}")
        if not value.strip() and not optional:
            raise RowError(column, "empty text")
        return value

    def margin(self, row: dict) -> float | None:
        """A pair's optional margin (TRL's reward-trainer column): a finite number, or None where the cell is empty."""
        column = self.columns["margin"]
        value = row.get(column)
        if value is None or value == "":
            return None
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # True is an int, but not a margin
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # CSV cells arrive as text
            except ValueError:
                pass
        if number is None:
            raise RowError(column, f"expected a number (the pair's reward margin), got {type(value).__name__} "
                                   f"{value!r:.40}")
        if not math.isfinite(number):
            raise RowError(column, f"expected a finite number (the pair's reward margin), got {value!r:.40}")
        return number

    def int_list(self, row: dict, role: str) -> list[int]:
        column = self.columns[role]
        value = row.get(column)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise RowError(column, f"expected a list of integers, got {value!r:.60}")
        return value

    def instruction_prompt(self, row: dict) -> str:
        instruction = self.text(row, "instruction")
        extra = self.text(row, "input", optional=True)
        return instruction + (f"\n\n{extra}" if extra else "")

    def system(self, row: dict, messages: list[dict] | None = None) -> list[dict]:
        """The system message from the system column (or data.system), when the conversation has none of its own."""
        column = self.columns.get("system", "system")
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise RowError(column, f"expected the system prompt as text, got {type(value).__name__}")
        value = value if value and value.strip() else self.data.system
        if not value:
            return []
        if messages and messages[0]["role"] == "system":
            if messages[0]["content"] != value and row.get(column):
                raise RowError(column, "the row has both a system column and a different system message in the "
                                       "conversation; keep one")
            return []
        return [{"role": "system", "content": value}]

    def history(self, row: dict) -> list[dict]:
        column = self.columns.get("history", "history")
        value = row.get(column)
        if value in (None, []):
            return []
        if not isinstance(value, list):
            raise RowError(column, f"expected a list of [instruction, answer] pairs, got {type(value).__name__}")
        turns = []
        for i, pair in enumerate(value, 1):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise RowError(column, f"item {i} is not an [instruction, answer] pair of two strings: {pair!r:.60}")
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        return turns

    def tools(self, row: dict) -> list[dict] | None:
        column = self.columns.get("tools", "tools")
        value = row.get(column)
        if value in (None, "", []):
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise RowError(column, f"is text but not JSON ({err.msg} at character {err.pos}); give the tools "
                                       "as a JSON list of function schemas") from None
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise RowError(column, f"expected a list of function schemas, got {type(value).__name__}")
        tools = []
        for i, tool in enumerate(value, 1):
            if not isinstance(tool, dict):
                raise RowError(column, f"tool {i} is not an object")
            function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise RowError(column, f"tool {i} has no function name; a tool is {{\"name\": ..., \"description\": "
                                       "..., \"parameters\": {...}}, or that inside {\"type\": \"function\", \"function\": ...}")
            tools.append({"type": "function", "function": function})
        return tools

    def turns(self, row: dict, role: str, speaker: str) -> list[dict]:
        """A column that is text (one turn of `speaker`), one message, or a list of messages."""
        column = self.columns[role]
        value = row.get(column)
        if isinstance(value, str):
            if not value.strip():
                raise RowError(column, "empty text")
            return [{"role": speaker, "content": value}]
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not value:
            raise RowError(column, f"expected text or messages, got {value!r:.60}")
        return self.message_list(value, column)

    def messages(self, row: dict, role: str) -> list[dict]:
        column = self.columns[role]
        value = row.get(column)
        if not isinstance(value, list) or not value:
            raise RowError(column, f"expected a list of messages, got {value!r:.60}")
        return self.message_list(value, column)

    def check_completion(self, column: str, prompt: list[dict], completion: list[dict]) -> None:
        if not prompt or prompt[-1]["role"] not in ("user", "tool"):
            raise RowError(column, "the prompt must end with a user (or tool) turn for the completion to answer")
        if any(m["role"] != "assistant" for m in completion):
            raise RowError(column, "a completion holds assistant turns only")

    # ---------------------------------------------------------------- messages

    def message_list(self, value: list, column: str) -> list[dict]:
        out: list[dict] = []
        for i, message in enumerate(value, 1):
            if not isinstance(message, dict):
                raise RowError(column, f"message {i} is not an object")
            out.append(self.message(message, i, column))
        return out

    def message(self, message: dict, number: int, column: str) -> dict:
        where = f"message {number}"
        role_key = self.role_key or ("role" if "role" in message else "from")
        content_key = self.content_key or ("content" if role_key == "role" or "content" in message else "value")
        speaker = message.get(role_key)
        if speaker is None:
            raise RowError(column, f"{where} has no {role_key!r} key (its keys: {sorted(message)}); map the keys "
                                   "with data.message_keys, e.g. {role: from, content: value}")
        role = self.speakers.get(str(speaker).lower())
        if role is None:
            raise RowError(column, f"{where}: unknown speaker {speaker!r}; known: {', '.join(sorted(self.speakers))}; "
                                   f"map yours with data.roles, e.g. {{{speaker}: assistant}}")
        content, part_reasoning, part_calls = self.content(message.get(content_key), f"{where} ({speaker})", column)
        out: dict[str, Any] = {"role": role, "content": content}
        if part_calls:  # LLaMA-Factory v1: tool calls as content parts
            message = {**message, "tool_calls": [self.calls_from_text(c, where, column)[0] for c in part_calls]}
        if part_reasoning:
            message = {**message, "reasoning_content": "".join(part_reasoning)}
        if role == "function_call":  # LLaMA-Factory: the assistant's call, JSON in the value
            out = {"role": "assistant", "content": "", "tool_calls": self.calls_from_text(content, where, column)}
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise RowError(column, f"{where}: tool_calls on a {role} message; only the assistant calls tools")
            out["tool_calls"] = self.calls(calls, where, column)
        if out["role"] == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(message.get(key), str):
                    out[key] = message[key]
        for key in REASONING_KEYS:
            value = message.get(key)
            if value in (None, ""):
                continue
            if out["role"] != "assistant" or not isinstance(value, str):
                raise RowError(column, f"{where}: {key} must be text on an assistant message")
            out["reasoning_content"] = value
        train = message.get("train", True)
        for key in ("weight", "loss_weight"):  # axolotl's, LLaMA-Factory v1's
            weight = message.get(key)
            if weight is not None:
                if weight not in (0, 1):
                    raise RowError(column, f"{where}: {key} {weight!r}; a message's {key} is 0 (not trained) or 1 "
                                           "(deltatune does not scale a turn's loss)")
                train = train and bool(weight)
        if not isinstance(train, bool):
            raise RowError(column, f"{where}: train {train!r} is not true or false")
        if "train" in message and message["train"] and out["role"] != "assistant":
            raise RowError(column, f"{where}: train: true on a {out['role']} turn; only assistant turns are trained")
        if out["role"] == "assistant" and not train:
            out["train"] = False
        if not out["content"].strip() and not out.get("tool_calls") and not (out["role"] == "tool" and content == ""):
            raise RowError(column, f"{where} ({speaker}) has no text")
        return out

    def content(self, value: Any, where: str, column: str) -> tuple[str, list[str], list[str]]:
        """(text, reasoning parts, tool-call parts) of a message's content: text, or a list of parts
        ({"type": "text", "text"|"value": ...}; LLaMA-Factory v1 also has "reasoning" and "tool_call" parts)."""
        if isinstance(value, str):
            return value, [], []
        if value is None:
            return "", [], []
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise RowError(column, f"{where}: content is a {type(value).__name__}; give text or a list of parts")
        texts, reasoning, calls = [], [], []
        for i, part in enumerate(value, 1):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict) or kind not in TEXT_PARTS + ("reasoning", "tool_call", None):
                raise RowError(column, f"{where}: content part {i} is of type {kind!r}; deltatune trains text-only "
                                       "models so far, so only text parts are read; drop the part (or the row)")
            text = part.get("text", part.get("value"))
            if kind == "tool_call" and isinstance(text, dict):
                text = json.dumps(text)
            if not isinstance(text, str):
                raise RowError(column, f"{where}: content part {i} has no text (a \"text\" or \"value\" string)")
            {"reasoning": reasoning, "tool_call": calls}.get(kind, texts).append(text)
        return "".join(texts), reasoning, calls

    def calls_from_text(self, text: str, where: str, column: str) -> list[dict]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise RowError(column, f"{where}: a function_call turn holds JSON {{\"name\": ..., \"arguments\": {{...}}}}; "
                                   f"this is not JSON ({err.msg} at character {err.pos})") from None
        return self.calls(value if isinstance(value, list) else [value], where, column)

    def calls(self, value: Any, where: str, column: str) -> list[dict]:
        if not isinstance(value, list) or not value:
            raise RowError(column, f"{where}: tool_calls must be a non-empty list")
        calls = []
        for i, call in enumerate(value, 1):
            function = call.get("function", call) if isinstance(call, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str) or not name:
                raise RowError(column, f"{where}: tool call {i} has no function name")
            arguments = function.get("arguments", function.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError as err:
                    raise RowError(column, f"{where}: tool call {i} ({name}): its arguments are not JSON "
                                           f"({err.msg} at character {err.pos})") from None
            if not isinstance(arguments, dict):
                raise RowError(column, f"{where}: tool call {i} ({name}): arguments must be a JSON object")
            out = {"type": "function", "function": {"name": name, "arguments": arguments}}
            if isinstance(call, dict) and isinstance(call.get("id"), str):
                out["id"] = call["id"]
            calls.append(out)
        return calls
