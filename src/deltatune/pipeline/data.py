"""Data: files -> checked rows -> tokenised examples -> batches.

Formats (data.format) and the columns each reads (rename with data.columns):

    text            text                                  continued pre-training, loss on every token
    instruction     instruction, input (optional), output alpaca; loss on the output only
    chat            messages [{role, content}] or sharegpt conversations [{from, value}];
                    loss on every assistant turn only
    classification  text, text_pair (optional), label     sequence classification
    seq2seq         source, target                        encoder-decoder

Every row is checked before anything is tokenised; a bad row is a `DataError` that
names the file, the row (1-based, over data rows) and the column. Chat and
instruction data are rendered with the tokenizer's chat template, or a built-in
one (chatml, alpaca, plain) for tokenizers without one; the tokens of each answer
are found by rendering the conversation turn by turn, so the prompt gets label
-100 and every assistant turn is trained.

Length rule: the recommended max_length is the mean token length after dropping
lengths above the 99th percentile, times 1.5, capped by the model's limit. A
user's data.max_length wins; the number of truncated examples is reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import DeltaError
from .config import DataSection, read_utf8

IGNORE = -100

ROLES = {
    "text": ("text",),
    "instruction": ("instruction", "input", "output"),
    "chat": ("messages",),
    "classification": ("text", "text_pair", "label"),
    "seq2seq": ("source", "target"),
}
OPTIONAL = {"input", "text_pair"}

# Built-in chat templates for tokenizers without one: (turn format by role, generation prompt).
TEMPLATES: dict[str, tuple[dict[str, str], str]] = {
    "chatml": ({"system": "<|im_start|>system\n{content}<|im_end|>\n", "user": "<|im_start|>user\n{content}<|im_end|>\n",
                "assistant": "<|im_start|>assistant\n{content}<|im_end|>\n"}, "<|im_start|>assistant\n"),
    "alpaca": ({"system": "{content}\n\n", "user": "### Instruction:\n{content}\n\n", "assistant": "### Response:\n{content}\n\n"},
               "### Response:\n"),
    "plain": ({"system": "{content}\n", "user": "User: {content}\n", "assistant": "Assistant: {content}\n"}, "Assistant: "),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "bot": "assistant", "model": "assistant"}


class DataError(DeltaError):
    """Bad data: the message names the file, the row and the column."""


# ---------------------------------------------------------------- reading


def read_rows(source: str, data: DataSection) -> tuple[list[dict[str, Any]], str]:
    """Rows of a local file (JSON, JSONL, CSV, Parquet) or of a `datasets` name, and a label for messages."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in (".json", ".jsonl", ".csv", ".parquet"):
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .csv or .parquet")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty; put the training rows in it (or point data.train at another file)")
        small = path.stat().st_size < 2_000_000_000  # read here whole; datasets streams what is larger
        rows = _json_rows(path) if suffix in (".json", ".jsonl") and small else None
        if rows is None:
            if suffix == ".csv" and small:
                read_utf8(path, DataError)  # datasets would only say "An error occurred while generating the dataset"
            builder = {".jsonl": "json"}.get(suffix, suffix[1:])
            try:
                dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
            except Exception as err:  # noqa: BLE001 - any reader failure is the file's fault here
                raise DataError(f"{path}: cannot be read as {builder} ({type(err).__name__}: {str(err)[:300]})") from None
            rows = [dict(row) for row in dataset]
        where = str(path)
    elif path.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet") or "/" in source and not _looks_like_hub(source):
        raise DataError(f"no data file at {path}")
    else:
        try:
            dataset = datasets.load_dataset(source, data.name, split=data.split)
        except Exception as err:  # noqa: BLE001
            raise DataError(f"the dataset {source!r} (split {data.split!r}) cannot be loaded: {str(err)[:300]}") from None
        where = f"dataset {source}"
        rows = [dict(row) for row in dataset]
    if data.max_examples is not None:
        rows = rows[: data.max_examples]
    if not rows:
        raise DataError(f"{where}: no rows")
    return rows, where


def _looks_like_hub(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/"))


def _json_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON or JSONL file, whichever the content is, whatever the suffix says: one object per line
    (JSONL), a JSON array of objects, or an object of equal-length columns ({"text": [...], "label": [...]}),
    printed on one line or many. Every row gets every column (None where a row has none), as datasets gives them."""
    text = read_utf8(path, DataError)
    if not text.strip():
        raise DataError(f"{path}: the file is empty (only whitespace); put the training rows in it")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        whole, whole_error = None, err
    else:
        whole_error = None
    if isinstance(whole, list):
        rows = whole
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {number} of the JSON array is a JSON {type(row).__name__}, not an object "
                                "with columns; write one object per row, e.g. [{\"text\": \"...\"}, ...]")
    elif isinstance(whole, dict) and text.strip().count("\n") == 0:
        rows = [whole]  # one line: a JSONL file of one row, as datasets reads it too
    elif isinstance(whole, dict):
        rows = _columns_to_rows(path, whole)
    elif whole is not None:
        raise DataError(f"{path} holds a single JSON {type(whole).__name__}; write one object per line (JSONL), "
                        "a JSON array of objects, or an object of columns")
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if not rows and text.lstrip()[:1] in "[{" and whole_error is not None and number == _first_line(text):
                    # a document spread over lines (not JSONL): its own error says where it breaks
                    raise DataError(f"{path}: not valid JSON ({whole_error.msg} at line {whole_error.lineno}, column "
                                    f"{whole_error.colno}); it is read as one JSON document (an array of objects or an "
                                    "object of columns) or as JSONL, one object per line") from None
                raise DataError(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                                "JSONL holds one complete object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object with columns")
            rows.append(row)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return [{c: row.get(c) for c in columns} for row in rows]


def _first_line(text: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.strip())


def _is_columns(value: dict[str, Any]) -> bool:
    return bool(value) and all(isinstance(v, list) for v in value.values())


def _columns_to_rows(path: Path, columns: dict[str, Any]) -> list[dict[str, Any]]:
    if not _is_columns(columns):
        bad = next((k for k, v in columns.items() if not isinstance(v, list)), None)
        raise DataError(f"{path} holds one JSON object over several lines, read as columns, but its key {bad!r} is "
                        "not a list of values; write columns as {\"col\": [values...], ...}, rows as a JSON array of "
                        "objects, or JSONL (one whole object per line)")
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{path}: the columns have different lengths ({', '.join(f'{k}: {n}' for k, n in lengths.items())}); "
                        "every column needs one value per row")
    names = list(columns)
    return [{k: columns[k][i] for k in names} for i in range(next(iter(lengths.values())))]


# ---------------------------------------------------------------- checking


def column_names(data: DataSection) -> dict[str, str]:
    known = {r for roles in ROLES.values() for r in roles}
    for role in data.columns:
        if role not in known:
            raise DataError(f"data.columns: {role!r} is not a column role; roles: {', '.join(sorted(known))}")
    return {role: data.columns.get(role, role) for role in ROLES[data.format]}


def check_rows(rows: list[dict[str, Any]], where: str, data: DataSection, labels: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows normalised to the format's roles; the first bad row is a DataError naming it."""
    columns = column_names(data)
    if data.format == "chat" and columns["messages"] not in rows[0] and "conversations" in rows[0] and "messages" not in data.columns:
        columns["messages"] = "conversations"  # sharegpt's column name
    missing = [c for role, c in columns.items() if role not in OPTIONAL and c not in rows[0]]
    if missing:
        raise DataError(f"{where}: row 1 has no column {missing[0]!r} (needed by data.format {data.format!r}); "
                        f"its columns are {sorted(rows[0])}; map yours with data.columns")
    out = []
    for number, row in enumerate(rows, 1):
        out.append(_check_row(row, number, where, data.format, columns, labels))
    return out


def _check_row(row: dict, number: int, where: str, fmt: str, columns: dict[str, str], labels: list[str] | None) -> dict:
    def fail(column: str, problem: str) -> DataError:
        return DataError(f"{where}: row {number}, column {column!r}: {problem}")

    def text(role: str, optional: bool = False) -> str | None:
        column = columns[role]
        value = row.get(column)
        if value is None and optional:
            return None
        if value is None:
            raise fail(column, "missing")
        if not isinstance(value, str):
            raise fail(column, f"expected text, got {type(value).__name__} {value!r:.40}")
        if not value.strip() and not optional:
            raise fail(column, "empty text")
        return value

    if fmt == "text":
        return {"text": text("text")}
    if fmt == "instruction":
        return {"instruction": text("instruction"), "input": text("input", optional=True) or "", "output": text("output")}
    if fmt == "seq2seq":
        return {"source": text("source"), "target": text("target")}
    if fmt == "classification":
        label = row.get(columns["label"])
        if label is None or (isinstance(label, str) and not label.strip()):
            raise fail(columns["label"], "missing label")
        label = str(label)
        if labels is not None and label not in labels:
            raise fail(columns["label"], f"label {label!r} is not in the label set {labels}")
        return {"text": text("text"), "text_pair": text("text_pair", optional=True), "label": label}
    # chat
    column = columns["messages"]
    messages = row.get(column)
    if not isinstance(messages, list) or not messages:
        raise fail(column, f"expected a list of messages, got {messages!r:.60}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise fail(column, f"message {i + 1} is not an object")
        if "role" in message:
            role, content = message.get("role"), message.get("content")
        else:
            role, content = SHAREGPT_ROLES.get(str(message.get("from")).lower()), message.get("value")
            if role is None:
                raise fail(column, f"message {i + 1}: unknown speaker {message.get('from')!r} "
                                   f"(sharegpt 'from' values: {', '.join(sorted(SHAREGPT_ROLES))})")
        if role not in ("system", "user", "assistant"):
            raise fail(column, f"message {i + 1}: role {role!r} is not system, user or assistant")
        if not isinstance(content, str) or not content.strip():
            raise fail(column, f"message {i + 1} ({role}) has no text")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise fail(column, "the conversation has no assistant turn, so there is nothing to train on")
    return {"messages": turns}


def label_set(rows: list[dict[str, Any]], data: DataSection) -> list[str]:
    if data.labels is not None:
        return [str(label) for label in data.labels]
    found = sorted({str(r["label"]) for r in rows}, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    return found


# ---------------------------------------------------------------- rendering and tokenising


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # per-token (IGNORE where not trained) or a class index
    token_type_ids: list[int] | None = None
    decoder_labels: list[int] | None = None  # seq2seq: the target's ids
    length: int = 0  # tokens before truncation

    def __post_init__(self) -> None:
        self.length = self.length or len(self.input_ids)


class Renderer:
    """Turns checked rows into token ids with their training labels."""

    def __init__(self, tokenizer: Any, data: DataSection, task: str, labels: list[str] | None = None) -> None:
        self.tokenizer, self.data, self.task, self.labels = tokenizer, data, task, labels
        self.template = None if getattr(tokenizer, "chat_template", None) and data.chat_template is None else \
            TEMPLATES.get(data.chat_template or "chatml")
        if data.chat_template is not None and data.chat_template not in TEMPLATES:
            raise DataError(f"data.chat_template = {data.chat_template!r} is not a built-in template; "
                            f"built-in: {', '.join(TEMPLATES)} (or leave it unset to use the tokenizer's own)")

    def encode(self, row: dict[str, Any]) -> Example:
        fmt = self.data.format
        if fmt == "classification":
            enc = self.tokenizer(row["text"], row["text_pair"]) if row["text_pair"] is not None else self.tokenizer(row["text"])
            return Example(list(enc["input_ids"]), self.labels.index(row["label"]), enc.get("token_type_ids"))
        if fmt == "seq2seq" or (fmt == "instruction" and self.task == "seq2seq"):
            source = row["source"] if fmt == "seq2seq" else _instruction_prompt(row)
            target = row["target"] if fmt == "seq2seq" else row["output"]
            ids = list(self.tokenizer(source)["input_ids"])
            target_ids = list(self.tokenizer(text_target=target)["input_ids"])
            return Example(ids, IGNORE, decoder_labels=target_ids, length=max(len(ids), len(target_ids)))
        if fmt == "text":
            ids = self._ids(row["text"]) + self._eos()
            return Example(ids, list(ids))
        messages = row["messages"] if fmt == "chat" else [
            {"role": "user", "content": _instruction_prompt(row)}, {"role": "assistant", "content": row["output"]}]
        return self._chat(messages)

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) pieces: each assistant turn is trained."""
        pieces, previous = [], ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = self.render(messages[:i], generation_prompt=True)
                if not prompt.startswith(previous):
                    raise DataError("the chat template does not render a conversation as a prefix of its continuation, "
                                    "so answers cannot be found; set data.answer_only: false or data.chat_template")
                pieces.append((prompt[len(previous):], False))
                previous = prompt
            text = self.render(messages[: i + 1])
            if not text.startswith(previous):
                raise DataError("the chat template does not render a conversation as a prefix of its continuation, "
                                "so answers cannot be found; set data.answer_only: false or data.chat_template")
            pieces.append((text[len(previous):], message["role"] == "assistant"))
            previous = text
        return [(t, trained) for t, trained in pieces if t]

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        if self.template is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        turns, prompt = self.template
        text = "".join(turns[m["role"]].format(content=m["content"]) for m in messages)
        return text + (prompt if generation_prompt else "")

    def _chat(self, messages: list[dict[str, str]]) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        bos = self._bos()
        if bos:
            ids, labels = list(bos), [IGNORE] * len(bos)
        pieces = self.segments(messages)
        for n, (text, trained) in enumerate(pieces):
            piece = self._ids(text)
            if trained and n == len(pieces) - 1 and self.template is not None:
                piece += self._eos()
            ids += piece
            labels += piece if (trained or not self.data.answer_only) else [IGNORE] * len(piece)
        return Example(ids, labels)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    def _bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        add = getattr(self.tokenizer, "add_bos_token", False)
        return [bos] if bos is not None and add and self.template is not None else []


def _instruction_prompt(row: dict[str, Any]) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


# ---------------------------------------------------------------- lengths


@dataclass
class LengthReport:
    count: int
    mean: float
    p50: int
    p90: int
    p99: int
    longest: int
    recommended: int
    chosen: int
    model_limit: int | None
    truncated: int
    lost_answers: int = 0

    def lines(self) -> list[str]:
        limit = f", capped by the model's limit {self.model_limit}" if self.model_limit else ""
        return [
            f"token lengths of {self.count} examples: mean {self.mean:.1f}, median {self.p50}, p90 {self.p90}, "
            f"p99 {self.p99}, longest {self.longest}",
            f"recommended max_length {self.recommended} (mean without lengths above the 99th percentile x 1.5{limit}); "
            f"using {self.chosen}; {self.truncated} example(s) truncated"
            + (f", {self.lost_answers} of them lost their whole answer and were dropped" if self.lost_answers else ""),
        ]


def recommended_max_length(lengths: list[int], model_limit: int | None) -> int:
    """Mean of the lengths at or below the 99th percentile, times 1.5, rounded up, capped by the model's limit."""
    if not lengths:
        raise DataError("no examples to measure")
    ordered = sorted(lengths)
    cut = _percentile(ordered, 99)
    kept = [n for n in ordered if n <= cut]
    value = math.ceil(sum(kept) / len(kept) * 1.5)
    return min(value, model_limit) if model_limit else value


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def length_report(examples: list[Example], chosen: int, recommended: int, model_limit: int | None) -> LengthReport:
    lengths = sorted(e.length for e in examples)
    return LengthReport(count=len(lengths), mean=sum(lengths) / len(lengths), p50=_percentile(lengths, 50),
                        p90=_percentile(lengths, 90), p99=_percentile(lengths, 99), longest=lengths[-1],
                        recommended=recommended, chosen=chosen, model_limit=model_limit,
                        truncated=sum(n > chosen for n in lengths))


def truncate(examples: list[Example], max_length: int) -> tuple[list[Example], int]:
    """Cut every example to max_length; drop those left with nothing to train. Returns (kept, dropped)."""
    kept, dropped = [], 0
    for e in examples:
        ids = e.input_ids[:max_length]
        labels = e.labels[:max_length] if isinstance(e.labels, list) else e.labels
        types = e.token_type_ids[:max_length] if e.token_type_ids is not None else None
        decoder = e.decoder_labels[:max_length] if e.decoder_labels is not None else None
        if isinstance(labels, list) and all(label == IGNORE for label in labels):
            dropped += 1
            continue
        kept.append(Example(ids, labels, types, decoder, length=e.length))
    return kept, dropped


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate causal-LM examples into rows of max_length tokens (the last row may be shorter)."""
    rows, ids, labels = [], [], []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
        while len(ids) >= max_length:
            rows.append(Example(ids[:max_length], labels[:max_length]))
            ids, labels = ids[max_length:], labels[max_length:]
    if ids and any(label != IGNORE for label in labels):
        rows.append(Example(ids, labels))
    return rows


# ---------------------------------------------------------------- batches


@dataclass
class Collator:
    pad_id: int
    task: str

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if examples[0].token_type_ids is not None:
            types = torch.zeros_like(ids)
            for i, e in enumerate(examples):
                types[i, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
            batch["token_type_ids"] = types
        if self.task == "seq_cls":
            batch["labels"] = torch.tensor([e.labels for e in examples])
        elif self.task == "seq2seq":
            target = max(len(e.decoder_labels) for e in examples)
            labels = torch.full((len(examples), target), IGNORE, dtype=torch.long)
            for i, e in enumerate(examples):
                labels[i, : len(e.decoder_labels)] = torch.tensor(e.decoder_labels)
            batch["labels"] = labels
        else:
            labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
            for i, e in enumerate(examples):
                labels[i, : len(e.labels)] = torch.tensor(e.labels)
            batch["labels"] = labels
        return batch


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=g).tolist()


def global_batch(count: int, seed: int, offset: int, size: int) -> list[int]:
    """The `size` example indices that follow the first `offset` of the endless stream of epochs.

    The stream is epoch 0's permutation, then epoch 1's, and so on, so the data position of a
    run is one integer (examples consumed) and a resumed run continues exactly where it stopped.
    A run on several processes splits each global batch between them.
    """
    out: list[int] = []
    while len(out) < size:
        epoch, start = divmod(offset + len(out), count)
        order = epoch_order(count, seed, epoch)
        out += order[start: start + size - len(out)]
    return out


@dataclass
class Prepared:
    """Everything the loop needs from the data."""

    train: list[Example]
    eval: list[Example]
    lengths: LengthReport
    labels: list[str] | None
    renderer: Renderer
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def prepare(config: Any, tokenizer: Any, model_limit: int | None) -> Prepared:
    """Read, check, tokenise, measure, truncate (and pack) the run's data."""
    import datasets

    data, task = config.data, config.model.task
    rows, where = read_rows(data.train, data)
    train_rows = check_rows(rows, where, data, labels=data.labels)
    labels = label_set(train_rows, data) if data.format == "classification" else None
    notes: list[str] = []
    if data.eval:
        raw, eval_where = read_rows(data.eval, data)
        eval_rows = check_rows(raw, eval_where, data, labels=labels)
    elif data.eval_fraction:
        order = epoch_order(len(train_rows), config.train.seed, epoch=-1)
        n_eval = max(1, round(len(train_rows) * data.eval_fraction))
        if n_eval >= len(train_rows):
            raise DataError(f"{where}: data.eval_fraction {data.eval_fraction} of {len(train_rows)} row(s) holds out "
                            f"{n_eval} for eval and leaves no training rows; add rows, lower data.eval_fraction, "
                            "or give the eval rows as a file in data.eval")
        eval_rows = [train_rows[i] for i in order[:n_eval]]
        train_rows = [train_rows[i] for i in sorted(order[n_eval:])]
        notes.append(f"eval: {n_eval} rows held out of {where} (data.eval_fraction {data.eval_fraction})")
    else:
        eval_rows = []
    renderer = Renderer(tokenizer, data, task, labels)
    train = _encode_all(renderer, train_rows, where)
    evaluation = _encode_all(renderer, eval_rows, data.eval or where)
    recommended = recommended_max_length([e.length for e in train], model_limit)
    chosen = data.max_length or recommended
    if model_limit and chosen > model_limit:
        notes.append(f"data.max_length {chosen} is above the model's limit {model_limit}; using {model_limit}")
        chosen = model_limit
    report = length_report(train, chosen, recommended, model_limit)
    if data.packing:  # whole examples are concatenated and cut into rows: nothing is truncated away
        before = len(train)
        train = pack(train, chosen)
        report.truncated = 0
        notes.append(f"packing: {before} examples into {len(train)} rows of up to {chosen} tokens")
    else:
        train, report.lost_answers = truncate(train, chosen)
    evaluation, _ = truncate(evaluation, chosen)
    if not train:
        raise DataError(f"{where}: no example keeps a trained token within max_length {chosen}; raise data.max_length")
    datasets.enable_progress_bars()
    return Prepared(train=train, eval=evaluation, lengths=report, labels=labels, renderer=renderer,
                    eval_rows=eval_rows, notes=notes)


def _encode_all(renderer: Renderer, rows: list[dict[str, Any]], where: str) -> list[Example]:
    """Tokenise every row (through datasets.map); a row the template cannot render names itself."""
    import datasets

    if not rows:
        return []

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            e = renderer.encode(row)
        except DataError as err:
            raise DataError(f"{where}: row {index + 1}: {err}") from None
        return {"input_ids": e.input_ids, "labels": e.labels if isinstance(e.labels, list) else [e.labels],
                "token_type_ids": e.token_type_ids or [], "decoder_labels": e.decoder_labels or [], "length": e.length}

    mapped = datasets.Dataset.from_list(rows).map(encode, with_indices=True, remove_columns=list(rows[0]),
                                                 load_from_cache_file=False, desc="tokenising")
    per_token = renderer.data.format not in ("classification", "seq2seq") and not (
        renderer.data.format == "instruction" and renderer.task == "seq2seq")
    out = []
    for r in mapped:
        labels = r["labels"] if per_token else r["labels"][0]
        out.append(Example(r["input_ids"], labels, r["token_type_ids"] or None, r["decoder_labels"] or None, r["length"]))
    return out
