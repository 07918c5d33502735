"""Diff pruning: a sparse task diff added to the frozen weights.

Guo, Rush & Kim 2021, "Parameter-Efficient Transfer Learning with Diff Pruning". Every
targeted parameter theta0 (a weight, a bias, a norm's scale, an embedding table) gets a
diff delta = z * w, elementwise:

    theta = theta0 + z * w

w is dense and starts at zero (the model is unchanged at attach). z is a hard-concrete
gate per entry (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through
L0 Regularization"), a relaxed binary mask whose expected L0 norm is differentiable:

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + alpha) / beta),
    s_bar = s (r - l) + l,  z = min(1, max(0, s_bar))

with alpha (log_alpha) trained per entry, beta the temperature and l < 0, r > 1 the
stretch limits. In eval mode the gate is deterministic: min(1, max(0, sigmoid(alpha) (r - l) + l)).
The penalty a training loop adds to its loss (``deltatune.regularization(model)``) is

    lambda * sum sigmoid(alpha - beta log(-l / r))          (the expected number of open gates)

Defaults are the paper's (its released code): l = -1.5, r = 1.5, alpha init 5, lambda = 1.25e-7,
beta = 1 (Louizos et al. use 2/3; with l = -r the penalty does not depend on beta).

When training ends, ``deltatune.finalize(model)`` projects the diff onto the target sparsity
by magnitude: of the N entries of all targeted tensors, the k = round(target_sparsity * N)
with the largest |delta| are kept, w becomes delta there and 0 elsewhere, and the mask is fixed
from then on (z = mask: further training changes the kept entries only; alpha is unused).

The file stores the diff sparsely, per tensor the flat indices of the kept entries, their
values and the shape (``<key>.indices`` int32 (int64 past 2**31 entries), ``<key>.values``
fp32, ``<key>.shape``): 8 bytes per kept entry, 1% of the dense fp32 tensors at 0.5%.
Before finalize the file holds every non-zero entry of z * w (eval gate); a loaded diff
has its mask fixed. Merge is theta0 + delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.func import functional_call

from .. import quant
from ..config import DeltaConfig, DeltaError, Method, check, register
from ..formats.peft import saved_key
from ..surgery import DeltaLayer, ModulesToSave, delta_layers, get_state, wrap
from ..targets import head_module_names, layer_index, name_matches, select_targets

EPS = 1e-6  # u is kept inside (EPS, 1 - EPS), so log u and log(1 - u) stay finite
SPARSE_PARTS = ("indices", "values", "shape")


@dataclass(kw_only=True)
class DiffPruningConfig(DeltaConfig):
    """target_sparsity: the fraction of the targeted entries kept by finalize.
    target_modules: None takes every module holding parameters of its own (linear layers,
    embeddings, norms, biases), except the output head, heads trained whole, weights tied to
    another module, and modules another method already wraps (a LoRA target); else names,
    suffixes or a regex, as for LoRA.
    l0_penalty: lambda; log_alpha_init: alpha at attach; temperature: beta; limit_l, limit_r:
    the stretch interval (l, r)."""

    method = "diff_pruning"
    peft_type = "DIFF_PRUNING"

    target_sparsity: float = check(0.005, gt=0, le=1)
    target_modules: list[str] | str | None = check(None, regex=True)
    exclude_modules: list[str] | str | None = check(None, regex=True)
    layers_to_transform: list[int] | int | None = check(None, ge=0)
    layers_pattern: list[str] | str | None = None
    l0_penalty: float = check(1.25e-7, ge=0)
    log_alpha_init: float = 5.0
    temperature: float = check(1.0, gt=0)
    limit_l: float = check(-1.5, lt=0)
    limit_r: float = check(1.5, gt=1)


class _Mask(nn.Module):
    """The fixed mask of one adapter: a bool buffer per parameter (not saved in state_dict; moves with .to())."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for pname, mask in masks.items():
            self.register_buffer(pname, mask, persistent=False)


class DiffPruningLayer(DeltaLayer):
    """Wraps any module with parameters of its own; the forward runs it with theta0 + delta."""

    containers = ("diff_w", "diff_log_alpha", "diff_mask")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.diff_w = nn.ModuleDict()  # adapter -> ParameterDict {parameter name: w}
        self.diff_log_alpha = nn.ModuleDict()  # adapter -> ParameterDict {parameter name: alpha}
        self.diff_mask = nn.ModuleDict()  # adapter -> _Mask, once finalized or loaded
        self.gates: dict[str, tuple[float, float, float]] = {}  # adapter -> (l, r, beta)
        self.names = tuple(n for n, p in base_layer.named_parameters(recurse=False) if p.is_floating_point())

    def add(self, name: str, config: DiffPruningConfig, module_name: str) -> None:
        own = dict(self.base_layer.named_parameters(recurse=False))
        # fp32 whatever the base dtype: small diffs vanish in half precision
        self.diff_w[name] = nn.ParameterDict({n: nn.Parameter(torch.zeros_like(own[n], dtype=torch.float32))
                                              for n in self.names})
        self.diff_log_alpha[name] = nn.ParameterDict(
            {n: nn.Parameter(torch.full_like(own[n], config.log_alpha_init, dtype=torch.float32)) for n in self.names})
        self.gates[name] = (config.limit_l, config.limit_r, config.temperature)

    def remove(self, name: str, keep_merged: bool = False) -> None:
        super().remove(name, keep_merged)
        self.gates.pop(name, None)

    # ------------------------------------------------------------ math
    def gate(self, name: str, pname: str, stochastic: bool) -> torch.Tensor:
        """z for one parameter (fp32): the fixed mask, a hard-concrete sample, or its deterministic value."""
        if name in self.diff_mask:
            return getattr(self.diff_mask[name], pname).float()
        alpha = self.diff_log_alpha[name][pname]
        l, r, beta = self.gates[name]
        if stochastic:
            u = torch.rand_like(alpha).clamp_(EPS, 1 - EPS)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + alpha) / beta)
        else:
            s = torch.sigmoid(alpha)
        return (s * (r - l) + l).clamp(0, 1)

    def diff(self, name: str, pname: str, stochastic: bool = False) -> torch.Tensor:
        """delta = z * w for one parameter, fp32, the parameter's shape."""
        return self.gate(name, pname, stochastic) * self.diff_w[name][pname]

    def penalty(self, name: str) -> torch.Tensor | float:
        """The expected number of open gates of adapter `name` here (0 once its mask is fixed)."""
        if name in self.diff_mask:
            return 0.0
        l, r, beta = self.gates[name]
        shift = beta * math.log(-l / r)
        return sum(torch.sigmoid(self.diff_log_alpha[name][n] - shift).sum() for n in self.names)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.live:
            return self.base_layer(*args, **kwargs)
        stochastic = self.training and torch.is_grad_enabled()
        params = {}
        for pname in self.names:
            base = getattr(self.base_layer, pname)
            total = base.float()
            for name in self.live:
                total = total + self.diff(name, pname, stochastic)
            params[pname] = total.to(base.dtype)
        return functional_call(self.base_layer, params, args, kwargs)

    # ------------------------------------------------------------ merge
    def merge_delta(self, name: str) -> None:
        self._shift(name, +1)

    def unmerge_delta(self, name: str) -> None:
        self._shift(name, -1)

    def _shift(self, name: str, sign: int) -> None:
        with torch.no_grad():
            for pname in self.names:
                weight = getattr(self.base_layer, pname)
                weight.data.copy_((weight.float() + sign * self.diff(name, pname)).to(weight.dtype))

    def merged_parameters(self) -> tuple[str, ...]:
        return self.names

    # ------------------------------------------------------------ the fixed mask
    def fix_mask(self, name: str, masks: dict[str, torch.Tensor]) -> None:
        """From now on z = mask; w keeps delta on the kept entries and 0 elsewhere."""
        with torch.no_grad():
            for pname, mask in masks.items():
                w = self.diff_w[name][pname]
                w.copy_(torch.where(mask, self.diff(name, pname), torch.zeros((), dtype=w.dtype, device=w.device)))
        self.diff_mask[name] = _Mask(masks)


# ---------------------------------------------------------------- targets


def _has_own_parameters(module: nn.Module) -> bool:
    return any(p.is_floating_point() for p in module.parameters(recurse=False))


def default_targets(model: nn.Module) -> list[str]:
    """Modules with parameters of their own, but the output and classifier heads, modules kept
    whole, other deltas' containers, and modules whose parameters are tied to another module's
    (one diff per use would not be one diff of the weight, and a merge would reach both)."""
    state = get_state(model)
    roots = {c for d in (state.deltas.values() if state else ()) if d.method.kind == "input" for c in d.method.containers}
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    heads = head_module_names(model)
    wrappers = [n for n, m in model.named_modules() if isinstance(m, DeltaLayer)]
    chosen = []
    for name, module in model.named_modules():
        if (not name or name.split(".")[0] in roots or any(name == h or name.startswith(h + ".") for h in heads)
                or any(name.startswith(w + ".") for w in wrappers) or isinstance(module, ModulesToSave)):
            continue
        module = module.base_layer if isinstance(module, DiffPruningLayer) else module
        if isinstance(module, DeltaLayer) or not _has_own_parameters(module):
            continue
        if any(uses[id(p)] > 1 for p in module.parameters(recurse=False)):
            continue
        chosen.append(name)
    return chosen


def _refuse_quantized(model: nn.Module) -> None:
    """A quantised (bitsandbytes) weight is packed integers: it cannot take a diff. The default targets would
    quietly leave those layers out and train the embeddings and norms only; say so instead."""
    layers = quant.quantized_layers(model)
    if layers:
        raise DeltaError(
            f"diff pruning trains a sparse diff of each target's weights, but {layers[0][0]} (and {len(layers) - 1} more) "
            "is quantised (bitsandbytes) and cannot take one: load the base unquantised, train a wrapping delta "
            "(LoRA) on the quantised layers, or name full-precision targets in target_modules"
        )


def _restrict(model: nn.Module, names: list[str], config: DiffPruningConfig) -> list[str]:
    layers = config.layers_to_transform
    layers = {layers} if isinstance(layers, int) else set(layers or ())
    out = []
    for name in names:
        if config.exclude_modules and name_matches(name, config.exclude_modules):
            continue
        if layers and layer_index(name, config.layers_pattern) not in layers:
            continue
        out.append(name)
    if not out:
        raise DeltaError(f"diff pruning: exclude_modules / layers_to_transform left no module of {type(model).__name__}")
    return out


def attach(model: nn.Module, config: DiffPruningConfig, name: str) -> DiffPruningConfig:
    if config.target_modules is None:
        _refuse_quantized(model)
        names = _restrict(model, default_targets(model), config)
    else:
        names = select_targets(model, config.target_modules, supported=_has_own_parameters, method="diff pruning",
                               exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
                               layers_pattern=config.layers_pattern)
    wrap(model, names, DiffPruningLayer, name, config)
    return config


# ---------------------------------------------------------------- training hooks


def _layers(model: nn.Module, name: str) -> Iterator[tuple[str, DiffPruningLayer]]:
    for layer_name, layer in delta_layers(model):
        if isinstance(layer, DiffPruningLayer) and name in layer.diff_w:
            yield layer_name, layer


def regularization(model: nn.Module, name: str, config: DiffPruningConfig) -> torch.Tensor | float:
    """lambda times the expected L0 norm of the diff (0 once the mask is fixed)."""
    total = sum((layer.penalty(name) for _, layer in _layers(model, name)), 0.0)
    return config.l0_penalty * total


def kept_entries(model: nn.Module, name: str = "default") -> int:
    """How many entries finalize keeps: round(target_sparsity * N), N the targeted entries (at least 1)."""
    config = get_state(model).deltas[name].config
    total = sum(getattr(layer.base_layer, p).numel() for _, layer in _layers(model, name) for p in layer.names)
    return max(1, min(total, round(config.target_sparsity * total)))


def finalize(model: nn.Module, name: str, config: DiffPruningConfig) -> None:
    """Magnitude projection onto the target sparsity over all targeted tensors at once; the mask is fixed after."""
    parts = [(layer, pname) for _, layer in _layers(model, name) for pname in layer.names]
    k = kept_entries(model, name)
    with torch.no_grad():
        magnitudes = torch.cat([layer.diff(name, pname).abs().flatten() for layer, pname in parts])  # (N,)
        kept = torch.zeros_like(magnitudes, dtype=torch.bool)
        kept[magnitudes.topk(k, sorted=False).indices] = True
        start = 0
        per_layer: dict[int, dict[str, torch.Tensor]] = {}
        for layer, pname in parts:
            shape = getattr(layer.base_layer, pname).shape
            per_layer.setdefault(id(layer), {})[pname] = kept[start : start + shape.numel()].view(shape).clone()
            start += shape.numel()
    for layer in {id(layer): layer for layer, _ in parts}.values():
        layer.fix_mask(name, per_layer[id(layer)])


# ---------------------------------------------------------------- the sparse file


def _dense_keys(model: nn.Module, name: str) -> Iterator[tuple[str, DiffPruningLayer, str]]:
    """(file key of w, layer, parameter name) for every diffed parameter."""
    for layer_name, layer in _layers(model, name):
        for pname in layer.names:
            yield saved_key(f"{layer_name}.diff_w.{name}.{pname}", name, DiffPruningLayer.containers), layer, pname


def to_file(model: nn.Module, name: str, config: DiffPruningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """delta as (flat indices, values, shape) per tensor: the kept entries once finalized, else the non-zero ones."""
    out = {k: v for k, v in tensors.items() if ".diff_w." not in k and ".diff_log_alpha." not in k}  # heads kept whole
    with torch.no_grad():
        for key, layer, pname in _dense_keys(model, name):
            delta = layer.diff(name, pname).detach().cpu()
            keep = layer.diff_mask[name].get_buffer(pname).cpu() if name in layer.diff_mask else delta != 0
            flat = keep.flatten().nonzero().flatten()
            index_dtype = torch.int32 if delta.numel() < 2**31 else torch.int64
            out[f"{key}.indices"] = flat.to(index_dtype)
            out[f"{key}.values"] = delta.flatten()[flat].contiguous()
            out[f"{key}.shape"] = torch.tensor(list(delta.shape), dtype=torch.int64)
    return out


def from_file(model: nn.Module, name: str, config: DiffPruningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense w (delta on the stored entries) and alpha for every stored tensor; the layers get their masks fixed."""
    out: dict[str, torch.Tensor] = {}
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, _, part = key.rpartition(".")
        if part in SPARSE_PARTS and ".diff_w." in stem:
            stems.setdefault(stem, {})[part] = value
        else:
            out[key] = value  # a head kept whole, or a key with no place (load names it)
    dense = {stem: _dense(stem, parts) for stem, parts in stems.items()}
    for stem, (values, mask) in dense.items():
        out[stem] = values
        out[stem.replace(".diff_w.", ".diff_log_alpha.")] = torch.full_like(values, config.log_alpha_init)
    by_layer: dict[int, tuple[DiffPruningLayer, dict[str, torch.Tensor]]] = {}
    for key, layer, pname in _dense_keys(model, name):
        if key in dense and dense[key][1].shape == getattr(layer.base_layer, pname).shape:
            device = layer.diff_w[name][pname].device
            by_layer.setdefault(id(layer), (layer, {}))[1][pname] = dense[key][1].to(device)
    for layer, masks in by_layer.values():
        if set(masks) == set(layer.names):
            layer.diff_mask[name] = _Mask(masks)
    return out


def _dense(stem: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(values as a dense fp32 tensor, the mask of stored entries) from one sparse triple, checked."""
    missing = [p for p in SPARSE_PARTS if p not in parts]
    if missing:
        raise DeltaError(f"diff pruning file: {stem}.{missing[0]} is missing (each tensor is stored as "
                         f"{', '.join(stem + '.' + p for p in SPARSE_PARTS)}); the file is damaged")
    indices, values, shape = parts["indices"], parts["values"], parts["shape"]
    if shape.dim() != 1 or shape.dtype not in (torch.int32, torch.int64) or bool((shape < 0).any()):
        raise DeltaError(f"diff pruning file: {stem}.shape must be a list of sizes, got {shape.tolist()!r}")
    size = math.prod(shape.tolist())
    if (indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64) or values.dim() != 1
            or not values.is_floating_point() or len(indices) != len(values)):
        raise DeltaError(f"diff pruning file: {stem}.indices and .values must be 1-D (integers, numbers) of one length; "
                         f"got {tuple(indices.shape)} {indices.dtype} and {tuple(values.shape)} {values.dtype}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise DeltaError(f"diff pruning file: {stem}.indices has an entry outside a tensor of shape {shape.tolist()}")
    flat_mask = torch.zeros(size, dtype=torch.bool)
    flat_mask[indices.long()] = True
    if int(flat_mask.sum()) != len(indices):
        raise DeltaError(f"diff pruning file: {stem}.indices repeats an entry; the file is damaged")
    flat = torch.zeros(size, dtype=torch.float32)
    flat[indices.long()] = values.float()
    dims = tuple(shape.tolist())
    return flat.view(dims), flat_mask.view(dims)


def training_state(model: nn.Module, name: str, config: DiffPruningConfig) -> dict[str, Any]:
    """Which layers have their mask fixed (the masks themselves are buffers and come along as such)."""
    return {"fixed": [layer_name for layer_name, layer in _layers(model, name) if name in layer.diff_mask]}


def load_training_state(model: nn.Module, name: str, config: DiffPruningConfig, state: dict[str, Any]) -> None:
    """Empty masks where the checkpoint had fixed ones; the checkpoint's buffers fill them in."""
    fixed = set(state.get("fixed", ()))
    for layer_name, layer in _layers(model, name):
        if layer_name in fixed and name not in layer.diff_mask:
            layer.diff_mask[name] = _Mask({p: torch.zeros_like(layer.diff_w[name][p], dtype=torch.bool) for p in layer.names})


DIFF_PRUNING = register(
    Method(name="diff_pruning", config_cls=DiffPruningConfig, kind="wrap", attach=attach,
           containers=DiffPruningLayer.containers, to_file=to_file, from_file=from_file,
           regularization=regularization, finalize=finalize,
           training_state=training_state, load_training_state=load_training_state)
)
