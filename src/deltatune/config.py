"""Config dataclasses, their JSON round trip, and the method registry.

Every method has a config dataclass (``LoraConfig``, ``PromptTuningConfig``, ...)
deriving from :class:`DeltaConfig`, and a :class:`Method` record that says how
the delta attaches. The registry is an explicit dict filled by
``deltatune.methods`` at import time; nothing scans modules.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

if TYPE_CHECKING:
    import torch.nn as nn


class DeltaError(ValueError):
    """Bad input to deltatune: the message says what was wrong and how to fix it."""


TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


@dataclass(kw_only=True)
class DeltaConfig:
    """Fields every delta has. Subclasses add the method's own."""

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""

    task_type: str | None = None  # inferred from the model class at attach when None
    modules_to_save: list[str] | None = None  # whole modules trained and saved beside the delta
    base_model_name_or_path: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise DeltaError(f"task_type {self.task_type!r} is not one of {', '.join(TASK_TYPES)}")

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


def _plain(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return value


def config_from_dict(data: dict[str, Any]) -> DeltaConfig:
    """Build a config from :meth:`DeltaConfig.to_dict` output; unknown fields are an error."""
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
    return config_from_dict(json.loads(text))


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
    # Can `merge` fold the delta into the base weights (prompts cannot).
    mergeable: bool = True
    # Config fields to replace when the weights come from a file: an init that the
    # loaded weights overwrite anyway should not run (or need a tokenizer download).
    load_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Does the peft package read and write this method's files.
    peft_compatible: bool = False


METHODS: dict[str, Method] = {}


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
        if method.config_cls.peft_type == peft_type:
            return method
    known = sorted(m.config_cls.peft_type for m in METHODS.values())
    raise DeltaError(f"adapter files of type {peft_type!r} are not supported; supported: {', '.join(known)}")


def not_serialised(default: Any = None) -> Any:
    """A config field that is used at attach time but never written to disk (e.g. a tokenizer object)."""
    return field(default=default, metadata={"serialise": False}, repr=False, compare=False)
