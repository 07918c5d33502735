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

import dataclasses
import re
from dataclasses import dataclass
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
# VeRA takes LoRA's defaults too, and phi's attention projections (peft's table).
DEFAULT_TARGETS["vera"] = {**DEFAULT_TARGETS["lora"], "phi": ["q_proj", "v_proj"]}
# HRA takes LoRA's defaults, as peft does.
DEFAULT_TARGETS["hra"] = DEFAULT_TARGETS["lora"]

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

# LN tuning: peft's norms per model_type; deltatune's own (same choice: every block's norms and the final
# one) for architectures peft has no default for (gpt_bigcode, gpt_neox, opt, chatglm, bert, roberta).
DEFAULT_TARGETS["ln_tuning"] = {
    **dict.fromkeys(["llama", "mistral", "gemma"], ["input_layernorm", "post_attention_layernorm", "norm"]),
    **dict.fromkeys(["gemma2", "gemma3_text"], ["input_layernorm", "post_attention_layernorm",
                                                "pre_feedforward_layernorm", "post_feedforward_layernorm", "norm"]),
    **dict.fromkeys(["qwen2", "qwen3"], ["post_attention_layernorm"]),
    **dict.fromkeys(["bloom", "falcon"], ["input_layernorm", "post_attention_layernorm", "ln_f"]),
    **dict.fromkeys(["t5", "mt5"], ["layer_norm", "final_layer_norm"]),
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["ln_1", "ln_2", "ln_f"]),
    "gptj": ["ln_1", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gpt_neox": ["input_layernorm", "post_attention_layernorm", "final_layer_norm"],
    "opt": ["self_attn_layer_norm", "final_layer_norm"],
    "chatglm": ["input_layernorm", "post_attention_layernorm", "final_layernorm"],
    **dict.fromkeys(["bert", "roberta"], ["LayerNorm"]),
}

# FourierFT: LoRA's, but GPT-2's and GPTBigCode's feed-forward output projection (peft's table).
DEFAULT_TARGETS["fourierft"] = {**DEFAULT_TARGETS["lora"], **dict.fromkeys(["gpt2", "gpt_bigcode"], ["mlp.c_proj"])}

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
        f"(or 'all-linear'). Linear modules in this model: {_leaf_summary(model, is_linear_like)}"
    )


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a linear layer storing its weight (in, out))."""
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
            if not is_linear_like(module) or any(name == h or name.startswith(h + ".") for h in heads):
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


# ---------------------------------------------------------------- bottleneck adapter sites
#
# Bottleneck adapters (methods/adapters.py) attach at fixed points of every transformer
# block rather than at user-chosen modules. Each architecture names four of them, as regexes
# on full module names:
#   attention  the self-attention output projection: its output h goes straight into the
#              residual add (Houlsby's first adapter);
#   ffn_in     the feed-forward block's input projection: its input is the FFN's input
#              (what a parallel adapter reads);
#   ffn_out    the feed-forward block's output projection: its output h goes straight into the
#              residual add (Houlsby's second adapter; parallel and pre-LN Pfeiffer add here);
#   ffn_norm   the layer norm of the feed-forward sublayer: in a post-LN block y = LN(x + h)
#              it is wrapped (Pfeiffer: y = LN(x + h + A(LN(x + h)))); in a pre-LN block
#              y = x + h(LN(x)) its input is the residual x (Pfeiffer: y = x + h + A(x + h)).
# Cross-attention (T5 and BART decoders) gets no adapter, as in AdapterHub's default.


@dataclass(frozen=True)
class AdapterSites:
    attention: str
    ffn_in: str
    ffn_out: str
    ffn_norm: str
    post_ln: bool  # True: y = LN(x + F(x)) (BERT, BART); False: y = x + F(LN(x)) (Llama, GPT-2, T5)


def _in_block(rest: str) -> str:
    """A regex for `rest` directly inside one transformer block (model.layers.3.<rest>)."""
    return rf"(?:.*\.)?(?:{'|'.join(LAYER_CONTAINERS)})\.\d+\.{rest}"


ADAPTER_LAYOUTS: dict[str, AdapterSites] = {
    "llama": AdapterSites(_in_block(r"self_attn\.o_proj"), _in_block(r"mlp\.up_proj"), _in_block(r"mlp\.down_proj"),
                          _in_block("post_attention_layernorm"), post_ln=False),
    "gpt2": AdapterSites(_in_block(r"attn\.c_proj"), _in_block(r"mlp\.c_fc"), _in_block(r"mlp\.c_proj"),
                         _in_block("ln_2"), post_ln=False),
    "gpt_neox": AdapterSites(_in_block(r"attention\.dense"), _in_block(r"mlp\.dense_h_to_4h"),
                             _in_block(r"mlp\.dense_4h_to_h"), _in_block("post_attention_layernorm"), post_ln=False),
    "bloom": AdapterSites(_in_block(r"self_attention\.dense"), _in_block(r"mlp\.dense_h_to_4h"),
                          _in_block(r"mlp\.dense_4h_to_h"), _in_block("post_attention_layernorm"), post_ln=False),
    "t5": AdapterSites(_in_block(r"layer\.0\.SelfAttention\.o"), _in_block(r"layer\.\d+\.DenseReluDense\.wi(?:_0)?"),
                       _in_block(r"layer\.\d+\.DenseReluDense\.wo"), _in_block(r"layer\.\d+\.layer_norm"), post_ln=False),
    "opt": AdapterSites(_in_block(r"self_attn\.out_proj"), _in_block("fc1"), _in_block("fc2"),
                        _in_block("final_layer_norm"), post_ln=False),
    "bart": AdapterSites(_in_block(r"self_attn\.out_proj"), _in_block("fc1"), _in_block("fc2"),
                         _in_block("final_layer_norm"), post_ln=True),
    "bert": AdapterSites(_in_block(r"attention\.output\.dense"), _in_block(r"intermediate\.dense"),
                         _in_block(r"output\.dense"), _in_block(r"output\.LayerNorm"), post_ln=True),
}

# model_type -> layout. Architectures not listed are matched against the layouts by module names.
ADAPTER_SITES: dict[str, AdapterSites] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma"], ADAPTER_LAYOUTS["llama"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ADAPTER_LAYOUTS["gpt2"]),
    "gpt_neox": ADAPTER_LAYOUTS["gpt_neox"],
    **dict.fromkeys(["bloom", "chatglm"], ADAPTER_LAYOUTS["bloom"]),
    **dict.fromkeys(["t5", "mt5"], ADAPTER_LAYOUTS["t5"]),
    **dict.fromkeys(["opt", "mbart"], ADAPTER_LAYOUTS["opt"]),
    **dict.fromkeys(["bart", "marian", "plbart"], ADAPTER_LAYOUTS["bart"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], ADAPTER_LAYOUTS["bert"]),
}


def adapter_sites(model: nn.Module) -> AdapterSites:
    """The adapter sites of `model`: its architecture's entry, else the first layout whose names it has."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    sites = ADAPTER_SITES.get(model_type)
    if sites is None:
        names = [n for n, _ in model.named_modules() if n]
        fits = lambda s: all(any(re.fullmatch(p, n) for n in names) for p in (s.attention, s.ffn_in, s.ffn_out, s.ffn_norm))  # noqa: E731
        sites = next((s for s in ADAPTER_LAYOUTS.values() if fits(s)), None)
    if sites is None:
        raise DeltaError(
            f"no bottleneck adapter sites are known for model_type {model_type!r} ({type(model).__name__}), and its "
            f"module names fit none of the known block layouts ({', '.join(ADAPTER_LAYOUTS)}); add an entry to "
            "deltatune.targets.ADAPTER_SITES naming its attention output, FFN input and output projections and FFN "
            f"layer norm. Linear modules in this model: {_leaf_summary(model, is_linear_like)}"
        )
    if getattr(config, "do_layer_norm_before", None) is not None:  # OPT: 350m is post-LN, the others pre-LN
        sites = dataclasses.replace(sites, post_ln=not config.do_layer_norm_before)
    return sites


_BLOCK = re.compile(rf"^(.*?(?:^|\.)(?:{'|'.join(LAYER_CONTAINERS)})\.\d+)(?:\.|$)")


def block_of(name: str) -> str | None:
    """The transformer block a module belongs to ("model.layers.3" for "model.layers.3.mlp.up_proj")."""
    found = _BLOCK.match(name)
    return found.group(1) if found else None
