"""Config dataclasses, their JSON round trip, and the method registry.

Every method has a config dataclass (``LoraConfig``, ``PromptTuningConfig``, ...)
deriving from :class:`DeltaConfig`, and a :class:`Method` record that says how
the delta attaches. The registry is an explicit dict filled by
``deltatune.methods`` at import time; nothing scans modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Union

if TYPE_CHECKING:
    import torch.nn as nn


class DeltaError(ValueError):
    """Bad input to deltatune: the message says what was wrong and how to fix it."""


class UserFileError(DeltaError):
    """A file of the user's (a model's config, weights, tokenizer, data) that a dependency could not read.

    The message names the file and the dependency's own message; the dependency's exception is chained
    (``__cause__``), so ``deltatune --debug`` can show where it was raised."""


@contextlib.contextmanager
def reading(what: str) -> Any:
    """Inside it, an exception a dependency (transformers, huggingface_hub, tokenizers, ...) raises is
    re-raised as a :class:`UserFileError` saying "cannot read WHAT: message", chained with the original.

    One raised by deltatune's own code is left alone (a bug shows its traceback), as are DeltaErrors
    (already worded for the user) and MemoryError."""
    try:
        yield
    except (DeltaError, MemoryError):
        raise
    except Exception as err:
        if _raised_in_deltatune(err):
            raise
        raise UserFileError(f"cannot read {what}: {one_line(err)}") from err


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (huggingface_hub's validation errors span several), cut at limit."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raised_in_deltatune(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(here + os.sep)


TaskType = Literal["CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]
TASK_TYPES: tuple[str, ...] = typing.get_args(TaskType)


@dataclass(kw_only=True)
class DeltaConfig:
    """Fields every delta has. Subclasses add the method's own."""

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    # Further peft_type values whose files this config reads: a variant of the method whose
    # file layout the peft package cannot read carries a peft_type of its own.
    file_types: ClassVar[tuple[str, ...]] = ()

    # inferred from the model class at attach when None (never when loading a file: the file decides)
    task_type: TaskType | None = None
    modules_to_save: list[str] | None = None  # whole modules trained and saved beside the delta
    base_model_name_or_path: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        validate_fields(self)

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.metadata.get("serialise", True):
                out[f.name] = _plain(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "DeltaConfig":
        return dataclasses.replace(self, **changes)

    def file_peft_type(self) -> str:
        """The peft_type written into this config's adapter files (one of peft_type and file_types)."""
        return self.peft_type


def _plain(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return value


def config_from_dict(data: dict[str, Any]) -> DeltaConfig:
    """Build a config from :meth:`DeltaConfig.to_dict` output; unknown fields are an error."""
    if not isinstance(data, dict):
        raise DeltaError(f"a config must be a JSON object with a 'method' field, got {type(data).__name__}: {data!r:.80}")
    data = dict(data)
    name = data.pop("method", None)
    if name not in METHODS:
        raise DeltaError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name].config_cls
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DeltaError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; its fields are {', '.join(sorted(known))}")
    return cls(**data)


def config_from_json(text: str) -> DeltaConfig:
    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as err:
        raise DeltaError(f"config text is not valid JSON: {err}") from None
    return config_from_dict(data)


# ---------------------------------------------------------------- field validation
#
# Every config field is checked against its type hint on construction (and so on
# load from JSON, and on every `replace`): int is not bool, float takes int, a
# Literal lists its allowed values, X | None takes None. Ranges and regexes are
# declared next to the field with `check(...)` and hold for every number (or
# pattern) inside the value, so `rank_pattern={"q": 0}` fails like `r=0`.


def check(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, gt: float | None = None,
          ge: float | None = None, lt: float | None = None, le: float | None = None, regex: bool = False) -> Any:
    """A dataclass field with a range for its numbers and/or regex syntax for its strings (and dict keys)."""
    metadata = {"bounds": (gt, ge, lt, le), "regex": regex}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def validate_fields(config: Any, prefix: str | None = None) -> None:
    """Check every field of a dataclass instance against its type hint and declared checks.

    Errors name the field as `prefix.field` (default: the class name)."""
    cls = type(config)
    hints = _hints(cls)
    for f in dataclasses.fields(config):
        if not f.init or f.metadata.get("serialise", True) is False:
            continue
        value = getattr(config, f.name)
        where = f"{prefix or cls.__name__}.{f.name}"
        ok, value = _conform(value, hints[f.name])
        if not ok:
            raise DeltaError(f"{where} = {getattr(config, f.name)!r} is not allowed: expected {_describe(hints[f.name])}")
        object.__setattr__(config, f.name, value)  # tuples and sets become lists, as JSON has them
        bounds = f.metadata.get("bounds")
        if bounds and any(b is not None for b in bounds):
            for number in _numbers(value):
                if not _within(number, *bounds):
                    raise DeltaError(f"{where} = {value!r} is not allowed: {number!r} must be {_describe_bounds(*bounds)}")
        if f.metadata.get("regex"):
            for pattern in _patterns(value):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise DeltaError(f"{where}: {pattern!r} is not a valid regular expression ({err})") from None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(value fits hint, value normalised)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin in (Union, types.UnionType):
        for option in args:
            ok, normalised = _conform(value, option)
            if ok:
                return True, normalised
        return False, value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str), value
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False, value
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not args:
            return True, items
        conformed = [_conform(v, args[0]) for v in items]
        return all(ok for ok, _ in conformed), [v for _, v in conformed]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False, value
        if not args:
            return True, value
        keys = [_conform(k, args[0]) for k in value]
        values = [_conform(v, args[1]) for v in value.values()]
        return all(ok for ok, _ in keys + values), dict(zip([k for _, k in keys], [v for _, v in values]))
    return isinstance(value, hint) if isinstance(hint, type) else True, value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a dict of {_describe(args[0])} to {_describe(args[1])}" if args else "a dict"
    return {int: "an int", float: "a number", bool: "True or False", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def _patterns(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [k for k in value if isinstance(k, str)]
    return []


def _within(x: float, gt: float | None, ge: float | None, lt: float | None, le: float | None) -> bool:
    return (gt is None or x > gt) and (ge is None or x >= ge) and (lt is None or x < lt) and (le is None or x <= le)


def _describe_bounds(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    parts = [f"{op} {b}" for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]
    return " and ".join(parts)


Kind = Literal["wrap", "input", "select"]


@dataclass(frozen=True)
class Method:
    """How one method attaches. The core does the rest (freeze, save, load, merge, switch).

    kind:
      "wrap"   replaces target modules by a :class:`deltatune.surgery.DeltaLayer` subclass;
      "input"  owns parameters at the model root and rewrites the model's forward kwargs;
      "select" marks existing parameters trainable (the core keeps their originals).
    """

    name: str
    config_cls: type[DeltaConfig]
    kind: Kind
    attach: Callable[["nn.Module", DeltaConfig, str], DeltaConfig | None]  # returns the resolved config
    # Names of the containers (ModuleDict / ParameterDict keyed by adapter name)
    # holding this method's parameters; "what trains" and "what is saved" filter on them.
    containers: tuple[str, ...] = ()
    # For kind "input": rewrite (module, kwargs) before the forward of the hooked module.
    transform_inputs: Callable[..., dict[str, Any]] | None = None
    # Can `merge` fold the delta into the base weights (prompts cannot), and if not, why not.
    mergeable: bool = True
    unmergeable_because: str = "adds inputs rather than weights"
    # Can rows of one batch use different adapters of this method (adapter_names=, mixed_batch)?
    # The method's layers then apply each adapter to its rows only (DeltaLayer.batch_groups).
    per_row: bool = False
    # Config fields to replace when the weights come from a file: an init that the
    # loaded weights overwrite anyway should not run (or need a tokenizer download). A
    # callable gets the file's config and returns them (when only some inits need it).
    load_overrides: dict[str, Any] | Callable[[DeltaConfig], dict[str, Any]] = dataclasses.field(default_factory=dict)
    # For kind "wrap": containers at the model root (keyed by adapter name) holding state that a delta's layers
    # share rather than own (VeRA's frozen random projections); removed with the delta. What of it goes into the
    # file is the method's to_file / from_file.
    root_modules: tuple[str, ...] = ()
    # Does the peft package read and write this method's files.
    peft_compatible: bool = False
    # What `save` writes: "adapter" (adapter_config.json + adapter_model.safetensors, peft's layout) or
    # "model" (the whole model in transformers' own layout, which from_pretrained loads, plus
    # deltatune_config.json; for a delta that is every weight, as full fine-tuning is).
    folder: Literal["adapter", "model"] = "adapter"
    # What the file holds, when it is not the parameters themselves: (model, adapter, config,
    # {file key: tensor}) -> {file key: tensor} on save, and the inverse on load.
    to_file: Callable[..., dict[str, Any]] | None = None
    from_file: Callable[..., dict[str, Any]] | None = None
    # For a delta that rewrote base weights (PiSSA, OLoRA): the same delta relative to the original
    # weights, (model, adapter, config, {file key: tensor}) -> (config, {file key: tensor}), for
    # `save(..., relative_to_original=True)`. None: such a delta cannot be written that way.
    to_original_base: Callable[..., tuple[DeltaConfig, dict[str, Any]]] | None = None
    # Training hooks, no-ops when None: a loss term (model, adapter, config) -> tensor that the
    # loop adds to its loss; a call after every optimizer step (model, adapter, config, global_step);
    # and one at the end of training (model, adapter, config).
    regularization: Callable[..., Any] | None = None
    step: Callable[..., None] | None = None
    finalize: Callable[..., None] | None = None
    # Training state the method keeps outside its parameters and buffers (AdaLoRA's importance
    # scores, which it prunes by), for checkpoints: (model, adapter, config) -> {key: tensor or
    # JSON value}; and its inverse (model, adapter, config, {key: value}), called on a freshly
    # attached delta before its parameters and buffers are loaded (so it may create buffers).
    training_state: Callable[..., dict[str, Any]] | None = None
    load_training_state: Callable[..., None] | None = None
    # Names of other attached deltas this one uses (AdapterFusion: the adapters it fuses), from its
    # config; they cannot be detached while it is attached.
    depends_on: Callable[[DeltaConfig], list[str]] | None = None


class _Registry(dict):
    """The method registry: filled by ``deltatune.methods`` when it is imported, which the first read does.

    ``import deltatune`` imports nothing heavy (the command line starts without torch), so a module that
    reads the registry may run before any method module was imported; reading imports them."""

    _state = "empty"  # -> "filling" while deltatune.methods imports (its register calls read) -> "full"

    def _fill(self) -> None:
        if self._state == "empty":
            type(self)._state = "filling"
            try:
                import importlib

                importlib.import_module(__name__.rsplit(".", 1)[0] + ".methods")
            except BaseException:
                type(self)._state = "empty"
                raise
            type(self)._state = "full"

    def __contains__(self, key: object) -> bool:
        self._fill()
        return super().__contains__(key)

    def __getitem__(self, key: str) -> Method:
        self._fill()
        return super().__getitem__(key)

    def __iter__(self) -> Any:
        self._fill()
        return super().__iter__()

    def __len__(self) -> int:
        self._fill()
        return super().__len__()

    def get(self, key: str, default: Any = None) -> Any:
        self._fill()
        return super().get(key, default)

    def keys(self) -> Any:
        self._fill()
        return super().keys()

    def values(self) -> Any:
        self._fill()
        return super().values()

    def items(self) -> Any:
        self._fill()
        return super().items()


METHODS: dict[str, Method] = _Registry()


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise DeltaError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def method_of(config: DeltaConfig) -> Method:
    try:
        return METHODS[config.method]
    except KeyError:
        raise DeltaError(f"{type(config).__name__} names method {config.method!r}, which is not registered") from None


def method_for_peft_type(peft_type: str) -> Method:
    for method in METHODS.values():
        if peft_type == method.config_cls.peft_type or peft_type in method.config_cls.file_types:
            return method
    known = sorted({t for m in METHODS.values() for t in (m.config_cls.peft_type, *m.config_cls.file_types)})
    raise DeltaError(f"adapter files of type {peft_type!r} are not supported; supported: {', '.join(known)}")


def not_serialised(default: Any = None) -> Any:
    """A config field that is used at attach time but never written to disk (e.g. a tokenizer object)."""
    return field(default=default, metadata={"serialise": False}, repr=False, compare=False)
