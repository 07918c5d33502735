"""A run's settings: one YAML file, every key also a flag, validated before anything runs.

    model:   {name: gpt2, task: causal_lm, dtype: fp32}
    data:    {train: data/train.jsonl, format: instruction, max_length: null}
    method:  lora
    lora:    {r: 16, alpha: 32, target_modules: [c_attn, c_proj], dropout: 0.05}
    train:   {max_steps: 200, batch_size: 8, lr: 2.0e-4}
    output:  {dir: out/run}

A flag overrides a key by its dotted path: `--train.lr 1e-4 --method lora --lora.r 16`
(the value is read as YAML, so `16` is an int, `[q, v]` a list, `null` None). The
section named after the method holds that method's config fields (LoraConfig's for
`lora`); every other key is one of the dataclasses below. Unknown keys and values of
the wrong type or range are errors naming the key, what is allowed and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import METHODS, DeltaConfig, DeltaError, check, validate_fields


class ConfigError(DeltaError):
    """A bad run configuration: the message names the key, the allowed values and the file."""


@dataclass(kw_only=True)
class ModelSection:
    name: str = ""  # a Hugging Face model id or a local folder
    task: Literal["causal_lm", "seq_cls", "seq2seq"] = "causal_lm"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # the frozen base's dtype; trainable tensors stay fp32
    trust_remote_code: bool = False
    revision: str | None = None
    num_labels: int | None = check(None, gt=1)  # seq_cls: the data's label count when None
    quant: Literal["nf4", "fp4", "int8"] | None = None  # a quantised frozen base (bitsandbytes); dtype: its compute dtype
    double_quant: bool = True  # nf4/fp4: 8-bit absmax scales (4.127 bits per weight instead of 4.5)
    int8_threshold: float = check(6.0, ge=0)  # int8: LLM.int8()'s outlier threshold (0: no 16-bit columns)


@dataclass(kw_only=True)
class DataSection:
    train: str = ""  # a .json/.jsonl/.csv/.parquet file, or a `datasets` name
    eval: str | None = None  # the same kinds of source; None: eval_fraction of train
    eval_fraction: float = check(0.0, ge=0, lt=1)
    format: Literal["text", "instruction", "chat", "classification", "seq2seq"] = "text"
    # role -> column name, e.g. {text: body, label: stars}; roles: text, text_pair, label, instruction,
    # input, output, messages, source, target
    columns: dict[str, str] = field(default_factory=dict)
    labels: list[str] | None = None  # classification: the label set (default: every label in train, sorted)
    chat_template: str | None = None  # a built-in template for tokenizers without one: chatml, alpaca, plain
    max_length: int | None = check(None, gt=0)  # None: the rule (mean without outliers x 1.5, capped)
    answer_only: bool = True  # instruction/chat: the loss covers the answers only
    packing: bool = False  # text/instruction/chat: concatenate examples into full-length rows
    max_examples: int | None = check(None, gt=0)
    split: str = "train"  # the split of a `datasets` name
    name: str | None = None  # the configuration of a `datasets` name


@dataclass(kw_only=True)
class TrainSection:
    epochs: float = check(1.0, gt=0)
    max_steps: int | None = check(None, gt=0)  # optimizer steps; overrides epochs
    batch_size: int = check(8, gt=0)  # per process, per micro-batch
    grad_accum: int = check(1, gt=0)
    lr: float = check(2e-4, gt=0)
    head_lr: float | None = check(None, gt=0)  # modules trained whole (a classifier head); None: lr
    optimizer: str = "adamw"  # a torch.optim class name, lower case (adamw, sgd, ...), or adamw8bit, paged_adamw8bit, paged_adamw (bitsandbytes)
    weight_decay: float = check(0.0, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = check(0, ge=0)
    warmup_ratio: float = check(0.0, ge=0, lt=1)
    max_grad_norm: float | None = check(1.0, gt=0)
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    eval_every: int | None = check(None, gt=0)  # optimizer steps; None: at the end only
    save_every: int | None = check(None, gt=0)  # optimizer steps; None: at the end only
    keep_last: int = check(2, gt=0)
    log_every: int = check(10, gt=0)
    on_nan: Literal["stop", "skip"] = "stop"
    init_adapter: str | None = None  # continue training this adapter (deltatune's or peft's)
    # continue from the newest complete checkpoint in output.dir (an error when there is none);
    # "auto": continue when there is one, else start afresh. The config must match the run's (see rundir.py)
    resume: bool | Literal["auto"] = False
    progress: bool = True  # the live progress bar


@dataclass(kw_only=True)
class OutputSection:
    dir: str = "out/run"
    merged: bool = False  # also export the merged model (standard transformers layout) at the end
    overwrite: bool = False  # output.dir holds another run: clear it (renamed aside, then deleted) and start afresh


@dataclass(kw_only=True)
class EvalSection:
    max_new_tokens: int = check(64, gt=0)  # generation metrics for seq2seq / instruction data
    generate: bool = False  # compute exact match / BLEU / ROUGE-L by generating (slower)
    batch_size: int = check(16, gt=0)


SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "train": TrainSection,
                             "output": OutputSection, "eval": EvalSection}


@dataclass
class RunConfig:
    model: ModelSection
    data: DataSection
    method: str
    delta: DeltaConfig
    train: TrainSection
    output: OutputSection
    eval: EvalSection
    source: str = "<flags>"  # where it was read from, for messages

    def as_dict(self) -> dict[str, Any]:
        """The config as YAML-ready data (what `deltatune train` prints and saves beside the run)."""
        out: dict[str, Any] = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["method"] = self.method
        out[self.method] = {k: v for k, v in self.delta.to_dict().items() if k != "method"}
        return out

    def command(self) -> str:
        """The equivalent `deltatune train` command line, every non-default key as a flag."""
        flags = []
        for name, cls in SECTIONS.items():
            default = cls()
            for f in dataclasses.fields(cls):
                value = getattr(getattr(self, name), f.name)
                if value != getattr(default, f.name):
                    flags.append(f"--{name}.{f.name} {_flag_value(value)}")
        flags.append(f"--method {self.method}")
        for f in dataclasses.fields(self.delta):
            value = getattr(self.delta, f.name)
            # the field's own default: a config with a required field (AdaLoRA's total_step) cannot be built bare
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.metadata.get("serialise", True) and value != default:
                flags.append(f"--{self.method}.{f.name} {_flag_value(value)}")
        return "deltatune train " + " ".join(flags)


def _flag_value(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"'{text}'" if any(c in text for c in " [],{}:*") else text


# ---------------------------------------------------------------- reading


def _yaml_loader() -> type:
    """PyYAML's safe loader, reading 5e-3 and 1e4 as numbers (YAML 1.2), not strings as YAML 1.1 does."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                   r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."),
    )
    return Loader


def read_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def load_run_config(path: str | os.PathLike | None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config (or start empty), apply `--key value` overrides, validate everything."""
    import yaml

    source = str(path) if path is not None else "<flags>"
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"no config file at {file}")
        try:
            data = read_yaml(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{file} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file} must hold a mapping of sections (model, data, method, train, ...), "
                              f"not a {type(data).__name__}")
    pairs = overrides.items() if isinstance(overrides, dict) else parse_flags(overrides or [])
    for key, value in pairs:
        _set_path(data, key, value, source)
    return build_run_config(data, source)


def parse_flags(args: list[str]) -> list[tuple[str, Any]]:
    """`--a.b value` / `--a.b=value` pairs; values are read as YAML."""
    import yaml

    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected a --key value flag, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = "true"  # a bare flag switches a setting on
            else:
                i += 1
                value = args[i]
        try:
            parsed = read_yaml(value)
        except yaml.YAMLError:
            parsed = value
        pairs.append((key.replace("-", "_"), parsed))
        i += 1
    return pairs


def _set_path(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: cannot set {key}: {part} is not a section")
    node[parts[-1]] = value


def build_run_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    method = data.get("method", "lora")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"{source}: method = {method!r} is not allowed: expected one of {', '.join(sorted(METHODS))}")
    known = set(SECTIONS) | {"method"} | set(METHODS)
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}{_suggest(unknown[0], known)}; the keys are "
                          f"{', '.join(sorted(SECTIONS))}, method, and a section named after the method ({method})")
    other_methods = [k for k in data if k in METHODS and k != method]
    if other_methods:
        raise ConfigError(f"{source}: section {other_methods[0]!r} does not apply: method is {method!r} "
                          f"(set --method {other_methods[0]} to use it)")
    sections = {name: _section(cls, data.get(name), name, source) for name, cls in SECTIONS.items()}
    delta = _method_config(method, data.get(method), source)
    config = RunConfig(method=method, delta=delta, source=source, **sections)
    _cross_checks(config)
    return config


def _section(cls: type, values: Any, name: str, source: str) -> Any:
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {name} must be a mapping of settings, got {values!r:.60}")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"{source}: {name}.{key} is not a setting{_suggest(key, fields)}; "
                              f"{name} settings: {', '.join(sorted(fields))}")
    try:
        section = cls(**values)
        validate_fields(section, prefix=name)
    except DeltaError as err:
        raise ConfigError(f"{source}: {err}") from None
    return section


def _method_config(method: str, values: Any, source: str) -> DeltaConfig:
    cls = METHODS[method].config_cls
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {method} must be a mapping of {cls.__name__} fields, got {values!r:.60}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("serialise", True)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"{source}: {method}.{key} is not a {cls.__name__} field{_suggest(key, fields)}; "
                              f"its fields: {', '.join(sorted(fields))}")
    try:
        return cls(**values)
    except DeltaError as err:
        raise ConfigError(f"{source}: {method}: {err}") from None


def _cross_checks(config: RunConfig) -> None:
    where = config.source
    if not config.model.name:
        raise ConfigError(f"{where}: model.name is required (a Hugging Face model id or a local folder)")
    if not config.data.train:
        raise ConfigError(f"{where}: data.train is required (a .json/.jsonl/.csv/.parquet file or a datasets name)")
    task_formats = {"causal_lm": {"text", "instruction", "chat"}, "seq_cls": {"classification"}, "seq2seq": {"seq2seq", "instruction"}}
    if config.data.format not in task_formats[config.model.task]:
        raise ConfigError(f"{where}: data.format = {config.data.format!r} does not fit model.task = {config.model.task!r}; "
                          f"use one of {', '.join(sorted(task_formats[config.model.task]))}")
    if config.data.packing and config.model.task != "causal_lm":
        raise ConfigError(f"{where}: data.packing works for causal_lm only")
    if config.train.mixed_precision != "no" and config.model.dtype != "fp32":
        raise ConfigError(f"{where}: train.mixed_precision = {config.train.mixed_precision!r} needs model.dtype = 'fp32' "
                          "(autocast over fp32 weights); a bf16/fp16 base runs in its own dtype with mixed_precision 'no'")


def _suggest(word: str, choices: set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
