"""A fine-tuned model as one GGUF file, for llama.cpp, Ollama and LM Studio, checked against the model it came from.

What is written. The base with the run's deltas folded in (the same merged model `deltatune merge` saves), its
tensors renamed to GGUF's names (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`, from the
`gguf` package's own name map, the one llama.cpp's converter uses), the hyper-parameters llama.cpp reads
(`{arch}.block_count`, `.embedding_length`, `.attention.head_count`, `.rope.freq_base`, ...), and the tokenizer
(tokens, types, merges, special ids, chat template) so the file runs on its own.

Two conventions differ from transformers':
  * RoPE. transformers rotates the two halves of each head (x[:d/2], x[d/2:]); llama.cpp's `llama` architecture
    rotates adjacent pairs (x[0], x[1]), ... So the rows of q_proj and k_proj are permuted per head, row
    i*(d/2)+j of a head going to 2j+i, and the logits are unchanged. Architectures llama.cpp runs with the halves
    convention ("neox": qwen2, qwen3) are written as they are.
  * Shapes. GGUF lists dimensions fastest-first; a (out, in) torch weight is written as it lies in memory and
    read back as (in, out) in ggml's order, so nothing is transposed.

Types: f32, f16, bf16, q8_0 (blocks of 32 int8 with one fp16 scale). As llama.cpp's converter does, 1-D tensors
(norms, biases) stay f32 and a weight whose rows are not a multiple of the block is written f16 under q8_0.

A LoRA adapter alone (`export_gguf_lora`, `deltatune export --lora`): llama.cpp's `--lora FILE` adds
(alpha/r)·B·A to a base it already holds, with one `adapter.lora.alpha` for the whole file and r read from each
tensor. deltatune's scale is per module (alpha/r, alpha/sqrt(r) under rsLoRA, `alpha_pattern`, `rank_pattern`),
so each B is written pre-multiplied by s_m·r_m/alpha: llama.cpp's alpha/r_m then gives back s_m exactly. A is
written (r, in) and B (out, r) as they lie, under `<base tensor>.lora_a` / `.lora_b`; B's rows of q and k take
the RoPE permutation above. DoRA (a norm no LoRA file carries), PiSSA and OLoRA (their base is rewritten) and
the other methods are refused: the merged file serves them.

The drift check. After writing, the file is read back (gguf.GGUFReader), its tensors un-renamed, un-permuted
and dequantised into a fresh copy of the model's architecture, and that model's logits on probe sequences are
compared with the unmerged model's (base + delta, as trained): max |delta logit|, the mean KL divergence of the
next-token distributions, and how often the top token agrees. It catches a wrong fold, name or permutation, and
shows what a quantised type costs; it does not run llama.cpp's kernels.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import DeltaError
from ..files import WriteFailed, write_failure
from .drift import Drift, compare_logits


@dataclass(frozen=True)
class GgufArch:
    name: str  # llama.cpp's architecture name
    pairs_rope: bool  # llama.cpp rotates adjacent pairs: permute q_proj/k_proj rows (see the module docstring)
    pre: str  # tokenizer.ggml.pre for the family's byte-level BPE tokenizer ("default" for one of unknown family)


# model_type -> how llama.cpp runs it. Mistral is llama.cpp's `llama` architecture.
ARCHITECTURES: dict[str, GgufArch] = {
    "llama": GgufArch("llama", True, "llama-bpe"),
    "mistral": GgufArch("llama", True, "default"),
    "qwen2": GgufArch("qwen2", False, "qwen2"),
    "qwen3": GgufArch("qwen3", False, "qwen2"),
}

TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class GgufReport:
    path: Path
    arch: str
    type: str
    tensors: int
    bytes: int
    drift: Drift | None


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise DeltaError("writing GGUF needs the `gguf` package (llama.cpp's own reader and writer): "
                         "pip install 'deltatune[export]'") from None
    return gguf


def check_exportable(config: Any) -> GgufArch:
    """The GGUF architecture for a transformers config; a clear error for one this exporter does not write."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise DeltaError(f"GGUF export supports the decoder architectures {', '.join(sorted(ARCHITECTURES))}; this "
                         f"model is {model_type!r}. Export a merged transformers folder with `deltatune merge` and "
                         "convert it with llama.cpp's convert_hf_to_gguf.py, which knows more architectures")
    _rope(config)  # refuses a RoPE scaling it cannot write, before anything is merged
    return ARCHITECTURES[model_type]


def _rope(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, the scaling dict or None) across transformers 4's and 5's spellings."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None) or params
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind not in ("linear", "llama3"):
        raise DeltaError(f"RoPE scaling {kind!r} is not written to GGUF by deltatune yet (linear and llama3 are); "
                         "use `deltatune merge` and llama.cpp's convert_hf_to_gguf.py")
    return float(theta), dict(scaling, rope_type=kind)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _pairs_permutation(rows: int, heads: int) -> torch.Tensor:
    """Index p with new[k] = old[p[k]]: within each head, halves order (j, d/2+j) becomes adjacent pairs (2j, 2j+1)."""
    d = rows // heads
    per_head = torch.arange(d).reshape(2, d // 2).T.reshape(-1)  # [0, d/2, 1, d/2+1, ...]
    return (torch.arange(heads)[:, None] * d + per_head).reshape(-1)


def _llama3_rope_factors(config: Any, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's per-frequency RoPE divisors (llama.cpp reads them as the `rope_freqs` tensor)."""
    dim = _head_dim(config)
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling["original_max_position_embeddings"]
    factors = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def gguf_tensors(model: torch.nn.Module, arch: GgufArch) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for every weight of a plain (merged) model, permuted where llama.cpp wants it."""
    gguf = _gguf()
    config = model.config
    names = gguf.get_tensor_name_map(_arch_enum(gguf, arch.name), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when `output` is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            if key.endswith("rotary_emb.inv_freq"):
                continue  # a buffer recomputed from the config
            raise DeltaError(f"no GGUF name for {key!r} in architecture {arch.name!r}: this model has a weight "
                             "llama.cpp's map does not know, so the file would be incomplete")
        tensor = tensor.detach().float().cpu()
        if arch.pairs_rope and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            tensor = tensor[_pairs_permutation(tensor.shape[0], heads)]
        yield name, tensor
    _, scaling = _rope(config)
    if scaling is not None and scaling["rope_type"] == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(config, _rope(config)[0], scaling)


def _arch_enum(gguf: Any, name: str) -> Any:
    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)


def _encode(gguf: Any, name: str, tensor: torch.Tensor, kind: str) -> tuple[Any, Any]:
    """(numpy array to write, its GGML type) for `tensor` under the file type `kind`."""
    q = gguf.GGMLQuantizationType
    array = tensor.numpy()
    if tensor.dim() == 1 or kind == "f32" or name == "rope_freqs.weight":
        return array.astype("float32"), q.F32
    if kind == "q8_0" and tensor.shape[-1] % 32 == 0:
        return gguf.quants.quantize(array, q.Q8_0), q.Q8_0
    if kind == "bf16":
        return gguf.quants.quantize(array, q.BF16), q.BF16
    return array.astype("float16"), q.F16


FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType values


def _metadata(writer: Any, model: torch.nn.Module, arch: GgufArch, kind: str, name: str) -> None:
    config = model.config
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[kind])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if scaling is not None and scaling["rope_type"] == "linear":
        gguf = _gguf()
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if kind == "q8_0":
        writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)


def _tokenizer(writer: Any, tokenizer: Any, arch: GgufArch, vocab_size: int) -> None:
    """Tokens, their types and scores, merges, special ids and the chat template, read from the tokenizer's files."""
    gguf = _gguf()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        vocab: Any = None
        for cls in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
            try:
                vocab = cls(Path(folder))
                break
            except (FileNotFoundError, TypeError, ValueError, KeyError):
                continue
        if vocab is None:
            raise DeltaError(f"the tokenizer ({type(tokenizer).__name__}) is neither a byte-level BPE nor a "
                             "SentencePiece-style tokenizer.json that GGUF export can write")
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        if len(tokens) > vocab_size:
            raise DeltaError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {vocab_size}: "
                             "they do not belong together")
        for i in range(len(tokens), vocab_size):  # an embedding padded past the tokenizer (Qwen's 151,936 rows)
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(arch.pre if vocab.tokenizer_model == "gpt2" else "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        # gguf logs a warning for each special token GGUF has no key for (a [CLS] in a decoder's tokenizer):
        # nothing a user can act on, so it is kept quiet
        with _quiet_gguf_log():
            special = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size)
            special.add_to_gguf(writer, quiet=True)


def _write_file(path: Path, arch_name: str, fill: Callable[[Any], int]) -> int:
    """Write one GGUF file at `path` atomically (a temporary sibling renamed into place): `fill(writer)` adds its
    keys and tensors and returns the tensor count. A failed write (space, permission) is one WriteFailed, and
    nothing is half-written."""
    gguf = _gguf()
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    writer = gguf.GGUFWriter(tmp, arch_name)
    try:
        count = fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001 - matched by what it says (files.write_failure), not by its class
        failure = write_failure(err)
        if failure is None:
            raise
        kept = f"{path} is as it was" if path.exists() else f"nothing is at {path}"
        raise WriteFailed(f"{failure[0]}: writing {path} failed. Nothing was half-written: {kept}.\n"
                          f"To finish: {failure[1]}, then export again", failure) from None
    finally:
        tmp.unlink(missing_ok=True)
    return count


@contextlib.contextmanager
def _quiet_gguf_log() -> Iterator[None]:
    log = logging.getLogger("gguf")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _fill_model(writer: Any, merged: torch.nn.Module, tokenizer: Any, arch: GgufArch, kind: str, name: str) -> int:
    """The merged model's keys, tokenizer and tensors into `writer`; the tensor count."""
    gguf = _gguf()
    _metadata(writer, merged, arch, kind, name)
    _tokenizer(writer, tokenizer, arch, merged.config.vocab_size)
    count = 0
    for tensor_name, tensor in gguf_tensors(merged, arch):
        array, ggml_type = _encode(gguf, tensor_name, tensor, kind)
        writer.add_tensor(tensor_name, array, raw_dtype=ggml_type)
        count += 1
    return count


def export_gguf(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike, kind: str = "f16",
                name: str | None = None, check: bool = True) -> GgufReport:
    """Write `model` (base + its active deltas, merged) as one GGUF file at `path`, atomically; the model is left
    as it was. With `check`, read the file back and measure its drift from the unmerged model (see the docstring)."""
    from ..pipeline.export import merged_model

    _gguf()  # a missing package is said before the merge, not after it
    if kind not in TYPES:
        raise DeltaError(f"GGUF type {kind!r} is not one deltatune writes: choose one of {', '.join(TYPES)}")
    if tokenizer is None:
        raise DeltaError("GGUF export needs the model's tokenizer (a GGUF file carries its own): none was found "
                         "beside the base model")
    arch = check_exportable(model.config)
    path = Path(path)
    # merged at the model's own dtype (each tensor goes to fp32 only as it is written), or fp32 for an f32 file
    merged = merged_model(model, dtype=torch.float32 if kind == "f32" else None)
    count = _write_file(path, arch.name, functools.partial(_fill_model, merged=merged, tokenizer=tokenizer, arch=arch,
                                                           kind=kind, name=name or path.stem))
    del merged  # before the check builds the file's model: at most two copies are held at once
    drift = measure_drift(model, path) if check else None
    return GgufReport(path, arch.name, kind, count, path.stat().st_size, drift)


def iter_gguf_weights(path: str | os.PathLike, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers weight name, fp32 tensor) for each tensor of a GGUF file written for `config`: names mapped
    back, q/k rows un-permuted, dequantised. The inverse of `gguf_tensors`, one tensor at a time (the drift check
    copies each into place, so a whole fp32 copy of the file is never held)."""
    gguf = _gguf()
    arch = check_exportable(config)
    names = gguf.get_tensor_name_map(_arch_enum(gguf, arch.name), config.num_hidden_layers)
    back = {name: key for key in _state_keys(config)
            if (name := names.get_name(key, try_suffixes=(".weight", ".bias"))) is not None}
    for t in gguf.GGUFReader(path).tensors:
        if t.name == "rope_freqs.weight":
            continue
        if t.name not in back:
            raise DeltaError(f"{path}: tensor {t.name!r} belongs to no weight of this model's architecture")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists the fastest dimension first
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32").copy()).reshape(shape)
        if arch.pairs_rope and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
            values = values[torch.argsort(_pairs_permutation(values.shape[0], heads))]
        yield back[t.name], values


def read_gguf_weights(path: str | os.PathLike, config: Any) -> dict[str, torch.Tensor]:
    """The transformers state dict (fp32) a GGUF file written for `config` holds."""
    return dict(iter_gguf_weights(path, config))


def _state_keys(config: Any) -> list[str]:
    """The weight names of `config`'s model, from an empty (meta-device) instance: nothing is allocated."""
    import transformers as tf

    with torch.device("meta"):
        skeleton = tf.AutoModelForCausalLM.from_config(config)
    return list(skeleton.state_dict())


@torch.no_grad()
def measure_drift(model: torch.nn.Module, path: str | os.PathLike, ids: torch.Tensor | None = None) -> Drift:
    """Logits of the model the GGUF file holds against `model`'s own (base + delta, unmerged), on `ids`. The file's
    model is built at `model`'s dtype (what it runs in), so the check holds one more copy of the model at most."""
    import transformers as tf

    from ..pipeline.export import _loaded_dtype

    config = copy.deepcopy(model.config)
    rebuilt = tf.AutoModelForCausalLM.from_config(config, dtype=_loaded_dtype(model))
    params = {**dict(rebuilt.named_parameters(remove_duplicate=False)), **dict(rebuilt.named_buffers())}
    filled = set()
    for key, values in iter_gguf_weights(path, config):
        params[key].copy_(values.to(params[key].dtype))
        filled.add(id(params[key]))
    missing = [k for k, p in rebuilt.named_parameters() if id(p) not in filled]
    if missing:
        raise DeltaError(f"{path}: the GGUF file does not hold all of this model's weights (missing {missing[:3]})")
    return compare_logits(model, rebuilt.eval(), ids)


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, Any, str]]:
    """(module name, LoRA layer, delta name) for every active LoRA delta's layer; a clear error for what a llama.cpp
    LoRA file cannot carry."""
    from ..api import get_state
    from ..methods.lora import LoraLayer

    state = get_state(model)
    if state is None or not state.active:
        raise DeltaError("the model has no active delta: there is no adapter to write (export the model itself "
                         "without --lora)")
    if len(state.active) > 1:
        raise DeltaError(f"{len(state.active)} deltas are active ({', '.join(state.active)}); a llama.cpp LoRA file "
                         "holds one: activate one (dt.set_active) and write each to its own file")
    for name in state.active:
        delta = state.deltas[name]
        if delta.method.name not in ("lora",) or delta.rewrites:
            what = "PiSSA/OLoRA (they rewrite the base weights)" if delta.rewrites else delta.method.name
            raise DeltaError(f"delta {name!r} is {what}: a llama.cpp LoRA file holds plain LoRA on the unchanged "
                             "base only; export the merged model instead (drop --lora)")
    found = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in state.active:
            if name not in module.lora_A:
                if name in module.lora_embedding_A:
                    raise DeltaError(f"delta {name!r} adapts the embedding {module_name}: llama.cpp LoRA files adapt "
                                     "linear weights only; export the merged model instead (drop --lora)")
                continue
            if name in module.lora_magnitude_vector:
                raise DeltaError(f"delta {name!r} is DoRA: llama.cpp LoRA files carry no magnitude vector; export "
                                 "the merged model instead (drop --lora)")
            found.append((module_name, module, name))
    if state.merged():
        raise DeltaError("the delta is merged into the weights; unmerge it (dt.unmerge) before writing it alone")
    return found


def export_gguf_lora(model: torch.nn.Module, path: str | os.PathLike, kind: str = "f32", name: str | None = None,
                     check: bool = True) -> GgufReport:
    """Write `model`'s active LoRA delta as a llama.cpp LoRA adapter GGUF at `path` (see the module docstring),
    atomically. With `check`, rebuild base + (alpha/r)·B·A from the file, as llama.cpp computes it, and measure the
    drift from the unmerged model."""
    gguf = _gguf()
    if kind not in ("f32", "f16", "bf16"):
        raise DeltaError(f"a LoRA GGUF is written as f32, f16 or bf16, not {kind!r} (its tensors are small)")
    config = model.config
    arch = check_exportable(config)
    layers = _lora_layers(model)
    names = gguf.get_tensor_name_map(_arch_enum(gguf, arch.name), config.num_hidden_layers)
    alpha = float(layers[0][1].lora_A[layers[0][2]].weight.shape[0] * layers[0][1].scaling[layers[0][2]]) if layers else 1.0
    alpha = alpha or 1.0
    path = Path(path)
    def fill(writer: Any) -> int:
        writer.add_type("adapter")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name or path.stem)
        count = 0
        for module_name, layer, delta in layers:
            target = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
            if target is None:
                raise DeltaError(f"the LoRA on {module_name} has no GGUF name in architecture {arch.name!r}")
            A = layer.lora_A[delta].weight.detach().float().cpu()  # (r, in)
            B = layer.lora_B[delta].weight.detach().float().cpu()  # (out, r)
            r = A.shape[0]
            B = B * (layer.scaling[delta] * r / alpha)  # llama.cpp scales by alpha / r: fold the rest into B
            if arch.pairs_rope and (".attn_q." in target or ".attn_k." in target):
                heads = config.num_attention_heads if ".attn_q." in target else config.num_key_value_heads
                B = B[_pairs_permutation(B.shape[0], heads)]
            for suffix, tensor in (("lora_a", A), ("lora_b", B)):
                array, ggml_type = _encode(gguf, f"{target}.{suffix}", tensor, kind)
                writer.add_tensor(f"{target}.{suffix}", array, raw_dtype=ggml_type)
                count += 1
        return count

    count = _write_file(path, arch.name, fill)
    drift = measure_lora_drift(model, path) if check else None
    return GgufReport(path, arch.name, kind, count, path.stat().st_size, drift)


def read_gguf_lora(path: str | os.PathLike, config: Any) -> dict[str, torch.Tensor]:
    """The update llama.cpp adds to each base weight from a LoRA GGUF: {transformers weight name: (alpha/r)·B·A},
    with B's q/k rows un-permuted back to transformers' order."""
    gguf = _gguf()
    arch = check_exportable(config)
    names = gguf.get_tensor_name_map(_arch_enum(gguf, arch.name), config.num_hidden_layers)
    back = {name: key for key in _state_keys(config)
            if (name := names.get_name(key, try_suffixes=(".weight", ".bias"))) is not None}
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    held: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        held[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32").copy()).reshape(shape)
    updates = {}
    for name in held:
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        A, B = held[name], held[f"{base}.lora_b"]
        update = (alpha / A.shape[0]) * (B @ A)  # llama.cpp: scale = alpha / r, r from lora_a's rows
        if arch.pairs_rope and (".attn_q." in base or ".attn_k." in base):
            heads = config.num_attention_heads if ".attn_q." in base else config.num_key_value_heads
            update = update[torch.argsort(_pairs_permutation(update.shape[0], heads))]
        updates[back[base]] = update
    return updates


@torch.no_grad()
def measure_lora_drift(model: torch.nn.Module, path: str | os.PathLike, ids: torch.Tensor | None = None) -> Drift:
    """The base (the model with its delta off) plus the updates a LoRA GGUF adds, against the unmerged model."""
    from ..api import disabled
    from ..pipeline.export import merged_model

    with disabled(model):
        rebuilt = merged_model(model)  # a plain copy of the base, at the model's dtype
    weights = dict(rebuilt.named_parameters())
    for key, update in read_gguf_lora(path, model.config).items():
        weights[key].add_(update.to(weights[key]))
    return compare_logits(model, rebuilt.eval(), ids)
