"""LoHa and LoKr: a weight delta built from small factors (the LyCORIS family).

Both reparameterise a frozen weight W0 (out x in) as W0 + ΔW, s = alpha / r.

LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning") multiplies two low-rank products elementwise:

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),    W1a, W2a: (out, r),  W1b, W2b: (r, in)

so 2r(out + in) parameters reach rank up to r². W2b starts at zero and the others
Kaiming-uniform, so outputs are unchanged at attach.

LoKr (Edalati et al. 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter";
LyCORIS's form) takes a Kronecker product:

    ΔW = s · W1 ⊗ W2,    W1: (a, c),  W2: (b, d),  out = a·b,  in = c·d

(a, b) and (c, d) are factor pairs of out and in: with decompose_factor f > 0 dividing
the dimension, (f, dim / f); otherwise the largest divisor not above √dim (nor above f)
and its cofactor. W2 is the low-rank W2a W2b (b x r, r x d) when r < max(b, d) / 2, and
W1 likewise (W1a W1b) when decompose_both and r < max(a, c) / 2. W1 (or W1a) starts at
zero. On a linear layer ΔW is never built: with x viewed as X (c x d),
(W1 ⊗ W2) x = vec(W1 X W2ᵀ), which costs far less than one product with W0.

On nn.Conv2d (weight out x in/groups x kh x kw) the factors act on the flattened
(out, in/groups·kh·kw) matrix (LoKr's W2 keeps the kernel: b x d x kh x kw when full);
with use_effective_conv2d and a kernel larger than 1x1 a core T (r x r x kh x kw) builds
the kernel (FedPara's proposition 3): Wa-mode-1 and Wb-mode-2 products of T, Wa (r x out),
Wb (r x in). GPT-2's Conv1D is treated as the nn.Linear it computes (peft has no LoHa/LoKr
for it, so such files are deltatune's only).

LoHa's forward (and LoKr's on Conv2d) runs the base layer's computation once with W0 + ΔW:
one matmul or convolution forward and two backward, where a separate delta output would take
two and three. Merging adds ΔW to W0 and unmerging subtracts it. Training-time options, as in
LyCORIS and peft: rank_dropout drops whole output rows of ΔW in each forward (LoHa
rescales the kept rows by 1/mean, LoKr only with rank_dropout_scale), module_dropout skips
the adapter for a whole forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DeltaConfig, DeltaError, Method, check, register
from ..surgery import DeltaLayer, float_or_quantized, is_conv1d, wrap
from ..targets import default_targets, pattern_value, select_targets


@dataclass(kw_only=True)
class _LycorisConfig(DeltaConfig):
    r: int = check(8, gt=0)
    alpha: float = 8
    rank_dropout: float = check(0.0, ge=0, lt=1)
    module_dropout: float = check(0.0, ge=0, lt=1)
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = check(None, regex=True)
    exclude_modules: list[str] | str | None = check(None, regex=True)
    layers_to_transform: list[int] | int | None = check(None, ge=0)
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = check(default_factory=dict, gt=0, regex=True)
    alpha_pattern: dict[str, float] = check(default_factory=dict, regex=True)


@dataclass(kw_only=True)
class LoHaConfig(_LycorisConfig):
    """r: rank of each of the two products; alpha: scale numerator (s = alpha / r).
    init_weights=False starts W2b random too (outputs change at attach)."""

    method = "loha"
    peft_type = "LOHA"

    init_weights: bool = True


@dataclass(kw_only=True)
class LoKrConfig(_LycorisConfig):
    """r: rank of W2 (and of W1 with decompose_both) where a low-rank factor is smaller;
    alpha: scale numerator (s = alpha / r); decompose_factor: -1 splits each dimension near
    its square root, f > 0 takes f as the first factor where it divides the dimension.
    init_weights: True (W1 zero), False (all random) or "lycoris" (W2 zero)."""

    method = "lokr"
    peft_type = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | Literal["lycoris"] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decompose_factor != -1 and self.decompose_factor < 1:
            raise DeltaError(f"LoKrConfig.decompose_factor = {self.decompose_factor!r} is not allowed: "
                             "it must be -1 (split near the square root) or a positive factor")


def kron_factors(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, dim / m): m = factor when it divides dim, else the largest divisor of dim that is
    at most √dim and at most factor (-1: no limit). LyCORIS's rule, so shapes match peft's."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0 and d <= limit)
    return m, dim // m


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):  # GPT-2's: weight stored (in, out)
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def supports(module: nn.Module) -> bool:
    # bitsandbytes' quantised layers subclass nn.Linear; other integer weights are refused
    return _kind(module) is not None and float_or_quantized(module)


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def _cp_kernel(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) from a core (r, r, kh, kw) and mode factors wa (r, out), wb (r, in)."""
    return torch.einsum("abhw,ao,bi->oihw", core, wa, wb)


class _HadamardProduct(torch.autograd.Function):
    """s · (w1a @ w1b) ⊙ (w2a @ w2b), saving only the factors: the two (out, in) products are
    recomputed in the backward instead of kept, so a LoHa layer holds no more than LoRA's."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b).mul_(w2a @ w2b).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)  # d/d(w1a w1b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


class _WeightDeltaLayer(DeltaLayer):
    """A delta that is a weight ΔW, shaped as the base weight in nn.Linear's orientation."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.kind = _kind(base_layer)
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}

    def base_replaced(self) -> None:
        super().base_replaced()
        self.kind = _kind(self.base_layer)

    # ------------------------------------------------------------ shapes
    def weight_shape(self) -> tuple[int, ...]:
        """(out, in) for Linear and Conv1D, (out, in / groups, kh, kw) for Conv2d."""
        return self.base_weight_shape()

    def kernel(self) -> tuple[int, ...]:
        return tuple(self.base_layer.kernel_size) if self.kind == "conv2d" else ()

    def effective_conv(self, config: _LycorisConfig) -> bool:
        return self.kind == "conv2d" and config.use_effective_conv2d and self.kernel() != (1, 1)

    def add_common(self, name: str, config: _LycorisConfig, module_name: str, rescale_rank_dropout: bool) -> int:
        """Record the adapter's scale and dropouts; returns its rank."""
        r = pattern_value(module_name, config.rank_pattern, config.r)
        alpha = pattern_value(module_name, config.alpha_pattern, config.alpha)
        self.scaling[name] = alpha / r
        self.rank_dropout[name] = config.rank_dropout
        self.rank_dropout_scale[name] = rescale_rank_dropout
        self.module_dropout[name] = config.module_dropout
        return r

    def new_parameter(self, container: str, name: str, *shape: int) -> nn.Parameter:
        # Trainable parameters are fp32 whatever the base dtype: fp16 updates underflow.
        weight = self.base_layer.weight
        param = nn.Parameter(torch.empty(shape, device=weight.device, dtype=torch.float32))
        getattr(self, container)[name] = param
        return param

    def remove(self, name: str, keep_merged: bool = False) -> None:
        super().remove(name, keep_merged)
        for table in (self.scaling, self.rank_dropout, self.rank_dropout_scale, self.module_dropout):
            table.pop(name, None)

    # ------------------------------------------------------------ math
    def delta_weight(self, name: str) -> torch.Tensor:
        """s · ΔW in fp32, shaped as weight_shape()."""
        raise NotImplementedError

    def row_mask(self, name: str, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """rank_dropout's mask over the output rows for this forward (training only), or None."""
        p = self.rank_dropout[name]
        if not (self.training and p):
            return None
        keep = (torch.rand(rows, device=device) > p).to(dtype)
        if self.rank_dropout_scale[name] and keep.any():
            keep = keep / keep.mean()
        return keep

    def skipped(self, name: str) -> bool:
        """module_dropout: the adapter sits out this whole forward (training only)."""
        p = self.module_dropout[name]
        return bool(self.training and p and torch.rand(()) <= p)

    def training_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """ΔW for this forward: rank dropout applied, in the compute dtype."""
        delta = self.delta_weight(name)
        mask = self.row_mask(name, delta.shape[0], delta.device, delta.dtype)
        if mask is not None:
            delta = delta * mask.view(-1, *([1] * (delta.dim() - 1)))
        return delta if delta.dtype == dtype else delta.to(dtype)

    def run_with_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's computation with `weight` (weight_shape() orientation) in place of its own."""
        if self.kind == "conv2d":
            return self.base_layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)  # Conv1D computes x @ W + b = F.linear(x, Wᵀ, b)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.model_state is not None and self.model_state.batch_adapters is not None:
            return self.mixed_forward(x, *args, **kwargs)
        live = [n for n in self.live if not self.skipped(n)]
        if not live or args or kwargs or self.quantized:  # a quantised base computes its own part
            result = self.base_layer(x, *args, **kwargs)
            for name in live:
                result = result + self.delta_output(name, x)
            return result
        return self.fused_forward(x, live)

    def fused_forward(self, x: torch.Tensor, live: list[str]) -> torch.Tensor:
        """One base computation with W0 + Σ ΔW: one matmul forward and two backward, where the
        base output plus a separate delta output would take two and three."""
        weight = self.base_layer.weight
        weight = weight.T if self.kind == "conv1d" else weight
        for name in live:
            weight = weight + self.training_delta(name, weight.dtype)
        return self.run_with_weight(x, weight, self.base_layer.bias)

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """ΔW applied to x, without the base output or bias."""
        return self.run_with_weight(x, self.training_delta(name, x.dtype), None)

    def mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        mixed = result
        for name, rows in self.batch_groups(x.shape[0]):
            if not self.skipped(name):
                mixed = mixed.index_copy(0, rows, result[rows] + self.delta_output(name, x[rows]))
        return mixed

    # ------------------------------------------------------------ merge (ΔW adds, so any order works)
    def merge_delta(self, name: str) -> None:
        self._add_to_weight(self.delta_weight(name))

    def unmerge_delta(self, name: str) -> None:
        self._add_to_weight(-self.delta_weight(name))

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        with torch.no_grad():
            self.set_base_weight(self.base_weight().float() + delta.detach())


# ---------------------------------------------------------------- LoHa


class LoHaLayer(_WeightDeltaLayer):
    """Wraps an nn.Linear, a GPT-2 Conv1D or an nn.Conv2d."""

    containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for container in self.containers:
            setattr(self, container, nn.ParameterDict())

    def add(self, name: str, config: LoHaConfig, module_name: str) -> None:
        r = self.add_common(name, config, module_name, rescale_rank_dropout=True)
        out_f, in_f, *kernel = self.weight_shape()
        if self.effective_conv(config):
            for i in ("1", "2"):
                self.new_parameter(f"hada_t{i}", name, r, r, *kernel)
                self.new_parameter(f"hada_w{i}_a", name, r, out_f)
                self.new_parameter(f"hada_w{i}_b", name, r, in_f)
        else:
            in_flat = in_f * math.prod(kernel)
            for i in ("1", "2"):
                self.new_parameter(f"hada_w{i}_a", name, out_f, r)
                self.new_parameter(f"hada_w{i}_b", name, r, in_flat)
        for container in self.containers:
            if name in getattr(self, container):
                _kaiming(getattr(self, container)[name])
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b[name])  # one zero factor makes ΔW zero

    def delta_weight(self, name: str) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (getattr(self, f"hada_w{i}")[name] for i in ("1_a", "1_b", "2_a", "2_b"))
        s = self.scaling[name]
        if name in self.hada_t1:  # effective conv: two CP kernels, multiplied elementwise
            return _cp_kernel(self.hada_t1[name], w1a, w1b) * _cp_kernel(self.hada_t2[name], w2a, w2b) * s
        return _HadamardProduct.apply(w1a, w1b, w2a, w2b, s).view(self.weight_shape())


# ---------------------------------------------------------------- LoKr


class LoKrLayer(_WeightDeltaLayer):
    """Wraps an nn.Linear, a GPT-2 Conv1D or an nn.Conv2d."""

    containers = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for container in self.containers:
            setattr(self, container, nn.ParameterDict())

    def add(self, name: str, config: LoKrConfig, module_name: str) -> None:
        r = self.add_common(name, config, module_name, rescale_rank_dropout=config.rank_dropout_scale)
        out_f, in_f, *kernel = self.weight_shape()
        a, b = kron_factors(out_f, config.decompose_factor)
        c, d = kron_factors(in_f, config.decompose_factor)
        if config.decompose_both and r < max(a, c) / 2:
            w1 = [self.new_parameter("lokr_w1_a", name, a, r), self.new_parameter("lokr_w1_b", name, r, c)]
        else:
            w1 = [self.new_parameter("lokr_w1", name, a, c)]
        if r >= max(b, d) / 2:
            w2 = [self.new_parameter("lokr_w2", name, b, d, *kernel)]
        elif self.effective_conv(config):
            w2 = [self.new_parameter("lokr_t2", name, r, r, *kernel), self.new_parameter("lokr_w2_a", name, r, b),
                  self.new_parameter("lokr_w2_b", name, r, d)]
        else:
            w2 = [self.new_parameter("lokr_w2_a", name, b, r), self.new_parameter("lokr_w2_b", name, r, d * math.prod(kernel))]
        for p in w1 + w2:
            _kaiming(p)
        if config.init_weights == "lycoris":  # W2 (or its second factor) zero
            nn.init.zeros_(self.lokr_w2[name] if name in self.lokr_w2 else self.lokr_w2_b[name])
        elif config.init_weights:  # W1 (or its first factor) zero
            nn.init.zeros_(self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name])

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """W1 (a, c) and W2: (b, d) on linear layers; on Conv2d (b, d, kh, kw) or (b, d·kh·kw)."""
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = _cp_kernel(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return w1, w2

    def delta_weight(self, name: str) -> torch.Tensor:
        w1, w2 = self.factors(name)
        if w2.dim() == 4:  # a full conv kernel: W1's entries scale whole (b, d, kh, kw) blocks
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2) * self.scaling[name]).view(self.weight_shape())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "conv2d" or (self.model_state is not None and self.model_state.batch_adapters is not None):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.live:
            if self.skipped(name):
                continue
            mask = self.row_mask(name, result.shape[-1], result.device, result.dtype)
            if mask is None:
                result = self.kron_product(name, x, add_to=result)
            else:
                result = result + self.kron_product(name, x) * mask
        return result

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d":
            return super().delta_output(name, x)
        mask = self.row_mask(name, self.weight_shape()[0], x.device, x.dtype)
        delta = self.kron_product(name, x)
        return delta if mask is None else delta * mask

    def kron_product(self, name: str, x: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """s (W1 ⊗ W2) x on a linear layer (plus `add_to`), without building ΔW.

        With X = x viewed as (c, d), (W1 ⊗ W2) x = vec(W1 X W2ᵀ): two thin products instead of
        one with the (out, in) ΔW. The second product writes straight into the output rows, and
        plain 2-D products are used throughout (torch.matmul's batched paths pick kernels by
        requires_grad, which would make a trained and a reloaded model differ in the last bits).
        """
        w1, w2 = self.factors(name)
        w1 = w1 * self.scaling[name]  # (a, c): scaling the small factor costs nothing
        if w1.dtype != x.dtype:  # fp32 trainables, half-precision base: compute in the base's dtype
            w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
        (a, c), (b, d) = w1.shape, w2.shape
        n = x.numel() // (c * d)
        xt = x.reshape(n, c, d).transpose(1, 2).reshape(n * d, c)  # Xᵀ per row: (N·d, c)
        u = (xt @ w1.T).view(n, d, a).transpose(1, 2).reshape(n * a, d)  # W1 X per row: (N·a, d)
        if add_to is None:
            return (u @ w2.T).view(*x.shape[:-1], a * b)  # (..., out), out index i·b + j
        rows = add_to.reshape(n * a, b)
        if not torch.is_grad_enabled() and add_to.is_contiguous():  # the base output is ours to overwrite
            return rows.addmm_(u, w2.T).view(add_to.shape)
        return torch.addmm(rows, u, w2.T).view(add_to.shape)


def _attach(layer_cls: type[_WeightDeltaLayer], method: str):
    def attach(model: nn.Module, config: _LycorisConfig, name: str) -> _LycorisConfig:
        targets = config.target_modules if config.target_modules is not None else default_targets(method, model)
        names = select_targets(
            model,
            targets,
            supported=supports,
            method=method,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
        )
        wrap(model, names, layer_cls, name, config)
        return config.replace(target_modules=targets)

    return attach


LOHA = register(
    Method(name="loha", config_cls=LoHaConfig, kind="wrap", attach=_attach(LoHaLayer, "loha"),
           containers=LoHaLayer.containers, per_row=True, peft_compatible=True)
)
LOKR = register(
    Method(name="lokr", config_cls=LoKrConfig, kind="wrap", attach=_attach(LoKrLayer, "lokr"),
           containers=LoKrLayer.containers, per_row=True, peft_compatible=True)
)
