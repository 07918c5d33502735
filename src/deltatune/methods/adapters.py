"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) and AdapterFusion.

A bottleneck adapter is a small two-layer network with a skip around it:

    A(z) = W_up σ(W_down z + b_down) + b_up,     W_down (m x d), W_up (d x m), m = d / reduction_factor

W_up and b_up start at zero, so the model is unchanged at attach; σ is ReLU, GELU or swish.
Where A sits in a transformer block, with x the block's residual stream, h a sublayer's
output before the residual add and LN the block's layer norm (identity in a pre-LN block):

  * Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP": two serial adapters,
    after the attention output projection and after the feed-forward block,
        y = LN(x + h + s·A(h))           (twice per block)
  * Pfeiffer et al. 2021, "AdapterFusion": one adapter after the feed-forward block, reading
    the sublayer's normalised output,
        y = LN(x + h + s·A(LN(x + h)))   post-LN (BERT, BART): the FFN's layer norm is wrapped
        y = x + h + s·A(x + h)           pre-LN (Llama, GPT-2, T5): LN is the identity here
  * He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning": a
    parallel adapter beside the feed-forward block, reading the block's input u,
        y = LN(x + h + s·A(u))           (u = x post-LN, u = LN(x) pre-LN; scaled PA uses s = 4)

Each architecture's attachment points are a table in deltatune.targets (ADAPTER_SITES). An
adapter wraps the module whose output it changes; where it reads the input of another module
of the block (the FFN's input, or the residual entering the FFN's layer norm), a forward
pre-hook on that module hands the input over ("taps" below). Since the adapter wraps the
projection, a dropout the block applies to the sublayer's output (BERT, GPT-2) acts on h + s·A(h)
where AdapterHub applies it to h alone; in evaluation the two agree. Decoder blocks with
cross-attention (T5, BART) get no adapter after cross-attention. Several active adapters on
one module each read the same input and their outputs add. On BERT-large (d = 1024, 24 layers)
a Houlsby adapter with m = 64 has 2 x 24 x (2·1024·64 + 64 + 1024) = 6,343,680 parameters.

Adapters cannot merge into the base weights: A is nonlinear.

AdapterFusion (Pfeiffer et al. 2021) combines n trained adapters A_1..A_n, frozen, in every
layer where they all sit, by attention over their outputs a_i = s·A_i(z), with the query from
the layer's own hidden state z (the adapters' common input):

    α = softmax_i( (Q z + b_Q) · (K a_i + b_K) / sqrt(d) ),     fused = Σ_i α_i V a_i

which replaces the adapter term of the formulas above. Only Q, K and V train (3d² + 2d per
layer); V starts as the identity and K at zero, so a new fusion computes exactly the average
of its adapters' outputs; the loss term regularization · Σ ||V - I||² keeps V near the identity
(`deltatune.regularization(model)`, 0.01 as in AdapterHub). The scores are scaled by 1/sqrt(d)
as in scaled dot-product attention (AdapterHub's fusion leaves them unscaled): trained adapters'
outputs can be large, and unscaled scores then saturate the softmax within a few steps, often on
the wrong adapter.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DeltaConfig, DeltaError, Method, check, register
from ..surgery import DeltaLayer, delta_layers, get_state, is_conv1d, select_parameters, wrap
from ..targets import adapter_sites, block_of, layer_index

NONLINEARITIES = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}
NOT_MERGEABLE = "is a nonlinear function of the hidden states, so no change of the base weights equals it"


@dataclass(kw_only=True)
class AdapterConfig(DeltaConfig):
    """placement: "houlsby" (after attention and after the FFN), "pfeiffer" (after the FFN) or
    "parallel" (beside the FFN). The bottleneck m is bottleneck_size, or the hidden size divided by
    reduction_factor. scaling: s. train_layer_norms: the adapted blocks' layer norms train too.
    target_layers: block indices to adapt (None: every block)."""

    method = "bottleneck_adapter"
    peft_type = "BOTTLENECK_ADAPTER"

    placement: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction_factor: float = check(16, gt=0)
    bottleneck_size: int | None = check(None, gt=0)
    nonlinearity: Literal["relu", "gelu", "swish"] = "relu"
    scaling: float = 1.0
    train_layer_norms: bool = False
    target_layers: list[int] | int | None = check(None, ge=0)

    def bottleneck(self, hidden: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(hidden // self.reduction_factor))


@dataclass(kw_only=True)
class AdapterFusionConfig(DeltaConfig):
    """adapters: names of attached bottleneck adapters (at least two) to fuse; they are frozen.
    regularization: weight of the loss term Σ ||V - I||² (0 turns it off)."""

    method = "adapter_fusion"
    peft_type = "ADAPTER_FUSION"

    adapters: list[str] = field(default_factory=list)
    regularization: float = check(0.01, ge=0)
    # Set at attach, not by hand: the fused adapters' placement (a saved fusion refuses adapters placed otherwise).
    placement: Literal["houlsby", "pfeiffer", "parallel"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.adapters) < 2 or len(set(self.adapters)) != len(self.adapters):
            raise DeltaError(f"AdapterFusionConfig.adapters = {self.adapters!r} is not allowed: it needs two or more "
                             "distinct adapter names")


# ---------------------------------------------------------------- where an adapter reads and writes
#
# mode      the adapter reads z =              the wrapped module's output becomes
# serial    f(u), the module's output           f(u) + a          (Houlsby)
# parallel  the FFN's input (tapped)            f(u) + a          (parallel, at the FFN's output projection)
# residual  x + f(u), x tapped                  f(u) + a          (Pfeiffer, pre-LN, at the FFN's output projection)
# renorm    f(u), the layer norm's output       f(u + a)          (Pfeiffer, post-LN, wrapping the FFN's layer norm)
# with a = s·A(z), or a fusion of several adapters' outputs.
TAPS = {"parallel": "ffn_input", "residual": "residual"}  # mode -> the input it takes from another module


@dataclass(frozen=True)
class Site:
    target: str  # the module the adapter wraps
    mode: str
    source: str | None = None  # the module whose input the adapter reads (tapped modes)


def plan(model: nn.Module, config: AdapterConfig) -> list[Site]:
    """Where the adapters of `config` go in `model`, in model order."""
    sites = adapter_sites(model)
    if config.placement == "houlsby":
        specs = [(sites.attention, "serial", None), (sites.ffn_out, "serial", None)]
    elif config.placement == "parallel":
        specs = [(sites.ffn_out, "parallel", sites.ffn_in)]
    elif sites.post_ln:
        specs = [(sites.ffn_norm, "renorm", None)]
    else:
        if getattr(getattr(model, "config", None), "apply_residual_connection_post_layernorm", False):
            raise DeltaError(f"Pfeiffer adapters on {type(model).__name__} with apply_residual_connection_post_layernorm="
                             "True are not supported (its residual is the normalised stream); use placement='houlsby' "
                             "or 'parallel'")
        specs = [(sites.ffn_out, "residual", sites.ffn_norm)]
    names = _module_names(model)
    layers = {config.target_layers} if isinstance(config.target_layers, int) else set(config.target_layers or ())
    chosen = []
    for pattern, mode, source_pattern in specs:
        found = [n for n in names if re.fullmatch(pattern, n)]
        if not found:
            raise DeltaError(f"{config.placement} adapters on {type(model).__name__}: no module matches {pattern!r}; "
                             "fix its entry in deltatune.targets.ADAPTER_SITES")
        sources = [n for n in names if source_pattern and re.fullmatch(source_pattern, n)]
        for name in found:
            if layers and layer_index(name) not in layers:
                continue
            chosen.append(Site(name, mode, _nearest(name, sources) if source_pattern else None))
    if not chosen:
        present = sorted({layer_index(n) for n, _ in model.named_modules() if layer_index(n) is not None})
        raise DeltaError(f"AdapterConfig.target_layers = {config.target_layers!r} selects no block of "
                         f"{type(model).__name__}; its blocks are numbered {present}")
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=lambda s: order[s.target])


def _module_names(model: nn.Module) -> list[str]:
    """Module names in model order; a wrapped module by its wrapper's name, never the wrapper's insides."""
    names, wrappers = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        names.append(name)
        if isinstance(module, DeltaLayer):
            wrappers.append(name)
    return names


def _nearest(target: str, candidates: list[str]) -> str:
    """The candidate in the same block as `target` that shares the longest name prefix with it."""
    block = block_of(target)
    same = [c for c in candidates if block_of(c) == block]
    if not same:
        raise DeltaError(f"no module of block {block} matches the adapter's input site; fix the architecture's entry "
                         "in deltatune.targets.ADAPTER_SITES")

    def shared(c: str) -> int:
        common = 0
        for a, b in zip(c.split("."), target.split(".")):
            if a != b:
                break
            common += 1
        return common

    return max(same, key=shared)


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, DeltaLayer):
        module = module.base_layer
    return module


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear, a GPT-2 Conv1D or a layer norm."""
    module = _innermost(module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if is_conv1d(module):
        return weight.shape[0], weight.shape[1]
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0], weight.shape[0]
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return shape[-1], shape[-1]
    raise DeltaError(f"a bottleneck adapter cannot find the width of {type(module).__name__}")


class _Tap:
    """Forward pre-hook on a source module: hands its input to an adapter layer downstream."""

    def __init__(self, layer: "AdapterLayer", role: str) -> None:
        self.layer, self.role = layer, role

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        value = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
        self.layer.taps[self.role] = value


# ---------------------------------------------------------------- the layer


class AdapterLayer(DeltaLayer):
    """Wraps the module whose output an adapter changes; holds adapters and fusions by name."""

    containers = ("adapter_down", "adapter_up", "fusion_query", "fusion_key", "fusion_value")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.fusion_query = nn.ModuleDict()
        self.fusion_key = nn.ModuleDict()
        self.fusion_value = nn.ModuleDict()
        self.mode: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        self.nonlinearity: dict[str, str] = {}
        self.fused: dict[str, list[str]] = {}  # fusion name -> the adapters it fuses
        self.sources: dict[str, nn.Module] = {}  # tap role -> the (innermost) module whose input is read
        self.taps: dict[str, torch.Tensor] = {}  # tap role -> that input, during one forward
        # (records, this module's name) inside fusion_attention(): records[fusion][module] = attention weights
        self.recording: tuple[dict[str, dict[str, torch.Tensor]], str] | None = None

    # ------------------------------------------------------------ adapters
    def add(self, name: str, config: DeltaConfig, module_name: str, mode: str = "serial",
            source: nn.Module | None = None) -> None:
        if isinstance(config, AdapterFusionConfig):
            return self._add_fusion(name, config)
        out_dim = _features(self.base_layer)[1]
        in_dim = _features(source)[0] if mode == "parallel" else out_dim
        m = config.bottleneck(in_dim)
        kw = dict(device=self.device_of(), dtype=torch.float32)  # fp32 whatever the base dtype
        down, up = nn.Linear(in_dim, m, **kw), nn.Linear(m, out_dim, **kw)  # down: Kaiming-uniform (a = sqrt 5)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)  # A starts at zero: the model is unchanged at attach
        nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.mode[name], self.scaling[name], self.nonlinearity[name] = mode, config.scaling, config.nonlinearity
        if mode in TAPS:
            self._tap(TAPS[mode], source)

    def _add_fusion(self, name: str, config: AdapterFusionConfig) -> None:
        first = config.adapters[0]
        z_dim, d = self.adapter_down[first].in_features, self.adapter_up[first].out_features
        kw = dict(device=self.device_of(), dtype=torch.float32)
        query, key, value = nn.Linear(z_dim, d, **kw), nn.Linear(d, d, **kw), nn.Linear(d, d, bias=False, **kw)
        nn.init.normal_(query.weight, std=0.02)
        nn.init.zeros_(query.bias)
        nn.init.zeros_(key.weight)  # equal scores: a new fusion is the average of its adapters
        nn.init.zeros_(key.bias)
        with torch.no_grad():
            value.weight.copy_(torch.eye(d, **kw))
        self.fusion_query[name], self.fusion_key[name], self.fusion_value[name] = query, key, value
        self.fused[name] = list(config.adapters)

    def _tap(self, role: str, source: nn.Module) -> None:
        source = _innermost(source)
        if role in self.sources:
            return
        source.register_forward_pre_hook(_Tap(self, role), with_kwargs=True)
        self.sources[role] = source

    def _untap(self, role: str) -> None:
        source = self.sources.pop(role)
        for hook_id, hook in list(source._forward_pre_hooks.items()):
            if isinstance(hook, _Tap) and hook.layer is self and hook.role == role:
                del source._forward_pre_hooks[hook_id]
                source._forward_pre_hooks_with_kwargs.pop(hook_id, None)

    def remove(self, name: str, keep_merged: bool = False) -> None:
        super().remove(name, keep_merged)
        for table in (self.mode, self.scaling, self.nonlinearity, self.fused):
            table.pop(name, None)
        needed = {TAPS[m] for m in self.mode.values() if m in TAPS}
        for role in [r for r in self.sources if r not in needed]:
            self._untap(role)

    # ------------------------------------------------------------ math
    def forward(self, u: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(u, *args, **kwargs)
        taps, self.taps = self.taps, {}  # each forward's inputs are used once, then let go
        if self.model_state is not None and self.model_state.batch_adapters is not None:
            result = out
            for name, rows in self.batch_groups(u.shape[0]):
                part = self._adapt((name,), u[rows], out[rows], {r: t[rows] for r, t in taps.items()})
                result = result.index_copy(0, rows, part)
            return result
        if not self.live:
            return out
        return self._adapt(self.live, u, out, taps)

    def _adapt(self, names: tuple[str, ...], u: torch.Tensor, out: torch.Tensor, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        to_output, to_input = [], []
        for name in names:
            mode = self.mode[self.fused[name][0]] if name in self.fused else self.mode[name]
            z = self._input(mode, out, taps)
            a = self._fuse(name, z) if name in self.fused else self.bottleneck(name, z)
            (to_input if mode == "renorm" else to_output).append(a)
        result = self.base_layer(u + sum(to_input)) if to_input else out
        for a in to_output:
            result = result + a
        return result

    def _input(self, mode: str, out: torch.Tensor, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        if mode not in TAPS:
            return out
        tapped = taps.get(TAPS[mode])
        if tapped is None:
            source = type(self.sources.get(TAPS[mode])).__name__
            raise DeltaError(f"a {mode} adapter on {type(self.base_layer).__name__} reads the input of a {source} in the "
                             "same block, which did not run before it in this forward")
        return tapped + out if mode == "residual" else tapped

    def bottleneck(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """s·A(z) for adapter `name`, in z's dtype."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        w_down, b_down, w_up, b_up = down.weight, down.bias, up.weight, up.bias
        if w_down.dtype != z.dtype:  # fp32 trainables, half-precision base: compute in the base's dtype
            w_down, b_down, w_up, b_up = (t.to(z.dtype) for t in (w_down, b_down, w_up, b_up))
        hidden = NONLINEARITIES[self.nonlinearity[name]](F.linear(z, w_down, b_down))  # (..., m)
        a = F.linear(hidden, w_up, b_up)  # (..., d)
        return a if self.scaling[name] == 1 else a * self.scaling[name]

    def _fuse(self, name: str, z: torch.Tensor) -> torch.Tensor:
        a = torch.stack([self.bottleneck(n, z) for n in self.fused[name]], dim=-2)  # (..., n, d)
        query, key, value = self.fusion_query[name], self.fusion_key[name], self.fusion_value[name]
        cast = (lambda t: t.to(z.dtype)) if query.weight.dtype != z.dtype else (lambda t: t)  # noqa: E731
        q = F.linear(z, cast(query.weight), cast(query.bias))  # (..., d)
        k = F.linear(a, cast(key.weight), cast(key.bias))  # (..., n, d)
        v = F.linear(a, cast(value.weight))  # (..., n, d)
        scores = (k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1])  # (..., n)
        weights = scores.float().softmax(dim=-1).to(z.dtype)
        if self.recording is not None:
            records, module_name = self.recording
            records.setdefault(name, {})[module_name] = weights.detach()
        return (weights.unsqueeze(-1) * v).sum(dim=-2)  # (..., d)


# ---------------------------------------------------------------- attach


def attach(model: nn.Module, config: AdapterConfig, name: str) -> AdapterConfig:
    sites = plan(model, config)
    per_module = {s.target: {"mode": s.mode, "source": model.get_submodule(s.source) if s.source else None} for s in sites}
    wrap(model, [s.target for s in sites], AdapterLayer, name, config, per_module=per_module)
    if config.train_layer_norms:
        select_parameters(model, name, _layer_norm_parameters(model, {block_of(s.target) for s in sites}))
    return config


def _layer_norm_parameters(model: nn.Module, blocks: set[str | None]) -> list[str]:
    """Names of the parameters of every layer norm inside the given blocks."""
    names = [f"{module_name}.{p}" for module_name, module in model.named_modules()
             if "norm" in type(module).__name__.lower() and block_of(module_name) in blocks
             for p, _ in module.named_parameters(recurse=False)]
    if not names:
        raise DeltaError(f"train_layer_norms=True, but the adapted blocks of {type(model).__name__} have no layer norm "
                         "parameters")
    return names


def attach_fusion(model: nn.Module, config: AdapterFusionConfig, name: str) -> AdapterFusionConfig:
    state = get_state(model)
    missing = [a for a in config.adapters if a not in state.deltas]
    if missing:
        raise DeltaError(f"AdapterFusion {name!r} fuses {config.adapters}, but {missing} "
                         f"{'is' if len(missing) == 1 else 'are'} not attached; attach or dt.load those adapters first "
                         f"(dt.load(model, folder, name={missing[0]!r}))")
    wrong = [a for a in config.adapters if state.deltas[a].method.name != ADAPTER.name]
    if wrong:
        raise DeltaError(f"AdapterFusion fuses bottleneck adapters; {wrong[0]!r} is a {state.deltas[wrong[0]].method.name} delta")
    layers = {a: [n for n, layer in delta_layers(model) if isinstance(layer, AdapterLayer) and a in layer.adapter_down]
              for a in config.adapters}
    first = config.adapters[0]
    for other in config.adapters[1:]:
        mine, theirs = state.deltas[first].config, state.deltas[other].config
        if layers[other] != layers[first] or mine.placement != theirs.placement:
            raise DeltaError(
                f"AdapterFusion needs its adapters at the same places: {first!r} ({mine.placement}, {len(layers[first])} "
                f"modules) and {other!r} ({theirs.placement}, {len(layers[other])} modules) differ; attach them with "
                "the same placement and target_layers"
            )
    placement = state.deltas[first].config.placement
    if config.placement not in (None, placement):
        raise DeltaError(f"AdapterFusion {name!r} was trained on {config.placement} adapters, but {config.adapters} are "
                         f"{placement} adapters; load the adapters it was trained with")
    wrap(model, layers[first], AdapterLayer, name, config)
    for a in config.adapters:  # the fused adapters stay as trained
        state.deltas[a].trainable = False
    return config.replace(placement=placement)


def fusion_regularization(model: nn.Module, name: str, config: AdapterFusionConfig) -> torch.Tensor | float:
    """regularization · Σ_layers ||V - I||²: keeps each fusion's value matrix near the identity."""
    total: torch.Tensor | float = 0.0
    for _, layer in delta_layers(model):
        if isinstance(layer, AdapterLayer) and name in layer.fusion_value:
            weight = layer.fusion_value[name].weight
            total = total + (weight - torch.eye(weight.shape[0], device=weight.device, dtype=weight.dtype)).pow(2).sum()
    return config.regularization * total


@contextlib.contextmanager
def fusion_attention(model: nn.Module) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Record AdapterFusion's attention weights inside the block.

    Yields {fusion name: {module name: weights of the last forward, shape (..., n adapters)}},
    filled as the model runs.
    """
    if not isinstance(model, nn.Module):
        raise DeltaError(f"fusion_attention expects a torch.nn.Module, got {type(model).__name__}")
    records: dict[str, dict[str, torch.Tensor]] = {}
    layers = [(n, layer) for n, layer in delta_layers(model) if isinstance(layer, AdapterLayer) and layer.fused]
    if not layers:
        raise DeltaError(f"{type(model).__name__} has no AdapterFusion attached")
    for n, layer in layers:
        layer.recording = (records, n)
    try:
        yield records
    finally:
        for _, layer in layers:
            layer.recording = None


ADAPTER = register(
    Method(name="bottleneck_adapter", config_cls=AdapterConfig, kind="wrap", attach=attach,
           containers=("adapter_down", "adapter_up"), mergeable=False, unmergeable_because=NOT_MERGEABLE, per_row=True)
)
FUSION = register(
    Method(name="adapter_fusion", config_cls=AdapterFusionConfig, kind="wrap", attach=attach_fusion,
           containers=("fusion_query", "fusion_key", "fusion_value"), mergeable=False,
           unmergeable_because=NOT_MERGEABLE, per_row=True, regularization=fusion_regularization,
           depends_on=lambda config: list(config.adapters))
)
