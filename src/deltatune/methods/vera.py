"""VeRA: two trained vectors per layer around one frozen random pair shared by all layers.

Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation". One pair of frozen
random matrices is shared by every adapted layer of a delta, sized for the largest one:
A (r x in_max) and B (out_max x r). Each layer of shape (out x in) uses their top-left
corner and trains two vectors, lambda_d (r) and lambda_b (out):

    h = W0 x + lambda_b ⊙ (B[:out, :] (lambda_d ⊙ (A[:, :in] dropout(x))))

so a layer trains r + out parameters (LoRA: r (in + out)); on Llama-3.2-3B's q and v
projections at r = 256, 28 x (2 x 256 + 3072 + 1024) = 129,024 parameters.

A and B come from a CPU torch.Generator seeded with ``projection_prng_key``: A first, then
B, each uniform in ±sqrt(3) · sqrt(2) / sqrt(fan_in) (Kaiming-uniform with gain sqrt(2);
fan_in is in_max for A and r for B), as the peft package draws them, so the same config and
seed give the same matrices in both libraries. lambda_b starts at zero (outputs are unchanged
at attach) and lambda_d at ``d_initial`` (0.1).

Merging adds ΔW = diag(lambda_b) B[:out, :] diag(lambda_d) A[:, :in] to W0 (transposed for
GPT-2's Conv1D, whose weight is stored in x out); unmerging subtracts it.

Files are peft's: per layer ``...<module>.vera_lambda_b`` [out] and ``vera_lambda_d`` [r],
and with ``save_projection`` (the default) the shared ``base_model.vera_A`` [r, in_max] and
``base_model.vera_B`` [out_max, r]. A file without them regenerates A and B from the seed.
The pair lives at the model root (``vera_projections.<adapter>``, non-persistent buffers, so
neither the base model's state dict nor ``model.to`` needs to know about it); each layer keeps
a plain reference to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DeltaConfig, DeltaError, Method, check, register
from ..surgery import DeltaLayer, float_or_quantized, is_conv1d, root_container, wrap
from ..targets import default_targets, select_targets

ROOT = "vera_projections"  # the model-root ModuleDict: adapter -> Projection
FILE_A, FILE_B = "base_model.vera_A", "base_model.vera_B"  # peft's keys for the shared pair


@dataclass(kw_only=True)
class VeraConfig(DeltaConfig):
    """r: rows of A (columns of B), larger than a LoRA rank since only vectors train (peft's
    default 256); projection_prng_key: the seed A and B are drawn from; save_projection: write
    A and B into the file (else a load regenerates them from the seed); d_initial: lambda_d's
    start value. init_weights=False starts lambda_b at ones and lambda_d random (outputs change)."""

    method = "vera"
    peft_type = "VERA"

    r: int = check(256, gt=0)
    target_modules: list[str] | str | None = check(None, regex=True)
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = check(0.0, ge=0, lt=1)
    d_initial: float = 0.1
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = check(None, ge=0)
    layers_pattern: list[str] | str | None = None
    # Set at attach, not by hand: True when the targets are GPT-2 Conv1D ([in, out] weights); peft reads it.
    fan_in_fan_out: bool = False


def supports(module: nn.Module) -> bool:
    # bitsandbytes' quantised layers subclass nn.Linear; other integer weights are refused
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and float_or_quantized(module)


def out_in(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear (quantised or not) or a GPT-2 Conv1D, wrapped or not."""
    module = module.base_layer if isinstance(module, DeltaLayer) else module
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return out_f, in_f
    return module.out_features, module.in_features


def _uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with gain sqrt(2) over fan_in = shape[1], drawn from `generator`."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, out_max: int, in_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (A (r, in_max), B (out_max, r)) for a seed, the same draws as peft's."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    A = _uniform((r, in_max), generator)
    B = _uniform((out_max, r), generator)
    return A, B


class Projection(nn.Module):
    """One delta's frozen pair, as non-persistent buffers (never trained, never in the base's state dict)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vera_A", A, persistent=False)  # (r, in_max)
        self.register_buffer("vera_B", B, persistent=False)  # (out_max, r)


class VeraLayer(DeltaLayer):
    """Wraps an nn.Linear or a GPT-2 Conv1D; two vectors per adapter over its delta's shared pair."""

    containers = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.dropout: dict[str, float] = {}
        # adapter -> its Projection at the model root; a plain dict, so not a submodule here
        self.projection: dict[str, Projection] = {}

    def add(self, name: str, config: VeraConfig, module_name: str, projection: Projection) -> None:
        out_f, in_f = out_in(self.base_layer)
        A, B = projection.vera_A, projection.vera_B
        if A.shape[1] < in_f or B.shape[0] < out_f or A.shape[0] != config.r:
            raise DeltaError(f"{module_name} is ({out_f} x {in_f}) but VeRA's shared projections are A "
                             f"{list(A.shape)}, B {list(B.shape)}; this is a bug, please report it")
        # Trainable parameters are fp32 whatever the base dtype.
        kw = dict(device=A.device, dtype=torch.float32)
        if config.init_weights:
            lambda_b, lambda_d = torch.zeros(out_f, **kw), torch.full((config.r,), float(config.d_initial), **kw)
        else:
            lambda_b, lambda_d = torch.ones(out_f, **kw), torch.randn(config.r, **kw)
        self.vera_lambda_b[name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[name] = nn.Parameter(lambda_d)
        self.dropout[name] = config.dropout
        self.projection[name] = projection

    def remove(self, name: str, keep_merged: bool = False) -> None:
        super().remove(name, keep_merged)
        self.dropout.pop(name, None)
        self.projection.pop(name, None)

    def sliced(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:, :in] (r, in), B[:out, :] (out, r)) for this layer."""
        out_f, in_f = out_in(self.base_layer)
        projection = self.projection[name]
        return projection.vera_A[:, :in_f], projection.vera_B[:out_f, :]

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.add_live(x, self.base_layer(x, *args, **kwargs))

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        p = self.dropout[name]
        h = F.dropout(x, p, training=True) if p and self.training else x
        A, B = self.sliced(name)
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        dtype = h.dtype  # fp32 trainables, half-precision base: compute in the base's dtype
        A, B, lambda_b, lambda_d = (t if t.dtype == dtype else t.to(dtype) for t in (A, B, lambda_b, lambda_d))
        low = F.linear(h, A) * lambda_d  # (..., r)
        return result + (F.linear(low, B) * lambda_b).to(result.dtype)  # (..., out)

    # ------------------------------------------------------------ merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """diag(lambda_b) B A diag(lambda_d) as (out, in), in fp32."""
        A, B = self.sliced(name)
        lambda_b, lambda_d = self.vera_lambda_b[name].float(), self.vera_lambda_d[name].float()
        return (lambda_b.unsqueeze(1) * B.float()) @ (lambda_d.unsqueeze(1) * A.float())

    def merge_delta(self, name: str) -> None:
        self.add_to_base_weight(self.delta_weight(name))

    def unmerge_delta(self, name: str) -> None:
        self.add_to_base_weight(-self.delta_weight(name))


def attach(model: nn.Module, config: VeraConfig, name: str) -> VeraConfig:
    targets = config.target_modules if config.target_modules is not None else default_targets("vera", model)
    names = select_targets(model, targets, supported=supports, method="vera",
                           layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern)
    shapes = [out_in(model.get_submodule(n)) for n in names]
    out_max, in_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    A, B = projections(config.r, out_max, in_max, config.projection_prng_key)
    device = next((p.device for n in names for p in model.get_submodule(n).parameters()), torch.device("cpu"))
    projection = Projection(A.to(device), B.to(device))
    root_container(model, ROOT, kind=nn.ModuleDict)[name] = projection
    config = config.replace(target_modules=targets)
    wrap(model, names, VeraLayer, name, config, per_module={n: {"projection": projection} for n in names})
    conv1d = any(is_conv1d(model.get_submodule(n).base_layer) for n in names)
    return config.replace(fan_in_fan_out=conv1d)


def _projection(model: nn.Module, name: str) -> Projection:
    return root_container(model, ROOT, create=False)[name]


def to_file(model: nn.Module, name: str, config: VeraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's layout: the shared pair under base_model.vera_A / vera_B when save_projection."""
    if not config.save_projection:
        return tensors
    projection = _projection(model, name)
    return {**tensors, FILE_A: projection.vera_A.detach().to("cpu", torch.float32, copy=True).contiguous(),
            FILE_B: projection.vera_B.detach().to("cpu", torch.float32, copy=True).contiguous()}


def from_file(model: nn.Module, name: str, config: VeraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load the file's pair into the delta's projection (a file without one keeps the pair drawn from the seed)."""
    rest = {k: v for k, v in tensors.items() if k not in (FILE_A, FILE_B)}
    if (FILE_A in tensors) != (FILE_B in tensors):
        raise DeltaError(f"the VeRA file has only one of {FILE_A} and {FILE_B}; it was damaged or edited by hand")
    if FILE_A not in tensors:
        return rest
    projection = _projection(model, name)
    for key, buffer in ((FILE_A, projection.vera_A), (FILE_B, projection.vera_B)):
        if tuple(tensors[key].shape) != tuple(buffer.shape):
            raise DeltaError(f"the VeRA adapter does not fit {type(model).__name__}: key {key} has shape "
                             f"{list(tensors[key].shape)} in the file but {list(buffer.shape)} in the model (the shared "
                             "projection, sized for the largest target); was it saved for another model?")
    with torch.no_grad():
        projection.vera_A.copy_(tensors[FILE_A])
        projection.vera_B.copy_(tensors[FILE_B])
    return rest


VERA = register(
    Method(name="vera", config_cls=VeraConfig, kind="wrap", attach=attach, containers=VeraLayer.containers, per_row=True,
           peft_compatible=True, to_file=to_file, from_file=from_file, root_modules=(ROOT,))
)
