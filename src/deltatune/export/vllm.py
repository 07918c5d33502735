"""A LoRA adapter folder that vLLM (and TGI, LoRAX, SGLang) serve as they are, and the command line to serve it.

deltatune's own adapter folders are already peft's format, but servers read less of that format than peft does.
vLLM computes every module's scale from the file-wide `lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`), refuses
DoRA and adapters that carry whole modules (`modules_to_save`, e.g. a retrained `lm_head`), and loads only plain
LoRA on the unchanged base. So this writes the same update in the plainest form every reader agrees on:

  * each module's scale s_m (alpha/r, alpha/sqrt(r), `alpha_pattern`, `rank_pattern`) is folded into its B,
    B' = s_m·B, and the config says `lora_alpha = r`, `use_rslora: false`: a scale of exactly 1 whichever way a
    reader computes it. Where ranks differ per module, `rank_pattern` and `alpha_pattern` carry the same number,
    so a reader that honours them also gets 1, and one that reads ranks from the tensors' shapes too;
  * PiSSA and OLoRA (their base was rewritten) are written relative to the original base, as a LoRA of rank 2r
    (io.save's relative_to_original);
  * what no server reads is refused with the alternative: DoRA, embedding LoRAs, `modules_to_save`, and every
    method other than LoRA (merge them: `deltatune merge`).
The check loads the folder back through deltatune's peft reader onto the base and compares logits with the model
it came from (tests do the same through the real peft package).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..api import get_state
from ..config import DeltaError
from .drift import Drift, compare_logits

# vLLM accepts --max-lora-rank only from this list (its LoRAConfig check)
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class VllmExport:
    folder: Path
    rank: int  # the largest rank in the folder
    max_lora_rank: int | None  # the smallest --max-lora-rank vLLM accepts for it (None: above vLLM's largest)
    modules: int
    drift: Drift | None

    def command(self, base: str, name: str, folder: str | os.PathLike | None = None) -> str:
        """The `vllm serve` line for the folder (or `folder`, where it was moved); vLLM's default rank limit is 16."""
        rank = f" --max-lora-rank {self.max_lora_rank}" if self.max_lora_rank and self.max_lora_rank > 16 else ""
        return f"vllm serve {base} --enable-lora --lora-modules {name}={folder or self.folder}{rank}"


def _check(model: torch.nn.Module, name: str) -> Any:
    state = get_state(model)
    if state is None or name not in state.deltas:
        raise DeltaError(f"the model has no delta {name!r} to write")
    delta = state.deltas[name]
    config = delta.config
    if delta.method.name != "lora":
        raise DeltaError(f"delta {name!r} is {delta.method.name}: vLLM serves LoRA adapters only; fold it into the "
                         "base with `deltatune merge` and serve the merged model")
    if config.use_dora:
        raise DeltaError(f"delta {name!r} is DoRA, which vLLM does not serve; merge it (`deltatune merge`) and serve "
                         "the merged model")
    if config.modules_to_save:
        raise DeltaError(f"delta {name!r} trains whole modules too ({', '.join(config.modules_to_save)}), which vLLM "
                         "refuses in an adapter; merge it (`deltatune merge`) and serve the merged model")
    if delta.merged:
        raise DeltaError(f"delta {name!r} is merged into the weights; unmerge it (dt.unmerge) before writing it alone")
    return delta


def export_vllm(model: torch.nn.Module, folder: str | os.PathLike, name: str = "default", check: bool = True) -> VllmExport:
    """Write delta `name` of `model` into `folder` in the form vLLM serves (see the module docstring). With `check`,
    load the folder onto the base (the model with its deltas off) and measure the drift from `model` with `name`
    active."""
    from ..io import _write_adapter, delta_state_dict
    from ..formats.peft import config_to_file

    delta = _check(model, name)
    config, tensors = delta.config, delta_state_dict(model, name)
    if delta.rewrites:  # PiSSA / OLoRA: the same update on the original base, at rank 2r
        config, tensors = delta.method.to_original_base(model, name, config, tensors)
    if any(".lora_embedding_" in key for key in tensors):
        raise DeltaError(f"delta {name!r} adapts an embedding; vLLM serves LoRA on linear layers only. Merge it "
                         "(`deltatune merge`) and serve the merged model")
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[: -len(".lora_A.weight")]
        module = stem.removeprefix("base_model.model.")
        B = tensors[f"{stem}.lora_B.weight"]
        scale = model.get_submodule(module).scaling[name]  # PiSSA's rank-2r form keeps the same scale
        out[key] = A.contiguous()
        out[f"{stem}.lora_B.weight"] = (B.float() * scale).to(B.dtype).contiguous()  # (out, r): s_m folded in
        ranks[module] = A.shape[0]
    if not ranks:
        raise DeltaError(f"delta {name!r} holds no LoRA weights to write")
    rank = max(ranks.values())
    # the full module path anchors each pattern to its one module (patterns match the end of a module name)
    pattern = {module: r for module, r in ranks.items() if r != rank}
    plain = config.replace(r=rank, alpha=float(rank), use_rslora=False, rank_pattern=dict(pattern),
                           alpha_pattern={module: float(r) for module, r in pattern.items()}, init="kaiming",
                           pissa_niter=None)
    folder = Path(folder)
    _write_adapter(folder, config_to_file(plain), out, peft_compatible=True)
    allowed = next((r for r in VLLM_MAX_RANKS if r >= rank), None)
    drift = measure_adapter_drift(model, folder, name) if check else None
    return VllmExport(folder, rank, allowed, len(ranks), drift)


@torch.no_grad()
def measure_adapter_drift(model: torch.nn.Module, folder: str | os.PathLike, name: str = "default") -> Drift:
    """The written folder loaded onto the original base, against `model` running delta `name` alone."""
    from ..api import active, disabled, set_active
    from ..io import load
    from ..pipeline.export import merged_model

    with disabled(model):
        base = merged_model(model)  # a plain copy of the original base (PiSSA's rewrite undone while disabled)
    load(base, folder)
    before = active(model)
    set_active(model, name)
    try:
        return compare_logits(model, base.eval(), None)
    finally:
        set_active(model, before)
