"""The peft package's adapter files: config fields and state-dict key names.

Keys. A delta parameter's name in the model, e.g.
    model.layers.0.self_attn.q_proj.lora_A.default.weight
is saved under peft's key by dropping the adapter name after its container and any
``base_layer`` step, and prefixing ``base_model.model.``:
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
``modules_to_save.<adapter>`` is dropped whole (a trained head saves as the head's
own keys), and a container at the model root (``prompt_embeddings``) is saved bare.

Configs. peft methods are written with exactly peft's fields (peft >= 0.14 drops
keys it does not know, with a warning; 0.13 and older reject them); our field
names map to peft's through a small table per peft_type. Methods peft does not
have are written with their own fields and a ``peft_type`` of their own, which peft refuses but deltatune reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import re
from typing import Any, Callable

from ..config import DeltaConfig, DeltaError, method_for_peft_type

PREFIX = "base_model.model."
# peft's prompt-learning models hold the transformers model one level up, so their
# other saved modules (a classifier head) are keyed "base_model.<path>".
INPUT_METHOD_PREFIX = "base_model."
# The peft release whose file format this module writes.
PEFT_FORMAT_VERSION = "0.21.2"
COMMON_FILE_FIELDS = ("peft_type", "inference_mode", "auto_mapping", "peft_version")


def saved_key(path: str, adapter: str, containers: tuple[str, ...], prefix: str = PREFIX) -> str:
    parts = [p for p in path.split(".") if p != "base_layer"]
    root_level = parts[0] in containers
    for i in range(len(parts) - 1):
        if parts[i] in containers and parts[i + 1] == adapter:
            start = i if parts[i] == "modules_to_save" else i + 1
            del parts[start : i + 2]
            break
    key = ".".join(parts)
    return key if root_level else prefix + key


def key_prefix(kind: str) -> str:
    """The key prefix peft uses for a method of this kind ("wrap", "input", "select")."""
    return INPUT_METHOD_PREFIX if kind == "input" else PREFIX


@dataclass(frozen=True)
class Schema:
    """How one peft_type's file fields relate to a deltatune config."""

    rename: dict[str, str] = field(default_factory=dict)  # our field -> peft field
    values: dict[str, dict[Any, Any]] = field(default_factory=dict)  # peft field -> {our value: peft value}
    extra: dict[str, Any] = field(default_factory=dict)  # peft-only fields, written with these defaults
    # Where peft packs several of our fields into one value: our fields -> our fields before the
    # renaming on save, and peft's fields -> peft's fields (unpacked) before reading a file.
    pack: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    unpack: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # peft fields the method ignores (AdaLoRA's r): written from `extra`, read whatever their value.
    ignored: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()  # our fields this file type never carries (they keep their default on load)


LORA_EXTRA = {
    "alora_invocation_tokens": None, "arrow_config": None, "bias": "none", "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "kasa_config": None, "layer_replication": None,
    "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "monteclora_config": None, "qalora_group_size": 16,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False,
    "velora_config": None,
}  # fmt: skip

def _pack_lora(ours: dict[str, Any]) -> dict[str, Any]:
    """peft packs two LoRA options: PiSSA's fast SVD goes inside the init (init="pissa", pissa_niter=4 is
    "pissa_niter_4"), and LoftQ's settings in `loftq_config` ({} unless the init is LoftQ).

    A LoftQ adapter is written as peft's own LoftQ recipe saves one: init_lora_weights=true and no
    loftq_config. The file holds the initialised (and trained) A and B; with init "loftq" peft would run
    LoftQ again when it loads the file, which needs CUDA and overwrites a quantised base layer's weight."""
    out = dict(ours)
    niter = out.pop("pissa_niter", None)
    if niter is not None:
        out["init"] = f"pissa_niter_{niter}"
    out.pop("loftq_bits", None), out.pop("loftq_iter", None)
    if out.get("init") == "loftq":
        out["init"] = "kaiming"
    out["loftq_config"] = {}
    return out


def _unpack_lora(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    init = out.get("init_lora_weights")
    found = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
    if found:
        out["init_lora_weights"], out["pissa_niter"] = "pissa", int(found.group(1))
    loftq = out.pop("loftq_config", None) or {}
    if init == "loftq":
        if not isinstance(loftq, dict) or set(loftq) - {"loftq_bits", "loftq_iter"}:
            raise DeltaError(f"loftq_config = {loftq!r} is not peft's LoftQ config (loftq_bits, loftq_iter)")
        out.update({k: v for k, v in loftq.items()})
    return out


LORA_INITS = {"kaiming": True, "gaussian": "gaussian", "none": False, "pissa": "pissa", "olora": "olora", "loftq": "loftq"}

SCHEMAS: dict[str, Schema] = {
    "LORA": Schema(
        rename={"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"},
        values={"init_lora_weights": LORA_INITS},
        extra=LORA_EXTRA,
        pack=_pack_lora,
        unpack=_unpack_lora,
    ),
    "ADALORA": Schema(
        rename={"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"},
        values={"init_lora_weights": {"normal": True, "none": False}},
        extra={**LORA_EXTRA, "r": 8, "alpha_pattern": {}, "use_dora": False, "use_rslora": False},
        ignored=("r", "alpha_pattern", "use_rslora"),  # peft's AdaLoRA uses init_r and lora_alpha only
    ),
    "IA3": Schema(rename={"init_weights": "init_ia3_weights"}),
    "VERA": Schema(rename={"dropout": "vera_dropout"}, extra={"bias": "none"}),
    "HRA": Schema(extra={"bias": "none"}),  # our field names are peft's; bias "none" only
    "LOHA": Schema(),  # our field names are peft's
    "LOKR": Schema(),
    "LN_TUNING": Schema(),  # our field names are peft's
    "FOURIERFT": Schema(extra={"bias": "none"}),  # peft's field names; its bias training is not supported
    "PROMPT_TUNING": Schema(
        rename={"init": "prompt_tuning_init", "init_text": "prompt_tuning_init_text"},
        values={"prompt_tuning_init": {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}},
        drop=("num_prompts",),  # a single prompt; an ensemble is written as PROMPT_TUNING_ENSEMBLE
    ),
    "P_TUNING": Schema(
        rename={"encoder": "encoder_reparameterization_type"},
        values={"encoder_reparameterization_type": {"mlp": "MLP", "lstm": "LSTM"}},
    ),
    "PREFIX_TUNING": Schema(
        rename={"projection": "prefix_projection", "projection_hidden_size": "encoder_hidden_size", "init": "init_weights"},
        values={"init_weights": {"random": None, "zero": "zero"}},
    ),
}


def config_to_file(config: DeltaConfig) -> dict[str, Any]:
    """The adapter_config.json content for `config`."""
    peft_type = config.file_peft_type()
    schema = SCHEMAS.get(peft_type)
    ours = {k: v for k, v in config.to_dict().items() if k != "method"}
    out: dict[str, Any] = {"peft_type": peft_type, "inference_mode": True}
    if schema is None:
        return {**out, **ours}
    if schema.pack is not None:
        ours = schema.pack(ours)
    for key, value in ours.items():
        if key in schema.drop:
            continue
        peft_key = schema.rename.get(key, key)
        out[peft_key] = schema.values.get(peft_key, {}).get(value, value) if _hashable(value) else value
    out.update({k: v for k, v in schema.extra.items() if k not in out})
    out["auto_mapping"] = None
    out["peft_version"] = PEFT_FORMAT_VERSION
    return out


def config_from_file(data: dict[str, Any], source: str = "adapter_config.json") -> DeltaConfig:
    """A deltatune config from an adapter_config.json written by deltatune or by peft."""
    if "peft_type" not in data:
        raise DeltaError(f"{source} has no 'peft_type'; it is not an adapter config")
    method = method_for_peft_type(data["peft_type"])
    cls = method.config_cls
    schema = SCHEMAS.get(data["peft_type"], Schema())
    if schema.unpack is not None:
        data = schema.unpack(data)
    ours_by_peft = {v: k for k, v in schema.rename.items()}
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in COMMON_FILE_FIELDS or key in schema.ignored:
            continue
        ours = ours_by_peft.get(key, key)
        if ours in fields:
            back = {v: k for k, v in schema.values.get(key, {}).items() if _hashable(v)}
            kwargs[ours] = back.get(value, value) if _hashable(value) else value
            if key in schema.values and value not in back:
                raise DeltaError(f"{source}: {key}={value!r} is not supported by deltatune (supported: {list(back)})")
        elif value != schema.extra.get(key, None) and value not in (None, False, {}, []):
            raise DeltaError(f"{source}: the peft option {key}={value!r} is not supported by deltatune")
    if isinstance(kwargs.get("target_modules"), (set, tuple)):
        kwargs["target_modules"] = sorted(kwargs["target_modules"])
    return cls(**kwargs)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
