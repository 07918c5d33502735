"""AdaLoRA: a low-rank update in SVD form whose rank budget goes where it matters.

Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(ICLR 2023). A frozen weight W0 (out x in) is adapted as

    h = W0 x + s * P diag(lambda) Q x,     s = alpha / (init_r + 1e-5)

with P (out x r) saved as lora_B, lambda (r x 1) as lora_E and Q (r x in) as lora_A
(peft's names); alpha = 0 means s = init_r / (init_r + 1e-5). lambda starts at zero and
P, Q as N(0, 0.02^2), so the model is unchanged at attach. Training adds a loss term that
keeps P and Q near-orthogonal (``dt.regularization(model)``):

    R = orth_reg_weight * mean over the modules' P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F

and, after every optimizer step (``dt.step(model, global_step)``, before the gradients
are zeroed), importance-scored pruning of the triplets (P_i, lambda_i, Q_i). Every entry
w gets a sensitivity I = |w * dL/dw|, smoothed, and an uncertainty:

    Ibar <- beta1 Ibar + (1 - beta1) I,     U <- beta2 U + (1 - beta2) |I - Ibar|,     score = Ibar * U

and triplet i scores  S_i = score(lambda_i) + mean_j score(Q_ij) + mean_j score(P_ji).
The total rank b(t) over all modules follows the paper's cubic schedule

    b(t) = b0                                                  t <= tinit
    b(t) = bT + (b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3   (applied every deltaT steps)
    b(t) = bT                                                  t >= T - tfinal

with b0 = init_r x modules, bT = target_r x modules, T = total_step: the lambda_i of the
b0 - b(t) lowest-scoring triplets are set to zero (they may come back while the budget
still falls); at T - tfinal the allocation is fixed and re-applied after every later step.
The kept triplets are the config's rank_pattern ({"<module>.lora_E": [kept, ...]}, peft's
field), and a saved adapter holds only their rows, so it loads with its final ranks here
and in peft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DeltaConfig, DeltaError, Method, check, register
from ..formats.peft import PREFIX
from ..surgery import DeltaLayer, delta_layers, float_or_quantized, is_conv1d, require_state, wrap
from ..targets import default_targets, select_targets
from .lora import add_low_rank

PARTS = ("lora_A", "lora_E", "lora_B")  # Q, lambda, P


@dataclass(kw_only=True)
class AdaLoraConfig(DeltaConfig):
    """init_r: every module's starting rank; target_r: the average rank at the end.

    total_step (required): the training steps; the budget falls from step tinit to step
    total_step - tfinal, re-allocated every deltaT steps. beta1 / beta2: the smoothing of
    the sensitivity and of its uncertainty. orth_reg_weight: the weight of the
    orthogonality penalty. alpha: the scale numerator (s = alpha / init_r). rank_pattern:
    the kept triplets per module, filled in by training; a config that has it builds
    each module at its final rank (as a saved adapter loads). init: "normal" (lambda zero,
    P and Q N(0, 0.02^2)); "none" draws all three N(0, 1), so outputs change at attach (tests).
    """

    method = "adalora"
    peft_type = "ADALORA"

    init_r: int = check(12, gt=0)
    target_r: int = check(8, gt=0)
    tinit: int = check(0, ge=0)
    tfinal: int = check(0, ge=0)
    deltaT: int = check(1, gt=0)
    beta1: float = check(0.85, gt=0, lt=1)
    beta2: float = check(0.85, gt=0, lt=1)
    orth_reg_weight: float = check(0.5, ge=0)
    total_step: int | None = check(None, gt=0)
    alpha: float = check(8, ge=0)
    dropout: float = check(0.0, ge=0, lt=1)
    target_modules: list[str] | str | None = check(None, regex=True)
    exclude_modules: list[str] | str | None = check(None, regex=True)
    layers_to_transform: list[int] | int | None = check(None, ge=0)
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    init: Literal["normal", "none"] = "normal"
    # Set at attach, not by hand: True when the targets are GPT-2 Conv1D ([in, out] weights); peft reads it.
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.total_step is None:
            raise DeltaError("AdaLoraConfig.total_step is required: the number of training steps, over which the rank "
                             "budget falls from init_r to target_r (e.g. total_step=len(loader) * epochs)")
        if self.tinit >= self.total_step - self.tfinal:
            raise DeltaError(f"AdaLoraConfig leaves no steps to allocate the budget: tinit={self.tinit} must be below "
                             f"total_step - tfinal = {self.total_step - self.tfinal}; lower tinit or tfinal")
        if self.target_r > self.init_r:
            raise DeltaError(f"AdaLoraConfig.target_r = {self.target_r} is above init_r = {self.init_r}; the budget only falls")
        for key, kept in (self.rank_pattern or {}).items():
            if len(kept) != self.init_r:
                raise DeltaError(f"AdaLoraConfig.rank_pattern[{key!r}] has {len(kept)} entries; it needs one per "
                                 f"initial triplet (init_r = {self.init_r})")


def supports(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and float_or_quantized(module)


class AdaLoraLayer(DeltaLayer):
    """Wraps an nn.Linear or a GPT-2 Conv1D with one SVD-form update per adapter."""

    containers = PARTS

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.is_conv1d = is_conv1d(base_layer)
        self.lora_A = nn.ParameterDict()  # Q (r, in)
        self.lora_E = nn.ParameterDict()  # lambda (r, 1)
        self.lora_B = nn.ParameterDict()  # P (out, r)
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        # Built at its final rank from a rank_pattern (a saved adapter): allocation is over.
        self.final: dict[str, bool] = {}
        # Per adapter and part: the smoothed sensitivity and its uncertainty, shaped like the part.
        self.importance: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        # Per adapter: the triplets within the budget (r,) bool, once allocated.
        self.kept: dict[str, torch.Tensor] = {}

    def base_replaced(self) -> None:
        super().base_replaced()
        self.is_conv1d = is_conv1d(self.base_layer)

    def add(self, name: str, config: AdaLoraConfig, module_name: str) -> None:
        pattern = (config.rank_pattern or {}).get(f"{module_name}.lora_E")
        r = config.init_r if pattern is None else sum(pattern)
        out_f, in_f = self.base_weight_shape()
        kw = dict(device=self.base_layer.weight.device, dtype=torch.float32)  # fp32 whatever the base dtype
        self.lora_A[name] = nn.Parameter(torch.empty(r, in_f, **kw))
        self.lora_E[name] = nn.Parameter(torch.empty(r, 1, **kw))
        self.lora_B[name] = nn.Parameter(torch.empty(out_f, r, **kw))
        with torch.no_grad():
            if config.init == "normal":
                self.lora_E[name].zero_()
                self.lora_A[name].normal_(0.0, 0.02)
                self.lora_B[name].normal_(0.0, 0.02)
            else:
                for part in PARTS:
                    getattr(self, part)[name].normal_()
        self.scaling[name] = (config.alpha if config.alpha > 0 else config.init_r) / (config.init_r + 1e-5)
        self.dropout[name] = config.dropout
        self.final[name] = pattern is not None

    def remove(self, name: str, keep_merged: bool = False) -> None:
        super().remove(name, keep_merged)
        for table in (self.scaling, self.dropout, self.final, self.importance, self.kept):
            table.pop(name, None)

    # ------------------------------------------------------------ math
    def delta_weight(self, name: str) -> torch.Tensor:
        """s P diag(lambda) Q as (out, in), in fp32."""
        return (self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name])) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.add_live(x, self.base_layer(x, *args, **kwargs))

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if not self.lora_E[name].shape[0]:
            return result  # every triplet of this module was pruned
        p = self.dropout[name]
        h = F.dropout(x, p, training=True) if p and self.training else x
        QL = self.lora_A[name] * self.lora_E[name]  # (r, in): Q with lambda folded in
        P = self.lora_B[name]
        if QL.dtype != h.dtype:  # fp32 trainables, half-precision base: compute in the base's dtype
            QL, P = QL.to(h.dtype), P.to(h.dtype)
        return add_low_rank(result, F.linear(h, QL), P, self.scaling[name])  # low: (..., r)

    def merge_delta(self, name: str) -> None:
        with torch.no_grad():
            self.set_base_weight(self.base_weight().float() + self.delta_weight(name))  # (out, in)

    def unmerge_delta(self, name: str) -> None:
        with torch.no_grad():
            self.set_base_weight(self.base_weight().float() - self.delta_weight(name))

    # ------------------------------------------------------------ budget
    def orthogonality(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """||Q Q^T - I||_F and ||P^T P - I||_F."""
        Q, P = self.lora_A[name], self.lora_B[name]
        eye = torch.eye(Q.shape[0], device=Q.device, dtype=Q.dtype)
        return torch.linalg.matrix_norm(Q @ Q.T - eye), torch.linalg.matrix_norm(P.T @ P - eye)

    def update_importance(self, name: str, module_name: str, beta1: float, beta2: float) -> None:
        ema = self.importance.setdefault(name, {})
        with torch.no_grad():
            for part in PARTS:
                p = getattr(self, part)[name]
                if p.grad is None:
                    raise DeltaError(
                        f"dt.step found no gradient on {module_name}.{part}: AdaLoRA scores importance from the "
                        "gradients, so call dt.step(model, step) after optimizer.step() and before optimizer.zero_grad() "
                        "(in a transformers TrainerCallback: on_optimizer_step)"
                    )
                sensitivity = (p * p.grad).abs()
                smooth, uncertainty = ema.get(part, (torch.zeros_like(p), torch.zeros_like(p)))
                smooth = beta1 * smooth + (1 - beta1) * sensitivity
                uncertainty = beta2 * uncertainty + (1 - beta2) * (sensitivity - smooth).abs()
                ema[part] = (smooth, uncertainty)

    def triplet_scores(self, name: str) -> torch.Tensor | None:
        """S_i per triplet (r,), or None before any importance was recorded."""
        ema = self.importance.get(name)
        if not ema:
            return None
        score = {part: smooth * uncertainty for part, (smooth, uncertainty) in ema.items()}
        return score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))

    def apply_kept(self, name: str) -> None:
        kept = self.kept.get(name)
        if kept is not None:
            with torch.no_grad():
                self.lora_E[name].masked_fill_(~kept.view(-1, 1), 0.0)


# ---------------------------------------------------------------- attach and the training hooks


def attach(model: nn.Module, config: AdaLoraConfig, name: str) -> AdaLoraConfig:
    targets = config.target_modules if config.target_modules is not None else default_targets("adalora", model)
    names = select_targets(
        model,
        targets,
        supported=supports,
        method="adalora",
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    strays = [k for k in config.rank_pattern or {} if k.removesuffix(".lora_E") not in names]
    if strays:
        raise DeltaError(f"AdaLoraConfig.rank_pattern names {strays[0]!r}, which is not one of the targeted modules "
                         f"(e.g. {names[0]}.lora_E); was it saved for another model?")
    wrap(model, names, AdaLoraLayer, name, config)
    conv1d = any(is_conv1d(model.get_submodule(n).base_layer) for n in names)
    return config.replace(target_modules=targets, fan_in_fan_out=conv1d)


def _layers(model: nn.Module, name: str) -> list[tuple[str, AdaLoraLayer]]:
    return [(n, m) for n, m in delta_layers(model) if isinstance(m, AdaLoraLayer) and name in m.lora_E]


def regularization(model: nn.Module, name: str, config: AdaLoraConfig) -> torch.Tensor:
    norms = [norm for _, layer in _layers(model, name) for norm in layer.orthogonality(name)]
    return config.orth_reg_weight * (sum(norms) / len(norms))


def budget(config: AdaLoraConfig, step: int, start: int, target: int) -> tuple[int, bool]:
    """(total rank allowed at `step`, whether to re-allocate now) on the cubic schedule."""
    end = config.total_step - config.tfinal
    if step <= config.tinit:
        return start, False
    if step > end:
        return target, True
    remaining = 1 - (step - config.tinit) / (end - config.tinit)
    return int((start - target) * remaining**3 + target), step % config.deltaT == 0


def step(model: nn.Module, name: str, config: AdaLoraConfig, global_step: int) -> None:
    """After each optimizer step: score, then prune to the budget (or hold the final allocation)."""
    layers = _layers(model, name)
    if any(layer.final[name] for _, layer in layers):
        return  # built at its final ranks (from a saved adapter): nothing left to allocate
    end = config.total_step - config.tfinal
    if global_step < end:
        for module_name, layer in layers:
            layer.update_importance(name, module_name, config.beta1, config.beta2)
        start = sum(layer.lora_E[name].shape[0] for _, layer in layers)
        allowed, now = budget(config, global_step, start, config.target_r * len(layers))
        if now:
            _allocate(model, name, config, layers, allowed, global_step)
    elif global_step == end:
        _allocate(model, name, config, layers, config.target_r * len(layers), global_step)
        for _, layer in layers:
            layer.importance.pop(name, None)  # the allocation is final
    else:
        for _, layer in layers:
            layer.apply_kept(name)


def _allocate(model: nn.Module, name: str, config: AdaLoraConfig, layers: list[tuple[str, AdaLoraLayer]],
              allowed: int, global_step: int) -> None:
    """Keep the `allowed` best-scoring triplets over all modules; zero the others' lambda."""
    scores = [layer.triplet_scores(name) for _, layer in layers]
    if any(s is None for s in scores):
        raise DeltaError(f"dt.step reached the allocation at step {global_step} with no importance scores for {name!r}; "
                         "call dt.step(model, step) after every optimizer step from the start of training")
    flat = torch.cat([s.to(scores[0].device) for s in scores])
    pruned = flat.numel() - allowed
    threshold = torch.kthvalue(flat, pruned).values.item() if pruned > 0 else -math.inf
    pattern = {}
    for (module_name, layer), score in zip(layers, scores):
        layer.kept[name] = ~(score <= threshold)
        layer.apply_kept(name)
        pattern[f"{module_name}.lora_E"] = layer.kept[name].tolist()
    delta = require_state(model).deltas[name]
    delta.config = delta.config.replace(rank_pattern=pattern)


def to_file(model: nn.Module, name: str, config: AdaLoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the kept triplets' rows (peft's file), for modules still at their initial rank."""
    out = dict(tensors)
    for key, kept in (config.rank_pattern or {}).items():
        module = PREFIX + key.removesuffix(".lora_E")
        A = out.get(f"{module}.lora_A")
        if A is None or A.shape[0] != len(kept) or all(kept):
            continue  # already at its final rank
        rows = torch.tensor(kept, dtype=torch.bool)
        out[f"{module}.lora_A"] = A[rows].contiguous()
        out[f"{module}.lora_E"] = out[f"{module}.lora_E"][rows].contiguous()
        out[f"{module}.lora_B"] = out[f"{module}.lora_B"][:, rows].contiguous()
    return out


def training_state(model: nn.Module, name: str, config: AdaLoraConfig) -> dict[str, Any]:
    """The smoothed sensitivities and uncertainties the budget is allocated by, and the kept triplets."""
    out: dict[str, Any] = {}
    for module_name, layer in _layers(model, name):
        for part, (smooth, uncertainty) in layer.importance.get(name, {}).items():
            out[f"importance.{module_name}.{part}.smooth"] = smooth
            out[f"importance.{module_name}.{part}.uncertainty"] = uncertainty
        if name in layer.kept:
            out[f"kept.{module_name}"] = layer.kept[name]
    return out


def load_training_state(model: nn.Module, name: str, config: AdaLoraConfig, state: dict[str, Any]) -> None:
    for module_name, layer in _layers(model, name):
        device = layer.lora_E[name].device
        ema = {part: (state[f"importance.{module_name}.{part}.smooth"].to(device),
                      state[f"importance.{module_name}.{part}.uncertainty"].to(device))
               for part in PARTS if f"importance.{module_name}.{part}.smooth" in state}
        layer.importance.pop(name, None)
        if ema:
            layer.importance[name] = ema
        layer.kept.pop(name, None)
        if f"kept.{module_name}" in state:
            layer.kept[name] = state[f"kept.{module_name}"].to(device)


ADALORA = register(
    Method(name="adalora", config_cls=AdaLoraConfig, kind="wrap", attach=attach, containers=PARTS, per_row=True,
           peft_compatible=True, to_file=to_file, regularization=regularization, step=step,
           training_state=training_state, load_training_state=load_training_state)
)
