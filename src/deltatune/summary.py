"""Trainable and total parameter counts, with a per-module breakdown."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn

from .config import DeltaError


@dataclass
class Summary:
    trainable: int
    total: int
    # trainable parameters per module name pattern (layer indices folded to "*")
    per_module: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def table(self) -> str:
        width = max([len(k) for k in self.per_module] + [len("module")])
        lines = [f"{'module'.ljust(width)}  {'trainable':>14}", "-" * (width + 16)]
        lines += [f"{k.ljust(width)}  {v:>14,}" for k, v in self.per_module.items()]
        lines.append("-" * (width + 16))
        lines.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.4f}%)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def summary(model: nn.Module, print_table: bool = True) -> Summary:
    """Count trainable and total parameters (each shared tensor once) and print a table.

    The total is the parameters the forward uses: a module trained whole (modules_to_save, a classifier
    head) counts its trained copy, not also the frozen original kept beside it for switching the delta
    off, so full fine-tuning counts 100% and a head does not count twice."""
    import torch.nn as nn  # here: `import deltatune` (the command line's --help) starts without torch

    if not isinstance(model, nn.Module):
        raise DeltaError(f"summary expects a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    per_module: dict[str, int] = {}
    replaced = replaced_originals(model)
    for name, p in model.named_parameters():
        if id(p) in replaced:
            continue
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
            key = re.sub(r"\.\d+\.", ".*.", name.rsplit(".", 1)[0] if "." in name else name)
            per_module[key] = per_module.get(key, 0) + n
    result = Summary(trainable=trainable, total=total, per_module=per_module)
    if print_table:
        print(result.table())
    return result


def replaced_originals(model: nn.Module) -> set[int]:
    """ids of the frozen originals of modules trained whole, which a trained copy stands in for."""
    from .surgery import DeltaLayer

    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, DeltaLayer) and module.replaces_base and module.adapter_names():
            out |= {id(p) for p in module.base_layer.parameters()}
    return out
