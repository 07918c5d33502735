"""`deltatune info MODEL`: what deltatune can do with a model, from its config alone.

The model is built on the meta device (nothing is allocated, only config.json is
read), so a 70B model is described on a laptop: its architecture, the modules each
kind of delta can take, the default targets, and each method's trainable count
with its default settings.
"""

from __future__ import annotations

import copy
import textwrap
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import api
from .config import METHODS, DeltaError, one_line, reading
from .summary import summary
from .targets import DEFAULT_TARGETS, is_linear_like

LINE_WIDTH = 110  # the reasons wrap here, at a space


def build_on_meta(name: str, trust_remote_code: bool = False) -> nn.Module:
    import transformers as tf

    from .model_files import check_model_path

    check_model_path(name, "model")  # a mistyped folder would come back as "Repo id must be in the form ..."
    path = Path(name)
    what = f"the model config {path / 'config.json' if path.is_dir() else path if path.is_file() else repr(name)}"
    with reading(what):  # what transformers raises beside OSError and ValueError (huggingface_hub's validation errors)
        try:
            config = tf.AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise DeltaError(f"cannot read the config of {name!r}: {one_line(err, 300)}") from None
        architectures = getattr(config, "architectures", None) or []
        cls = next((getattr(tf, a) for a in architectures if hasattr(tf, a)), None)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if cls is not None:
                return cls(config)
            return tf.AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def describe(name: str, trust_remote_code: bool = False) -> str:
    model = build_on_meta(name, trust_remote_code)
    model_type = getattr(model.config, "model_type", "?")
    total = sum(p.numel() for p in model.parameters())
    lines = [f"{name}: {type(model).__name__} (model_type {model_type}), {total:,} parameters"]
    kinds: dict[str, Counter] = {"linear": Counter(), "embedding": Counter(), "layer norm": Counter()}
    for module_name, module in model.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        if is_linear_like(module):
            kinds["linear"][leaf] += 1
        elif isinstance(module, nn.Embedding):
            kinds["embedding"][leaf] += 1
        elif "norm" in type(module).__name__.lower():
            kinds["layer norm"][leaf] += 1
    for kind, found in kinds.items():
        if found:
            lines.append(f"  {kind} modules: " + ", ".join(f"{leaf} x{n}" for leaf, n in found.items()))
    for method, table in DEFAULT_TARGETS.items():
        if model_type in table:
            lines.append(f"  default {method} targets: {', '.join(table[model_type])}")
    lines.append("  trainable parameters with each method's defaults (diff pruning: what it stores):")
    width = max(len(m) for m in METHODS)
    for method_name, method in METHODS.items():
        trial = copy.deepcopy(model)
        head = f"    {method_name.ljust(width)}  "
        try:
            config = method.config_cls()
            api.attach(trial, config)
            counts = summary(trial, print_table=False)
        except (DeltaError, TypeError, NotImplementedError) as err:
            lines += _wrap(head + f"{'n/a':>15}  ", str(err))
            continue
        if method_name == "diff_pruning":
            stored, note = _diff_pruning_storage(trial, config, counts.trainable)
            lines += _wrap(head + f"{stored:>15,}  ({100 * stored / total:.4f}%)  ", note)
        else:
            lines.append(head + f"{counts.trainable:>15,}  ({counts.percent:.4f}%)")
    lines += _wrap("  ", _master_weights_line(model.config))
    return "\n".join(lines)


def _master_weights_line(config: Any) -> str:
    """How the methods that train the base's own weights (full, freeze, BitFit) train them at this dtype."""
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").replace("torch.", "")
    if dtype not in ("bfloat16", "float16"):
        return (f"the checkpoint's weights are {dtype}: methods that train the base's own weights (full, freeze, bitfit) "
                "train them in fp32; loaded with model.dtype bf16 or fp16 they train through fp32 master copies "
                "(train.master_weights: fp32, the default; kahan or none for less memory)")
    scaling = "; fp16 adds dynamic loss scaling" if dtype == "float16" else ""
    return (f"the checkpoint's weights are {dtype}: methods that train the base's own weights (full, freeze, bitfit) "
            f"train through fp32 master copies (train.master_weights: fp32, the default, 18 bytes per parameter with "
            f"AdamW; kahan: 14, a 16-bit compensation buffer; none: 16-bit updates, most of which round away){scaling}")


def _diff_pruning_storage(model: nn.Module, config: Any, trainable: int) -> tuple[int, str]:
    """Diff pruning trains a dense diff and a gate per targeted entry, but finalize keeps only the
    target_sparsity share of the diff, and only that (with any head trained whole) is saved: its cost."""
    from .methods.diff_pruning import kept_entries

    targeted = sum(p.numel() for n, p in model.named_parameters() if ".diff_w." in n)
    gates = sum(p.numel() for n, p in model.named_parameters() if ".diff_log_alpha." in n)
    heads = trainable - targeted - gates  # heads trained whole (a classifier) are saved whole
    stored = kept_entries(model) + heads
    note = (f"stored: {100 * config.target_sparsity:g}% (target_sparsity) of the {targeted:,} targeted entries"
            + (f", plus {heads:,} in heads trained whole" if heads else "")
            + f"; training holds a diff and a gate per entry ({trainable:,})")
    return stored, note


def _wrap(head: str, text: str) -> list[str]:
    """`head` then `text`, wrapped at word boundaries (never cut), continuation lines under the text's start."""
    body = textwrap.wrap(text, width=max(40, LINE_WIDTH - len(head)), break_long_words=False, break_on_hyphens=False)
    return [head + body[0]] + [" " * len(head) + line for line in body[1:]] if body else [head.rstrip()]
