"""FourierFT: a weight update learned as a few coefficients of its 2-D Fourier spectrum.

Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform". For a
frozen weight W0 (out x in), n spectral entries at fixed random locations E = {(j_k, l_k)}
train; every other entry of the spectrum F is zero:

    F[j_k, l_k] = c_k  (k = 1..n),   ΔW = s * Re(IDFT2(F)),   h = W0 x + ΔW x

with IDFT2 normalised by 1/(out * in) (torch.fft.ifft2's default), s the `scaling`. ΔW is dense
although only n numbers train: n per targeted layer, whatever its shape (LoRA's r(in + out)).
On Llama-3.2-3B's q and v projections with n = 1000: 2 x 28 x 1000 = 56,000 parameters.

The locations are the first n of a random permutation of the out * in positions, drawn from a
torch.Generator seeded with `random_loc_seed` (row = p // in, column = p % in), exactly as peft
draws them: the same seed gives the same locations in both libraries, and the file holds only
the coefficients (``fourierft_spectrum``, shape [n]). The coefficients start standard normal
(peft's default, so outputs change at attach) or at zero with ``init_weights=True``.

On nn.Linear and GPT-2's Conv1D (a quantised bitsandbytes base through its dequantised weight).
ΔW is computed in fp32 (the FFT does not take half precision) and applied in the base's dtype.
Merging adds ΔW to the weight in its own layout (transposed for Conv1D); unmerging subtracts the
same ΔW, recomputed from the same coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DeltaConfig, DeltaError, Method, check, register
from ..surgery import DeltaLayer, float_or_quantized, is_conv1d, wrap
from ..targets import default_targets, pattern_value, select_targets


@dataclass(kw_only=True)
class FourierFTConfig(DeltaConfig):
    """n_frequency: trained spectral coefficients per targeted layer (at most out * in); scaling: s
    (the paper uses 100-150 for RoBERTa, 300 for LLaMA and ViT); random_loc_seed: seeds where the
    coefficients sit; init_weights: False starts them N(0, 1) (peft's default), True at zero
    (outputs unchanged at attach). n_frequency_pattern: {regex on the end of a module name: n}.
    target_modules: names, a regex string or "all-linear"; None takes peft's per-architecture
    default (LoRA's, GPT-2's mlp.c_proj)."""

    method = "fourierft"
    peft_type = "FOURIERFT"

    n_frequency: int = check(1000, gt=0)
    scaling: float = 150.0
    random_loc_seed: int = 777
    init_weights: bool = False
    target_modules: list[str] | str | None = check(None, regex=True)
    exclude_modules: list[str] | str | None = check(None, regex=True)
    layers_to_transform: list[int] | int | None = check(None, ge=0)
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict[str, int] = check(default_factory=dict, gt=0, regex=True)
    # Set at attach, not by hand: True when the targets are GPT-2 Conv1D ([in, out] weights); peft reads it.
    fan_in_fan_out: bool = False


def supports(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and float_or_quantized(module)


def spectral_locations(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) row and column indices of the n trained entries in the (out, in) spectrum (peft's draw)."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


class FourierFTLayer(DeltaLayer):
    """Wraps an nn.Linear or a GPT-2 Conv1D; n spectral coefficients per adapter."""

    containers = ("fourierft_spectrum",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fourierft_spectrum = nn.ParameterDict()
        self.indices: dict[str, torch.Tensor] = {}  # (2, n) locations, fixed by the seed (not saved)
        self.scaling: dict[str, float] = {}

    def add(self, name: str, config: FourierFTConfig, module_name: str) -> None:
        out_f, in_f = self.base_weight_shape()
        n = pattern_value(module_name, config.n_frequency_pattern, config.n_frequency)
        if n > out_f * in_f:
            raise DeltaError(f"FourierFTConfig.n_frequency = {n} is more than the {out_f} x {in_f} = {out_f * in_f} "
                             f"entries of {module_name}'s spectrum; lower it (or set n_frequency_pattern for this module)")
        device = self.base_layer.weight.device
        self.indices[name] = spectral_locations(out_f, in_f, n, config.random_loc_seed).to(device)
        self.scaling[name] = config.scaling
        kw = dict(device=device, dtype=torch.float32)  # trainables are fp32 whatever the base dtype
        self.fourierft_spectrum[name] = nn.Parameter(torch.zeros(n, **kw) if config.init_weights else torch.randn(n, **kw))

    def remove(self, name: str, keep_merged: bool = False) -> None:
        super().remove(name, keep_merged)
        self.indices.pop(name, None)
        self.scaling.pop(name, None)

    # ------------------------------------------------------------ math
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * Re(IDFT2(F)) as (out, in), fp32."""
        spectrum = self.fourierft_spectrum[name]
        indices = self.indices[name]
        if indices.device != spectrum.device:  # the model moved after attach: move the locations once
            indices = self.indices[name] = indices.to(spectrum.device)
        rows, cols = indices
        dense = torch.zeros(self.base_weight_shape(), device=spectrum.device, dtype=torch.float32)  # (out, in)
        dense[rows, cols] = spectrum.float()
        return torch.fft.ifft2(dense).real * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.add_live(x, self.base_layer(x, *args, **kwargs))

    def add_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + F.linear(x, self.delta_weight(name).to(x.dtype)).to(result.dtype)

    # ------------------------------------------------------------ merge
    def merge_delta(self, name: str) -> None:
        self.add_to_base_weight(self.delta_weight(name))

    def unmerge_delta(self, name: str) -> None:
        self.add_to_base_weight(-self.delta_weight(name))


def attach(model: nn.Module, config: FourierFTConfig, name: str) -> FourierFTConfig:
    targets = config.target_modules if config.target_modules is not None else default_targets("fourierft", model)
    names = select_targets(model, targets, supported=supports, method="fourierft", exclude_modules=config.exclude_modules,
                           layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern)
    wrap(model, names, FourierFTLayer, name, config)
    conv1d = any(is_conv1d(model.get_submodule(n).base_layer) for n in names)
    return config.replace(target_modules=targets, fan_in_fan_out=conv1d)


# The file's coefficients overwrite the init: skip drawing random ones (the locations come from the seed).
FOURIERFT = register(
    Method(name="fourierft", config_cls=FourierFTConfig, kind="wrap", attach=attach, containers=FourierFTLayer.containers,
           per_row=True, peft_compatible=True, load_overrides={"init_weights": True})
)
