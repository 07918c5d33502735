"""LN tuning: train the model's layer norms, each through a copy beside the frozen original.

Zhao et al. 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM
Finetuning". A layer norm computes

    LN(x) = gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta      (RMSNorm: gamma * x / rms(x))

and LN tuning trains only gamma and beta (RMSNorm: gamma) of the targeted norms; every
other weight stays frozen. The count is 2 x hidden per LayerNorm (hidden per RMSNorm):
on Llama-3.2-3B's default targets (two norms per block and the final one)
(2 x 28 + 1) x 3072 = 175,104 parameters.

As peft does, each adapter trains a full copy of the norm (``ln_tuning_layers[name]``),
so the original stays untouched: ``disabled`` and an inactive delta run the original,
several adapters live side by side, and rows of a mixed batch each run their own copy.
A copy replaces the norm rather than adding to it, so of several active adapters the
last one computes the output (peft refuses more than one). The copy is kept in fp32
and runs on fp32 inputs, its output cast back to the base's dtype.

Files hold peft's keys: ``<norm>.ln_tuning_layers.weight`` (and ``.bias``).

Merging writes the trained values into the norm itself (the values they replace are
kept aside), unmerging puts the originals back bit for bit. Merging several adapters
leaves the last one's values, as the forward does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, Method, check, register
from .. import quant
from ..surgery import DeltaLayer, wrap
from ..targets import default_targets, select_targets


@dataclass(kw_only=True)
class LNTuningConfig(DeltaConfig):
    """target_modules: names (or suffixes) of the norms to train, or a regex on the full module
    name; None takes the architecture's default (peft's: the blocks' norms and the final one)."""

    method = "ln_tuning"
    peft_type = "LN_TUNING"

    target_modules: list[str] | str | None = check(None, regex=True)
    exclude_modules: list[str] | str | None = check(None, regex=True)


def supports(module: nn.Module) -> bool:
    """A module with floating-point parameters of its own and no delta inside (a norm, typically)."""
    params = list(module.parameters())
    if not params or quant.is_quantized(module) or any(isinstance(m, DeltaLayer) for m in module.modules()):
        return False
    return all(p.is_floating_point() for p in params)


def _float_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


class LNTuningLayer(DeltaLayer):
    """Wraps a norm (any module with float parameters); one trained fp32 copy per adapter."""

    containers = ("ln_tuning_layers",)
    replaces_base = True  # a copy stands in for the base module: its frozen original is not counted or selected

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()
        # The base values a merge overwrote, per merged adapter: {parameter name: value}.
        self.replaced: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, config: LNTuningConfig, module_name: str) -> None:
        trained = copy.deepcopy(self.base_layer)
        if self.merged:  # copy the original, not another adapter's merged values
            with torch.no_grad():
                first = self.replaced[self.merged[0]]
                for key, p in trained.named_parameters():
                    p.copy_(first[key])
        self.ln_tuning_layers[name] = trained.float()  # trainables are fp32 whatever the base dtype

    def remove(self, name: str, keep_merged: bool = False) -> None:
        super().remove(name, keep_merged)
        self.replaced.pop(name, None)

    # ------------------------------------------------------------ forward
    def run(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        """The copy on fp32 inputs, its output in the base's dtype."""
        dtype = _float_dtype(self.base_layer)
        if dtype == torch.float32:
            return module(*args, **kwargs)
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        out = module(*args, **kwargs)
        return out.to(dtype) if torch.is_tensor(out) else out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mixed = self.model_state is not None and self.model_state.batch_adapters is not None
        groups = self.batch_groups(x.shape[0]) if mixed else None
        if groups is not None:  # each row through its own adapter's copy ("__base__" rows: the original)
            result = self.base_layer(x, *args, **kwargs)
            for name, rows in groups:
                result = result.index_copy(0, rows, self.run(self.ln_tuning_layers[name], (x[rows], *args), kwargs))
            return result
        if not self.live:
            return self.base_layer(x, *args, **kwargs)
        return self.run(self.ln_tuning_layers[self.live[-1]], (x, *args), kwargs)

    # ------------------------------------------------------------ merge
    def merge_delta(self, name: str) -> None:
        with torch.no_grad():
            params = dict(self.base_layer.named_parameters())
            self.replaced[name] = {k: p.detach().clone() for k, p in params.items()}
            for key, p in self.ln_tuning_layers[name].named_parameters():
                params[key].copy_(p.to(params[key].dtype))

    def unmerge_delta(self, name: str) -> None:
        with torch.no_grad():
            params = dict(self.base_layer.named_parameters())
            for key, value in self.replaced.pop(name).items():
                params[key].copy_(value)

    def merged_parameters(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.base_layer.named_parameters())


def attach(model: nn.Module, config: LNTuningConfig, name: str) -> LNTuningConfig:
    targets = config.target_modules if config.target_modules is not None else default_targets("ln_tuning", model)
    names = select_targets(model, targets, supported=supports, method="ln_tuning", exclude_modules=config.exclude_modules)
    wrap(model, names, LNTuningLayer, name, config)
    return config.replace(target_modules=targets)


LN_TUNING = register(
    Method(name="ln_tuning", config_cls=LNTuningConfig, kind="wrap", attach=attach, containers=LNTuningLayer.containers,
           per_row=True, peft_compatible=True)
)
