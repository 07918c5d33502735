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
`lora`). `stage` (sft, dpo, kto, orpo, reward, grpo) picks what the run trains for, by default the stage the
data format implies (pipeline/stages); a stage's own settings are the section named
after it (`dpo: {beta: 0.1}`). Every other key is one of the dataclasses below. Unknown keys and values of
the wrong type or range are errors naming the key, what is allowed and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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
    # seq_cls: load a checkpoint whose classifier head has another label count with a fresh head of the
    # data's count (transformers' ignore_mismatched_sizes); a head of the right size is kept as it is
    reinit_head: bool = False
    quant: Literal["nf4", "fp4", "int8"] | None = None  # a quantised frozen base (bitsandbytes); dtype: its compute dtype
    double_quant: bool = True  # nf4/fp4: 8-bit absmax scales (4.127 bits per weight instead of 4.5)
    int8_threshold: float = check(6.0, ge=0)  # int8: LLM.int8()'s outlier threshold (0: no 16-bit columns)
    # the attention kernel (transformers' attn_implementation); None: the model's default (sdpa). With
    # flash_attention_2 (a CUDA GPU and the flash-attn package) packed rows take the varlen path, no mask built.
    attention: Literal["sdpa", "eager", "flash_attention_2"] | None = None


@dataclass(kw_only=True)
class DataSection:
    # a .json/.jsonl/.csv/.parquet/.txt file, a folder of .txt files, a `datasets` name, or an entry of a
    # LLaMA-Factory dataset_info.json: path/to/dataset_info.json#name (its file, formatting, columns and tags)
    train: str = ""
    eval: str | None = None  # the same kinds of source; None: eval_fraction of train
    eval_fraction: float = check(0.0, ge=0, lt=1)
    # text, instruction, chat, segments, tokenized, preference, kto, classification, seq2seq; or the
    # LLaMA-Factory / axolotl name of one (alpaca, sharegpt, completion, chat_template, input_output, ...)
    format: str = "text"
    # role -> column name, e.g. {text: body, label: stars}; roles per format in rows.py (text, instruction,
    # input, output, system, history, tools, messages, prompt, chosen, rejected, completion, label, ...)
    columns: dict[str, str] = field(default_factory=dict)
    message_keys: dict[str, str] = field(default_factory=dict)  # {role: from, content: value}; default: either pair
    roles: dict[str, str] = field(default_factory=dict)  # the file's speaker -> system/user/assistant/tool/function_call
    system: str | None = None  # a system prompt for rows that have none of their own
    labels: list[str] | None = None  # classification: the label set (default: every label in train, sorted)
    # a chat template: a built-in name (chatml, qwen2.5, qwen3, llama3, llama2, mistral, gemma, phi-3, zephyr,
    # alpaca, plain), a Jinja string, or a .jinja file; None: the tokenizer's own (chatml when it has none)
    chat_template: str | None = None
    train_empty_think: bool = False  # train the empty <think></think> blocks a template inserts (Qwen3)
    text_split: str = "block"  # .txt files: one document per blank-line-separated block, per line, or per file
    max_length: int | None = check(None, gt=0)  # None: the rule (mean without outliers x 1.5, capped)
    answer_only: bool = True  # instruction/chat: the loss covers the answers only
    # causal_lm: whole examples share rows of max_length tokens, each computed as if alone (packing.py)
    packing: bool = False
    # without packing: batches of similar lengths (less padding); the order stays a function of the seed
    group_by_length: bool = False
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
    seed: int = 0  # 0 .. 2**32 - 1 (checked in _cross_checks: numpy's seeding takes no more)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # trainable weights stored in 16 bits (full, freeze, bitfit on a bf16/fp16 base): "fp32" keeps an fp32 copy the
    # optimizer updates (see deltatune/master.py); "none" updates the 16-bit weights themselves (small updates round away);
    # "kahan" keeps a 16-bit compensation buffer per weight instead of the fp32 copy (14 bytes a parameter, not 18)
    master_weights: Literal["fp32", "none", "kahan"] = "fp32"
    gradient_checkpointing: bool = False
    eval_every: int | None = check(None, gt=0)  # optimizer steps; None: at the end only
    save_every: int | None = check(None, gt=0)  # optimizer steps; None: at the end only
    keep_last: int = check(2, gt=0)
    log_every: int = check(10, gt=0)
    on_nan: Literal["stop", "skip"] = "stop"
    # causal LMs and seq2seq: "fused" computes the head and the loss chunk by chunk (deltatune.losses), never
    # holding the full logits; "standard" is the model's own loss. Equal to float tolerance.
    loss: Literal["fused", "standard"] = "fused"
    label_smoothing: float = check(0.0, ge=0, lt=1)  # causal LMs and seq2seq, with the fused loss
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
    # Method config fields the pipeline sets from the run rather than the user (AdaLoRA's total_step):
    # they hold a placeholder until train.run knows the step count (see with_step_count).
    filled: tuple[str, ...] = ()
    stage: str | None = None  # the training stage the run names; None: the one its data format implies
    # the settings of every stage that has some (section name -> its dataclass), defaults where not given
    stage_settings: dict[str, Any] = field(default_factory=dict)

    def _stage_section(self) -> str | None:
        """The settings section of the stage this run trains with, if that stage has one."""
        from .stages import active_stage

        stage = active_stage(self)
        return stage.name if stage is not None and stage.name in self.stage_settings else None

    def _implied_stage(self) -> str | None:
        from .stages import active_stage

        implied = active_stage(dataclasses.replace(self, stage=None))
        return implied.name if implied is not None else None

    def as_dict(self) -> dict[str, Any]:
        """The config as YAML-ready data (what `deltatune train` prints and saves beside the run)."""
        out: dict[str, Any] = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["method"] = self.method
        out[self.method] = {k: v for k, v in self.delta.to_dict().items() if k != "method" and k not in self.filled}
        if self.stage is not None and self.stage != self._implied_stage():
            # only when it is not the one the data implies: a run recorded before stages had names, or one that
            # named its implied stage, resumes as it was
            out["stage"] = self.stage
        section = self._stage_section()
        if section is not None:
            out[section] = dataclasses.asdict(self.stage_settings[section])
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
        # the fields' own defaults: a config with a required field (AdaLoRA's total_step) has no default instance
        for f in dataclasses.fields(self.delta):
            value = getattr(self.delta, f.name)
            if f.metadata.get("serialise", True) and f.name not in self.filled and value != _default(f):
                flags.append(f"--{self.method}.{f.name} {_flag_value(value)}")
        if self.stage is not None and self.stage != self._implied_stage():
            flags.append(f"--stage {self.stage}")
        section = self._stage_section()
        if section is not None:
            settings = self.stage_settings[section]
            default = type(settings)()
            flags += [f"--{section}.{f.name} {_flag_value(getattr(settings, f.name))}" for f in dataclasses.fields(settings)
                      if getattr(settings, f.name) != getattr(default, f.name)]
        return "deltatune train " + " ".join(flags)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _flag_value(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"'{text}'" if any(c in text for c in " [],{}:*") else text


# ---------------------------------------------------------------- reading


def _yaml_loader() -> type:
    """PyYAML's safe loader, reading 5e-3 and 1e4 as numbers (YAML 1.2), not strings as YAML 1.1 does,
    and refusing a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            if isinstance(node, yaml.MappingNode):
                first: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *defaults` then an explicit key is an override YAML allows
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        earlier = first.get(key)
                        first.setdefault(key, line)
                    except TypeError:  # an unhashable key: SafeLoader's own error says so
                        break
                    if earlier is not None:
                        lines = f"twice on line {line}" if earlier == line else f"on line {earlier} and again on line {line}"
                        raise ConfigError(f"key {key!r} is given {lines} of one section; PyYAML would silently keep "
                                          "the last: delete one of them")
            return super().construct_mapping(node, deep=deep)

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
    source = str(path) if path is not None else "<flags>"
    data = read_config_file(path) if path is not None else {}
    pairs = overrides.items() if isinstance(overrides, dict) else parse_flags(overrides or [])
    for key, value in pairs:
        set_path(data, key, value, source)
    return build_run_config(data, source)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML run config's sections, as written (nothing checked but that it is a mapping)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"no config file at {file}")
    try:
        data = read_yaml(read_utf8(file, ConfigError)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{file} is not valid YAML: {err}") from None
    except ConfigError as err:
        if str(err).startswith(str(file)):
            raise
        raise ConfigError(f"{file}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a mapping of sections (model, data, method, train, ...), "
                          f"not a {type(data).__name__}")
    return data


def read_utf8(path: Path, error: type[DeltaError] = DeltaError) -> str:
    """A text file's contents; bytes that are not UTF-8 are an `error` naming the line and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise error(f"{path}: line {line}, byte {column} (offset {err.start} in the file) is not UTF-8 "
                    f"(byte 0x{data[err.start]:02x}); save the file as UTF-8 (in an editor: 'save with encoding'; "
                    f"from Latin-1: iconv -f latin1 -t utf-8 {path.name} > fixed_{path.name})") from None


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
        except ConfigError as err:
            raise ConfigError(f"--{key} {value}: {err}") from None
        pairs.append((key.replace("-", "_"), parsed))
        i += 1
    return pairs


def set_path(data: dict[str, Any], key: str, value: Any, source: str) -> None:
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
    from .stages import names as stage_names, settings_classes

    stage_sections = settings_classes()
    known = set(SECTIONS) | {"method", "stage"} | set(METHODS) | set(stage_sections)
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}{_suggest(unknown[0], known)}; the keys are "
                          f"{', '.join(sorted(SECTIONS))}, method, stage, a section named after the method ({method}) "
                          f"and one named after the stage ({', '.join(sorted(stage_sections))})")
    stage = data.get("stage")
    if stage is not None and (not isinstance(stage, str) or stage not in stage_names()):
        raise ConfigError(f"{source}: stage = {stage!r} is not allowed: expected one of {', '.join(stage_names())} "
                          "(or no stage: the one the data format implies)")
    other_methods = [k for k in data if k in METHODS and k != method]
    if other_methods:
        raise ConfigError(f"{source}: section {other_methods[0]!r} does not apply: method is {method!r} "
                          f"(set --method {other_methods[0]} to use it)")
    sections = {name: _section(cls, data.get(name), name, source) for name, cls in SECTIONS.items()}
    delta, filled = _method_config(method, data.get(method), source, sections["train"])
    settings = {name: _section(cls, data.get(name), name, source) for name, cls in stage_sections.items()}
    config = RunConfig(method=method, delta=delta, source=source, filled=filled, stage=stage, stage_settings=settings,
                       **sections)
    _cross_checks(config)
    _stage_checks(config, [name for name in stage_sections if name in data])
    return config


def _stage_checks(config: RunConfig, given: list[str]) -> None:
    """The stage's own refusals, and a stage section given for a stage the run does not train with."""
    from .stages import active_stage

    stage = active_stage(config)
    for name in given:
        if stage is None or name != stage.name:
            raise ConfigError(f"{config.source}: section {name!r} does not apply: the run trains with stage "
                              f"{stage.name if stage else None!r} (data.format {config.data.format!r}); set stage: {name} "
                              f"to use it, or drop the section")
    refusal = stage.check(config) if stage is not None and stage.check is not None else None
    if refusal:
        raise ConfigError(f"{config.source}: {refusal}")


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
    for f in dataclasses.fields(section):  # .inf passes every `> 0` bound, and no setting means it
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: {name}.{f.name} = {value!r} is not allowed: it must be a finite number")
    return section


def _method_config(method: str, values: Any, source: str, train: TrainSection) -> tuple[DeltaConfig, tuple[str, ...]]:
    """The method's config, and the fields the pipeline fills in from the run (see with_step_count)."""
    cls = METHODS[method].config_cls
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {method} must be a mapping of {cls.__name__} fields, got {values!r:.60}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("serialise", True)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"{source}: {method}.{key} is not a {cls.__name__} field{_suggest(key, fields)}; "
                              f"its fields: {', '.join(sorted(fields))}")
    filled: tuple[str, ...] = ()
    if STEP_FIELD in fields and values.get(STEP_FIELD) is None:
        # The run's step count is known only once the data is read (epochs x examples / batch): until then
        # a placeholder that passes the config's own checks; train.max_steps when set, so tinit/tfinal
        # that leave no steps are refused now rather than after loading the model.
        placeholder = train.max_steps or int(values.get("tinit") or 0) + int(values.get("tfinal") or 0) + 1
        values, filled = {**values, STEP_FIELD: placeholder}, (STEP_FIELD,)
    try:
        return cls(**values), filled
    except DeltaError as err:
        raise ConfigError(f"{source}: {method}: {err}") from None


SEED_MAX = 2**32 - 1
# torch.optim classes the loop cannot drive, and why: it calls step() with no closure, on dense gradients
UNUSABLE_OPTIMIZERS = {"lbfgs": "LBFGS needs a closure that re-evaluates the loss at every step(), which this loop "
                                "does not give (it is a full-batch method)",
                       "sparseadam": "SparseAdam takes sparse gradients only, and a delta's gradients are dense"}


# The method config field that is the run's number of optimizer steps (AdaLoRA's budget schedule).
STEP_FIELD = "total_step"


def with_step_count(config: RunConfig, total: int) -> tuple[RunConfig, str | None]:
    """The config with the run's step count in the method's total_step, and a note when the user's disagrees.

    Left to the pipeline, total_step is the run's step count. A user's value above it is refused (the
    rank budget would stop part-way, never reaching target_r); one below it is kept and said (the
    budget reaches its target early and stays fixed, as tfinal does)."""
    if not hasattr(config.delta, STEP_FIELD):
        return config, None
    where, key = config.source, f"{config.method}.{STEP_FIELD}"
    if STEP_FIELD in config.filled:
        try:
            delta = config.delta.replace(**{STEP_FIELD: total})
        except DeltaError as err:
            raise ConfigError(f"{where}: {config.method}: with the run's {total} steps as {STEP_FIELD}: {err}") from None
        return dataclasses.replace(config, delta=delta, filled=tuple(f for f in config.filled if f != STEP_FIELD)), None
    given = getattr(config.delta, STEP_FIELD)
    if given > total:
        raise ConfigError(f"{where}: {key} = {given} but the run trains {total} steps, so the rank budget would stop "
                          f"part-way and never reach target_r; drop {key} (the pipeline sets it to the run's step count) "
                          f"or set train.max_steps: {given}")
    if given < total:
        return config, (f"{key} = {given} is below the run's {total} steps: the rank budget reaches target_r at step "
                        f"{given - getattr(config.delta, 'tfinal', 0)} and stays fixed after; drop {key} to spread it "
                        "over the whole run")
    return config, None


def _cross_checks(config: RunConfig) -> None:
    where = config.source
    if not config.model.name:
        raise ConfigError(f"{where}: model.name is required (a Hugging Face model id or a local folder)")
    if not config.output.dir.strip():
        raise ConfigError(f"{where}: output.dir is empty, which would write the run into the current folder; "
                          "name a folder for it, e.g. output.dir: out/run")
    if config.train.label_smoothing and (config.train.loss != "fused" or config.model.task == "seq_cls"):
        raise ConfigError(f"{where}: train.label_smoothing = {config.train.label_smoothing} is applied by the fused loss of "
                          "causal LMs and seq2seq models; set train.loss: fused (the default)" if config.model.task != "seq_cls"
                          else f"{where}: train.label_smoothing is for causal LMs and seq2seq models, not classifiers; drop it")
    seed = config.train.seed
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{where}: train.seed = {seed} is not allowed: a seed goes from 0 to 2**32 - 1 ({SEED_MAX}), "
                          "the range numpy's seeding accepts (torch and random take it too); choose one in that range")
    if config.train.optimizer.lower() in UNUSABLE_OPTIMIZERS:  # before the model loads, not after
        raise ConfigError(f"{where}: train.optimizer = {config.train.optimizer!r} cannot be used: "
                          f"{UNUSABLE_OPTIMIZERS[config.train.optimizer.lower()]}; choose another torch.optim class "
                          "(adamw, adam, sgd, rmsprop, ...) or a bitsandbytes one (adamw8bit, paged_adamw8bit, ...)")
    if not config.data.train:
        raise ConfigError(f"{where}: data.train is required (a .json/.jsonl/.csv/.parquet file or a datasets name)")
    from .dataset_info import resolve_entries
    from .rows import DataError, canonical_format

    try:
        resolve_entries(config.data)
        config.data.format = canonical_format(config.data.format)
    except DataError as err:
        raise ConfigError(f"{where}: {err}") from None
    task_formats = {"causal_lm": {"text", "instruction", "chat", "segments", "tokenized", "preference", "kto"},
                    "seq_cls": {"classification"}, "seq2seq": {"seq2seq", "instruction"}}
    if config.data.format not in task_formats[config.model.task]:
        from .stages import active_stage

        stage = active_stage(config)  # a stage that loads its own model class says why model.task does not fit it
        refusal = stage.check(config) if stage is not None and stage.task is not None and stage.check else None
        if refusal:
            raise ConfigError(f"{where}: {refusal}")
        raise ConfigError(f"{where}: data.format = {config.data.format!r} does not fit model.task = {config.model.task!r}; "
                          f"use one of {', '.join(sorted(task_formats[config.model.task]))}")
    if config.model.reinit_head and config.model.task != "seq_cls":
        raise ConfigError(f"{where}: model.reinit_head applies to model.task = 'seq_cls' (a classifier head); "
                          f"model.task is {config.model.task!r}: drop model.reinit_head")
    if config.data.packing and config.model.task != "causal_lm":
        raise ConfigError(f"{where}: data.packing packs causal-LM examples; model.task is {config.model.task!r}, "
                          "whose examples cannot share a row: set data.packing: false")
    if config.data.packing:
        from ..config import method_of
        from .packing import check_method

        refusal = check_method(config.method, method_of(config.delta).kind)
        if refusal:
            raise ConfigError(f"{where}: {refusal}")
        if config.data.group_by_length:
            raise ConfigError(f"{where}: data.group_by_length groups unpacked examples by length; packed rows are "
                              "already full: drop one of data.packing and data.group_by_length")
    if config.train.mixed_precision != "no" and config.model.dtype != "fp32":
        raise ConfigError(f"{where}: train.mixed_precision = {config.train.mixed_precision!r} needs model.dtype = 'fp32' "
                          "(autocast over fp32 weights); a bf16/fp16 base runs in its own dtype with mixed_precision 'no'")


def _suggest(word: str, choices: set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
