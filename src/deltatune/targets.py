"""Which modules a config selects.

A target spec is one of
  * a list of names: a module matches when its full name equals an entry or ends
    with "." + entry (so "q_proj" takes every layer's q_proj);
  * a string: a regular expression that must match the full module name;
  * "all-linear": every Linear / Conv1D except the output head and classifier heads.
Layer restriction picks layer indices found in names like "model.layers.7.mlp".
Per-module overrides (rank_pattern, alpha_pattern) are regexes matched against
the end of the module name.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence, TypeVar

import torch.nn as nn

from .config import DeltaError

# Default targets per model_type, by method (the peft package's defaults, so files interoperate).
DEFAULT_TARGETS: dict[str, dict[str, list[str]]] = {
    "lora": {
        **dict.fromkeys(
            ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt", "bart", "mbart", "marian"],
            ["q_proj", "v_proj"],
        ),
        "gpt2": ["c_attn"],
        "gpt_bigcode": ["c_attn", "c_proj"],
        "gpt_neox": ["query_key_value"],
        "bloom": ["query_key_value"],
        "falcon": ["query_key_value"],
        "chatglm": ["query_key_value"],
        "phi3": ["qkv_proj"],
        "bert": ["query", "value"],
        "roberta": ["query", "value"],
        "xlm-roberta": ["query", "value"],
        "electra": ["query", "value"],
        "distilbert": ["q_lin", "v_lin"],
        "deberta-v2": ["query_proj", "value_proj"],
        "t5": ["q", "v"],
        "mt5": ["q", "v"],
    },
    # (IA)³ rescales keys, values and the feed-forward input (IA3_FEEDFORWARD lists which of these
    # targets are feed-forward modules, whose input rather than output is rescaled).
    "ia3": {
        **dict.fromkeys(["llama", "mistral"], ["k_proj", "v_proj", "down_proj"]),
        **dict.fromkeys(["qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "llama4"], ["q_proj", "v_proj", "down_proj"]),
        "mixtral": ["k_proj", "v_proj", "w2"],
        "gpt2": ["c_attn", "mlp.c_proj"],
        "gpt_bigcode": ["c_attn", "mlp.c_proj"],
        "gpt_neo": ["q_proj", "v_proj", "c_proj"],
        "gptj": ["q_proj", "v_proj", "fc_out"],
        "gpt_neox": ["query_key_value", "dense_4h_to_h"],
        "falcon": ["query_key_value", "dense_4h_to_h"],
        "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
        "chatglm": ["query_key_value", "dense_4h_to_h"],  # deltatune's own: peft has no (IA)³ default for ChatGLM
        "opt": ["q_proj", "k_proj", "fc2"],
        "bart": ["q_proj", "v_proj", "fc2"],
        "phi": ["q_proj", "v_proj", "fc2"],
        "bert": ["key", "value", "output.dense"],
        "roberta": ["key", "value", "output.dense"],
        "deberta-v2": ["key_proj", "value_proj", "output.dense"],
        "t5": ["k", "v", "wo"],
        "mt5": ["k", "v", "wi_1"],
    },
}
# LoHa and LoKr take LoRA's defaults, as peft does.
DEFAULT_TARGETS["loha"] = DEFAULT_TARGETS["lokr"] = DEFAULT_TARGETS["lora"]

# (IA)³'s feed-forward modules per model_type: the default targets whose input is rescaled.
IA3_FEEDFORWARD: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "llama4"], ["down_proj"]),
    "mixtral": ["w2"],
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
    "gpt_neo": ["c_proj"],
    "gptj": ["fc_out"],
    **dict.fromkeys(["gpt_neox", "falcon", "chatglm"], ["dense_4h_to_h"]),
    "bloom": ["mlp.dense_4h_to_h"],
    **dict.fromkeys(["opt", "bart", "phi"], ["fc2"]),
    **dict.fromkeys(["bert", "roberta", "deberta-v2"], ["output.dense"]),
    "t5": ["wo"],
    "mt5": [],
}
# AdaLoRA: peft's AdaLoRA defaults where they differ from LoRA's, LoRA's elsewhere.
DEFAULT_TARGETS["adalora"] = {
    **DEFAULT_TARGETS["lora"],
    **dict.fromkeys(["bart", "opt"], ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
}

# Head modules that "all-linear" leaves out, besides the model's output embeddings.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")

# Names of the module lists that hold the transformer blocks, tried in this order.
LAYER_CONTAINERS = ("layers", "h", "block", "blocks", "layer")


def default_targets(method: str, model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = DEFAULT_TARGETS.get(method, {})
    if model_type in table:
        return list(table[model_type])
    raise DeltaError(
        f"no default target modules for {method} on model_type {model_type!r}; pass target_modules=[...] "
        f"(or 'all-linear'). Linear modules in this model: {_leaf_summary(model, _is_linear_like)}"
    )


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _leaf_summary(model: nn.Module, keep: Callable[[nn.Module], bool], limit: int = 40) -> str:
    wrappers = [n for n, m in model.named_modules() if _is_wrapper(m)]
    names = [n for n, m in model.named_modules()
             if n and not any(n.startswith(w + ".") for w in wrappers) and keep(m.base_layer if _is_wrapper(m) else m)]
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    text = ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")
    example = f" (full names look like {names[0]!r})" if names else ""
    return (text or "none") + example


def head_module_names(model: nn.Module) -> set[str]:
    """Full names of the output head and classifier heads, which 'all-linear' skips."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            heads.add(name)
        if name.rsplit(".", 1)[-1] in HEAD_NAMES and name.count(".") == 0:
            heads.add(name)
    return heads


def _is_wrapper(module: nn.Module) -> bool:
    return "base_layer" in module._modules and hasattr(type(module), "containers")


def block_stacks(model: nn.Module) -> list[tuple[str, int]]:
    """(full name, number of blocks) of each stack of transformer blocks: a ModuleList named like
    LAYER_CONTAINERS, outermost only (T5's blocks hold a ModuleList named "layer" of their own).
    An encoder-decoder has two stacks."""
    wrappers = [n for n, m in model.named_modules() if _is_wrapper(m)]
    found: list[tuple[str, int]] = []
    for name, module in model.named_modules():  # parents come before their children
        if (isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in LAYER_CONTAINERS
                and not any(name.startswith(f + ".") for f, _ in found)
                and not any(name.startswith(w + ".") for w in wrappers)):
            found.append((name, len(module)))
    return found


def name_matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or LAYER_CONTAINERS)
    for pattern in patterns:
        found = re.match(rf"(?:.*\.)?(?:{pattern})\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def select_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    supported: Callable[[nn.Module], bool],
    method: str,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> list[str]:
    """Full names of the modules the spec selects, in model order. Matching nothing is an error."""
    all_linear = target_modules == "all-linear"
    heads = head_module_names(model) if all_linear else set()
    layers = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform or ())
    chosen, unsupported = [], []
    # A module already wrapped by a delta layer is targeted through its wrapper; the
    # wrapper's insides (base_layer, adapter containers) are never targets themselves.
    wrappers = [n for n, m in model.named_modules() if _is_wrapper(m)]
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        module = module.base_layer if _is_wrapper(module) else module
        if all_linear:
            if not _is_linear_like(module) or any(name == h or name.startswith(h + ".") for h in heads):
                continue
        elif not name_matches(name, target_modules):
            continue
        if exclude_modules and name_matches(name, exclude_modules):
            continue
        if layers:
            index = layer_index(name, layers_pattern)
            if index is None or index not in layers:
                continue
        if supported(module):
            chosen.append(name)
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported and not all_linear:
        raise DeltaError(
            f"{method} cannot wrap {unsupported[0]}" + (f" and {len(unsupported) - 1} more" if len(unsupported) > 1 else "")
            + f"; target modules of a supported type instead: {_leaf_summary(model, supported)}"
        )
    if not chosen:
        restriction = f" within layers {sorted(layers)}" if layers else ""
        raise DeltaError(
            f"target_modules={target_modules!r}{restriction} matched no module of {type(model).__name__}. "
            f"Modules that can take a {method} delta: {_leaf_summary(model, supported)}"
        )
    return chosen


T = TypeVar("T")


def pattern_value(name: str, patterns: dict[str, T], default: T) -> T:
    """The value of the first pattern that matches the end of `name` (peft's rank_pattern rule)."""
    for key, value in patterns.items():
        if re.match(rf"(?:.*\.)?(?:{key})$", name):
            return value
    return default
