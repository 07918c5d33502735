"""The life of a delta: attach, switch, merge, unmerge, detach, disable.

Every function works in place on a plain transformers model and dispatches on
the method's kind ("wrap", "input", "select"); no method needs a special case here.

Every operation is all-or-nothing: it checks what it can before changing
anything, and if a step still fails it puts back what it had changed (the
active set, trainable flags, merged flags and weights), so an error leaves the
model computing exactly what it computed before.

Merged deltas are in the weights, so they are always active: `set_active` refuses
to leave one out (unmerge it first), and attaching or loading another delta keeps
the merged ones active beside it.
"""

from __future__ import annotations

import dataclasses
import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from .config import DeltaConfig, DeltaError, method_of
from .inputs import ensure_hooks
from .surgery import (
    Delta,
    ModelState,
    check_adapter_name,
    check_batch_adapters,
    check_switchable,
    delta_layers,
    drop_state,
    get_state,
    remove_from_layers,
    remove_root_parameters,
    require_state,
    restore_rewrites,
    restore_selected,
    swap_problem,
    swap_rewrites,
    selected_by,
    swap_selected,
    wrap_modules_to_save,
)

CLASSIFIER_HEADS = ("classifier", "score")  # heads a sequence classifier trains whole (peft's choice too)


def infer_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if cls.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and (
        cls.endswith("ForConditionalGeneration") or cls.endswith("Seq2SeqLM")
    ):
        return "SEQ_2_SEQ_LM"
    return None


# ---------------------------------------------------------------- undo


@dataclass
class _Snapshot:
    """The bookkeeping an operation may change, to put back if it fails (weights roll back separately)."""

    active: list[str]
    trainable: dict[str, bool]
    requires_grad: dict[nn.Parameter, bool]

    @classmethod
    def take(cls, model: nn.Module, state: ModelState) -> "_Snapshot":
        return cls(
            active=list(state.active),
            trainable={n: d.trainable for n, d in state.deltas.items()},
            requires_grad={p: p.requires_grad for p in model.parameters()},
        )

    def restore(self, model: nn.Module, state: ModelState) -> None:
        _apply_active(model, state, [n for n in self.active if n in state.deltas])
        for n, flag in self.trainable.items():
            if n in state.deltas:
                state.deltas[n].trainable = flag
        for p, flag in self.requires_grad.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module, state: ModelState) -> Iterator[None]:
    snapshot = _Snapshot.take(model, state)
    try:
        yield
    except BaseException:
        snapshot.restore(model, state)
        raise


# ---------------------------------------------------------------- attach


def attach(model: nn.Module, config: DeltaConfig, name: str = "default") -> nn.Module:
    """Inject a delta into `model` in place, freeze everything else, make it the active delta.

    Returns the same model object, so generate(), save_pretrained() and
    transformers.Trainer keep working. The task type, when the config leaves it
    None, is inferred from the model class (a sequence classifier's head then trains too).
    """
    _attach(model, config, name, infer_task=True, activate=True)
    return model


def _attach(model: nn.Module, config: DeltaConfig, name: str, *, infer_task: bool, activate: bool) -> Delta:
    if not isinstance(model, nn.Module):
        raise DeltaError(f"attach expects a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not isinstance(config, DeltaConfig):
        raise DeltaError(f"attach expects a deltatune config (LoraConfig, ...), got {type(config).__name__}")
    check_adapter_name(name)
    method = method_of(config)
    state = get_state(model, create=True)
    if name in state.deltas:
        raise DeltaError(f"a delta named {name!r} is already attached; pass another name=..., or detach it first")
    first = not state.deltas
    if first:
        state.original_requires_grad = {p: p.requires_grad for p in model.parameters()}
    task_type, modules_to_save = config.task_type, list(config.modules_to_save or ())
    if infer_task and task_type is None:
        task_type = infer_task_type(model)
        if task_type == "SEQ_CLS":
            modules_to_save += [h for h in CLASSIFIER_HEADS if h not in modules_to_save]
    base_name = config.base_model_name_or_path or getattr(model, "name_or_path", None) or None
    config = config.replace(task_type=task_type, modules_to_save=modules_to_save or None, base_model_name_or_path=base_name)
    snapshot = _Snapshot.take(model, state)
    delta = state.deltas[name] = Delta(config=config, method=method)
    try:
        wrap_modules_to_save(model, name, config, optional=CLASSIFIER_HEADS)
        delta.config = method.attach(model, config, name) or config
        ensure_hooks(model)
        if activate:
            _apply_active(model, state, state.merged() + [name])
    except BaseException:
        _remove(model, name, keep=False)
        if not first:
            snapshot.restore(model, state)
        raise
    return delta


# ---------------------------------------------------------------- active set and trainable flags


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Choose which attached deltas the forward uses (and which train). [] runs the bare base.

    A merged delta is in the weights and stays in effect: leaving it out is an error
    that says to unmerge it first.
    """
    state = require_state(model)
    names = _name_list(state, names)
    left_out = [n for n in state.merged() if n not in names]
    if left_out:
        raise DeltaError(
            f"delta {left_out[0]!r} is merged into the base weights, so it stays in effect whatever the active set; "
            f"dt.unmerge(model, {left_out[0]!r}) first, then set the active deltas"
        )
    with _all_or_nothing(model, state):
        _apply_active(model, state, names)


def _name_list(state: ModelState, names: object) -> list[str]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise DeltaError(f"expected an adapter name or a list of adapter names, got {names!r:.80}")
    unknown = [n for n in names if n not in state.deltas]
    if unknown:
        raise DeltaError(f"no delta named {unknown[0]!r} is attached; attached: {list(state.deltas)}")
    return list(dict.fromkeys(names))


def _apply_active(model: nn.Module, state: ModelState, names: list[str]) -> None:
    for name, delta in state.deltas.items():  # checked before anything changes
        problem = swap_problem(state, name, active=name in names)
        if problem:
            raise DeltaError(f"cannot {'activate' if name in names else 'deactivate'} {name!r}: {problem}")
    state.active = list(names)
    for _, layer in delta_layers(model):
        layer.set_active(names)
    for name, delta in state.deltas.items():
        if delta.selected:
            swap_selected(delta, active=name in names, name=name)
        swap_rewrites(delta, active=name in names)
    _refresh_trainable(model, state)


def active(model: nn.Module) -> list[str]:
    state = get_state(model)
    return list(state.active) if state else []


def attached(model: nn.Module) -> dict[str, DeltaConfig]:
    state = get_state(model)
    return {n: d.config for n, d in state.deltas.items()} if state else {}


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Let delta `name` train (when active) or freeze it."""
    state = require_state(model)
    name = _one_name(state, name)
    if not isinstance(trainable, bool):
        raise DeltaError(f"set_trainable expects trainable=True or False, got {trainable!r}")
    with _all_or_nothing(model, state):
        state.deltas[name].trainable = trainable
        _refresh_trainable(model, state)


def _refresh_trainable(model: nn.Module, state: ModelState) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for name in state.active:
        if state.deltas[name].trainable:
            for p in delta_parameters(model, name).values():
                p.requires_grad_(True)


def delta_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters that make up delta `name`, by their current name in the model."""
    state = require_state(model)
    name = _one_name(state, name)
    delta = state.deltas[name]
    containers = set(delta.method.containers) | {"modules_to_save"}
    selected = {id(p) for p in delta.selected.values()}
    out = {}
    for path, p in model.named_parameters():
        parts = path.split(".")
        if id(p) in selected or any(parts[i] in containers and parts[i + 1] == name for i in range(len(parts) - 1)):
            out[path] = p
    return out


def _one_name(state: ModelState, name: object) -> str:
    if not isinstance(name, str):
        raise DeltaError(f"expected one adapter name (a string), got {name!r:.80}")
    return _name_list(state, [name])[0]


def _names(state: ModelState, name: str | None, default: list[str]) -> list[str]:
    return default if name is None else [_one_name(state, name)]


# ---------------------------------------------------------------- merge


def merge(model: nn.Module, name: str | None = None, *, untie: bool = False) -> None:
    """Fold delta `name` (default: the active ones) into the base weights. Idempotent.

    A delta must be active to merge (merged deltas are always in effect). A weight
    shared with another module (GPT-2's lm_head and wte) is refused, since the merge
    would change the other module too; untie=True gives the merged module its own
    copy of the weight first (and sets config.tie_word_embeddings False).
    """
    state = require_state(model)
    names = _names(state, name, list(state.active))
    inactive = [n for n in names if n not in state.active]
    if inactive:
        raise DeltaError(f"delta {inactive[0]!r} is not active; dt.set_active it first (a merged delta is always in effect)")
    _merge(model, state, names, untie)


def _merge(model: nn.Module, state: ModelState, names: list[str], untie: bool) -> None:
    for n in names:
        delta = state.deltas[n]
        if not delta.method.mergeable:
            raise DeltaError(f"{n!r} is a {delta.method.name} delta, which {delta.method.unmergeable_because} and cannot be merged")
    owners: dict[int, list[str]] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(path)
    selected = selected_by(model)
    plan = []
    earlier: dict[int, list[str]] = {}  # per layer, what this call merges into it before
    for n in names:
        for layer_name, layer in delta_layers(model):
            if n not in layer.adapter_names() or n in layer.merged:
                continue
            problem = layer.merge_problem(n, earlier.setdefault(id(layer), []))
            earlier[id(layer)].append(n)
            if problem:
                raise DeltaError(f"cannot merge {n!r} into {layer_name}: {problem}")
            held = [a for a in layer.merged_parameters() if id(getattr(layer.base_layer, a)) in selected]
            if held:
                raise DeltaError(
                    f"cannot merge {n!r} into {layer_name}: its {held[0]} is trained by the selective delta "
                    f"{selected[id(getattr(layer.base_layer, held[0]))]!r}, which would lose the merge when it is switched "
                    "off or detached; keep this delta unmerged, or detach that one (merge=True keeps its weights) first"
                )
            tied = [a for a in layer.merged_parameters() if len(owners.get(id(getattr(layer.base_layer, a)), ())) > 1]
            if tied and not untie:
                own = f"{layer_name}.base_layer.{tied[0]}"
                others = [s for s in owners[id(getattr(layer.base_layer, tied[0]))] if s != own]
                raise DeltaError(
                    f"cannot merge {n!r} into {layer_name}: its {tied[0]} is shared (tied) with {', '.join(others)}, so "
                    "the merge would change that module too; pass untie=True to give the merged module its own copy, "
                    "or keep the delta unmerged"
                )
            plan.append((layer, n, tied))
    quantized = [n for n in dict.fromkeys(n for layer, n, _ in plan if layer.quantized)]
    if quantized:
        warnings.warn(
            f"deltatune: merging {quantized} into quantised (bitsandbytes) layers re-quantises the merged weights, so "
            "the outputs move by the re-quantisation error (see README, Quantised bases); unmerge puts the original "
            "quantised weights back exactly. For an exact merged model, dequantise first: "
            "deltatune.pipeline.export.export_merged(model, tokenizer, folder, dtype=...) or `deltatune merge --dtype`",
            stacklevel=3,
        )
    done: list[tuple[Any, str]] = []
    untied_before = len(state.untied)
    try:
        for layer, n, tied in plan:
            for attribute in tied:
                _untie(model, state, layer.base_layer, attribute)
            layer.merge(n)
            done.append((layer, n))
        for n in names:
            state.deltas[n].merged = True
    except BaseException:
        for layer, n in reversed(done):
            layer.unmerge(n)
        _retie(model, state, keep=untied_before)
        raise


def _untie(model: nn.Module, state: ModelState, module: nn.Module, attribute: str) -> None:
    shared = getattr(module, attribute)
    setattr(module, attribute, nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad))
    state.untied.append((module, attribute, shared))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        if state.tie_word_embeddings is None:
            state.tie_word_embeddings = True
        config.tie_word_embeddings = False  # so save_pretrained / from_pretrained keep them apart


def _retie(model: nn.Module, state: ModelState, keep: int = 0) -> None:
    """Put back the shared parameters that merge(untie=True) replaced, beyond the first `keep`."""
    while len(state.untied) > keep:
        module, attribute, shared = state.untied.pop()
        setattr(module, attribute, shared)
    if not state.untied and state.tie_word_embeddings is not None:
        model.config.tie_word_embeddings = state.tie_word_embeddings
        state.tie_word_embeddings = None


def unmerge(model: nn.Module, name: str | None = None) -> None:
    """Take merged delta `name` (default: every merged one) back out of the base weights."""
    state = require_state(model)
    names = _names(state, name, state.merged())
    _unmerge(model, state, names)


def _unmerge(model: nn.Module, state: ModelState, names: list[str]) -> None:
    # last merged, first unmerged: a merge may depend on what was merged into the weight before it
    plan = []
    for layer_name, layer in delta_layers(model):
        for n in reversed(layer.merged):
            if n in names:
                problem = layer.unmerge_problem(n, names)
                if problem:
                    raise DeltaError(f"cannot unmerge {n!r} from {layer_name}: {problem}")
                plan.append((layer, n))
    done = []
    try:
        for layer, n in plan:
            layer.unmerge(n)
            done.append((layer, n))
        for n in names:
            state.deltas[n].merged = False
    except BaseException:
        for layer, n in reversed(done):
            layer.merge(n)
        raise


# ---------------------------------------------------------------- detach

_merge_fn = merge  # detach's `merge` flag shadows the function


def detach(model: nn.Module, name: str | None = None, merge: bool = False, *, untie: bool = False) -> nn.Module:
    """Remove delta `name` (default: all) and restore the original modules.

    merge=True keeps its effect in the base weights (merge-and-unload), whether or not
    it is active; otherwise the base is restored exactly as it was before attach.
    """
    state = require_state(model)
    names = _removal_order(state, _names(state, name, list(state.deltas)))  # a delta's users go before it
    # Deltas that rewrote base weights (PiSSA) go last, once the others' merges are out of those weights.
    names.sort(key=lambda n: bool(state.deltas[n].rewrites))
    for n in names:
        problem = swap_problem(state, n, active=merge, leaving=() if merge else names)
        if problem:
            raise DeltaError(f"cannot detach {n!r}: {problem}")
    if not merge:
        for n in names:
            check_switchable(state.deltas[n], n, "detach it without merge")
    if merge:
        # every merge runs (and may fail, rolled back) before anything is removed; a rewriting delta's
        # own base values must be in place for its merge to mean what its forward computed
        unmerged = [n for n in names if not state.deltas[n].merged]
        swapped = [n for n in unmerged if any(rw.aside is not None for rw in state.deltas[n].rewrites)]
        for n in swapped:
            swap_rewrites(state.deltas[n], active=True)
        try:
            _merge(model, state, unmerged, untie)
        except BaseException:
            for n in swapped:
                swap_rewrites(state.deltas[n], active=False)
            raise
    for n in names:
        _remove(model, n, keep=merge)
    return model


def _users(state: ModelState, name: str) -> list[str]:
    """The attached deltas that use delta `name` (an AdapterFusion uses the adapters it fuses)."""
    return [n for n, d in state.deltas.items() if d.method.depends_on is not None and name in d.method.depends_on(d.config)]


def _removal_order(state: ModelState, names: list[str]) -> list[str]:
    """`names` with every delta after the deltas that use it; a delta used by one that stays is an error."""
    for n in names:
        staying = [u for u in _users(state, n) if u not in names]
        if staying:
            raise DeltaError(f"delta {n!r} is used by {staying[0]!r} ({state.deltas[staying[0]].method.name}); "
                             f"detach {staying[0]!r} first, or both at once")
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [n for n in names if n not in ordered and all(u in ordered for u in _users(state, n))]
        if not ready:
            raise DeltaError(f"deltas {[n for n in names if n not in ordered]} use each other in a cycle")
        ordered += ready
    return ordered


def _remove(model: nn.Module, name: str, keep: bool) -> None:
    state = get_state(model)
    delta = state.deltas[name]
    if keep and delta.merged:
        # the merged weights stay, in their own (untied) tensors: never re-tie those
        merged_into = {id(layer.base_layer) for _, layer in delta_layers(model) if name in layer.merged}
        kept = [r for r in state.untied if id(r[0]) in merged_into]
        if kept:
            state.untied = [r for r in state.untied if id(r[0]) not in merged_into]
            state.tie_word_embeddings = None
    remove_from_layers(model, name, keep_merged=keep)
    for container in (delta.method.containers if delta.method.kind == "input" else ()) + delta.method.root_modules:
        remove_root_parameters(model, container, name)
    if delta.selected:
        restore_selected(delta, keep_trained=keep)
    restore_rewrites(delta, keep=keep)
    if not keep:
        with torch.no_grad():
            for param, original in delta.base_originals.values():
                param.copy_(original)
    del state.deltas[name]
    state.active = [n for n in state.active if n != name]
    if state.deltas:
        _refresh_trainable(model, state)
    else:
        _retie(model, state)
        for p, flag in state.original_requires_grad.items():
            p.requires_grad_(flag)
        drop_state(model)


# ---------------------------------------------------------------- contexts


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block; merged deltas are unmerged for its duration."""
    state = require_state(model)
    previous = list(state.active)
    merged = state.merged()
    _unmerge(model, state, merged)
    try:
        with _all_or_nothing(model, state):
            _apply_active(model, state, [])
    except BaseException:
        _merge(model, state, merged, untie=True)
        raise
    try:
        yield model
    finally:
        _apply_active(model, state, previous)
        _merge(model, state, merged, untie=True)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Every forward inside the block runs row i with adapter adapter_names[i] ("__base__": none).

    The same as passing adapter_names=[...] to the model's forward, for callers that
    cannot pass it, such as generate(). Only methods that can act per row (LoRA and
    other wrapping methods) may take part; a prompt or selective delta that is named
    or active is an error, since it would reach every row.
    """
    state = require_state(model)
    state.pinned_batch_adapters = check_batch_adapters(state, adapter_names)
    try:
        yield model
    finally:
        state.pinned_batch_adapters = None


# ---------------------------------------------------------------- training hooks


def regularization(model: nn.Module) -> torch.Tensor | float:
    """The sum of the active, trainable deltas' loss terms (diff pruning's L0 penalty, ...); 0.0 when none.

    Add it to the training loss: `loss = out.loss + dt.regularization(model)`.
    """
    state = get_state(model)
    total: torch.Tensor | float = 0.0
    for name in state.active if state else ():
        delta = state.deltas[name]
        if delta.method.regularization is not None and delta.trainable and not delta.merged:
            total = total + delta.method.regularization(model, name, delta.config)
    return total


def step(model: nn.Module, global_step: int) -> None:
    """Call after every optimizer step: methods that reshape themselves while training do it here."""
    state = get_state(model)
    if not isinstance(global_step, int) or isinstance(global_step, bool) or global_step < 0:
        raise DeltaError(f"step expects the global step as an int >= 0 (the number of optimizer steps so far), got {global_step!r}")
    for name in list(state.active) if state else ():
        delta = state.deltas[name]
        if delta.method.step is not None and delta.trainable and not delta.merged:
            delta.method.step(model, name, delta.config, global_step)


def finalize(model: nn.Module) -> None:
    """Call once when training ends (diff pruning projects onto its target sparsity here).

    Acts on the active deltas; a merged one must be unmerged first (its weights are in the base).
    """
    state = get_state(model)
    names = [n for n in (state.active if state else ()) if state.deltas[n].method.finalize is not None]
    merged = [n for n in names if state.deltas[n].merged]
    if merged:
        raise DeltaError(f"delta {merged[0]!r} is merged into the base weights; dt.unmerge(model) before dt.finalize(model)")
    for name in names:
        delta = state.deltas[name]
        delta.method.finalize(model, name, delta.config)


# ---------------------------------------------------------------- training state (checkpoints)


def _delta_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Delta `name`'s parameters and the buffers inside its containers (diff pruning's mask), by model path."""
    out: dict[str, torch.Tensor] = dict(delta_parameters(model, name))
    containers = set(require_state(model).deltas[name].method.containers) | {"modules_to_save"}
    for path, buffer in model.named_buffers():
        parts = path.split(".")
        if any(parts[i] in containers and parts[i + 1] == name for i in range(len(parts) - 1)):
            out[path] = buffer
    return out


def training_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every attached delta as it trains, to continue it exactly: (tensors, JSON-ready record).

    Unlike `save`, nothing is folded: P-tuning's encoder, prefix tuning's projection, diff
    pruning's log-alpha (and mask once fixed), AdaLoRA's importance scores all come along,
    plus each delta's config as it is now (AdaLoRA's rank_pattern grows while it trains).
    `load_training_state` on the same model, attached the same way, puts it back.
    """
    state = require_state(model)
    tensors: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {"active": list(state.active), "deltas": {}}
    for name, delta in state.deltas.items():
        for path, value in _delta_tensors(model, name).items():
            tensors[f"{name}/{path}"] = value.detach().to("cpu", copy=True).contiguous()
        extra: dict[str, Any] = {}
        if delta.method.training_state is not None:
            for key, value in delta.method.training_state(model, name, delta.config).items():
                if torch.is_tensor(value):
                    tensors[f"{name}//{key}"] = value.detach().to("cpu", copy=True).contiguous()
                    extra[key] = {"tensor": f"{name}//{key}"}
                else:
                    extra[key] = {"value": value}
        record["deltas"][name] = {"method": delta.method.name, "config": delta.config.to_dict(),
                                  "trainable": delta.trainable, "state": extra}
    return tensors, record


def load_training_state(model: nn.Module, tensors: dict[str, torch.Tensor], record: dict[str, Any], source: str) -> None:
    """Restore what `training_state` returned onto a model with the same deltas attached the same way."""
    from .config import config_from_dict

    state = require_state(model)
    saved = record.get("deltas", {})
    if set(saved) != set(state.deltas) or any(state.deltas[n].method.name != saved[n]["method"] for n in saved):
        raise DeltaError(f"{source} holds deltas {({n: d['method'] for n, d in saved.items()})}, but the model has "
                         f"{({n: d.method.name for n, d in state.deltas.items()})} attached; it was written by another run")
    for name, entry in saved.items():
        delta = state.deltas[name]
        stored = config_from_dict(entry["config"])
        written = [f.name for f in dataclasses.fields(stored) if f.metadata.get("serialise", True)]
        delta.config = delta.config.replace(**{k: getattr(stored, k) for k in written})  # keeps fields never written
        if delta.method.load_training_state is not None:
            extra = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry["state"].items()}
            delta.method.load_training_state(model, name, delta.config, extra)
        expected = _delta_tensors(model, name)
        mine = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}/") and not k.startswith(f"{name}//")}
        missing, unexpected = sorted(set(expected) - set(mine)), sorted(set(mine) - set(expected))
        wrong = [k for k in expected if k in mine and tuple(mine[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            what = (f"{missing[0]} is missing" if missing else f"{unexpected[0]} has no place in the model" if unexpected
                    else f"{wrong[0]} is {list(mine[wrong[0]].shape)} there but {list(expected[wrong[0]].shape)} in the model")
            raise DeltaError(f"{source}: the training state of delta {name!r} does not fit the model ({what}); "
                             "it was written for another model or config")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(mine[key].to(device=target.device, dtype=target.dtype))
        delta.trainable = bool(entry["trainable"])
    _apply_active(model, state, [n for n in record.get("active", state.active) if n in state.deltas])
