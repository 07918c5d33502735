"""Quantised frozen bases through bitsandbytes: QLoRA and LLM.int8().

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") keeps the
frozen base in 4 bits and trains a 16/32-bit delta on top. A weight W (out x in) is
flattened and cut into blocks of 64; each block stores one absmax scale and, per weight,
the index of the nearest of 16 code values times that scale:

    W[b] ~ absmax[b] * code[q],   q in 0..15
    NF4: the 16 quantiles of N(0, 1) rescaled to [-1, 1] (exact zero included)
    FP4: a 4-bit float (1 sign, 2 exponent, 1 mantissa bit)

Double quantisation stores the fp32 absmax themselves in 8 bits, in blocks of 256 with one
fp32 scale each (after subtracting their mean). Storage per weight:

    4 + 32/64 = 4.5 bits;   with double quantisation 4 + 8/64 + 32/(64*256) ~ 4.127 bits

plus a few constant tables per layer (the 16-entry code, the 256-entry code of the second
quantisation, its offset); see `weight_bytes_formula`. LLM.int8() (Dettmers et al. 2022)
stores int8 per output row with one fp32 row scale, W ~ CB * SCB/127 (8 + 32/in bits per
weight); at inference, input columns holding an outlier above `int8_threshold` run in 16-bit.

The delta stays fp32 and computes in the activations' dtype. The base layer computes
itself: its kernel dequantises block by block, so no dequantised copy of a weight is ever
kept. Only merge, DoRA's weight norm and LoftQ's initialisation need the (out, in) weight
as numbers: `dequantize_weight` makes a temporary fp32 copy for them (DeltaLayer.base_weight
calls it), and `quantize_weight_` writes a merged weight back in the layer's own format.

bitsandbytes runs on the CPU too (>= 0.45; measured with 0.50). On a CPU with AVX512-BF16 it
rewrites a 4-bit layer in place into a faster inference layout the first time the layer
runs in eval mode without gradients; that layout rounds the scales to bf16 and has no
backward, so a later training step fails. `keep_trainable_layout` turns it off (and undoes
it) for the layers deltatune touches: `load_base`, `prepare_kbit` and every wrapped layer.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from .config import DeltaError, reading
from .model_files import BASE_LOAD_KWARGS

KINDS = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # transformers' 4-bit quantisation always uses bitsandbytes' default block
NESTED_BLOCKSIZE = 256  # double quantisation: absmax quantised in blocks of 256
OPTIMIZERS = {"adamw8bit": "AdamW8bit", "adam8bit": "Adam8bit", "paged_adamw8bit": "PagedAdamW8bit",
              "paged_adamw": "PagedAdamW", "paged_adamw32bit": "PagedAdamW32bit"}
# Heads a sequence classifier trains whole: kept in full precision, as QLoRA keeps the output head.
CLASSIFIER_HEADS = ("classifier", "score", "qa_outputs")


def bnb() -> Any:
    """The bitsandbytes module, with a clear error when it is missing."""
    try:
        import bitsandbytes
    except ImportError:
        raise DeltaError("quantised bases need bitsandbytes: pip install 'deltatune[quant]' "
                         "(or pip install bitsandbytes)") from None
    return bitsandbytes


# ---------------------------------------------------------------- what a layer is


def _bnb_loaded() -> Any:
    """bitsandbytes if it was imported (a quantised layer cannot exist otherwise), else None."""
    return sys.modules.get("bitsandbytes")


def is_quantized(module: nn.Module) -> bool:
    """Is `module` a bitsandbytes 4-bit or 8-bit linear layer?"""
    lib = _bnb_loaded()
    return lib is not None and isinstance(module, (lib.nn.Linear4bit, lib.nn.Linear8bitLt))


def quant_kind(module: nn.Module) -> str | None:
    """"nf4", "fp4" or "int8" for a bitsandbytes layer, else None."""
    if not is_quantized(module):
        return None
    if isinstance(module, _bnb_loaded().nn.Linear8bitLt):
        return "int8"
    state = _quant_state(module)
    return state.quant_type if state is not None else module.weight.quant_type


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_quantized(m)]


def _quant_state(module: nn.Module) -> Any:
    return getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)


def _is_4bit(module: nn.Module) -> bool:
    return isinstance(module, _bnb_loaded().nn.Linear4bit)


def _int8_scales(module: nn.Module) -> torch.Tensor:
    """The fp32 row scales (out,) of an 8-bit layer: on the weight before its first forward, on its state after."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


# ---------------------------------------------------------------- the CPU inference layout


def keep_trainable_layout(module: nn.Module) -> None:
    """Stop bitsandbytes from switching a 4-bit layer to its CPU inference layout, and undo that switch.

    The CPU layout (AVX512-BF16 machines, eval mode, no gradients) rounds the absmax scales to
    bf16 and has no backward; a model that evaluated once could then no longer train."""
    if not is_quantized(module) or not _is_4bit(module):
        return
    module.support_avx512bf16_for_cpu = False
    state = _quant_state(module)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        module.weight.quant_state = module.quant_state = state


def keep_trainable_layouts(model: nn.Module) -> None:
    for _, module in quantized_layers(model):
        keep_trainable_layout(module)


# ---------------------------------------------------------------- numbers in, numbers out


def dequantize_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's weight as an (out, in) tensor of `dtype`: a new tensor, never kept by the layer."""
    weight = module.weight
    if _is_4bit(module):
        state = _quant_state(module)
        if state is None:  # not quantised yet (a layer built on the CPU before its first .to())
            return weight.data.to(dtype, copy=True)
        keep_trainable_layout(module)
        state = _quant_state(module)
        return _bnb_loaded().functional.dequantize_4bit(weight.data, state).to(dtype)
    if weight.dtype != torch.int8:  # has_fp16_weights, or not quantised yet
        return weight.data.to(dtype, copy=True)
    # as bitsandbytes' own 8-bit matmul dequantises: CB * (SCB / 127)
    return weight.data.to(dtype) * (_int8_scales(module).to(dtype).unsqueeze(1) * (1.0 / 127.0))


def quantize_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Store the (out, in) float `weight` in the layer, quantised in the layer's own format
    (4-bit type, block size, double quantisation; or int8 rows). The old tensors are replaced,
    not overwritten, so a `snapshot` taken before still holds them."""
    lib = bnb()
    param = module.weight
    if _is_4bit(module):
        state = _quant_state(module)
        data, new_state = lib.functional.quantize_4bit(
            weight.to(device=param.device, dtype=state.dtype).contiguous(), blocksize=state.blocksize,
            compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=param.data.dtype)
        param.data = data
        param.quant_state = module.quant_state = new_state
        return
    CB, SCB, _ = lib.functional.int8_vectorwise_quant(weight.to(device=param.device, dtype=torch.float16).contiguous())
    _set_int8(module, CB, SCB)


def _set_int8(module: nn.Module, CB: torch.Tensor, SCB: torch.Tensor) -> None:
    module.weight.data = CB
    if module.state.CB is not None:  # after the first forward the state holds them
        module.state.CB, module.state.SCB = CB, SCB
    else:
        module.weight.CB, module.weight.SCB = CB, SCB


@dataclass
class Snapshot:
    """A quantised layer's stored tensors, to put back exactly (an unmerge, a detach)."""

    data: torch.Tensor
    state: Any  # the 4-bit QuantState, or the 8-bit row scales


def snapshot(module: nn.Module) -> Snapshot:
    if _is_4bit(module):
        keep_trainable_layout(module)
        return Snapshot(module.weight.data, _quant_state(module))
    return Snapshot(module.weight.data, _int8_scales(module))


def restore(module: nn.Module, snap: Snapshot) -> None:
    if _is_4bit(module):
        module.weight.data = snap.data
        module.weight.quant_state = module.quant_state = snap.state
    else:
        _set_int8(module, snap.data, snap.state)


def dequantize_snapshot(module: nn.Module, snap: Snapshot, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight a snapshot holds."""
    current = snapshot(module)
    restore(module, snap)
    try:
        return dequantize_weight(module, dtype)
    finally:
        restore(module, current)


# ---------------------------------------------------------------- memory


def weight_bytes(module: nn.Module) -> int:
    """Bytes the layer stores for its weight: the packed values, the scales and the code tables (bias excluded)."""
    tensors = [module.weight.data]
    if _is_4bit(module):
        state = _quant_state(module)
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, torch.as_tensor(state.offset)]
    else:
        tensors.append(_int8_scales(module))
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes_formula(out_features: int, in_features: int, kind: str, double_quant: bool = False,
                         blocksize: int = BLOCKSIZE) -> int:
    """What a quantised (out, in) weight costs, from the format alone.

    4-bit: out*in/2 bytes of packed values; one fp32 absmax per block of `blocksize`, or with
    double quantisation one byte per block plus one fp32 scale per 256 blocks; the 16-entry
    fp32 code (64 bytes), and with double quantisation the 256-entry fp32 code of the second
    quantisation (1024 bytes) and its fp32 offset (4 bytes). int8: out*in bytes plus one fp32 scale per row.
    """
    n = out_features * in_features
    if kind == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / blocksize)
    packed, code = math.ceil(n / 2), 16 * 4
    if not double_quant:
        return packed + 4 * blocks + code
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + code + 256 * 4 + 4


# ---------------------------------------------------------------- whole layers and models


def float_linear(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A plain layer computing what the quantised layer computes, its weight dequantised to `dtype`: an
    nn.Linear, or the GPT-2 Conv1D transformers quantised it from (its weight stored (in, out)), so that
    the model's own checkpoint layout comes back."""
    weight = dequantize_weight(module, dtype)  # (out, in)
    bias = module.bias
    if _from_conv1d(module):
        layer = getattr(module, "source_cls")(module.out_features, module.in_features)
        weight = weight.T
    else:
        layer = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
    layer = layer.to(device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
    layer.requires_grad_(module.weight.requires_grad)
    layer.train(module.training)
    return layer


def _from_conv1d(module: nn.Module) -> bool:
    """Was this quantised layer a GPT-2 Conv1D before transformers quantised it (its source_cls)?"""
    return getattr(getattr(module, "source_cls", None), "__name__", None) == "Conv1D"


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every bitsandbytes layer of `model` (wrapped ones included) by a plain nn.Linear in `dtype`,
    and drop the quantisation marks from its config, so save_pretrained writes a full-precision model."""
    for name, module in quantized_layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, float_linear(module, dtype))
    # the marks from_pretrained leaves on a quantised model (and its config), which make transformers refuse
    # .to(dtype) and write a quantisation_config into the saved config.json
    for module in model.modules():
        for attribute in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized", "quantization_method", "hf_quantizer"):
            module.__dict__.pop(attribute, None)
        config = module.__dict__.get("config")
        if config is not None:
            # _pre_quantization_dtype: transformers 4.x drops it from config.json only beside a quantization_config
            for attribute in ("quantization_config", "_is_quantized", "_pre_quantization_dtype"):
                if attribute in vars(config):
                    delattr(config, attribute)
        # a model read from a quantised checkpoint records how its quantised tensors were read, which
        # save_pretrained would undo (and cannot): the weights are plain now
        conversions = module.__dict__.get("_weight_conversions")
        if conversions:
            module._weight_conversions = [c for c in conversions if _reversible(c)]
    return model


def _reversible(conversion: Any) -> bool:
    try:
        conversion.reverse_transform()
    except NotImplementedError:  # bitsandbytes' deserialisation has no reverse
        return False
    return True


# ---------------------------------------------------------------- loading


def quantization_config(name: str, compute_dtype: torch.dtype | str = torch.float32, *, double_quant: bool = True,
                        int8_threshold: float = 6.0, skip_modules: Iterable[str] | None = None) -> Any:
    """transformers' BitsAndBytesConfig for `name` ("nf4", "fp4" or "int8").

    compute_dtype: the 4-bit matmul's dtype (the QLoRA paper uses bf16). double_quant: 8-bit
    absmax (4.127 bits per weight instead of 4.5). int8_threshold: LLM.int8()'s outlier
    threshold (0 quantises every input column). skip_modules: modules kept in full precision;
    None keeps transformers' choice (the output head and tied weights).
    """
    from transformers import BitsAndBytesConfig

    if name not in KINDS:
        raise DeltaError(f"quant = {name!r} is not a quantisation; choose one of {', '.join(KINDS)}")
    if isinstance(compute_dtype, str):
        compute_dtype = _dtype(compute_dtype)
    if int8_threshold < 0:
        raise DeltaError(f"int8_threshold = {int8_threshold} must be >= 0 (0 turns the outlier columns off)")
    bnb()  # a clear error now rather than transformers' later
    skip = list(skip_modules) if skip_modules is not None else None
    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(int8_threshold), llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)


# the dtype names configs and commands use (the pipeline, the planner, `deltatune merge --dtype`)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TASKS = ("causal_lm", "seq_cls", "seq2seq")


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise DeltaError(f"dtype = {value!r} is not allowed; choose one of {', '.join(DTYPES)} (or a torch.dtype)")
    return DTYPES[value]


def load_base(name: str, quant: str | None = None, *, task: str = "causal_lm", dtype: torch.dtype | str = "fp32",
              double_quant: bool = True, int8_threshold: float = 6.0, **kwargs: Any) -> nn.Module:
    """A transformers model from `name` (a hub id or a folder), its frozen base quantised when `quant` is set.

    task: "causal_lm", "seq_cls" or "seq2seq" (the Auto class). dtype: the weights that stay in
    full precision and the 4-bit compute dtype. A sequence classifier's head stays unquantised
    (it trains whole). Further keyword arguments go to from_pretrained (num_labels, revision, ...).
    """
    import transformers as tf

    classes = {"causal_lm": tf.AutoModelForCausalLM, "seq_cls": tf.AutoModelForSequenceClassification,
               "seq2seq": tf.AutoModelForSeq2SeqLM}
    if task not in classes:
        raise DeltaError(f"task = {task!r} is not one of {', '.join(TASKS)}")
    torch_dtype = _dtype(dtype)
    if quant is not None:
        skip = (["lm_head", *CLASSIFIER_HEADS] if task == "seq_cls" else None)
        kwargs["quantization_config"] = quantization_config(quant, torch_dtype, double_quant=double_quant,
                                                            int8_threshold=int8_threshold, skip_modules=skip)
    with reading(f"the model {name}"):  # what transformers raises beside these
        try:
            model = classes[task].from_pretrained(name, dtype=torch_dtype, **BASE_LOAD_KWARGS, **kwargs)
        except (OSError, ValueError) as err:
            raise DeltaError(f"cannot load {name!r} as a {task} model: {str(err)[:400]}") from None
    keep_trainable_layouts(model)
    return model


# ---------------------------------------------------------------- training


def prepare_kbit(model: nn.Module, *, gradient_checkpointing: bool = True, use_reentrant: bool = False) -> nn.Module:
    """Get a quantised model ready to train a delta on (QLoRA's recipe), in place.

    Every floating-point parameter that is not the delta's and is in half precision (the layer
    norms, the output head, the embeddings, biases) goes to fp32, so norms and logits are computed
    in full precision; the quantised weights stay as they are. Gradient checkpointing is switched
    on (non-reentrant unless use_reentrant=True), and with reentrant checkpointing the input
    embeddings' output requires grad, which it needs to reach the first block. The CPU inference
    layout of 4-bit layers is switched off (see the module docstring). Works before or after attach.
    """
    if not isinstance(model, nn.Module):
        raise DeltaError(f"prepare_kbit expects a torch.nn.Module (a transformers model), got {type(model).__name__}")
    keep_trainable_layouts(model)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and not is_quantized_parameter(param):
            param.data = param.data.float()
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise DeltaError(f"{type(model).__name__} does not support gradient checkpointing; "
                             "call prepare_kbit(model, gradient_checkpointing=False)")
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if use_reentrant and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def is_quantized_parameter(param: torch.Tensor) -> bool:
    lib = _bnb_loaded()
    return lib is not None and isinstance(param, (lib.nn.Params4bit, lib.nn.Int8Params))


def bnb_optimizer(name: str, params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """A bitsandbytes optimizer by name: adamw8bit, adam8bit, paged_adamw8bit, paged_adamw, paged_adamw32bit.

    8-bit optimizers keep Adam's two moments in 8 bits (blockwise, dynamic code): 2 bytes per
    parameter instead of 8; tensors under 4096 elements stay 32-bit. Paged optimizers move their
    states to host memory when the GPU runs short; on the CPU they are the plain ones."""
    key = name.lower()
    if key not in OPTIMIZERS:
        raise DeltaError(f"optimizer {name!r} is not a bitsandbytes optimizer; choose one of {', '.join(OPTIMIZERS)}")
    return getattr(bnb().optim, OPTIMIZERS[key])(params, lr=lr, weight_decay=weight_decay)


# ---------------------------------------------------------------- LoftQ


def loftq_factors(weight: torch.Tensor, quantized: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ's low-rank step: A (r, in), B (out, r) with s B A the best rank-r approximation of W - Q.

    (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization".) With W - Q = U S V^T,
    A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), so s B A = U_r S_r V_r^T: the
    adapter starts as the part of the quantisation error a rank-r update can carry.
    """
    U, S, Vh = torch.linalg.svd(weight.float() - quantized.float(), full_matrices=False)
    root = torch.sqrt(S[:r] / scale)
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]



def checkpoint_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The full-precision weights of modules `names`, read from the safetensors checkpoint the model was
    loaded from (`model.name_or_path`: a local folder, or the local Hugging Face cache; nothing is downloaded).

    LoftQ needs W itself, which a quantised model no longer holds. Each weight comes back as
    (out, in): a GPT-2 Conv1D weight, stored (in, out), is transposed."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    source = getattr(model, "name_or_path", None) or ""
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # noqa: BLE001 - any failure means: not in the local cache
            raise DeltaError(
                f"init='loftq' needs the unquantised weights, read from the checkpoint the model was loaded from, but "
                f"{source!r} is neither a local folder nor in the local Hugging Face cache; load the base from a "
                "local folder (deltatune.load_base(folder, quant=...))") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            files = dict.fromkeys(f.keys(), folder / "model.safetensors")
    else:
        raise DeltaError(f"init='loftq' needs the unquantised weights, but {folder} holds no model.safetensors "
                         "(LoftQ reads safetensors checkpoints only)")
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name in names:
        module = model.get_submodule(name)
        module = getattr(module, "base_layer", module)
        candidates = [f"{name}.weight"]
        if prefix and name.startswith(prefix + "."):
            candidates.append(f"{name[len(prefix) + 1:]}.weight")
        elif prefix:
            candidates.append(f"{prefix}.{name}.weight")
        key = next((k for k in candidates if k in files), None)
        if key is None:
            raise DeltaError(f"init='loftq': the checkpoint at {folder} has no weight for {name} (looked for "
                             f"{', '.join(candidates)}); was the model loaded from another checkpoint?")
        with safe_open(str(files[key]), framework="pt") as f:
            weight = f.get_tensor(key).float()
        out[name] = _as_out_in(weight, module, name)
    return out


def _as_out_in(weight: torch.Tensor, module: nn.Module, name: str) -> torch.Tensor:
    """`weight` as (out, in) for `module`: a Conv1D checkpoint stores (in, out), which a square weight
    cannot show by its shape; then the orientation closer to the quantised weight is the stored one."""
    shape = (module.out_features, module.in_features)
    if tuple(weight.shape) not in (shape, shape[::-1]):
        raise DeltaError(f"init='loftq': the checkpoint's weight for {name} has shape {list(weight.shape)}, "
                         f"but the module is {list(shape)}; was the model loaded from another checkpoint?")
    if _from_conv1d(module):
        return weight.T.contiguous()
    if shape[0] != shape[1]:
        return weight if tuple(weight.shape) == shape else weight.T.contiguous()
    current = dequantize_weight(module)
    return weight if (weight - current).norm() <= (weight.T - current).norm() else weight.T.contiguous()
