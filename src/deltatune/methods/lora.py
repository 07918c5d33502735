"""LoRA, rsLoRA and DoRA.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")
reparameterises a frozen weight W0 (out x in) as W0 + s * B A with A (r x in),
B (out x r) and s = alpha / r:

    h = W0 x + s * B A dropout(x)

A starts random (Kaiming-uniform with a = sqrt(5), or Gaussian N(0, 1/r)) and B
at zero, so the model is unchanged at attach. Merging adds s * B A to W0
(transposed for GPT-2's Conv1D, whose weight is stored in x out); unmerging
subtracts it. rsLoRA (Kalajdzievski 2023) uses s = alpha / sqrt(r), which keeps
the update's scale stable as r grows.

On an embedding (vocab x dim) the roles turn around: A (r x vocab) starts at zero
and B (dim x r) Gaussian, and the delta is  s * onehot(x) A^T B^T.

Two initialisations start from the base weight instead and move part of it into the
adapter, so training begins on the weight's most important directions:

  PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors
  Adaptation"): with W0 = U S V^T (singular values descending),
      A = sqrt(S_r / s) V_r^T,   B = U_r sqrt(S_r / s),   W0 <- W0 - s B A  (the residual),
  from the full SVD, or from a randomized SVD with `pissa_niter` subspace iterations.
  OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation"): with W0 = Q R,
      A = R[:r],   B = Q[:, :r],   W0 <- W0 - s B A.
The sum W0 - s B A + s B A is W0 at attach. The core keeps the original W0 (on the CPU):
an inactive delta and ``disabled()`` run the true base, and detach puts it back bit for
bit. Trained, the adapter means  W0 + s (B A - B0 A0)  with B0, A0 its initial values,
which is a plain LoRA of rank 2r on the original weight:  A' = [A; A0], B' = [B, -B0],
same scale (alpha doubled, or times sqrt 2 with rsLoRA, as r doubles); that is what
``dt.save(..., relative_to_original=True)`` writes (peft's
``path_initial_model_for_weight_conversion`` produces the same file).

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") splits the
adapted weight into a magnitude m (one per output row, initialised to the row
norms of W0 + s B A) and a direction:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row

with the norm treated as a constant in the backward pass (paper section 4.3).
Written on top of the base output y0 = W0 x (bias removed):

    h = y0 + (m/n - 1) * y0 + (m/n) * s * B A x + bias,   n = ||W0 + s B A||_row

On a quantised base (bitsandbytes 4-bit or 8-bit, see deltatune.quant) the base layer
computes W0 x itself, dequantising inside its kernel; only merges and DoRA's norm see W0
as numbers, dequantised for the call. LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware
Quantization") starts the adapter on the quantisation error instead of at zero: with Q the
dequantised base and W the unquantised weight (read from the model's checkpoint),

    s B A = the best rank-r approximation of W - Q,   so  Q + s B A ~ W at attach.

(LoftQ's alternating steps re-quantise W - s B A; on a base that is already quantised Q is
fixed, and one step is the optimum.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DeltaConfig, DeltaError, Method, check, register
from ..formats.peft import PREFIX
from .. import quant
from ..surgery import DeltaLayer, float_or_quantized, is_conv1d, rewrite_base, wrap
from ..targets import default_targets, pattern_value, select_targets


@dataclass(kw_only=True)
class LoraConfig(DeltaConfig):
    """r: rank; alpha: scale numerator (s = alpha/r, or alpha/sqrt(r) with use_rslora).

    target_modules: names, a regex string, or "all-linear"; None takes the
    architecture's default. rank_pattern / alpha_pattern: {regex on the end of a
    module name: value} overrides. init: "kaiming" or "gaussian" for A (B zero);
    "pissa" or "olora" from the base weight (which becomes the residual; pissa_niter
    takes a randomized SVD with that many iterations instead of the full one); "loftq"
    from the quantisation error of a quantised base (loftq_bits: the base's bits, 4 or 8;
    loftq_iter: 1, the base being quantised already); "none" leaves B random too, so
    outputs change at attach (for tests).
    """

    method = "lora"
    peft_type = "LORA"

    r: int = check(8, gt=0)
    alpha: float = 8
    dropout: float = check(0.0, ge=0, lt=1)
    target_modules: list[str] | str | None = check(None, regex=True)
    exclude_modules: list[str] | str | None = check(None, regex=True)
    layers_to_transform: list[int] | int | None = check(None, ge=0)
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = check(default_factory=dict, gt=0, regex=True)
    alpha_pattern: dict[str, float] = check(default_factory=dict, regex=True)
    init: Literal["kaiming", "gaussian", "none", "pissa", "olora", "loftq"] = "kaiming"
    pissa_niter: int | None = check(None, gt=0)
    loftq_bits: Literal[4, 8] = 4
    loftq_iter: int = check(1, gt=0)
    use_rslora: bool = False
    use_dora: bool = False
    # Set at attach, not by hand: True when the targets are GPT-2 Conv1D ([in, out] weights); peft reads it.
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pissa_niter is not None and self.init != "pissa":
            raise DeltaError(f"LoraConfig.pissa_niter = {self.pissa_niter} only applies to init='pissa' (init is {self.init!r})")

    @property
    def rewrites_base(self) -> bool:
        """Does this init move part of the base weight into the adapter (PiSSA, OLoRA)?"""
        return self.init in ("pissa", "olora")

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def supports(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear; any other integer weight is packed in a
    # format deltatune cannot read, so such a layer is refused by name.
    kinds = isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)
    return kinds and float_or_quantized(module)


class LoraLayer(DeltaLayer):
    """Wraps an nn.Linear, a GPT-2 Conv1D or an nn.Embedding."""

    containers = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self.is_conv1d = is_conv1d(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.merged_factors: dict[str, torch.Tensor] = {}  # DoRA's m / ||W0 + s B A|| at merge time, for unmerge
        # PiSSA / OLoRA: the initial (A0, B0), on the CPU, for writing the adapter relative to the original weight
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def base_replaced(self) -> None:
        super().base_replaced()
        self.is_conv1d = is_conv1d(self.base_layer)

    # ------------------------------------------------------------ shapes
    def dims(self) -> tuple[int, int]:
        if self.is_embedding:
            return self.base_layer.num_embeddings, self.base_layer.embedding_dim
        out_f, in_f = self.base_weight_shape()
        return in_f, out_f

    # ------------------------------------------------------------ adapters
    def add(self, name: str, config: LoraConfig, module_name: str, original: torch.Tensor | None = None) -> None:
        """original: LoftQ's unquantised (out, in) weight for this module."""
        r = pattern_value(module_name, config.rank_pattern, config.r)
        alpha = pattern_value(module_name, config.alpha_pattern, config.alpha)
        in_f, out_f = self.dims()
        device = self.base_layer.weight.device
        # Trainable parameters are fp32 whatever the base dtype: fp16 updates underflow and drift to inf/NaN.
        kw = dict(device=device, dtype=torch.float32)
        if self.is_embedding:
            if config.use_dora:
                raise DeltaError(f"DoRA on an embedding ({module_name}) is not supported; exclude it or turn use_dora off")
            self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, in_f, **kw))
            self.lora_embedding_B[name] = nn.Parameter(torch.empty(out_f, r, **kw))
            nn.init.normal_(self.lora_embedding_B[name])
            if config.init == "none":
                nn.init.normal_(self.lora_embedding_A[name])
        else:
            self.lora_A[name] = nn.Linear(in_f, r, bias=False, **kw)
            self.lora_B[name] = nn.Linear(r, out_f, bias=False, **kw)
            if config.init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            if config.init != "none":
                nn.init.zeros_(self.lora_B[name].weight)
        self.scaling[name] = config.scaling(r, alpha)
        self.dropout[name] = config.dropout
        if config.rewrites_base:
            if self.is_embedding:
                raise DeltaError(f"init={config.init!r} on an embedding ({module_name}) is not supported; exclude it")
            self.init_from_weight(name, config, module_name)
        if config.init == "loftq" and original is not None:
            A, B = quant.loftq_factors(original, self.base_weight(), r, self.scaling[name])
            with torch.no_grad():
                self.lora_A[name].weight.copy_(A)
                self.lora_B[name].weight.copy_(B)
        if config.use_dora:
            with torch.no_grad():
                norm = self.dora_norm(name, self.base_weight().float())
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(**kw))

    def init_from_weight(self, name: str, config: LoraConfig, module_name: str) -> None:
        """PiSSA / OLoRA: A and B from the base weight, which becomes W0 - s B A (the core keeps W0)."""
        weight = self.base_layer.weight
        if self.quantized:
            raise DeltaError(f"init={config.init!r} rewrites {module_name}'s base weight, which is quantised "
                             f"({quant.quant_kind(self.base_layer)}); use init='loftq' on a quantised base, or "
                             "start from the unquantised model")
        if weight.is_meta:
            raise DeltaError(f"init={config.init!r} needs the values of {module_name}'s weight, which is on the meta device; "
                             "load the model's weights first")
        r, s = self.lora_A[name].weight.shape[0], self.scaling[name]
        w = self.base_weight().detach().to(torch.float32, copy=True)  # (out, in)
        if r > min(w.shape):
            raise DeltaError(f"init={config.init!r} needs r <= min(in, out) = {min(w.shape)} for {module_name}, got r={r}")
        if config.init == "olora":
            Q, R = torch.linalg.qr(w)  # (out, k), (k, in)
            A, B = R[:r].contiguous(), Q[:, :r].contiguous()
        else:
            U, S, Vh = _top_singular(w, r, config.pissa_niter)  # (out, r), (r,), (r, in)
            root = torch.sqrt(S / s)
            A, B = root[:, None] * Vh, U * root[None, :]  # (r, in), (out, r)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.copy_(B)
        self.initial[name] = (A.to("cpu", copy=True), B.to("cpu", copy=True))
        residual = (w - (s * B) @ A).to(weight.dtype)  # (out, in)
        rewrite_base(self, name, module_name, "weight", residual.T if self.is_conv1d else residual)

    def remove(self, name: str, keep_merged: bool = False) -> None:
        super().remove(name, keep_merged)
        self.initial.pop(name, None)
        self.merged_factors.pop(name, None)
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)

    # ------------------------------------------------------------ math
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A as (out, in) for Linear/Conv1D, or (vocab, dim) for an embedding, in fp32."""
        if self.is_embedding:
            return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Row norms of W + s B A (out,), computed in fp32."""
        return torch.linalg.vector_norm(weight.float() + self.delta_weight(name), dim=1)

    def original_weight(self) -> torch.Tensor:
        """W0 as (out, in): the base weight with every merged adapter taken back out (last merged first).

        DoRA's norm is always that of W0 + s B A, merged neighbours or not, so that merging
        adapters in the order they apply gives exactly what the unmerged forward computes.
        """
        weight = self.base_weight()
        if not self.merged:
            return weight
        premerge = self.premerge_weight()
        if premerge is not None:  # a quantised base keeps its tensors from before the merges
            return premerge
        weight = weight.float()
        for name in reversed(self.merged):
            if name in self.merged_factors:
                weight = weight / self.merged_factors[name].unsqueeze(1)
            weight = weight - self.delta_weight(name)
        return weight

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.add_live(x, self.base_layer(x, *args, **kwargs))

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.is_embedding:
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            if A.dtype != result.dtype:
                A, B = A.to(result.dtype), B.to(result.dtype)
            low = F.embedding(x, A.T, padding_idx=self.base_layer.padding_idx)  # (..., r)
            return add_low_rank(result, low, B, self.scaling[name])
        p = self.dropout[name]
        h = F.dropout(x, p, training=True) if p and self.training else x
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if A.dtype != h.dtype:  # fp32 trainables, half-precision base: compute in the base's dtype
            A, B = A.to(h.dtype), B.to(h.dtype)
        low = F.linear(h, A)  # (..., r)
        if name in self.lora_magnitude_vector:
            return self.dora(name, h, x, result, low, B)
        return add_low_rank(result, low, B, self.scaling[name])

    def dora(self, name: str, h: torch.Tensor, x: torch.Tensor, result: torch.Tensor, low: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            norm = self.dora_norm(name, self.original_weight())  # (out,), a constant in the backward pass
        factor = (self.lora_magnitude_vector[name] / norm).to(result.dtype)  # (out,)
        bias = getattr(self.base_layer, "bias", None)
        if h is x:
            base = result if bias is None else result - bias
        else:  # dropout is on: the direction term sees the same dropped input as the LoRA path
            base = self.base_output(h)
        return result + (factor - 1) * base + factor * self.scaling[name] * F.linear(low, B)

    # ------------------------------------------------------------ merge
    # Merging applies each adapter to the weight as its forward applies it to the output:
    # LoRA  W <- W + s B A;   DoRA  W <- f (W + s B A),  f = m / ||W0 + s B A||_row.
    # Unmerging inverts the last one applied.
    def merge_delta(self, name: str) -> None:
        with torch.no_grad():
            new = self.base_weight().float() + self.delta_weight(name)  # (out, in), a new tensor
            if self.is_dora(name):
                factor = self.lora_magnitude_vector[name] / self.dora_norm(name, self.original_weight())  # (out,)
                new = new * factor.unsqueeze(1)
                self.merged_factors[name] = factor
            self.set_base_weight(new)

    def unmerge_delta(self, name: str) -> None:
        with torch.no_grad():
            w_out_in = self.base_weight().float()
            if name in self.merged_factors:
                w_out_in = w_out_in / self.merged_factors.pop(name).unsqueeze(1)
            self.set_base_weight(w_out_in - self.delta_weight(name))

    def merge_problem(self, name: str, earlier: Sequence[str] = ()) -> str | None:
        # Adapters apply in the active order, merged ones first. LoRA steps commute; a DoRA step
        # does not, so merging must not move it before a live adapter that now applies earlier.
        live = [n for n in self.active if n not in self.merged and n not in earlier]
        before = live[: live.index(name)] if name in live else []
        if before and (self.is_dora(name) or any(self.is_dora(n) for n in before)):
            return (f"DoRA's result depends on the order adapters apply, and {before} apply before it here; "
                    "merge those first, or every active delta at once with dt.merge(model)")
        return None

    def unmerge_problem(self, name: str, also: Sequence[str] = ()) -> str | None:
        later = [n for n in self.merged[self.merged.index(name) + 1 :] if n not in also] if name in self.merged else []
        if later and (self.is_dora(name) or any(self.is_dora(n) for n in later)):
            return (f"{later} were merged after it and DoRA's result depends on the order; unmerge those first, "
                    "or every merged delta at once with dt.unmerge(model)")
        return None


def _top_singular(w: torch.Tensor, r: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r leading singular triplets of w (out, in): U (out, r), S (r,), V^T (r, in).

    The randomized SVD runs under a fixed seed, so the same base gives the same residual
    every time (a saved PiSSA adapter re-initialises identically when loaded).
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
    return U, S, V.T


def add_low_rank(result: torch.Tensor, low: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """result + scale * low @ B^T as one fused GEMM (addmm) over the flattened rows.

    Peft's ``result + B(low) * scale`` makes two more passes over the output; addmm makes none.
    Without autograd the base output is ours to overwrite, so the sum goes in place.
    """
    if low.dtype != result.dtype or B.dtype != result.dtype:  # under autocast the base output is already half precision
        low, B = low.to(result.dtype), B.to(result.dtype)
    if result.dim() < 2:
        return result + scale * (low @ B.T)
    rows, low2d = result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1])
    if not torch.is_grad_enabled() and result.is_contiguous():
        rows.addmm_(low2d, B.T, alpha=scale)
        return result
    return torch.addmm(rows, low2d, B.T, alpha=scale).view(result.shape)


def attach(model: nn.Module, config: LoraConfig, name: str) -> LoraConfig:
    targets = config.target_modules if config.target_modules is not None else default_targets("lora", model)
    names = select_targets(
        model,
        targets,
        supported=supports,
        method="lora",
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    if config.rewrites_base:
        _refuse_tied_targets(model, names, config)
    per_module = _loftq_weights(model, names, config) if config.init == "loftq" else None
    wrap(model, names, LoraLayer, name, config, per_module=per_module)
    conv1d = any(is_conv1d(model.get_submodule(n).base_layer) for n in names)
    return config.replace(target_modules=targets, fan_in_fan_out=conv1d)


def _loftq_weights(model: nn.Module, names: list[str], config: LoraConfig) -> dict[str, dict[str, torch.Tensor]]:
    """LoftQ's unquantised weight for each quantised target. A target the model keeps in full precision
    (T5's wo) has no quantisation error to start from: it gets the plain init (A random, B zero)."""
    kinds = {}
    for n in names:
        module = model.get_submodule(n)
        kinds[n] = quant.quant_kind(module.base_layer if isinstance(module, DeltaLayer) else module)
    quantised = [n for n in names if kinds[n] is not None]
    if not quantised:
        raise DeltaError(
            f"init='loftq' starts the adapter on a quantised base's quantisation error, but no target is quantised "
            f"({names[0]} is a {type(model.get_submodule(names[0])).__name__}); load the base quantised first "
            "(deltatune.load_base(name, quant='nf4'), or from_pretrained(..., quantization_config=...))"
        )
    for n in quantised:
        bits = 8 if kinds[n] == "int8" else 4
        if config.loftq_bits != bits:
            raise DeltaError(f"init='loftq' with loftq_bits={config.loftq_bits}, but {n} is quantised in {bits} bits "
                             f"({kinds[n]}); LoftQ works against the base's own quantisation: set loftq_bits={bits}")
    if config.loftq_iter != 1:
        raise DeltaError(
            f"LoraConfig.loftq_iter = {config.loftq_iter}: LoftQ's further steps re-quantise W - s B A, but this base "
            "is quantised already and stays as it is, so one step is the optimum; set loftq_iter=1"
        )
    originals = quant.checkpoint_weights(model, quantised)
    return {n: {"original": w} for n, w in originals.items()}


def _refuse_tied_targets(model: nn.Module, names: list[str], config: LoraConfig) -> None:
    """PiSSA/OLoRA rewrite the weight in place: a weight shared with another module would change there too."""
    owners: dict[int, list[str]] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(path)
    for n in names:
        module = model.get_submodule(n)
        weight = (module.base_layer if isinstance(module, DeltaLayer) else module).weight
        shared = [o for o in owners.get(id(weight), ()) if not o.startswith(n + ".")]
        if shared:
            raise DeltaError(f"init={config.init!r} rewrites {n}'s weight, which is shared (tied) with {shared[0]}; "
                             "exclude it from target_modules (exclude_modules=[...]) or untie the weights first")


def to_original_base(model: nn.Module, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PiSSA / OLoRA adapter as a plain LoRA of rank 2r on the original weights: A' = [A; A0], B' = [B, -B0]."""
    if config.use_dora:
        raise DeltaError(f"delta {name!r} uses DoRA, whose magnitude is not a low-rank difference; it cannot be written "
                         "relative to the original weights (save it without relative_to_original)")
    out = dict(tensors)
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")]
        A0, B0 = model.get_submodule(module).initial[name]
        key_B = key[: -len("lora_A.weight")] + "lora_B.weight"
        out[key] = torch.cat([A, A0.to(A.dtype)], dim=0)  # (2r, in)
        out[key_B] = torch.cat([tensors[key_B], -B0.to(A.dtype)], dim=1)  # (out, 2r)
    # the same scale at twice the rank: alpha/r needs alpha doubled, alpha/sqrt(r) alpha times sqrt(2)
    factor = math.sqrt(2) if config.use_rslora else 2
    plain = config.replace(
        init="kaiming", pissa_niter=None, r=2 * config.r, alpha=config.alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )  # fmt: skip
    return plain, out


def _load_overrides(config: LoraConfig) -> dict[str, Any]:
    # A LoftQ adapter's file holds its trained A and B: nothing to initialise (nor a checkpoint to read).
    return {"init": "kaiming"} if config.init == "loftq" else {}


LORA = register(
    Method(name="lora", config_cls=LoraConfig, kind="wrap", attach=attach, containers=LoraLayer.containers, per_row=True,
           peft_compatible=True, to_original_base=to_original_base, load_overrides=_load_overrides)
)
