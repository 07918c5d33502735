"""The merged export: base + delta folded into one model in the standard transformers layout,
which `AutoModel...from_pretrained` loads without deltatune installed."""

from __future__ import annotations

import copy
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import api, quant
from ..config import DeltaError
from ..files import WriteFailed, replace_tree, size_text, tensor_bytes, write_failure
from ..surgery import dequantize_base


def merged_model(model: torch.nn.Module, dtype: torch.dtype | None = None, in_place: bool = False) -> torch.nn.Module:
    """`model` with its active deltas folded into its weights and detached: a plain transformers model. A copy
    unless in_place=True. A quantised base is dequantised first (see export_merged); `dtype` converts the result."""
    merged = model if in_place else copy.deepcopy(model)
    if quant.quantized_layers(merged):
        state = api.get_state(merged)
        if state is not None and state.merged():
            api.unmerge(merged)  # the quantised tensors from before the merge come back exactly
        dtype = dtype or _loaded_dtype(merged)
        dequantize_base(merged, dtype)
    state = api.get_state(merged)
    if state is not None and state.deltas:
        not_mergeable = [n for n in state.active if not state.deltas[n].method.mergeable]
        if not_mergeable:
            delta = state.deltas[not_mergeable[0]]
            raise DeltaError(f"delta {not_mergeable[0]!r} ({delta.method.name}) adds inputs rather than weights, so it "
                             "cannot be merged into a plain model; share the base and the adapter instead")
        for name in [n for n in state.deltas if n not in state.active]:
            api.detach(merged, name)
        if api.get_state(merged) is not None and api.get_state(merged).deltas:  # none active (dt.disabled): the base
            api.detach(merged, merge=True, untie=True)
    if dtype is not None:
        merged = merged.to(dtype)
    return merged


def export_merged(model: torch.nn.Module, tokenizer: Any, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                  in_place: bool = False) -> Path:
    """Write `model` with its active deltas merged, atomically (a temporary folder renamed into place).

    The model is left as it was, at the cost of a copy, unless in_place=True (then its
    deltas are merged and detached: what `deltatune merge` does with a model it loaded).

    A quantised base (bitsandbytes) is dequantised first, to `dtype` (default: the dtype the
    model was loaded in), and the deltas merged into those full-precision weights: the export
    computes what base + delta computed, with no re-quantisation error, and loads as a plain model.
    """
    folder = Path(folder)
    merged = merged_model(model, dtype, in_place)
    tmp = folder.with_name(f".{folder.name}.tmp-{secrets.token_hex(4)}")
    try:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_tree(tmp, folder)  # the caller decided that `folder` may be replaced (check_output_folder)
    except Exception as err:  # noqa: BLE001 - matched by what it says (files.write_failure), not by its class
        failure = write_failure(err)
        if failure is None:
            raise
        kept = f"{folder} is as it was" if folder.exists() else f"nothing is at {folder}"
        raise WriteFailed(f"{failure[0]}: writing the merged model into {folder} failed; it needs about "
                          f"{size_text(tensor_bytes(merged.parameters()))}. Nothing was half-written: {kept}.\n"
                          f"To finish: {failure[1]}, then merge again", failure) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _loaded_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model was loaded in (transformers records it in the config), else fp32."""
    value = getattr(getattr(model, "config", None), "dtype", None) or getattr(getattr(model, "config", None), "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32
