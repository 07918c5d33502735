"""BitFit: train only the bias terms.

Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models". Every weight stays frozen; the biases
b of the chosen modules train, so the model computes W x + (b0 + delta_b). The
trained biases live in the model itself, so there is nothing to merge; the core
keeps b0 to run the base model (``disabled``) and to restore it at detach. On
BERT-large, all biases including LayerNorm's are 272,384 parameters (0.08%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..config import DeltaConfig, DeltaError, Method, check, register
from ..surgery import DeltaLayer, ModulesToSave, select_parameters
from ..targets import name_matches


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


def attach(model: nn.Module, config: BitFitConfig, name: str) -> BitFitConfig:
    # Parameters inside delta layers' own containers, and heads trained whole, are not biases to select.
    skip = {id(p) for m in model.modules() if isinstance(m, DeltaLayer)
            for c in m.containers for p in getattr(m, c).parameters()}
    skip |= {id(p) for m in model.modules() if isinstance(m, ModulesToSave) for p in m.base_layer.parameters()}
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
    select_parameters(model, name, chosen)
    return config


BITFIT = register(Method(name="bitfit", config_cls=BitFitConfig, kind="select", attach=attach))
