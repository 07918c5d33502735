"""LLaMA-Factory's dataset descriptions, used as they are: `data.train: path/to/dataset_info.json#name`.

An entry of a dataset_info.json says where a dataset is (`file_name`, relative to the json's folder,
or `hf_hub_url` with `subset` and `split`), how it is laid out (`formatting`: alpaca or sharegpt;
`ranking: true` for preference pairs; a `kto_tag` column for KTO feedback), which column holds what
(`columns`) and, for sharegpt, how messages name their keys and speakers (`tags`). It becomes the
same settings a deltatune config would give:

    formatting alpaca                    data.format instruction (preference with ranking, kto with kto_tag)
    formatting sharegpt                  data.format chat (preference, kto as above)
    columns prompt/query/response        data.columns instruction/input/output
    columns history/system/tools         data.columns history/system/tools
    columns messages/chosen/rejected     data.columns messages/chosen/rejected
    columns kto_tag                      data.columns label
    tags role_tag/content_tag            data.message_keys role/content
    tags user_tag/assistant_tag/...      data.roles (observation -> tool, function_call -> function_call)
    num_samples                          data.max_examples
    columns {prompt: text} only, or .txt data.format text (a .txt read one example per line, as LLaMA-Factory does)

Settings the user gave in the config win where they do not contradict the entry; a format that
contradicts it is an error naming both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .rows import DataError, canonical_format

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "tools": "tools", "chosen": "chosen", "rejected": "rejected", "kto_tag": "label"}
SHAREGPT_COLUMNS = {"messages": "messages", "system": "system", "tools": "tools", "chosen": "chosen",
                    "rejected": "rejected", "kto_tag": "label"}
MEDIA_COLUMNS = ("images", "videos", "audios")
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
             "function_tag": "function_call", "system_tag": "system"}
TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
ENTRY_KEYS = {"file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "formatting",
              "ranking", "columns", "tags", "subset", "split", "folder", "num_samples", "load_from"}


def is_entry(source: str | None) -> bool:
    return bool(source) and "#" in source and source.split("#", 1)[0].lower().endswith(".json")


def resolve_entries(data: Any) -> None:
    """Rewrite data.train / data.eval given as dataset_info.json#name into the entry's file and settings."""
    formats = []
    for key in ("train", "eval"):
        source = getattr(data, key)
        if not is_entry(source):
            continue
        path, settings = read_entry(source)
        setattr(data, key, path)
        formats.append((key, source, settings))
    if not formats:
        return
    (_, first_source, settings), *others = formats
    for key, source, other in others:
        if other != settings:
            raise DataError(f"data.eval {source} is described differently from data.train {first_source} "
                            f"({_describe(other)} against {_describe(settings)}); one run reads one layout")
    if data.format not in ("text", settings["format"]) and canonical_format(data.format) != settings["format"]:
        raise DataError(f"data.format = {data.format!r}, but {first_source} describes {settings['format']} data; "
                        "drop data.format (the entry says it) or describe the dataset otherwise")
    data.format = settings["format"]
    data.columns = {**settings["columns"], **data.columns}
    data.message_keys = {**settings["message_keys"], **data.message_keys}
    data.roles = {**settings["roles"], **data.roles}
    if settings.get("max_examples") and data.max_examples is None:
        data.max_examples = settings["max_examples"]
    for name in ("split", "name", "text_split"):
        if settings.get(name):
            setattr(data, name, settings[name])


def read_entry(source: str) -> tuple[str, dict[str, Any]]:
    """(the dataset's file or hub name, deltatune's settings for it) from `dataset_info.json#name`."""
    file_part, name = source.split("#", 1)
    info_path = Path(file_part)
    if not info_path.is_file():
        raise DataError(f"{source}: no dataset_info file at {info_path}")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{info_path} is not valid JSON ({err}); a dataset_info.json maps names to descriptions") from None
    if not isinstance(info, dict):
        raise DataError(f"{info_path} holds a JSON {type(info).__name__}; a dataset_info.json maps names to descriptions")
    if name not in info:
        import difflib

        close = difflib.get_close_matches(name, list(info), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"{info_path} has no dataset {name!r}{hint}; it describes: {', '.join(sorted(info)[:30])}")
    entry = info[name]
    where = f"{info_path}#{name}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: the description is a JSON {type(entry).__name__}, not an object")
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r}; LLaMA-Factory's keys are {', '.join(sorted(ENTRY_KEYS))}")
    if entry.get("file_name"):
        path = info_path.parent / entry["file_name"]
        if not path.exists():
            raise DataError(f"{where}: its file_name {entry['file_name']!r} is not at {path}")
        location = str(path)
    elif entry.get("hf_hub_url"):
        location = entry["hf_hub_url"]
    else:
        other = next((k for k in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if entry.get(k)), None)
        raise DataError(f"{where}: " + (f"{other} sources are not read by deltatune; download the data and give its "
                                        "file_name" if other else "names no file_name or hf_hub_url"))
    return location, settings_of(entry, where, text_file=location.lower().endswith(".txt"))


def settings_of(entry: dict[str, Any], where: str, text_file: bool = False) -> dict[str, Any]:
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}: formatting {formatting!r}; LLaMA-Factory's formattings are alpaca and sharegpt")
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise DataError(f"{where}: columns and tags are objects mapping names to names")
    media = [c for c in MEDIA_COLUMNS if c in columns]
    if media:
        raise DataError(f"{where}: the dataset has {media[0]} (column {columns[media[0]]!r}); deltatune trains "
                        "text-only models so far, so it cannot read this dataset as described")
    table = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    ours = {}
    for theirs, column in columns.items():
        if theirs not in table:
            raise DataError(f"{where}: column key {theirs!r} is not one of {formatting}'s: {', '.join(table)}")
        ours[table[theirs]] = column
    if formatting == "sharegpt" and "messages" not in columns:
        ours["messages"] = "conversations"  # LLaMA-Factory's default sharegpt column
    if entry.get("ranking"):
        fmt = "preference"
        if formatting == "sharegpt":
            ours.setdefault("messages", "conversations")
    elif "kto_tag" in columns:
        fmt = "kto"
    elif formatting == "alpaca" and (text_file or set(columns) == {"prompt"}):
        # pre-training data: LLaMA-Factory's pt stage reads the prompt column (or each line of a .txt) as text
        fmt, ours = "text", ({} if text_file else {"text": columns["prompt"]})
    else:
        fmt = "instruction" if formatting == "alpaca" else "chat"
    message_keys, roles = {}, {}
    if formatting == "sharegpt":
        unknown = sorted(set(tags) - set(TAG_DEFAULTS))
        if unknown:
            raise DataError(f"{where}: tag {unknown[0]!r} is not one of {', '.join(TAG_DEFAULTS)}")
        full = {**TAG_DEFAULTS, **tags}
        message_keys = {"role": full["role_tag"], "content": full["content_tag"]}
        roles = {full[tag]: role for tag, role in TAG_ROLES.items()}
    settings = {"format": fmt, "columns": ours, "message_keys": message_keys, "roles": roles}
    if text_file:
        settings["text_split"] = "line"  # as LLaMA-Factory reads a .txt: one example per line
    if entry.get("num_samples"):
        settings["max_examples"] = int(entry["num_samples"])
    if entry.get("split"):
        settings["split"] = entry["split"]
    if entry.get("subset"):
        settings["name"] = entry["subset"]
    return settings


def _describe(settings: dict[str, Any]) -> str:
    return f"format {settings['format']}, columns {settings['columns']}"
