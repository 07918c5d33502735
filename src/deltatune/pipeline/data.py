"""Data: files -> checked rows -> tokenised examples -> batches.

Reading (this file): JSON, JSONL, CSV, Parquet, .txt (data.text_split), a folder of .txt files, a
`datasets` name, or a LLaMA-Factory dataset_info.json entry (dataset_info.py). Checking (rows.py): every
format's rows become one canonical shape, the first bad row a `DataError` naming the file, the row
(1-based, over data rows) and the column. Rendering (render.py): conversations are rendered whole with
the chat template and tokenised whole; trained tokens are found by character offsets.

    text            text                                  continued pre-training, loss on every token
    instruction     instruction, input, output (+ system, history, tools)     alpaca; loss on the answers
    chat            messages (role/content or from/value; tool calls, parts)  sharegpt, OpenAI; loss on
                    the assistant turns (not those marked train: false, never on tool results)
    segments        segments [{text, label}]              axolotl input_output; loss where label is true
    tokenized       input_ids (+ labels, attention_mask)  used as they are
    preference      prompt, chosen, rejected              the DPO stage (stage: orpo for ORPO)
    kto             prompt, completion, label             the KTO stage (stage: kto)
    classification  text, text_pair (optional), label     sequence classification
    seq2seq         source, target                        encoder-decoder

Length rule: the recommended max_length is the mean token length after dropping
lengths above the 99th percentile, times 1.5, capped by the model's limit. A
user's data.max_length wins; the number of truncated examples is reported.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import DeltaError
from .config import DataSection, read_utf8
from .packing import collate_packed, pack
from .rows import DataError, canonical_format, check_rows  # noqa: F401 - check_rows is part of this module's API

IGNORE = -100
TXT_SPLITS = ("block", "line", "file")
CHAT_FORMATS = ("instruction", "chat", "preference", "kto")  # rendered with a chat template


# ---------------------------------------------------------------- reading


def read_rows(source: str, data: DataSection) -> tuple[list[dict[str, Any]], str]:
    """Rows of a local file (JSON, JSONL, CSV, Parquet, plain text) or of a `datasets` name, and a label for messages."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    if path.suffix.lower() == ".txt" or path.is_dir() and any(path.glob("*.txt")):
        rows, where = _txt_rows(path, data), str(path)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix not in (".json", ".jsonl", ".csv", ".parquet"):
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .csv, .parquet or .txt")
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


def _txt_rows(path: Path, data: DataSection) -> list[dict[str, Any]]:
    """Plain text for continued pre-training: {"text": document} rows, a document being a blank-line-separated
    block (data.text_split: block, the default), a line (line), or a whole file (file); a folder reads every
    .txt file in it, in name order."""
    if canonical_format(data.format) != "text":
        raise DataError(f"{path}: a .txt file holds plain text, read with data.format: text (it is {data.format!r}); "
                        "give conversations or instructions as .json/.jsonl")
    if data.text_split not in TXT_SPLITS:
        raise DataError(f"data.text_split = {data.text_split!r}; choose block (documents separated by blank lines), "
                        "line (one document per line) or file (one document per file)")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files[0].is_file():
        raise DataError(f"no data file at {path}")
    rows: list[dict[str, Any]] = []
    for file in files:
        text = read_utf8(file, DataError).replace("\r\n", "\n")
        if data.text_split == "file":
            documents = [text]
        elif data.text_split == "line":
            documents = text.split("\n")
        else:
            documents = re.split(r"\n[ \t]*\n", text)
        rows += [{"text": d.strip("\n")} for d in documents if d.strip()]
    if not rows:
        raise DataError(f"{path}: no text (the file is empty or only whitespace); put the documents in it")
    return rows


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


# ---------------------------------------------------------------- checking (rows.py) and encoding


def label_set(rows: list[dict[str, Any]], data: DataSection) -> list[str]:
    if data.labels is not None:
        return [str(label) for label in data.labels]
    found = sorted({str(r["label"]) for r in rows}, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    return found


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # per-token (IGNORE where not trained) or a class index
    token_type_ids: list[int] | None = None
    decoder_labels: list[int] | None = None  # seq2seq: the target's ids
    length: int = 0  # tokens before truncation
    rejected: "Example | None" = None  # preference pairs: this example is the chosen completion
    desirable: bool | None = None  # KTO rows: the completion's label
    position_ids: list[int] | None = None  # a packed row (packing.py): positions restarting at each example
    margin: float | None = None  # preference pairs: the row's `margin` column, m in the reward model's loss

    def __post_init__(self) -> None:
        self.length = self.length or len(self.input_ids)


class Encoder:
    """Turns canonical rows (rows.py) into token ids with their training labels (render.py for chats)."""

    def __init__(self, tokenizer: Any, data: DataSection, task: str, labels: list[str] | None = None) -> None:
        from .render import Renderer

        self.tokenizer, self.data, self.task, self.labels = tokenizer, data, task, labels
        self.format = canonical_format(data.format)
        self.chat = Renderer(tokenizer, data)

    def encode(self, row: dict[str, Any]) -> Example:
        fmt = self.format
        if fmt == "classification":
            enc = self.tokenizer(row["text"], row["text_pair"]) if row["text_pair"] is not None else self.tokenizer(row["text"])
            return Example(list(enc["input_ids"]), self.labels.index(row["label"]), enc.get("token_type_ids"))
        if self.task == "seq2seq":
            source, target = self.source_target(row)
            ids = list(self.tokenizer(source)["input_ids"])
            target_ids = list(self.tokenizer(text_target=target)["input_ids"])
            return Example(ids, IGNORE, decoder_labels=target_ids, length=max(len(ids), len(target_ids)))
        if fmt == "text":
            ids = self.chat.ids(row["text"]) + self._eos()
            return Example(ids, list(ids))
        if fmt == "segments":
            text, spans, cursor = "", [], 0
            for piece, trained in row["segments"]:
                if trained:
                    spans.append((len(text), len(text) + len(piece)))
                text += piece
            ids, labels = self.chat.labelled(text, spans)
            return Example(ids, labels)
        if fmt == "tokenized":
            vocab = len(self.tokenizer)
            bad = next((t for t in row["input_ids"] + [x for x in row["labels"] if x != IGNORE] if not 0 <= t < vocab), None)
            if bad is not None:
                raise DataError(f"token id {bad} is outside the tokenizer's vocabulary (0 .. {vocab - 1}); were these "
                                "rows tokenized with another tokenizer?")
            return Example(list(row["input_ids"]), list(row["labels"]))
        if fmt == "preference":
            chosen = self._conversation(row["prompt"] + row["chosen"], row["tools"], completion_only=True)
            chosen.rejected = self._conversation(row["prompt"] + row["rejected"], row["tools"], completion_only=True)
            chosen.margin = row.get("margin")
            return chosen
        if fmt == "kto":
            example = self._conversation(row["prompt"] + row["completion"], row["tools"], completion_only=True)
            example.desirable = row["label"]
            return example
        return self._conversation(row["messages"], row["tools"])

    def _conversation(self, messages: list[dict], tools: list[dict] | None, completion_only: bool = False) -> Example:
        if completion_only:  # pairs and feedback: only the completion's turns count, never the prompt's answers
            last = max(i for i, m in enumerate(messages) if m["role"] != "assistant")
            messages = [dict(m, train=False) if m["role"] == "assistant" and i < last else m for i, m in enumerate(messages)]
        ids, labels = self.chat.conversation(messages, tools, train_all=not self.data.answer_only)
        return Example(ids, labels)

    def source_target(self, row: dict[str, Any]) -> tuple[str, str]:
        if self.format == "seq2seq":
            return row["source"], row["target"]
        messages = row["messages"]
        if messages[-1]["role"] != "assistant" or any(m.get("tool_calls") for m in messages) or row.get("tools"):
            raise DataError("an encoder-decoder reads an instruction and its answer; tool calls need a causal LM")
        return "\n\n".join(m["content"] for m in messages[:-1]), messages[-1]["content"]

    def reference(self, row: dict[str, Any]) -> tuple[str, str] | None:
        """(prompt text, reference answer) for generation metrics, or None where a row has no final answer."""
        if self.task == "seq2seq":
            return self.source_target(row)
        if "messages" not in row:
            return None
        turns = row["messages"]
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        if not turns[last]["content"].strip() or turns[last].get("tool_calls"):
            return None
        return self.chat.prompt(turns[:last], row.get("tools")), turns[last]["content"]

    def _eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

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
        rejected = None
        if e.rejected is not None:  # a pair is kept whole or not at all
            kept_rejected, _ = truncate([e.rejected], max_length)
            if not kept_rejected:
                dropped += 1
                continue
            rejected = kept_rejected[0]
        kept.append(Example(ids, labels, types, decoder, length=e.length, rejected=rejected, desirable=e.desirable,
                            margin=e.margin))
    return kept, dropped


# ---------------------------------------------------------------- batches


@dataclass
class Collator:
    pad_id: int
    task: str

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if examples[0].position_ids is not None:  # packed rows: position_ids and no attention_mask; use_cache=False
            return collate_packed(examples, self.pad_id)
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


def global_batch(count: int, seed: int, offset: int, size: int, lengths: "Sequence[int] | None" = None) -> list[int]:
    """The `size` example indices that follow the first `offset` of the endless stream of epochs.

    The stream is epoch 0's permutation, then epoch 1's, and so on, so the data position of a
    run is one integer (examples consumed) and a resumed run continues exactly where it stopped.
    A run on several processes splits each global batch between them. With `lengths`
    (data.group_by_length) each epoch's order is `grouped_order`'s: batches of similar lengths,
    still a function of (seed, epoch) alone.
    """
    out: list[int] = []
    while len(out) < size:
        epoch, start = divmod(offset + len(out), count)
        order = epoch_order(count, seed, epoch) if lengths is None else grouped_order(tuple(lengths), seed, epoch, size)
        out += order[start: start + size - len(out)]
    return out


GROUP_SPAN = 64  # batches per sorted chunk: wider groups tighter, narrower keeps more of the shuffle


@functools.lru_cache(maxsize=4)
def grouped_order(lengths: tuple[int, ...], seed: int, epoch: int, size: int) -> list[int]:
    """One epoch's order for length-grouped batches: the epoch's permutation cut into chunks of
    GROUP_SPAN batches, each chunk sorted by length (longest first) and cut into batches of `size`,
    then the batches shuffled (seeded by (seed, epoch)), so consecutive batches are not ordered by length."""
    order = epoch_order(len(lengths), seed, epoch)
    span = size * GROUP_SPAN
    ordered = [i for at in range(0, len(order), span) for i in sorted(order[at:at + span], key=lambda i: -lengths[i])]
    batches = [ordered[at:at + size] for at in range(0, len(ordered), size)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
    return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]


@dataclass
class Prepared:
    """Everything the loop needs from the data."""

    train: list[Example]
    eval: list[Example]
    lengths: LengthReport
    labels: list[str] | None
    renderer: Encoder
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def prepare(config: Any, tokenizer: Any, model_limit: int | None) -> Prepared:
    """Read, check, tokenise, measure, truncate (and pack) the run's data."""
    import datasets

    data, task = config.data, config.model.task
    notes: list[str] = []
    rows, where = read_rows(data.train, data)
    train_rows = check_rows(rows, where, data, labels=data.labels, notes=notes)
    labels = label_set(train_rows, data) if canonical_format(data.format) == "classification" else None
    if data.eval:
        raw, eval_where = read_rows(data.eval, data)
        eval_rows = check_rows(raw, eval_where, data, labels=labels, notes=notes)
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
    renderer = Encoder(tokenizer, data, task, labels)
    if renderer.format in CHAT_FORMATS and task == "causal_lm":
        notes.append(f"chat template: {renderer.chat.template_name}")
    train = _encode_all(renderer, train_rows, where)
    evaluation = _encode_all(renderer, eval_rows, data.eval or where)
    recommended = recommended_max_length([e.length for e in train], model_limit)
    chosen = data.max_length or recommended
    if model_limit and chosen > model_limit:
        notes.append(f"data.max_length {chosen} is above the model's limit {model_limit}; using {model_limit}")
        chosen = model_limit
    report = length_report(train, chosen, recommended, model_limit)
    train, report.lost_answers = truncate(train, chosen)
    if data.packing and train:  # whole examples share rows, each computed as if alone (packing.py)
        before, tokens = len(train), sum(len(e.input_ids) for e in train)
        train = pack(train, chosen)
        notes.append(f"packing: {before} examples into {len(train)} rows of up to {chosen} tokens "
                     f"({tokens / (len(train) * chosen):.0%} full)")
    evaluation, _ = truncate(evaluation, chosen)
    if not train:
        raise DataError(f"{where}: no example keeps a trained token within max_length {chosen}; raise data.max_length")
    datasets.enable_progress_bars()
    return Prepared(train=train, eval=evaluation, lengths=report, labels=labels, renderer=renderer,
                    eval_rows=eval_rows, notes=notes)


def _encode_all(renderer: Encoder, rows: list[dict[str, Any]], where: str) -> list[Example]:
    """Tokenise every row (through datasets.map); a row the template cannot render names itself."""
    import datasets

    if not rows:
        return []

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            e = renderer.encode(row)
        except DataError as err:
            raise DataError(f"{where}: row {index + 1}: {err}") from None
        rejected = e.rejected or Example([], [])
        return {"input_ids": e.input_ids, "labels": e.labels if isinstance(e.labels, list) else [e.labels],
                "token_type_ids": e.token_type_ids or [], "decoder_labels": e.decoder_labels or [], "length": e.length,
                "rejected_ids": rejected.input_ids, "rejected_labels": rejected.labels,
                "desirable": -1 if e.desirable is None else int(e.desirable),
                # NaN for no margin: an Arrow column keeps one type, and a read margin is always finite (rows.py)
                "margin": math.nan if e.margin is None else float(e.margin)}

    # Rows go to datasets as JSON text: their nested values (tool arguments, messages) vary in shape from row to
    # row, which Arrow's column types cannot hold.
    table = datasets.Dataset.from_dict({"row": [json.dumps(row) for row in rows]})
    mapped = table.map(lambda r, i: encode(json.loads(r["row"]), i), with_indices=True, remove_columns=["row"],
                       load_from_cache_file=False, desc="tokenising")
    per_token = renderer.format != "classification" and renderer.task != "seq2seq"
    out = []
    for r in mapped:
        labels = r["labels"] if per_token else r["labels"][0]
        rejected = Example(r["rejected_ids"], r["rejected_labels"]) if r["rejected_ids"] else None
        out.append(Example(r["input_ids"], labels, r["token_type_ids"] or None, r["decoder_labels"] or None, r["length"],
                           rejected=rejected, desirable=None if r["desirable"] < 0 else bool(r["desirable"]),
                           margin=None if math.isnan(r["margin"]) else r["margin"]))
    return out
