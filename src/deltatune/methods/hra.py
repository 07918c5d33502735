"""HRA: the weight times a chain of trained Householder reflections.

Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via
Householder Reflection Adaptation". A target of shape (out x in) trains r vectors
u_1 .. u_r of length in, one Householder reflection each, H_i = I - 2 û_i û_i^T with
û_i = u_i / ||u_i||, and computes with the weight multiplied on its input side by their
chain, H = H_1 H_2 ... H_r:

    h = W H x + b = W (H_1 (H_2 ( ... (H_r x)))) + b

so the input goes through the reflections (the last first) and then the base layer,
unchanged; r x in parameters per target (LoRA: r (in + out)). The chain is applied in its
compact form H = I - A D^T (D the unit directions, A built from them column by column), so
H x costs two thin matmuls, x - A (D^T x), and no (in x in) matrix is formed. H is orthogonal, so W H
keeps W's singular values (the paper's orthogonal view), while I - H has rank at most r
(its low-rank view). Several adapters on one layer multiply in their active order,
W H_a H_b.

Init (``init_weights``, the default): the vectors come in equal pairs, u_1 = u_2,
u_3 = u_4, ..., each pair one column of (in x r/2) drawn Kaiming-uniform (a = sqrt(5),
bound 1 / sqrt(r/2)) and repeated; H_i H_i = I, so the chain is the identity and the
outputs are unchanged at attach. r must be even for it. ``init_weights=False`` draws all
r columns independently (bound 1 / sqrt(r)): outputs change at attach. Both are drawn on
the CPU from torch's global generator as the peft package draws them, so the same seed
gives the same vectors in both libraries.

``apply_GS``: the vectors are orthonormalised in order (Gram-Schmidt, here a QR, whose
Q Q^T is the same) into Q (in x r), and H = I - 2 Q Q^T, a single reflection of Q's span.
It is never the identity, and the paired init makes Q degenerate (peft's outputs turn
NaN), so apply_GS needs init_weights=False.

Merging writes W <- W H (transposed for GPT-2's Conv1D, whose weight is stored in x out);
unmerging W <- W H^T, exact up to rounding since H^T H = I.

On an nn.Conv2d (groups = 1) a vector has in_channels x kh x kw entries, one per weight entry
of an output channel, and the chain multiplies the weight flattened to (out, in x kh x kw);
the forward convolves with that turned weight, as a patch of the input is not a row to
reflect.

Files are peft's ``HRA``: per target ``...<module>.hra_u`` [in, r] (a Conv2d's [in x kh x kw, r]).
peft's HRA takes nn.Linear and square-kernel Conv2d; deltatune also takes GPT-2's Conv1D
(and non-square kernels), files peft cannot load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..config import DeltaConfig, DeltaError, Method, check, register
from ..surgery import DeltaLayer, float_or_quantized, is_conv1d, wrap
from ..targets import default_targets, select_targets


@dataclass(kw_only=True)
class HRAConfig(DeltaConfig):
    """r: reflections per target (even with init_weights); apply_GS: orthonormalise the vectors
    first (H = I - 2 Q Q^T; needs init_weights=False); init_weights: equal pairs of vectors, so the
    chain starts as the identity (False: independent random vectors, outputs change at attach)."""

    method = "hra"
    peft_type = "HRA"

    r: int = check(8, gt=0)
    apply_GS: bool = False
    target_modules: list[str] | str | None = check(None, regex=True)
    exclude_modules: list[str] | str | None = check(None, regex=True)
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = check(None, ge=0)
    layers_pattern: list[str] | str | None = None


def supports(module: nn.Module) -> bool:
    # bitsandbytes' quantised layers subclass nn.Linear; other integer weights are refused; a grouped
    # convolution's weight sees only part of the input channels, so one chain over all of them does not fit it
    conv = isinstance(module, nn.Conv2d) and module.groups == 1
    return (isinstance(module, nn.Linear) or is_conv1d(module) or conv) and float_or_quantized(module)


def in_features(module: nn.Module) -> int:
    """Length of a reflection vector: the input features, or a Conv2d's in_channels x kh x kw (one patch)."""
    module = module.base_layer if isinstance(module, DeltaLayer) else module
    if isinstance(module, nn.Conv2d):
        return module.weight[0].numel()
    return module.weight.shape[0] if is_conv1d(module) else module.in_features


def initial_vectors(n: int, r: int, paired: bool, device: torch.device) -> torch.Tensor:
    """(n, r): Kaiming-uniform (a = sqrt(5)) columns, in equal adjacent pairs when `paired`; drawn on
    the CPU from the global generator, the draws peft makes (nothing is drawn on the meta device)."""
    cols = r // 2 if paired else r
    if device.type == "meta":
        return torch.empty(n, r, device=device)
    bound = 1.0 / math.sqrt(cols)  # gain sqrt(2 / (1 + 5)) * sqrt(3 / fan_in), fan_in = cols
    u = torch.empty(n, cols).uniform_(-bound, bound)  # (n, cols)
    if paired:
        u = torch.repeat_interleave(u, 2, dim=1)  # (n, r): u_1 = u_2, u_3 = u_4, ...
    return u.to(device)


class HRALayer(DeltaLayer):
    """Wraps an nn.Linear (quantised or not), a GPT-2 Conv1D or an nn.Conv2d; r reflection vectors per adapter."""

    containers = ("hra_u",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hra_u = nn.ParameterDict()  # adapter -> (in, r), one vector per column
        self.apply_GS: dict[str, bool] = {}

    def add(self, name: str, config: HRAConfig, module_name: str) -> None:
        device = self.device_of()
        # Trainable parameters are fp32 whatever the base dtype.
        u = initial_vectors(in_features(self.base_layer), config.r, config.init_weights, device)
        self.hra_u[name] = nn.Parameter(u.float())
        self.apply_GS[name] = config.apply_GS

    def remove(self, name: str, keep_merged: bool = False) -> None:
        super().remove(name, keep_merged)
        self.apply_GS.pop(name, None)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, D), both (in, r), with H = I - A D^T: the chain H_1 ... H_r in compact form, so that
        H x costs two thin matmuls rather than r passes over x. D holds the unit directions û_i; A's
        columns follow from (I - A D^T) H_k = I - [A, a_k] [D, û_k]^T with a_k = 2 (û_k - A (D^T û_k)).
        With apply_GS, D is the orthonormal Q of the vectors in order and A = 2 Q (H = I - 2 Q Q^T)."""
        u = self.hra_u[name]
        if self.apply_GS[name]:
            q, _ = torch.linalg.qr(u)  # Q Q^T is Gram-Schmidt's projection whatever Q's column signs
            return 2 * q, q
        d = u / u.norm(dim=0)  # (in, r)
        cols: list[torch.Tensor] = []
        for k in range(d.shape[1]):
            a = 2 * d[:, k]  # (in,)
            if cols:
                done = torch.stack(cols, dim=1)  # (in, k)
                a = a - done @ (d[:, :k].T @ a)
            cols.append(a)
        return torch.stack(cols, dim=1), d

    # ------------------------------------------------------------ forward
    def reflect(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """H x for adapter `name` (x: (..., in)), in x's dtype: x - A (D^T x), as rows x - (x D) A^T."""
        a, d = self.factors(name)
        if a.dtype != x.dtype:  # fp32 trainables, half-precision base: compute in the base's dtype
            a, d = a.to(x.dtype), d.to(x.dtype)
        return x - (x @ d) @ a.T  # (..., r) -> (..., in)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        groups = self.batch_groups(x.shape[0]) if self.model_state is not None and self.model_state.batch_adapters is not None else None
        if isinstance(self.base_layer, nn.Conv2d):
            return self.conv_forward(x, groups)
        if groups is not None:  # each row through its own adapter's chain only
            for name, rows in groups:
                x = x.index_copy(0, rows, self.reflect(name, x[rows]))
        else:
            for name in reversed(self.live):  # W H_a H_b x: b's chain first
                x = self.reflect(name, x)
        return self.base_layer(x, *args, **kwargs)

    def conv_forward(self, x: torch.Tensor, groups: list[tuple[str, torch.Tensor]] | None) -> torch.Tensor:
        """A Conv2d: a patch is not an input row, so the chain goes into the weight, W H over (out, in x kh x kw)."""
        conv = self.base_layer
        if groups is None:
            if not self.live:
                return conv(x)
            return conv._conv_forward(x, self.turned_weight(self.live, x.dtype), conv.bias)
        result = conv(x)  # rows of "__base__" (or of another method)
        for name, rows in groups:
            result = result.index_copy(0, rows, conv._conv_forward(x[rows], self.turned_weight([name], x.dtype), conv.bias))
        return result

    def turned_weight(self, names: Sequence[str], dtype: torch.dtype) -> torch.Tensor:
        """The base weight times the chains of `names` in order (differentiable), shaped as the base stores it."""
        weight = self.base_layer.weight
        h = None
        for name in names:
            one = self.reflection(name, grad=True)
            h = one if h is None else h @ one
        return (weight.reshape(weight.shape[0], -1).to(dtype) @ h.to(dtype)).view(weight.shape)  # (out, in, kh, kw)

    # ------------------------------------------------------------ merge
    def reflection(self, name: str, grad: bool = False) -> torch.Tensor:
        """H = H_1 ... H_r (or I - 2 Q Q^T) as an (in, in) fp32 matrix (`grad`: kept in the autograd graph)."""
        a, d = self.factors(name)
        if not grad:
            a, d = a.detach(), d.detach()
        return torch.eye(d.shape[0], device=d.device) - a.float() @ d.float().T

    def merge_delta(self, name: str) -> None:
        self._multiply(self.reflection(name))

    def unmerge_delta(self, name: str) -> None:
        self._multiply(self.reflection(name).T)

    def _multiply(self, h: torch.Tensor) -> None:
        """W <- W h, W as (out, in) (a Conv2d's as (out, in x kh x kw))."""
        with torch.no_grad():
            weight = self.base_weight().float()
            self.set_base_weight((weight.reshape(weight.shape[0], -1) @ h).view(weight.shape))


def attach(model: nn.Module, config: HRAConfig, name: str) -> HRAConfig:
    if config.init_weights and config.apply_GS:
        raise DeltaError("HRAConfig(apply_GS=True) needs init_weights=False: the default init repeats each vector "
                         "once, and Gram-Schmidt of a repeated vector divides by zero")
    if config.init_weights and config.r % 2:
        raise DeltaError(f"HRAConfig(r={config.r}): r must be even with init_weights=True, which pairs equal "
                         "reflections so that they cancel at attach; use an even r, or init_weights=False for "
                         "random vectors (outputs change at attach)")
    targets = config.target_modules if config.target_modules is not None else default_targets("hra", model)
    names = select_targets(model, targets, supported=supports, method="hra", exclude_modules=config.exclude_modules,
                           layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern)
    config = config.replace(target_modules=targets)
    wrap(model, names, HRALayer, name, config)
    return config


HRA = register(
    # a load overwrites the vectors: draw them freely (an odd r or apply_GS from a peft file loads)
    Method(name="hra", config_cls=HRAConfig, kind="wrap", attach=attach, containers=HRALayer.containers, per_row=True,
           peft_compatible=True, load_overrides={"init_weights": False})
)
