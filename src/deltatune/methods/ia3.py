"""(IA)³: learned vectors that rescale activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning". A vector l rescales a layer's activations elementwise:

    keys, values (output scaling):    h = l ⊙ (W x + b)     l has one entry per output feature
    feed-forward (input scaling):     h = W (l ⊙ x) + b     l has one entry per input feature

l starts at ones, so the model is unchanged at attach; only the vectors train (on
Llama-3.2-3B's k, v and down projections 28 x (1024 + 1024 + 8192) = 286,720
parameters). The paper rescales the feed-forward's inner activation, which is the
input of its second projection, so that projection is the "feed-forward module".

Files hold peft's shapes: ``ia3_l`` is [out, 1] for output scaling and [1, in] for
input scaling on nn.Linear and GPT-2's Conv1D (in nn.Linear's sense), and
[1, channels, 1, 1] on nn.Conv2d. Which targets are feed-forward follows peft's rule
(a regex string must match the whole module name; a list entry is a suffix of it).

Merging folds l into the weight: output scaling multiplies the weight's output rows
and the bias, input scaling its input columns; unmerging divides back out. Several
adapters multiply, so they merge and unmerge in any order. A merged vector entry of
exactly zero erases its rows or columns, so those values are kept aside at merge and
put back at unmerge (peft divides by l + 1e-8 there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..config import DeltaConfig, DeltaError, Method, check, register
from ..surgery import DeltaLayer, float_or_quantized, is_conv1d, wrap
from ..targets import IA3_FEEDFORWARD, default_targets, select_targets


@dataclass(kw_only=True)
class IA3Config(DeltaConfig):
    """target_modules: names, a regex string or "all-linear"; None takes the architecture's
    default (keys, values and the feed-forward output projection). feedforward_modules: which
    targets have their input rescaled instead of their output (a subset of target_modules);
    None takes the architecture's default. init_weights=False starts the vectors random
    (peft's option, outputs change at attach)."""

    method = "ia3"
    peft_type = "IA3"

    target_modules: list[str] | str | None = check(None, regex=True)
    exclude_modules: list[str] | str | None = check(None, regex=True)
    feedforward_modules: list[str] | str | None = check(None, regex=True)
    init_weights: bool = True
    # Set at attach, not by hand: True when the targets are GPT-2 Conv1D ([in, out] weights); peft reads it.
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_subset(self.feedforward_modules, self.target_modules)


def _check_subset(feedforward: list[str] | str | None, targets: list[str] | str | None) -> None:
    if isinstance(feedforward, list) and isinstance(targets, list) and not set(feedforward) <= set(targets):
        extra = sorted(set(feedforward) - set(targets))
        raise DeltaError(
            f"IA3Config.feedforward_modules = {feedforward!r} must be a subset of target_modules = {targets!r}; "
            f"{extra} are not targets: add them to target_modules or remove them from feedforward_modules"
        )


def is_feedforward(module_name: str, feedforward: list[str] | str | None) -> bool:
    """peft's rule, so a file means the same in both libraries: a regex must match the whole
    name, a list entry only has to end it (no '.' boundary needed)."""
    if feedforward is None:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module_name) is not None
    return any(module_name.endswith(t) for t in feedforward)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):  # GPT-2's: weight stored (in, out)
        return "conv1d"
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        return "conv"
    return None


def supports(module: nn.Module) -> bool:
    # bitsandbytes' quantised layers subclass nn.Linear; other integer weights are refused
    return _kind(module) is not None and float_or_quantized(module)


class IA3Layer(DeltaLayer):
    """Wraps an nn.Linear, a GPT-2 Conv1D or an nn.Conv2d/Conv3d; one vector per adapter."""

    containers = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.kind = _kind(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}  # per adapter: input (True) or output (False) scaling
        # Weight and bias values that a zero vector entry erased at merge: (adapter, attribute) -> (where, values).
        self.erased: dict[tuple[str, str], tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def base_replaced(self) -> None:
        super().base_replaced()
        self.kind = _kind(self.base_layer)

    # ------------------------------------------------------------ shapes
    def features(self, feedforward: bool) -> int:
        base = self.base_layer
        if self.kind == "linear":
            return base.in_features if feedforward else base.out_features
        if self.kind == "conv1d":
            in_f, out_f = base.weight.shape
            return in_f if feedforward else out_f
        return base.in_channels if feedforward else base.out_channels

    def stored_shape(self, feedforward: bool) -> tuple[int, ...]:
        n = self.features(feedforward)
        if self.kind == "conv":
            return (1, n) + (1,) * (self.base_layer.weight.dim() - 2)
        return (1, n) if feedforward else (n, 1)

    # ------------------------------------------------------------ adapters
    def add(self, name: str, config: IA3Config, module_name: str) -> None:
        feedforward = is_feedforward(module_name, config.feedforward_modules)
        shape = self.stored_shape(feedforward)
        # Trainable parameters are fp32 whatever the base dtype.
        kw = dict(device=self.base_layer.weight.device, dtype=torch.float32)
        vector = torch.ones(shape, **kw) if config.init_weights else torch.randn(shape, **kw)
        self.ia3_l[name] = nn.Parameter(vector)
        self.feedforward[name] = feedforward

    def remove(self, name: str, keep_merged: bool = False) -> None:
        super().remove(name, keep_merged)
        self.feedforward.pop(name, None)
        for key in [k for k in self.erased if k[0] == name]:
            del self.erased[key]

    # ------------------------------------------------------------ forward
    def scale(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Adapter `name`'s vector shaped to broadcast over the activations it scales."""
        vector = self.ia3_l[name]
        vector = vector if vector.dtype == dtype else vector.to(dtype)  # fp32 trainables, compute in the base's dtype
        return vector if self.kind == "conv" else vector.reshape(-1)  # conv: (1, C, 1, 1); else features last

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.model_state is not None and self.model_state.batch_adapters is not None:
            return self.mixed_forward(x, *args, **kwargs)
        x_scale = out_scale = None
        for name in self.live:
            s = self.scale(name, x.dtype)
            if self.feedforward[name]:
                x_scale = s if x_scale is None else x_scale * s
            else:
                out_scale = s if out_scale is None else out_scale * s
        if x_scale is not None:
            x = x * x_scale
        result = self.base_layer(x, *args, **kwargs)
        return result if out_scale is None else result * out_scale

    def mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row scaled by its own adapter's vector (ones for rows of "__base__" or of other methods)."""
        groups = self.batch_groups(x.shape[0])
        x_scale = self.row_scales(groups, x, feedforward=True)
        result = self.base_layer(x if x_scale is None else x * x_scale, *args, **kwargs)
        out_scale = self.row_scales(groups, result, feedforward=False)
        return result if out_scale is None else result * out_scale

    def row_scales(self, groups: list[tuple[str, torch.Tensor]], t: torch.Tensor, feedforward: bool) -> torch.Tensor | None:
        chosen = [(n, rows) for n, rows in groups if self.feedforward[n] == feedforward]
        if not chosen:
            return None
        n = self.features(feedforward)
        table = torch.ones(t.shape[0], n, dtype=t.dtype, device=t.device)  # (rows, features)
        for name, rows in chosen:
            table = table.index_copy(0, rows, self.scale(name, t.dtype).reshape(1, n).expand(len(rows), n))
        if self.kind == "conv":
            return table.view(t.shape[0], n, *([1] * (t.dim() - 2)))  # (rows, C, 1, 1)
        return table.view(t.shape[0], *([1] * (t.dim() - 2)), n)  # (rows, 1, ..., features)

    # ------------------------------------------------------------ merge
    def multipliers(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(base attribute, factor broadcastable to it) pairs that merging adapter `name` multiplies in."""
        vector = self.ia3_l[name].detach().float().reshape(-1)
        weight = self.base_layer.weight
        if self.feedforward[name]:  # input columns
            if self.kind == "linear":  # (out, in)
                yield "weight", vector.view(1, -1)
            elif self.kind == "conv1d":  # (in, out)
                yield "weight", vector.view(-1, 1)
            else:  # (out, in / groups, *kernel): output channel o sees input channels of its group only
                groups, out, in_per_group = self.base_layer.groups, weight.shape[0], weight.shape[1]
                per_weight = vector.view(groups, 1, in_per_group).expand(groups, out // groups, in_per_group)
                yield "weight", per_weight.reshape(out, in_per_group, *([1] * (weight.dim() - 2)))
            return
        # output rows, and the bias
        if self.kind == "conv1d":
            yield "weight", vector.view(1, -1)
        else:
            yield "weight", vector.view(-1, *([1] * (weight.dim() - 1)))
        if getattr(self.base_layer, "bias", None) is not None:
            yield "bias", vector

    def merge_delta(self, name: str) -> None:
        with torch.no_grad():
            for attribute, factor in self.multipliers(name):
                if attribute == "weight" and self.quantized:  # (out, in): dequantised, scaled, re-quantised
                    self.set_base_weight(self.base_weight() * factor)  # unmerge restores the stored tensors
                    continue
                param = getattr(self.base_layer, attribute)
                factor = factor.expand_as(param)
                erased = (factor == 0).nonzero(as_tuple=True)
                if erased[0].numel():
                    self.erased[(name, attribute)] = (erased, param[erased].clone())
                param.copy_((param.float() * factor).to(param.dtype))

    def unmerge_delta(self, name: str) -> None:
        with torch.no_grad():
            for attribute, factor in self.multipliers(name):
                if attribute == "weight" and self.quantized:
                    self.set_base_weight(self.base_weight() / torch.where(factor == 0, 1.0, factor))
                    continue
                param = getattr(self.base_layer, attribute)
                factor = factor.expand_as(param)
                param.copy_((param.float() / torch.where(factor == 0, 1.0, factor)).to(param.dtype))
                kept = self.erased.pop((name, attribute), None)
                if kept is not None:
                    param[kept[0]] = kept[1]

    def merged_parameters(self) -> tuple[str, ...]:
        return ("weight", "bias") if getattr(self.base_layer, "bias", None) is not None else ("weight",)


def default_feedforward(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The architecture's feed-forward modules among `targets`; none for an unknown architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    feedforward = IA3_FEEDFORWARD.get(model_type, [])
    # Keep the list a subset of the targets, so the file loads in peft (which checks that).
    return [t for t in feedforward if not isinstance(targets, list) or t in targets]


def attach(model: nn.Module, config: IA3Config, name: str) -> IA3Config:
    targets = config.target_modules if config.target_modules is not None else default_targets("ia3", model)
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = default_feedforward(model, targets)
    _check_subset(feedforward, targets)
    names = select_targets(model, targets, supported=supports, method="ia3", exclude_modules=config.exclude_modules)
    config = config.replace(target_modules=targets, feedforward_modules=feedforward)
    wrap(model, names, IA3Layer, name, config)
    conv1d = any(model.get_submodule(n).kind == "conv1d" for n in names)
    return config.replace(fan_in_fan_out=conv1d)


IA3 = register(
    Method(name="ia3", config_cls=IA3Config, kind="wrap", attach=attach, containers=IA3Layer.containers, per_row=True,
           peft_compatible=True)
)
