"""Selective methods: train some of the model's own parameters, or all of them.

The trained parameters live in the model itself, so there is nothing to merge (a merge
is only a flag); the core keeps the original values to run the base model
(``disabled``, ``set_active``) and to restore it at detach, bit for bit.

BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"): every weight stays frozen; the biases b of
the chosen modules train, so the model computes W x + (b0 + delta_b). On BERT-large, all
biases including LayerNorm's are 272,384 parameters (0.08%).

Layer freezing, the classic options of the fine-tuning seeds: train the top k transformer
blocks (or the blocks at given indices), and/or named parts (embeddings, layer norms,
...), and the task head; everything else stays frozen. ``trainable_layers=0`` with the
head alone is a linear probe. Saved as the trained tensors only.

Full fine-tuning: every parameter trains, through the same API. Its file is the whole
model in transformers' own layout (config.json + model.safetensors, which a plain
``from_pretrained`` loads), with deltatune_config.json beside it (see model_files.py).
Keeping the originals costs a full copy of the model: by default it is kept in CPU memory
(``originals="cpu"``: no accelerator memory, the host RAM of one copy), beside the
parameters with ``"same_device"``, or not at all with ``"none"``: the delta can then
never be switched off, and detach must keep its weights (``merge=True``).

Trained parameters keep the base's dtype (they are the model's own tensors); on a bf16/fp16 base
the training loop updates fp32 master copies of them and rounds (deltatune/master.py), since a
16-bit weight loses every update under half its spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from ..config import DeltaConfig, DeltaError, Method, check, register
from ..surgery import ModulesToSave, foreign_parameters, select_parameters
from ..targets import block_stacks, head_module_names, name_matches

# ---------------------------------------------------------------- BitFit


@dataclass(kw_only=True)
class BitFitConfig(DeltaConfig):
    """target_modules: None trains every bias (LayerNorm's included); else the biases of the
    modules it names (names, suffixes, or a regex on the full module name)."""

    method = "bitfit"
    peft_type = "BITFIT"

    target_modules: list[str] | str | None = check(None, regex=True)


def _owner(param_name: str) -> str:
    """Module name of a parameter, without the wrappers' base_layer step."""
    module = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return ".".join(p for p in module.split(".") if p != "base_layer")


def attach_bitfit(model: nn.Module, config: BitFitConfig, name: str) -> BitFitConfig:
    # Parameters of other deltas, and heads trained whole, are not biases to select.
    skip = foreign_parameters(model)
    biases = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and id(p) not in skip]
    if not biases:
        raise DeltaError(
            f"{type(model).__name__} has no bias terms, so BitFit has nothing to train; "
            "use a method that adds parameters (LoRA, prompt tuning) for this model"
        )
    chosen = biases if config.target_modules is None else [n for n in biases if name_matches(_owner(n), config.target_modules)]
    if not chosen:
        owners = list(dict.fromkeys(_owner(n).rsplit(".", 1)[-1] for n in biases))
        raise DeltaError(
            f"target_modules={config.target_modules!r} matched no module with a bias; modules with biases: {', '.join(owners)}"
        )
    select_parameters(model, name, chosen, method="bitfit")
    return config


BITFIT = register(Method(name="bitfit", config_cls=BitFitConfig, kind="select", attach=attach_bitfit))


# ---------------------------------------------------------------- layer freezing


@dataclass(kw_only=True)
class FreezeConfig(DeltaConfig):
    """trainable_layers: k trains the top k blocks of each stack of transformer blocks (an
    encoder-decoder has two), a list trains the blocks at those indices; 0 trains none.
    trainable_modules: modules that train whole besides (names or suffixes, or a regex on the
    full module name), e.g. ["embeddings", "LayerNorm"]. train_head: the output head (lm_head,
    classifier, score, qa_outputs) trains too; on a model whose head is tied to the input
    embeddings (GPT-2), that is the embedding matrix. A sequence classifier's new head always
    trains, as with every method."""

    method = "freeze"
    peft_type = "FREEZE"

    trainable_layers: int | list[int] = check(0, ge=0)
    trainable_modules: list[str] | str | None = check(None, regex=True)
    train_head: bool = True


def _blocks(model: nn.Module, layers: int | list[int]) -> list[str]:
    if layers == 0 or layers == []:
        return []
    stacks = block_stacks(model)
    if not stacks:
        raise DeltaError(
            f"trainable_layers={layers!r}: {type(model).__name__} has no stack of transformer blocks (a ModuleList "
            "named layers, h, block, blocks or layer); name the modules to train with trainable_modules instead"
        )
    chosen = []
    for stack, count in stacks:
        indices = list(range(count - layers, count)) if isinstance(layers, int) else layers
        too_far = [i for i in indices if not 0 <= i < count]
        if too_far:
            raise DeltaError(f"trainable_layers={layers!r}: {stack} has {count} blocks (indices 0 to {count - 1})")
        chosen += [f"{stack}.{i}" for i in indices]
    return chosen


def _named_modules(model: nn.Module, spec: str | list[str]) -> list[str]:
    found = [n for n, _ in model.named_modules() if n and name_matches(n, spec)]
    if not found:
        leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n))
        raise DeltaError(f"trainable_modules={spec!r} matched no module of {type(model).__name__}; its modules are named "
                         f"{', '.join(leaves[:40])}{', ...' if len(leaves) > 40 else ''}")
    return found


def attach_freeze(model: nn.Module, config: FreezeConfig, name: str) -> FreezeConfig:
    modules = _blocks(model, config.trainable_layers)
    if config.trainable_modules:
        modules += _named_modules(model, config.trainable_modules)
    if config.train_head:
        modules += sorted(head_module_names(model))
    # by parameter object: a head tied to the embeddings is listed under the embeddings' name
    canonical = {id(p): n for n, p in model.named_parameters()}
    foreign = foreign_parameters(model)
    chosen: dict[str, None] = {}
    for module in dict.fromkeys(modules):
        for p in model.get_submodule(module).parameters():
            if id(p) not in foreign:
                chosen[canonical[id(p)]] = None
    whole = any(isinstance(m, ModulesToSave) and name in m.modules_to_save for m in model.modules())
    if not chosen and not whole:  # a classifier's head kept whole is a linear probe by itself
        raise DeltaError(
            f"FreezeConfig(trainable_layers={config.trainable_layers!r}, trainable_modules={config.trainable_modules!r}, "
            f"train_head={config.train_head}) leaves nothing to train in {type(model).__name__}; "
            "choose layers (trainable_layers=k) or modules (trainable_modules=[...])"
        )
    select_parameters(model, name, list(chosen), method="freeze")
    return config


FREEZE = register(Method(name="freeze", config_cls=FreezeConfig, kind="select", attach=attach_freeze))


# ---------------------------------------------------------------- full fine-tuning


@dataclass(kw_only=True)
class FullConfig(DeltaConfig):
    """Every parameter trains. originals: where the copy of the base weights that detach (and
    `disabled`) restore is kept: "cpu" (host memory, the default), "same_device" (beside the
    weights), or "none" (no copy: the delta cannot be switched off; detach with merge=True)."""

    method = "full"
    peft_type = "FULL"

    originals: Literal["cpu", "same_device", "none"] = "cpu"


def attach_full(model: nn.Module, config: FullConfig, name: str) -> FullConfig:
    foreign = foreign_parameters(model)
    names = [n for n, p in model.named_parameters() if id(p) not in foreign]
    if not names:
        raise DeltaError(f"{type(model).__name__} has no parameters of its own to fine-tune")
    select_parameters(model, name, names, originals=config.originals, method="full")
    return config


# A load must be undoable, so a loaded full delta keeps the originals it overwrites (on the CPU),
# whatever the file's config says (a model without a base to return to is from_pretrained's job).
FULL = register(Method(name="full", config_cls=FullConfig, kind="select", attach=attach_full, folder="model",
                       load_overrides={"originals": "cpu"}))
