"""Module surgery, written once for every method.

Three attachment mechanisms live here:
  * wrapping: a target module is replaced in place by a :class:`DeltaLayer` that
    keeps the original as ``base_layer`` and holds one entry per adapter name in
    its containers (``lora_A["default"]``, ...);
  * root parameters: input-side methods (prompts) keep their parameters in a
    container on the model itself (``model.prompt_embeddings["default"]``);
  * selection: existing parameters are made trainable and their original values
    kept, so the base model can be restored bit for bit.
The per-model bookkeeping (which deltas exist, which are active) is a
:class:`ModelState` stored on the model object; there is no wrapper class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant
from .config import DeltaConfig, DeltaError, Method
from .targets import name_matches

STATE_ATTR = "_deltatune_state"


@dataclass
class Delta:
    """One attached delta."""

    config: DeltaConfig
    method: Method
    trainable: bool = True
    # Folded into the base weights by `merge`. A merged delta stays active until unmerged.
    merged: bool = False
    # Base tensors the delta's file overrode at load (peft's saved embedding weights): the
    # parameter and its value before the load, restored by detach.
    base_originals: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    # Existing parameters the delta trains (kind "select", or a wrapping delta that also trains
    # some of the base, as adapters' layer norms): the selected parameters (by their name at selection time; held
    # by object, since wrapping a module later renames its parameters), their
    # original values, and their trained values while the delta is inactive.
    selected: dict[str, nn.Parameter] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    stash: dict[str, torch.Tensor] | None = None
    # Base tensors the delta rewrote when it was built (PiSSA's and OLoRA's residual weights):
    # the rewritten values are in place while the delta is active, the originals otherwise.
    rewrites: list["Rewrite"] = field(default_factory=list)

    # False when the method chose not to keep the originals (full fine-tuning of a model too big
    # to copy): the delta can then never be switched off, only merged or detached with merge=True.
    restorable: bool = True


@dataclass
class Rewrite:
    """A base tensor that a delta replaced by a value of its own (PiSSA's residual weight).

    The original is kept on the CPU (no accelerator memory), so detach restores it bit
    for bit and an inactive delta leaves the true base in place; while the delta is
    inactive its own value waits in `aside` (also on the CPU).
    """

    layer: "DeltaLayer"  # the wrapper whose base_layer holds the tensor
    module_name: str
    attribute: str
    original: torch.Tensor
    aside: torch.Tensor | None = None

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.layer.base_layer, self.attribute)


@dataclass
class ModelState:
    deltas: dict[str, Delta] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    # Per-row adapter names for one forward (mixed batches); set by a hook, read by layers.
    batch_adapters: list[str] | None = None
    # Per-row adapter names for every forward inside `mixed_batch(...)` (generate() cannot pass them).
    pinned_batch_adapters: list[str] | None = None
    # requires_grad of every parameter before the first attach, restored when the last delta goes.
    original_requires_grad: dict[nn.Parameter, bool] = field(default_factory=dict)
    # Weights untied by merge(untie=True): (module, attribute, the shared parameter), re-tied
    # when the last delta goes without having been kept merged; and the config flag to restore.
    untied: list[tuple[nn.Module, str, nn.Parameter]] = field(default_factory=list)
    tie_word_embeddings: bool | None = None
    # Modules with a `gradient_checkpointing` flag (transformers sets it on the blocks).
    checkpointing_modules: list[nn.Module] = field(default_factory=list)
    model: nn.Module | None = None  # the model this state belongs to (set with the hooks)
    # Calls the model's forward hook makes once the current forward ends (or fails, with None):
    # each takes the model output and returns it, possibly changed (an ensemble averages its
    # rows), and undoes a per-forward change an input transform made (a temporary hook, a flag).
    after_forward: list[Callable[[Any], Any]] = field(default_factory=list)

    def merged(self) -> list[str]:
        return [n for n, d in self.deltas.items() if d.merged]


def get_state(model: nn.Module, create: bool = False) -> ModelState | None:
    if not isinstance(model, nn.Module):
        raise DeltaError(f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = ModelState()
        model.__dict__[STATE_ATTR] = state
    return state


def require_state(model: nn.Module) -> ModelState:
    if not isinstance(model, nn.Module):
        raise DeltaError(f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    state = get_state(model)
    if state is None or not state.deltas:
        raise DeltaError(f"{type(model).__name__} has no delta attached; call deltatune.attach or deltatune.load first")
    return state


RESERVED_NAMES = ("__base__",)
# save() writes each adapter of several into a subfolder of its name, and most filesystems (ext4, APFS, NTFS,
# ZFS) cap one name at 255 bytes; 128 leaves room for the names other tools derive from it (name.tmp, name.bak)
NAME_MAX_BYTES = 128


def check_adapter_name(name: object) -> str:
    """An adapter name must work as a key of nn.ModuleDict / nn.ParameterDict and in file paths."""
    if not isinstance(name, str) or not name:
        raise DeltaError(f"an adapter name must be a non-empty string, got {name!r}")
    problem = None
    if name in RESERVED_NAMES:
        problem = "it is reserved for the bare base model in mixed batches"
    elif "." in name or "/" in name or "\\" in name:
        problem = "it contains '.' or a path separator"
    elif len(name.encode("utf-8")) > NAME_MAX_BYTES:
        problem = (f"it is {len(name.encode('utf-8'))} bytes long (UTF-8) and the limit is {NAME_MAX_BYTES}: save "
                   "writes an adapter into a folder of its name, and filesystems cap a name at 255 bytes")
    elif hasattr(nn.ModuleDict(), name) or hasattr(nn.ParameterDict(), name):
        problem = "it is an attribute name of torch's module containers"
    if problem:
        shown = repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name)} characters)"
        raise DeltaError(f"adapter name {shown} cannot be used: {problem}; choose another, such as 'my_adapter'")
    return name


def check_batch_adapters(state: ModelState, names: object) -> list[str]:
    """Per-row adapter names for one batch: every row must get exactly what its name says."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise DeltaError(f"adapter_names must be a list of adapter names, one per row, got {names!r:.80}")
    for n in names:
        if n != "__base__" and n not in state.deltas:
            raise DeltaError(f"adapter_names names {n!r}, which is not attached; attached: {list(state.deltas)}")
    merged = state.merged()
    if merged:
        raise DeltaError(f"adapter(s) {merged} are merged into the base weights, so every row would get them; "
                         "dt.unmerge(model) before a mixed-adapter batch")
    for n in dict.fromkeys(list(names) + state.active):
        delta = state.deltas.get(n)
        if delta is not None and (not delta.method.per_row or delta.selected):
            role = "is named in adapter_names" if n in names else "is active, so it would reach every row"
            why = (f"a {delta.method.name} delta changes the whole batch" if not delta.method.per_row else
                   f"it trains {len(delta.selected)} parameter tensors of the base model itself, which every row uses,")
            raise DeltaError(
                f"delta {n!r} ({delta.method.name}) {role}, but {why} and cannot be applied per row; deactivate it "
                "(dt.set_active) and run its rows in a batch of their own"
            )
        if delta is not None and delta.rewrites:
            role = "is named in adapter_names" if n in names else "is active"
            raise DeltaError(
                f"delta {n!r} {role}, but it rewrote the base weights of its layers ({_init_of(delta)}), which every "
                "row would see, so it cannot be applied per row; deactivate it (dt.set_active) and run its rows in a "
                "batch of their own, or convert it to a plain LoRA (dt.save(..., relative_to_original=True))"
            )
    return list(names)


def drop_state(model: nn.Module) -> None:
    from .inputs import remove_hooks

    remove_hooks(model)


# ---------------------------------------------------------------- wrapping


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's: weight stored (in, out)


def float_or_quantized(module: nn.Module) -> bool:
    """Can a wrapping method take this layer: a floating-point weight, or a bitsandbytes quantised one?
    (Other integer weights are packed in formats deltatune cannot read.)"""
    weight = getattr(module, "weight", None)
    return quant.is_quantized(module) or (torch.is_tensor(weight) and weight.is_floating_point())


class DeltaLayer(nn.Module):
    """Base of every wrapping delta layer: bookkeeping only, no math.

    A subclass declares ``containers`` (its per-adapter ModuleDicts/ParameterDicts),
    and implements ``add``, ``forward`` and, when it can merge, ``merge_delta`` /
    ``unmerge_delta``. Attribute reads that miss fall through to ``base_layer``,
    so code that asks a wrapped module for ``.weight`` or ``.in_features`` still works.
    """

    containers: ClassVar[tuple[str, ...]] = ()
    # True when an adapter's trained copy of the whole base module computes the output instead of the
    # base (modules_to_save, LN tuning): the frozen original is then neither counted nor selectable.
    replaces_base: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        # Adapters that are active and not merged: what forward adds. Kept up to
        # date by set_active / merge / unmerge so forward does no bookkeeping.
        self.live: tuple[str, ...] = ()
        self.model_state: ModelState | None = None
        # A bitsandbytes 4-bit / 8-bit base: its forward dequantises inside the kernel; merges re-quantise,
        # and `premerge` keeps the stored tensors from before each merge so that unmerge puts them back exactly.
        self.quantized = quant.is_quantized(base_layer)
        self.premerge: dict[str, dict[str, Any]] = {}
        if self.quantized:
            quant.keep_trainable_layout(base_layer)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # -- adapters
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for container in self.containers:
            names.update(dict.fromkeys(getattr(self, container).keys()))
        return list(names)

    def add(self, name: str, config: DeltaConfig, module_name: str) -> None:
        raise NotImplementedError

    def remove(self, name: str, keep_merged: bool = False) -> None:
        """Drop an adapter; a merged one stays in the base weights when keep_merged."""
        if name in self.merged:
            if keep_merged:
                self.merged.remove(name)
                self.premerge.pop(name, None)
            elif name in self.premerge:
                self.unmerge(name)  # restores the tensors from before its merge, and re-merges later ones
            else:
                self.unmerge_delta(name)
                self.merged.remove(name)
        for container in self.containers:
            store = getattr(self, container)
            if name in store:
                del store[name]
        self.set_active([n for n in self.active if n != name])

    def set_active(self, names: list[str]) -> None:
        present = self.adapter_names()
        self.active = tuple(n for n in names if n in present)
        self.live = tuple(n for n in self.active if n not in self.merged)

    # -- merge
    def merge(self, name: str) -> None:
        if name in self.merged or name not in self.adapter_names():
            return
        self._merge_one(name)
        self.set_active(list(self.active))

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        # Merges stack: take out the ones merged after `name` first, and put them back after.
        later = self.merged[self.merged.index(name) + 1 :]
        for other in reversed(later + [name]):
            if other in self.premerge:  # a quantised base: the tensors from before the merge, exactly
                self._restore_premerge(self.premerge.pop(other))
            else:
                self.unmerge_delta(other)
            self.merged.remove(other)
        for other in later:
            self._merge_one(other)
        self.set_active(list(self.active))

    def _merge_one(self, name: str) -> None:
        saved = self._premerge_state() if self.quantized else None
        self.merge_delta(name)
        if saved is not None:
            self.premerge[name] = saved
        self.merged.append(name)

    def _premerge_state(self) -> dict[str, Any]:
        """What a merge into a quantised base changes: the weight's stored tensors (kept, not copied:
        the merge replaces them) and copies of the other merged parameters (the bias)."""
        saved: dict[str, Any] = {"weight": quant.snapshot(self.base_layer)}
        for attribute in self.merged_parameters():
            value = getattr(self.base_layer, attribute, None)
            if attribute != "weight" and value is not None:
                saved[attribute] = value.detach().clone()
        return saved

    def _restore_premerge(self, saved: dict[str, Any]) -> None:
        quant.restore(self.base_layer, saved["weight"])
        with torch.no_grad():
            for attribute, value in saved.items():
                if attribute != "weight":
                    getattr(self.base_layer, attribute).copy_(value)

    # -- the base weight as numbers (merge, DoRA's norm, inits), whatever the base stores
    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in) (an embedding's as (vocab, dim), a conv's as stored): the parameter
        itself, transposed for GPT-2's Conv1D (stored (in, out)); for a quantised base a dequantised fp32
        copy made for this call and never kept."""
        if self.quantized:
            return quant.dequantize_weight(self.base_layer)
        weight = self.base_layer.weight
        return weight.T if is_conv1d(self.base_layer) else weight

    def base_weight_shape(self) -> tuple[int, ...]:
        """base_weight()'s shape, without dequantising anything."""
        if self.quantized:
            return (self.base_layer.out_features, self.base_layer.in_features)
        shape = tuple(self.base_layer.weight.shape)
        return shape[::-1] if is_conv1d(self.base_layer) else shape

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Write `weight` (base_weight()'s layout) into the base: in the parameter's own dtype, or
        re-quantised in the layer's format for a quantised base (which rounds it to that format)."""
        with torch.no_grad():
            if self.quantized:
                quant.quantize_weight_(self.base_layer, weight.detach())
                return
            param = self.base_layer.weight
            param.data.copy_((weight.T if is_conv1d(self.base_layer) else weight).to(param.dtype))

    def premerge_weight(self) -> torch.Tensor | None:
        """A quantised base with merges in it: the (out, in) weight from before the first merge, dequantised."""
        if not (self.quantized and self.merged and self.merged[0] in self.premerge):
            return None
        return quant.dequantize_snapshot(self.base_layer, self.premerge[self.merged[0]]["weight"])

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """W x without the bias, computed by the base layer itself when it is quantised (its kernel
        dequantises), else from the weight."""
        if self.quantized:
            result = self.base_layer(x)
            bias = self.base_layer.bias
            return result if bias is None else result - bias.to(result.dtype)
        return F.linear(x, self.base_weight().to(x.dtype))

    def base_replaced(self) -> None:
        """The base layer was swapped for a module of another class computing the same thing (a quantised
        layer for its dequantised float layer: an nn.Linear, or the GPT-2 Conv1D it was made from); a
        subclass refreshes here what it derived from the base's type (call super() first)."""
        self.quantized = quant.is_quantized(self.base_layer)

    def merge_delta(self, name: str) -> None:
        raise DeltaError(f"{type(self).__name__} cannot be merged into the base weights")

    def add_to_base_weight(self, delta: torch.Tensor) -> None:
        """W += delta, (out, in), summed in fp32 and written back in the base's dtype (re-quantised on a quantised
        base): the merge and unmerge of a method whose delta is an additive weight update."""
        with torch.no_grad():
            self.set_base_weight(self.base_weight().float() + delta)

    def unmerge_delta(self, name: str) -> None:
        raise DeltaError(f"{type(self).__name__} cannot be unmerged")

    def merge_problem(self, name: str, earlier: Sequence[str] = ()) -> str | None:
        """Why adapter `name` cannot be merged here, or None; checked before any layer merges.
        `earlier`: adapters this same call merges into the layer before `name`."""
        return None

    def unmerge_problem(self, name: str, also: Sequence[str] = ()) -> str | None:
        """Why adapter `name` cannot be unmerged here, or None; `also`: adapters this call unmerges too."""
        return None

    def merged_parameters(self) -> tuple[str, ...]:
        """Names of base_layer's parameters that a merge writes into (a tie to them is checked first)."""
        return ("weight",)

    # -- mixed batches
    def batch_groups(self, batch_size: int) -> list[tuple[str, torch.Tensor]] | None:
        """(adapter, row indices) groups when the forward carries per-row adapter names, else None."""
        names = self.model_state.batch_adapters if self.model_state is not None else None
        if names is None:
            return None
        if not names or batch_size % len(names):
            raise DeltaError(f"adapter_names has {len(names)} entries but the batch has {batch_size} rows")
        # Some blocks flatten (B, T, H) to (B * T, H) before a linear layer (OPT's MLP): row i then
        # belongs to batch row i // T.
        per_row = batch_size // len(names)
        present = self.adapter_names()
        groups = []
        for name in dict.fromkeys(names):
            if name in present:  # names were checked against the model by the forward hook
                rows = [j for i, n in enumerate(names) if n == name for j in range(i * per_row, (i + 1) * per_row)]
                groups.append((name, torch.tensor(rows, device=self.device_of())))
        return groups

    def add_live(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` plus every live adapter's `add_delta`, or in a mixed batch each row's own adapter only.

        For layers whose adapters add to the base output: the subclass supplies
        ``add_delta(name, x, result) -> result``."""
        groups = self.batch_groups(x.shape[0]) if self.model_state is not None and self.model_state.batch_adapters is not None else None
        if groups is not None:
            mixed = result
            for name, rows in groups:
                mixed = mixed.index_copy(0, rows, self.add_delta(name, x[rows], result[rows]))
            return mixed
        for name in self.live:
            result = self.add_delta(name, x, result)
        return result

    def device_of(self) -> torch.device:
        for p in self.base_layer.parameters():
            return p.device
        return torch.device("cpu")


class ModulesToSave(DeltaLayer):
    """A whole module trained and saved per adapter (a classification head, say).

    Each adapter gets a full copy of the original, in fp32; the forward runs the
    copy of the last active adapter, or the original when none is active.
    """

    containers = ("modules_to_save",)
    replaces_base = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add(self, name: str, config: DeltaConfig, module_name: str) -> None:
        if self.quantized:  # a quantised head: its trained copy is a plain fp32 layer with the dequantised weight
            trained = quant.float_linear(self.base_layer, torch.float32)
        else:
            trained = quant.dequantize_model(copy.deepcopy(self.base_layer), torch.float32)
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in trained.parameters()):
            trained = trained.float()
        self.modules_to_save[name] = trained

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        groups = self.batch_groups(_batch_size(args))
        if groups is not None:
            result = self.base_layer(*args, **kwargs)
            for name, rows in groups:
                sub = [a[rows] if torch.is_tensor(a) else a for a in args]
                result = result.index_copy(0, rows, self._run(self.modules_to_save[name], sub, kwargs))
            return result
        if not self.active:
            return self.base_layer(*args, **kwargs)
        return self._run(self.modules_to_save[self.active[-1]], args, kwargs)

    def _run(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        base_dtype = _float_dtype(self.base_layer)
        if base_dtype == torch.float32:
            return module(*args, **kwargs)
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        out = module(*args, **kwargs)
        return out.to(base_dtype) if torch.is_tensor(out) else out

    # Outputs are the same merged or not: merging is only a flag here.
    def merge_delta(self, name: str) -> None:
        pass

    def unmerge_delta(self, name: str) -> None:
        pass

    def merged_parameters(self) -> tuple[str, ...]:
        return ()

    def remove(self, name: str, keep_merged: bool = False) -> None:
        if keep_merged and name in self.merged and name in self.modules_to_save:
            trained = self.modules_to_save[name].to(_float_dtype(self.base_layer))
            trained.requires_grad_(False)
            self.base_layer = trained
        super().remove(name, keep_merged)


def _float_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _batch_size(args: Any) -> int:
    for a in args:
        if torch.is_tensor(a):
            return a.shape[0]
    return 0


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = parent_of(model, name)
    setattr(parent, child, new)


def wrap(model: nn.Module, names: list[str], layer_cls: type[DeltaLayer], adapter: str, config: DeltaConfig,
         per_module: dict[str, dict[str, Any]] | None = None) -> None:
    """Give each named module an adapter of `layer_cls`, wrapping it first when needed.

    per_module: extra keyword arguments for `add`, by module name (what differs between the
    modules of one delta, such as where a bottleneck adapter reads its input)."""
    state = get_state(model, create=True)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, DeltaLayer) and not isinstance(module, layer_cls):
            raise DeltaError(
                f"{name} is already wrapped by {type(module).__name__}; stacking {layer_cls.__name__} on it is not supported"
            )
        if not isinstance(module, layer_cls):
            module = layer_cls(module)
            module.model_state = state
            replace_module(model, name, module)
        module.add(adapter, config, name, **(per_module or {}).get(name, {}))
        module.train(module.base_layer.training)  # new layers join in the model's current mode


def dequantize_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every quantised (bitsandbytes) layer of the model, wrapped ones included, by a plain
    nn.Linear holding its dequantised weight in `dtype` (for an exact merge, and an export that any
    transformers install loads). Deltas merged into a quantised layer must be unmerged first."""
    merged = [n for n, layer in delta_layers(model) if layer.quantized and layer.merged]
    if merged:
        raise DeltaError(f"{merged[0]} has deltas merged into its quantised weight; dt.unmerge(model) first")
    quant.dequantize_model(model, dtype)
    for _, layer in delta_layers(model):
        layer.base_replaced()


def delta_layers(model: nn.Module) -> Iterator[tuple[str, DeltaLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, DeltaLayer):
            yield name, module


def unwrap_empty(model: nn.Module) -> None:
    """Replace every delta layer that holds no adapter by its base module."""
    for name, layer in list(delta_layers(model)):
        if not layer.adapter_names():
            replace_module(model, name, layer.base_layer)


def remove_from_layers(model: nn.Module, adapter: str, keep_merged: bool = False) -> None:
    for _, layer in list(delta_layers(model)):
        if adapter in layer.adapter_names():
            layer.remove(adapter, keep_merged)
    unwrap_empty(model)


def wrap_modules_to_save(model: nn.Module, adapter: str, config: DeltaConfig, optional: tuple[str, ...] = ()) -> None:
    """Wrap the config's modules_to_save; names in `optional` (default heads) may be absent."""
    names = list(config.modules_to_save or ())
    if not names:
        return
    chosen = [n for n, _ in model.named_modules() if n and name_matches(n, names)]
    missing = [t for t in names if t not in optional and not any(name_matches(n, [t]) for n in chosen)]
    if missing:
        raise DeltaError(
            f"modules_to_save {missing} matched no module of {type(model).__name__}; "
            f"its top-level modules are {[n for n, _ in model.named_children()]}"
        )
    wrap(model, chosen, ModulesToSave, adapter, config)


# ---------------------------------------------------------------- root parameters


def root_container(model: nn.Module, container: str, create: bool = True,
                   kind: type[nn.Module] = nn.ParameterDict) -> Any:
    """The per-adapter container `container` on the model root: a ParameterDict, or a ModuleDict
    (kind=nn.ModuleDict) for a delta made of modules (a prompt encoder)."""
    existing = model._modules.get(container)
    if existing is None and create:
        existing = kind()
        model.add_module(container, existing)
    return existing


def remove_root_parameters(model: nn.Module, container: str, adapter: str) -> None:
    store = root_container(model, container, create=False)
    if store is None:
        return
    if adapter in store:
        del store[adapter]
    if not len(store):
        del model._modules[container]


# ---------------------------------------------------------------- selection


def foreign_parameters(model: nn.Module) -> set[int]:
    """Ids of parameters a selective delta must not select: other deltas' own parameters (inside
    delta layers' containers or in a container at the model root) and the frozen originals of
    modules kept whole (their trained copies are what trains)."""
    state = get_state(model)
    roots = {c for d in (state.deltas.values() if state else ()) if d.method.kind == "input" for c in d.method.containers}
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, DeltaLayer):
            ids |= {id(p) for c in module.containers for p in getattr(module, c).parameters()}
            if module.replaces_base:
                ids |= {id(p) for p in module.base_layer.parameters()}
    for container in roots:
        store = model._modules.get(container)
        if store is not None:
            ids |= {id(p) for p in store.parameters()}
    return ids


def select_parameters(model: nn.Module, adapter: str, names: list[str], originals: str = "same_device",
                      method: str = "selective") -> None:
    """Record the parameters a selective delta trains, and their original values.

    originals: "same_device" keeps the copies beside the parameters, "cpu" in host
    memory (a full fine-tuning delta then costs no accelerator memory for them), "none" keeps
    none: the delta cannot be switched off or detached without merge afterwards.
    """
    state = get_state(model, create=True)
    params = dict(model.named_parameters())
    packed = [n for n in names if not params[n].is_floating_point()]
    if packed:
        kind = "quantised (bitsandbytes)" if quant.is_quantized_parameter(params[packed[0]]) else "not floating point"
        raise DeltaError(
            f"parameter {packed[0]} is {kind}{f' (and {len(packed) - 1} more)' if len(packed) > 1 else ''}, so a "
            f"{method} delta cannot train it: load the base unquantised to train its own weights, or train a delta "
            "on top of the quantised layers (LoRA and the other wrapping methods)"
        )
    taken = {id(p): other for other, d in state.deltas.items() if other != adapter for p in d.selected.values()}
    overlap = [n for n in names if id(params[n]) in taken]
    if overlap:
        raise DeltaError(
            f"parameter {overlap[0]} is already selected by delta {taken[id(params[overlap[0]])]!r}"
            f"{f' (and {len(overlap) - 1} more)' if len(overlap) > 1 else ''}; a {method} delta cannot select it too: "
            "detach that delta first, or narrow this one"
        )
    merged_into = _merged_parameters(model)
    busy = [n for n in names if id(params[n]) in merged_into]
    if busy:
        raise DeltaError(
            f"parameter {busy[0]} holds the merged delta {merged_into[id(params[busy[0]])]!r}; a {method} delta cannot "
            "select it (its detach would drop the merge): dt.unmerge(model) first"
        )
    delta = state.deltas[adapter]
    delta.selected = {n: params[n] for n in names}
    delta.restorable = originals != "none"
    delta.originals = {n: _copy_of(params[n], originals) for n in names} if delta.restorable else {}


def _copy_of(p: nn.Parameter, where: str) -> torch.Tensor:
    to_cpu = where == "cpu" and p.device.type != "meta"  # meta tensors have no data to copy anywhere
    return p.detach().to("cpu", copy=True) if to_cpu else p.detach().clone()


def _merged_parameters(model: nn.Module) -> dict[int, str]:
    """Parameters that hold a merged wrap delta, by id, with the delta's name."""
    held = {}
    for _, layer in delta_layers(model):
        for attribute in layer.merged_parameters() if layer.merged else ():
            p = getattr(layer.base_layer, attribute, None)
            if p is not None:
                held[id(p)] = layer.merged[0]
    return held


def selected_by(model: nn.Module) -> dict[int, str]:
    """Parameters selected by a selective delta, by id, with the delta's name."""
    state = get_state(model)
    return {id(p): n for n, d in (state.deltas.items() if state else ()) for p in d.selected.values()}


def check_switchable(delta: Delta, name: str, doing: str) -> None:
    """A selective delta without originals cannot be switched off or detached without merge."""
    if not delta.restorable:
        raise DeltaError(
            f"cannot {doing}: delta {name!r} ({delta.method.name}) was attached with originals='none', so the base "
            f"weights it trained over are gone; dt.merge(model, {name!r}) to make it part of the base, or "
            f"dt.detach(model, {name!r}, merge=True) to keep its weights and remove the delta"
        )


def swap_selected(delta: Delta, active: bool, name: str = "") -> None:
    """Put the trained values in place (active) or the originals (inactive).

    The trained values wait beside the originals (on their device), so a full fine-tuning
    delta kept on the CPU costs no accelerator memory while it is switched off."""
    with torch.no_grad():
        if active and delta.stash is not None:
            for n, value in delta.stash.items():
                delta.selected[n].copy_(value)
            delta.stash = None
        elif not active and delta.stash is None:
            check_switchable(delta, name, "switch it off")
            delta.stash = {n: p.detach().to(delta.originals[n].device, copy=True) for n, p in delta.selected.items()}
            for n, value in delta.originals.items():
                delta.selected[n].copy_(value)


def rewrite_base(layer: "DeltaLayer", adapter: str, module_name: str, attribute: str, value: torch.Tensor) -> None:
    """Replace base_layer.<attribute> by `value` on behalf of delta `adapter`, keeping the original.

    One delta at a time may rewrite a layer's base, and never under a merge: the core swaps
    whole tensors (exact), which is only right when nothing else was added into them.
    """
    state = layer.model_state
    delta = state.deltas[adapter]
    other = rewriter_of(state, layer)
    if other is not None and other != adapter:
        raise DeltaError(
            f"{module_name}'s base weight was already rewritten by delta {other!r} ({_init_of(state.deltas[other])}); one "
            f"delta at a time may rewrite a layer's base. Detach {other!r} first, or convert it to a plain LoRA "
            f"(dt.save(model, path, name={other!r}, relative_to_original=True)) and load that instead"
        )
    if layer.merged:
        raise DeltaError(
            f"{module_name} has {layer.merged} merged into its base weight, which {_init_of(delta)} would rewrite; "
            "dt.unmerge(model) first"
        )
    param = getattr(layer.base_layer, attribute)
    delta.rewrites.append(Rewrite(layer, module_name, attribute, param.detach().to("cpu", copy=True)))
    with torch.no_grad():
        param.copy_(value)


def _init_of(delta: Delta) -> str:
    init = getattr(delta.config, "init", None)
    return f"init={init!r}" if isinstance(init, str) else delta.method.name


def rewriter_of(state: ModelState, layer: "DeltaLayer") -> str | None:
    """The delta that rewrote this layer's base tensors, if any."""
    for name, delta in state.deltas.items():
        if any(rw.layer is layer for rw in delta.rewrites):
            return name
    return None


def swap_rewrites(delta: Delta, active: bool) -> None:
    """Put the delta's rewritten base tensors in place (active) or the originals (inactive). Exact copies."""
    with torch.no_grad():
        for rw in delta.rewrites:
            if active and rw.aside is not None:
                rw.param.copy_(rw.aside)
                rw.aside = None
            elif not active and rw.aside is None:
                rw.aside = rw.param.detach().to("cpu", copy=True)
                rw.param.copy_(rw.original)


def swap_problem(state: ModelState, name: str, active: bool, leaving: Sequence[str] = ()) -> str | None:
    """Why delta `name`'s rewritten base tensors cannot be swapped (to `active`) now, or None.

    A swap copies whole tensors, so no other delta may be merged into them (deltas in
    `leaving` are detached first and do not count)."""
    delta = state.deltas[name]
    for rw in delta.rewrites:
        if (rw.aside is None) == active:
            continue  # already as asked
        others = [m for m in rw.layer.merged if m != name and m not in leaving]
        if others:
            return (f"it rewrote the base weight of {rw.module_name} ({_init_of(delta)}), and {others} are merged into "
                    f"that weight; dt.unmerge(model, {others[0]!r}) first")
    return None


def restore_rewrites(delta: Delta, keep: bool) -> None:
    """On detach: the originals back (bit for bit), or, keeping the delta's effect, its own values."""
    swap_rewrites(delta, active=keep)
    delta.rewrites = []


def restore_selected(delta: Delta, keep_trained: bool) -> None:
    """Leave the trained values in place (keep_trained) or put the originals back."""
    with torch.no_grad():
        source = (delta.stash or {}) if keep_trained else delta.originals
        for n, value in source.items():
            delta.selected[n].copy_(value)


# ---------------------------------------------------------------- the base model's own state dict


def base_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's tensors under the base model's own keys, and the active deltas left out.

    Wrapped modules give their base_layer's tensors under the original names; delta
    parameters are dropped. Merged deltas are in the weights already (a merged head
    kept whole gives the trained copy); an unmerged selective delta gives the original
    values. So the result is exactly the base model, or the merged model.
    """
    state = get_state(model)
    layers = dict(delta_layers(model))
    roots = {c for d in state.deltas.values() if d.method.kind == "input" for c in d.method.containers}
    paths_of: dict[int, list[str]] = {}  # a tied parameter has several names; each gets the same value
    for n, p in model.named_parameters(remove_duplicate=False):
        paths_of.setdefault(id(p), []).append(n)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        mapped = _base_key(key, layers, roots)
        if mapped is not None:
            out[mapped] = value
    for name, layer in layers.items():
        if isinstance(layer, ModulesToSave):
            merged = [n for n in layer.merged if n in layer.modules_to_save]
            if merged:
                dtype = _float_dtype(layer.base_layer)
                prefix = _base_key(name + ".base_layer", layers, roots)
                for key, value in layer.modules_to_save[merged[-1]].state_dict().items():
                    out[f"{prefix}.{key}"] = value.to(dtype) if value.is_floating_point() else value
    for delta in state.deltas.values():
        # trained values in place: write the originals (a delta without them is the base now)
        if delta.selected and not delta.merged and delta.stash is None and delta.restorable:
            for n, p in delta.selected.items():
                for path in paths_of[id(p)]:
                    out[_base_key(path, layers, roots)] = delta.originals[n]
        if not delta.merged:  # a rewritten base weight in place (PiSSA's residual) is not the base model's
            for rw in delta.rewrites:
                if rw.aside is None:
                    for path in paths_of[id(rw.param)]:
                        out[_base_key(path, layers, roots)] = rw.original.to(rw.param.device)
    left_out = [n for n in state.active if not state.deltas[n].merged and state.deltas[n].restorable]
    return out, left_out


def _base_key(key: str, layers: dict[str, DeltaLayer], roots: set[str]) -> str | None:
    """`key` with every wrapper's `base_layer` step removed; None for a delta's own tensors."""
    parts = key.split(".")
    if parts[0] in roots:
        return None
    kept, path, i = [], "", 0
    while i < len(parts):
        path = f"{path}.{parts[i]}" if path else parts[i]
        kept.append(parts[i])
        i += 1
        if path in layers and i < len(parts):
            if parts[i] != "base_layer":
                return None  # an adapter container inside the wrapper
            path, i = f"{path}.base_layer", i + 1
    return ".".join(kept)
