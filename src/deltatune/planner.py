"""Memory planning: a training run's peak memory, from the model's config alone.

    plan = deltatune.plan("meta-llama/Llama-3.1-8B", "lora", r=16, batch=8, seq=1024,
                          dtype="bf16", memory="24GB")
    print(plan)            # the breakdown, the verdict, the changes that would fit

How the numbers come about. The model is built on the meta device (shapes, no
data; only config.json is read) and the method's config is attached to it, so the
trainable set of every method is counted by the method's own code, with no
per-method arithmetic here; a method whose trainable set differs between training
and saving (prefix tuning's projection, P-tuning's encoder) is counted as it trains.

    model states   frozen weights: numel x bytes of the dtype; a quantised base stores
                   the Linear weights of its blocks as deltatune.quant.load_base does
                   (quant.weight_bytes_formula: NF4/FP4 with double quantisation, about 4.127
                   bits a weight; int8 plus an fp32 scale per row), the output head unquantised.
                   Trainable weights and their gradients: numel x their dtype (fp32 for
                   added deltas, the base's dtype for selected parameters). A trainable 16-bit
                   parameter trains through an fp32 master (master.py, master_weights="fp32",
                   the default): 4 bytes more for the master, and its gradient and optimizer
                   states are the master's, fp32. Optimizer states
                   per trainable element: Adam(W) 2 states in the parameter's dtype, SGD
                   none, bitsandbytes 8-bit 2 bytes (+ an fp32 absmax per 256; tensors under
                   4096 elements keep 32-bit states), the paged 32-bit AdamW 8 bytes.
    activations    one training step is *run* on the meta device under a dispatch mode
                   that records every tensor storage the step creates and when it is freed
                   (the autograd graph frees what backward no longer needs), so the peak
                   of live bytes is the peak of the real step: every architecture's own
                   saved tensors (SwiGLU's three products, RMSNorm's fp32 upcasts, GPT-2's
                   dropout masks), the method's (LoRA's inputs, prompt tokens lengthening
                   the sequence), the logits and the loss's fp32 copies, gradients as they
                   accumulate, and gradient checkpointing's recomputation. Fused attention
                   (SDPA on CUDA, and on the CPU when attention dropout is off, which is
                   when torch's CPU kernel takes it) is emulated: it keeps q, k, v, the
                   output and an fp32 log-sum-exp per row, no s x s scores; eager
                   attention and the CPU's math fallback run as written.
                   A deep model is run with three blocks and the middle block's forward
                   and backward repeated L - 2 times (exact when the blocks are alike, which
                   is checked; otherwise the whole depth runs).
    overhead       CUDA: 0.5 GiB of context (outside torch's allocator), 32 MiB of cuBLAS
                   workspace, and 10% of the memory allocated per step (activations, logits,
                   gradients, optimizer temporaries) for the caching allocator's
                   fragmentation. CPU: the process itself (Python, torch, transformers).

The peak is max(forward/backward peak + optimizer states, gradients + states + the
optimizer step's temporaries), at the second step (states exist). With gradient
accumulation every micro-batch after the first starts with the gradients allocated.

Checked by tests/test_planner.py (counts equal the real model's; the simulated step's
peak equals a real CPU step's tracked tensor bytes; the QLoRA paper's and torchtune's
published figures) and benchmarks/memory.py (resident-memory growth of real training
steps over a grid of sizes, methods, batches, lengths; see BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import re
import warnings
import weakref
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from . import api
from .config import METHODS, DeltaConfig, DeltaError, one_line, reading
from .quant import DTYPES, weight_bytes_formula
from .targets import block_stacks, head_module_names, is_linear_like
from .summary import replaced_originals

GiB = 1 << 30
MiB = 1 << 20

Device = Literal["cuda", "cpu"]

# ---------------------------------------------------------------- sizes

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50}


def parse_size(text: str | int | float) -> int:
    """Bytes in "24GB" (10^9), "24GiB" (2^30), "1.5TB", "512MiB" or a plain byte count; exact, no float rounding."""
    if isinstance(text, bool):
        raise DeltaError(f"a memory size must be like '24GB' or '24GiB', got {text!r}")
    if isinstance(text, int):
        value, unit = Fraction(text), "b"
    elif isinstance(text, float):
        if not math.isfinite(text):
            raise DeltaError(f"the memory size {text!r} must be a finite number of bytes")
        value, unit = Fraction(str(text)), "b"
    elif isinstance(text, str):
        found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", text)
        unit = (found.group(2) or "b").lower() if found else ""
        if not found or unit not in _UNITS:
            raise DeltaError(f"cannot read the memory size {text!r}: write a number and a unit, decimal "
                             "(KB, MB, GB, TB: powers of 1000) or binary (KiB, MiB, GiB, TiB: powers of 1024), "
                             "e.g. 24GB or 80GiB")
        value = Fraction(found.group(1))
    else:
        raise DeltaError(f"a memory size must be a string like '24GB' or a number of bytes, got {type(text).__name__}")
    size = value * _UNITS[unit]
    if size <= 0:
        raise DeltaError(f"the memory size {text!r} must be positive")
    return int(size)


def format_size(n: float) -> str:
    """Binary units, as GPU memory is counted: 1.50 GiB, 312.0 MiB."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


# ---------------------------------------------------------------- settings

QUANT_BITS = {"nf4": 4.127, "fp4": 4.127, "int8": 8.0}  # bits per weight, roughly; exact bytes: quant.weight_bytes_formula

# Optimizer states: (states per element in the parameter's dtype, or None) / bitsandbytes (bytes per element).
TORCH_STATES = {"adam": 2, "adamw": 2, "adamax": 2, "nadam": 2, "radam": 2, "adadelta": 2, "rprop": 2,
                "sgd": 0, "adagrad": 1, "rmsprop": 1, "asgd": 1}
BNB_STATES = {"adamw8bit": 2, "adam8bit": 2, "paged_adamw8bit": 2, "paged_adamw": 8}
FOREACH_TEMPS = {"adam", "adamw", "adamax", "nadam", "radam"}  # sqrt(v) of every tensor at once (torch's foreach path)

CUDA_CONTEXT = 512 * MiB  # the CUDA context and kernels: outside torch's allocator, 0.3-1 GiB by GPU and driver
CUBLAS_WORKSPACE = 32 * MiB
FRAGMENTATION = 0.10  # of the memory allocated and freed each step, for the caching allocator's partly used blocks
CPU_PROCESS = 600 * MiB  # a Python process with torch and transformers imported (resident set, measured)


@dataclass(frozen=True)
class Setting:
    """One training setting; the plan's alternatives are copies of it with one field changed."""

    batch: int = 8
    seq: int = 1024
    dtype: str = "bf16"
    quant: str | None = None
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    accum: int = 1
    device: str = "cuda"
    attention: str | None = None  # None: the config's own (transformers picks sdpa where it can)
    loss: str = "standard"  # "fused": deltatune.losses (head and loss per chunk of rows, no logits kept);
    # "chunked": cross-entropy over 8 chunks of the logits (torchtune's CEWithChunkedOutputLoss);
    # "compiled": the same under torch.compile, each chunk's cross-entropy fused (no fp32 copies kept)
    target_seq: int | None = None  # seq2seq: the label length (None: seq)
    master_weights: str = "fp32"  # trainable 16-bit parameters: "fp32" masters (master.py), "kahan" or "none"
    # the stage compares the policy with a reference model (DPO, KTO, GRPO with beta > 0): a method that trains the
    # base weights (kind "select") then holds a second, frozen copy of them; a delta method switches its delta off
    reference: bool = False

    def check(self) -> None:
        for name in ("batch", "seq", "accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DeltaError(f"{name} must be a positive integer, got {value!r}")
        choices = {"dtype": DTYPES, "quant": [None, *QUANT_BITS], "device": ["cuda", "cpu"],
                   "attention": [None, "sdpa", "eager", "flash_attention_2"], "loss": ["standard", "fused", "chunked", "compiled"],
                   "master_weights": ["fp32", "none", "kahan"]}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DeltaError(f"{name} = {getattr(self, name)!r} is not allowed: expected one of "
                                 f"{', '.join(repr(a) for a in allowed)}")
        if self.optimizer not in TORCH_STATES and self.optimizer not in BNB_STATES:
            raise DeltaError(f"optimizer = {self.optimizer!r} is not one the planner knows: choose one of "
                             f"{', '.join(sorted({*TORCH_STATES, *BNB_STATES}))}")


# ---------------------------------------------------------------- the result


@dataclass
class Alternative:
    """A change to the setting (or the method) and the plan's total with it."""

    change: str
    total: int
    fits: bool
    setting: Setting  # plan(model, delta or the same method, **dataclasses.asdict(setting)) gives this total again
    delta: DeltaConfig | None = None  # another method's config, when the change is the method


@dataclass
class Plan:
    """Bytes at the peak of a training step, by what holds them; `total` is their sum."""

    model: str
    architecture: str
    method: str
    delta: DeltaConfig  # the method's config as attached (targets resolved)
    setting: Setting
    parameters: int
    trainable: int
    frozen_weights: int
    trainable_weights: int
    kept_copies: int  # originals a selective delta keeps on this device (full fine-tuning keeps them in host RAM)
    gradients: int
    optimizer_states: int
    optimizer_temporaries: int
    activations: int
    logits: int
    overhead: int
    total: int
    peak_phase: str  # "backward" (forward/backward peak) or "optimizer step"
    master_weights: int = 0  # fp32 masters of the trainable 16-bit parameters (their gradients and states are counted there)
    reference_weights: int = 0  # a preference stage's frozen reference copy of the weights (full, freeze, bitfit)
    sixteen_bit_trainable: int = 0  # trainable parameters stored in 16 bits: those setting.master_weights applies to
    activations_by_checkpointing: dict[bool, int] = field(default_factory=dict)  # the fwd/bwd peak's activations, off/on
    host_copies: int = 0  # originals kept in host RAM (not device memory) on a CUDA plan
    attention: str = "sdpa"  # the attention implementation the model runs (the config's own unless set)
    memory: int | None = None
    alternatives: list[Alternative] = field(default_factory=list)
    max_batch: int | None = None  # None with `searched`: not even batch 1 fits
    max_seq: int | None = None
    searched: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.total <= self.memory

    @property
    def static(self) -> int:
        """Memory held before the first step: weights, kept copies and the process or CUDA context."""
        context = CUDA_CONTEXT if self.setting.device == "cuda" else CPU_PROCESS
        return (self.frozen_weights + self.trainable_weights + self.master_weights + self.kept_copies
                + self.reference_weights + context)

    @property
    def step_growth(self) -> int:
        """What a training step adds on top of `static`: the number the benchmark measures."""
        return self.total - self.static

    def table(self) -> str:
        s = self.setting
        method_line = f"{self.method}: {self.trainable:,} trainable of {self.parameters:,} parameters"
        base = f"{s.quant} base ({s.dtype} compute)" if s.quant else f"{s.dtype} base"
        run = (f"batch {s.batch} x seq {s.seq}" + (f" x accum {s.accum}" if s.accum > 1 else "")
               + f", {base}, {s.optimizer}, checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
               f"{self.attention} attention, {s.device}"
               + (f", master_weights {s.master_weights}" if self.sixteen_bit_trainable else ""))
        ckpt = self.activations_by_checkpointing
        rows = [
            ("frozen base weights", self.frozen_weights, ""),
            ("trainable weights", self.trainable_weights, ""),
            ("gradients", self.gradients, "at the peak" if self.peak_phase == "backward" else ""),
            ("optimizer states", self.optimizer_states, s.optimizer),
            ("optimizer step temporaries", self.optimizer_temporaries, ""),
            ("activations", self.activations,
             "  ".join(f"{'with' if on else 'without'} checkpointing {format_size(v)}" for on, v in sorted(ckpt.items()))),
            ("logits and loss buffers", self.logits, ""),
            ("framework overhead", self.overhead, "CUDA context, cuBLAS, 10% fragmentation" if s.device == "cuda"
             else "the Python process"),
        ]
        if self.kept_copies:
            rows.insert(2, ("kept originals", self.kept_copies, ""))
        if self.reference_weights:
            rows.insert(2, ("reference copy", self.reference_weights, "the base again, frozen: the stage's reference"))
        if self.master_weights and s.master_weights == "kahan":
            rows.insert(2, ("Kahan compensation", self.master_weights, "master_weights kahan: 16-bit, states fp32"))
        elif self.master_weights:
            rows.insert(2, ("fp32 master weights", self.master_weights, "master_weights fp32: gradients, states fp32"))
        lines = [f"{self.model}: {self.architecture}", f"  {method_line}", f"  {run}", ""]
        for name, value, note in rows:
            lines.append(f"  {name:<28}{format_size(value):>12}   {note}".rstrip())
        lines.append("  " + "-" * 40)
        lines.append(f"  {'total (peak, ' + self.peak_phase + ')':<28}{format_size(self.total):>12}   "
                     f"({self.total / 1e9:,.2f} GB)")
        if self.host_copies:
            lines.append(f"  and {format_size(self.host_copies)} of host RAM for the originals full fine-tuning keeps")
        if self.memory is not None:
            margin = self.memory - self.total
            verdict = (f"fits, {format_size(margin)} to spare" if margin >= 0 else f"does NOT fit: {format_size(-margin)} over")
            lines.append(f"  memory {format_size(self.memory)}: {verdict}")
        if self.alternatives:
            lines.append("")
            lines.append("  changes and their totals:")
            for alt in self.alternatives:
                lines.append(f"    {alt.change:<52}{format_size(alt.total):>12}   {'fits' if alt.fits else 'too big'}")
        if self.searched:
            lines.append("")
            lines.append(f"  largest batch that fits at seq {s.seq}: {self.max_batch or 'none (not even 1)'}")
            lines.append(f"  longest max_length that fits at batch {s.batch}: {self.max_seq or 'none (not even 1)'}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------- the model and method


def load_model_config(model: Any, trust_remote_code: bool = False) -> Any:
    """A transformers config from a PretrainedConfig, a config.json path, a model folder or a hub id."""
    import transformers as tf

    if isinstance(model, tf.PretrainedConfig):
        return copy.deepcopy(model)
    if not isinstance(model, str) or not model:
        raise DeltaError(f"model must be a model id, a folder or a config.json path, got {model!r:.80}")
    from pathlib import Path

    from .model_files import check_model_path

    path = Path(model)
    if not path.is_file():
        check_model_path(model, "model")  # a mistyped folder would come back as "Repo id must be in the form ..."
    file = path if path.is_file() else path / "config.json" if (path / "config.json").is_file() else None
    with reading(f"the model config {file if file is not None else model}"):  # what transformers raises beside these
        try:
            if file is not None:
                try:
                    data = json.loads(file.read_bytes().decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise DeltaError(f"{file} is not valid JSON ({err}); it should be a transformers config.json") from None
                if not isinstance(data, dict) or "model_type" not in data:
                    raise DeltaError(f"{file} has no model_type: it is not a transformers config.json")
                check_sizes(data, data["model_type"], str(file))  # before transformers, whose errors do not name keys
            if path.is_file():
                return tf.AutoConfig.for_model(**data)
            config = tf.AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            if isinstance(err, DeltaError):
                raise
            raise DeltaError(f"cannot read the config of {model!r}: {one_line(err, 300)}") from None
    if file is None:  # a hub id: the config as transformers read it
        check_sizes({k: v for k, v in config.to_dict().items() if v is not None}, config.model_type, model)
    return config


# head-size keys: a config that gives one splits its width as it likes (T5's d_kv, Gemma's head_dim)
_HEAD_SIZE_KEYS = ("head_dim", "d_kv", "kv_channels", "attention_head_size", "head_size")


def check_sizes(values: dict[str, Any], model_type: str, source: str) -> None:
    """A model config's sizes (as its config.json names them) are positive, and the width splits into whole heads."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    aliases = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) if model_type in CONFIG_MAPPING else {}

    def key(name: str) -> str | None:  # the name this config's file uses (gpt2: n_embd for hidden_size)
        for candidate in (name, aliases.get(name)):
            if candidate is not None and candidate in values:
                return candidate
        return None

    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
        k = key(name)
        if k is None:
            continue
        value = values[k]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # a per-layer list (some configs have one) or a string: left to transformers
        if not isinstance(value, int) or value <= 0:
            raise DeltaError(f"{source}: {k} = {value!r} is not allowed: it must be a positive whole number; "
                             "fix it in the model's config.json")
    hidden, heads = key("hidden_size"), key("num_attention_heads")
    if hidden and heads and isinstance(values[hidden], int) and isinstance(values[heads], int) and not any(values.get(k) for k in _HEAD_SIZE_KEYS) and values[hidden] % values[heads]:
        raise DeltaError(f"{source}: {hidden} = {values[hidden]} is not divisible by {heads} = {values[heads]}, so "
                         "the width does not split into whole attention heads; make it a multiple (or give head_dim)")


TASKS = ("causal_lm", "seq_cls", "seq2seq")


def infer_task(hf_config: Any) -> str:
    return default_task(hf_config)[0]


def default_task(hf_config: Any) -> tuple[str, str | None]:
    """The task to plan when none is given, from the head config.architectures names, and a note when it is a guess.

    An encoder saved without a task head (BertModel, BertForMaskedLM) is planned as sequence classification,
    what it is fine-tuned for; planning it as a causal LM would add a decoder's head it never trains with."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    architectures = list(getattr(hf_config, "architectures", None) or [])
    seq2seq = bool(getattr(hf_config, "is_encoder_decoder", False))
    for name in architectures:
        if name.endswith("ForSequenceClassification"):
            return "seq_cls", None
        if seq2seq and name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")):
            return "seq2seq", None
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal_lm", None
    if seq2seq:
        return "seq2seq", None
    model_type = getattr(hf_config, "model_type", "")
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if encoder and not getattr(hf_config, "is_decoder", False):
        head = ", ".join(architectures) or "no architectures"
        return "seq_cls", (f"{model_type} is an encoder and its config names no task head ({head}): planned as "
                           "sequence classification; pass --task to plan another")
    return "causal_lm", None


def _model_class(task: str) -> Any:
    import transformers as tf

    return {"causal_lm": tf.AutoModelForCausalLM, "seq_cls": tf.AutoModelForSequenceClassification,
            "seq2seq": tf.AutoModelForSeq2SeqLM}[task]


def _build(hf_config: Any, task: str, dtype: torch.dtype, attention: str | None, trust_remote_code: bool) -> nn.Module:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attention is not None:
        kwargs["attn_implementation"] = "sdpa" if attention == "flash_attention_2" else attention
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = _model_class(task).from_config(hf_config, **kwargs)
        except (ValueError, KeyError, TypeError) as err:
            raise DeltaError(f"cannot build a {task} model from this config ({type(hf_config).__name__}): "
                             f"{str(err)[:300]}") from None
    return model.to(dtype)


def _method_configs(method: Any, fields: dict[str, Any]) -> list[tuple[str, DeltaConfig]]:
    """(adapter name, config) pairs to attach in order; the last one is the delta that trains."""
    if isinstance(method, dict):
        if not method or fields or not all(isinstance(c, DeltaConfig) for c in method.values()):
            raise DeltaError("method as a dict maps adapter names to deltatune configs, attached in order (the last "
                             "trains), e.g. {'fa': AdapterConfig(), 'fb': AdapterConfig(), 'default': "
                             "AdapterFusionConfig(adapters=['fa', 'fb'])}; no extra fields with it")
        return list(method.items())
    return [("default", _method_config(method, fields))]


def _method_config(method: Any, fields: dict[str, Any]) -> DeltaConfig:
    if isinstance(method, DeltaConfig):
        return method.replace(**fields) if fields else method
    if not isinstance(method, str) or method not in METHODS:
        raise DeltaError(f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[method].config_cls
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise DeltaError(f"{cls.__name__} has no field {unknown[0]!r}; its fields: {', '.join(sorted(known))}")
    return cls(**fields)


def _element_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class _Weights:
    parameters: int
    trainable: int
    frozen_bytes: int
    trainable_bytes: int
    kept_device: int
    kept_host: int
    largest_trainable: int  # bytes of the largest trainable tensor (the CPU optimizer's temporaries)
    largest_quantised: int  # elements of the largest quantised weight (its dequantised copy in a forward)
    trainable_tensors: list[tuple[int, int]]  # (numel, element size) of each trainable tensor


def _weights(model: nn.Module, quant: str | None) -> _Weights:
    """Weights by role, after attach; a quantised base is counted as bitsandbytes stores it."""
    from .surgery import DeltaLayer, get_state

    heads = head_module_names(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantised: dict[int, int] = {}  # id(weight) -> bytes stored
    largest_q = 0
    if quant is not None:
        state = get_state(model)
        selects = state is not None and any(d.method.kind == "select" for d in state.deltas.values())
        for name, module in model.named_modules():
            if not is_linear_like(module) or name in heads or module is out_emb:
                continue
            if module.weight.requires_grad:
                if not selects:  # an added delta's own layer (lora_A, an adapter's projection): never quantised
                    continue
                # a selected base weight (full fine-tuning, freezing): attach refuses it on a real quantised base
                raise DeltaError(f"{name}.weight would be quantised ({quant}), but the method trains it, and "
                                 "bitsandbytes cannot train a quantised weight; on a quantised base train an added "
                                 "delta (LoRA, say), or plan without quant")
            w = module.weight
            out_f, in_f = w.shape if isinstance(module, nn.Linear) else w.shape[::-1]  # Conv1D stores (in, out)
            # as load_base stores it: 4-bit with double quantisation, or int8 with a row scale
            quantised[id(w)] = weight_bytes_formula(out_f, in_f, quant, double_quant=True)
            largest_q = max(largest_q, w.numel())
    total = trainable = frozen_b = trainable_b = 0
    largest = 0
    tensors: list[tuple[int, int]] = []
    seen: set[int] = set()
    replaced = replaced_originals(model)  # held in memory, but counted as summary() counts: the trained copy only
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += 0 if id(p) in replaced else p.numel()
        if p.requires_grad:
            trainable += p.numel()
            trainable_b += _element_bytes(p)
            largest = max(largest, _element_bytes(p))
            tensors.append((p.numel(), p.element_size()))
        else:
            frozen_b += quantised.get(id(p), _element_bytes(p))
    for b in model.buffers():
        frozen_b += _element_bytes(b)
    kept_device = kept_host = 0
    state = get_state(model)
    for delta in (state.deltas.values() if state else []):
        on_host = getattr(delta.config, "originals", "same_device") == "cpu"
        for t in delta.originals.values():
            if on_host:
                kept_host += _element_bytes(t)
            else:
                kept_device += _element_bytes(t)
        kept_host += sum(_element_bytes(r.original) for r in delta.rewrites)  # PiSSA/OLoRA keep theirs on the CPU
    if getattr(model, "_planner_rewrites", False):  # planned with the default init: the rewritten weights' originals
        kept_host += sum(_element_bytes(m.base_layer.weight) for m in model.modules() if isinstance(m, DeltaLayer)
                         and getattr(m, "lora_A", None) is not None)
    return _Weights(parameters=total, trainable=trainable, frozen_bytes=frozen_b, trainable_bytes=trainable_b,
                    kept_device=kept_device, kept_host=kept_host, largest_trainable=largest,
                    largest_quantised=largest_q, trainable_tensors=tensors)


# ---------------------------------------------------------------- the simulated step

ACT, LOGITS, GRADS = 0, 1, 2


class _Ledger:
    """Live bytes of every storage created during the simulated step, by category, after each op."""

    def __init__(self, known: set[int]):
        self.known = known  # storages that existed before the step (weights, buffers): never counted
        self.sizes: dict[int, tuple[int, int]] = {}  # storage key -> (bytes, category)
        self.live = [0, 0, 0]
        self.timeline: list[tuple[int, int, int]] = []
        self.category = ACT
        self.marks: dict[str, int] = {}
        self.forward = True
        self.window: set[int] | None = None  # storages block 1's forward creates (between marks f1s and f1e)
        self.window_open = False
        self.window_sizes: dict[int, tuple[int, int]] = {}
        self.gone = (0, 0, 0)  # of those alive at f1e, the bytes freed by the time the forward has ended (mark fe)

    def track(self, t: torch.Tensor, category: int | None = None) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.known or key in self.sizes:
            return
        size, cat = storage.nbytes(), self.category if category is None else category
        self.sizes[key] = (size, cat)
        self.live[cat] += size
        if self.window_open and self.window is not None:
            self.window.add(key)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        entry = self.sizes.pop(key, None)
        if entry is not None:
            self.live[entry[1]] -= entry[0]

    def retag(self, t: torch.Tensor | None, category: int) -> None:
        if t is None:
            return
        key = t.untyped_storage()._cdata
        entry = self.sizes.get(key)
        if entry is not None and entry[1] != category:
            self.live[entry[1]] -= entry[0]
            self.live[category] += entry[0]
            self.sizes[key] = (entry[0], category)

    def record(self) -> None:
        self.timeline.append((self.live[0], self.live[1], self.live[2]))

    def mark(self, name: str) -> None:
        """Record the live bytes now (frees since the last op included) and remember where."""
        if name not in self.marks:
            self.record()
            self.marks[name] = len(self.timeline) - 1
            if name == "f1s":
                self.window, self.window_open = set(), True
            elif name == "f1e" and self.window is not None:
                self.window_open = False
                self.window_sizes = {k: self.sizes[k] for k in self.window if k in self.sizes}  # alive at f1e
            elif name == "fe" and self.window is not None:  # e.g. a KV cache dies with the model's output
                gone = [0, 0, 0]
                for key, (size, cat) in self.window_sizes.items():
                    if key not in self.sizes:
                        gone[cat] += size
                self.gone = (gone[0], gone[1], gone[2])


def _dispatch_mode(ledger: _Ledger) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    scalar = torch.ops.aten._local_scalar_dense.default

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is scalar and args[0].device.type == "meta":
                # A data-dependent check (is the mask all ones? is the batch packed?) reads a value that
                # meta tensors lack; the simulated batch is full rows of ones, so the answer is "yes" / 1.
                return {torch.bool: True}.get(args[0].dtype, 1)
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    ledger.track(t)
            ledger.record()
            return out

    return Mode()


class _FusedAttention(torch.autograd.Function):
    """Memory of a fused attention kernel (flash / memory-efficient): keeps q, k, v, the output and an
    fp32 log-sum-exp per query row; no s x s scores. Its backward allocates dq, dk, dv and, on CUDA with
    16-bit inputs, an fp32 accumulator the size of q (FlashAttention-2's dq_accum)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                accumulator: bool) -> torch.Tensor:
        B, H, T, _ = q.shape
        out = q.new_empty(B, T, H, v.shape[-1]).transpose(1, 2)  # (B, H, T, Dv), laid out (B, T, H, Dv) as kernels write it
        lse = q.new_empty(B, H, T, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, mask)  # a mask (a prefix's, a padded batch's) is kept too
        ctx.accumulator = accumulator and q.element_size() < 4
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, k, v = ctx.saved_tensors[:3]
        scratch = q.new_empty(q.shape, dtype=torch.float32) if ctx.accumulator else None
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None)
        del scratch
        return grads


def _attention(device: str, original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # torch's CPU flash kernel takes no dropout: with attention dropout the math path runs (s x s scores)
        math_path = query.dim() != 4 or (device == "cpu" and dropout_p > 0)
        if math_path:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:  # torch turns a boolean mask into an additive one first
            mask = torch.where(mask, query.new_zeros(()), query.new_full((), float("-inf")))  # (B, 1, T, S)
        return _FusedAttention.apply(query, key, value, mask, device == "cuda")

    return sdpa


def _first_tensor(value: Any) -> torch.Tensor | None:
    from torch.utils._pytree import tree_leaves

    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    return next((t for t in tree_leaves(value) if isinstance(t, torch.Tensor)), None)


@dataclass
class _Peak:
    """The forward/backward peak: bytes by category at the moment the sum is largest."""

    activations: int
    logits: int
    gradients: int

    @property
    def total(self) -> int:
        return self.activations + self.logits + self.gradients


def _inputs(model: nn.Module, task: str, batch: int, seq: int, target_seq: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long, device="meta")}
    if task == "seq_cls":
        inputs["labels"] = torch.zeros(batch, dtype=torch.long, device="meta")
    elif task == "seq2seq":
        inputs["labels"] = torch.zeros(batch, target_seq, dtype=torch.long, device="meta")
    else:
        inputs["labels"] = ids
    return inputs


class _FusedCrossEntropy(torch.autograd.Function):
    """Memory of a fused (compiled) cross-entropy: keeps only its 16-bit logits, recomputes the softmax in
    backward; the fp32 upcast lives only inside the kernel."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits)
        return logits.new_empty((), dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (logits,) = ctx.saved_tensors
        return torch.empty_like(logits)


def _chunked_loss(model: nn.Module, inputs: dict[str, torch.Tensor], ledger: _Ledger, fused: bool,
                  chunks: int = 8) -> torch.Tensor:
    """torchtune's CEWithChunkedOutputLoss: the output projection in chunks of the sequence, each chunk's
    logits upcast to fp32 only inside its own cross-entropy (fused: not even there, as torch.compile makes it)."""
    labels = inputs.pop("labels")
    head = model.get_output_embeddings()
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    hidden = body(**inputs)[0]  # (B, T, h)
    ledger.category = LOGITS
    logits = [head(part) for part in hidden.chunk(chunks, dim=1)]  # chunks of (B, T/c, V), kept for backward
    total = 0
    for part, lab in zip(logits, labels.chunk(chunks, dim=1)):
        if fused:
            total = total + _FusedCrossEntropy.apply(part)
        else:
            total = total + nn.functional.cross_entropy(part.float().flatten(0, 1), lab.flatten(), reduction="sum")
    return total / labels.numel()


class _FusedLinearLossMemory(torch.autograd.Function):
    """Memory of deltatune.losses' fused linear + cross-entropy: the forward keeps the gradient for the hidden
    states (and an fp32 gradient for the head's weight when it trains), and holds one chunk of fp32 logits and its
    gradient (plus a 16-bit copy under a 16-bit compute dtype) at a time; the backward only scales."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        z = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=hidden.device)  # a chunk's logits, then dz
        half = z.to(hidden.dtype) if hidden.dtype != torch.float32 else None  # dz in the compute dtype
        del z, half
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0, device=hidden.device))
        ctx.weight_grad = grad_w is not None
        return hidden.new_empty((), dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return torch.empty_like(grad_h), (torch.empty_like(grad_w) if ctx.weight_grad else None), None


def _fused_linear_loss(model: nn.Module, inputs: dict[str, torch.Tensor], ledger: _Ledger, s: Setting, task: str) -> torch.Tensor:
    """The fused loss the pipeline runs (train.loss: fused): the model up to its head, then one chunk at a time."""
    from .losses import chunk_rows, final_hidden, head_of

    labels = inputs.pop("labels")
    if task == "seq2seq":
        inputs["decoder_input_ids"] = labels
    hidden = final_hidden(model, inputs)  # (B, T, h): the head is stood in for, its logits never made
    ledger.category = LOGITS
    try:
        weight = head_of(model.get_output_embeddings()).weight
    except DeltaError:
        weight = model.get_output_embeddings().weight
    rows = min(hidden.shape[0] * hidden.shape[1], chunk_rows(weight.shape[0], s.device if s.device == "cpu" else None))
    return _FusedLinearLossMemory.apply(hidden, weight, rows)


class _MetaSafeAutocast(torch.autocast):
    """torch.autocast for the simulation: transformers 4.x rotary embeddings open
    autocast(device_type=x.device.type, enabled=False), and torch has no autocast for "meta"."""

    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


def _simulate(model: nn.Module, task: str, s: Setting, marks: list[nn.Module] | None) -> tuple[_Ledger, bool]:
    """Run one training micro-step on the meta model; the ledger holds its memory timeline.

    marks: blocks 0 and 1 of the stack, to record where block 1's forward and backward begin and end."""
    # Held, not just their addresses: a buffer the step replaces (a rotary cache) would free its storage
    # and the address could come back for an activation that would then go uncounted.
    existing = [t.untyped_storage() for t in [*model.parameters(), *model.buffers()]]
    ledger = _Ledger({storage._cdata for storage in existing})
    trainable = [p for p in model.parameters() if p.requires_grad]
    hooks: list[Any] = []
    for p in trainable:
        hooks.append(p.register_post_accumulate_grad_hook(lambda p: ledger.retag(p.grad, GRADS)))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and s.loss == "standard":
        def enter_head(module: nn.Module, args: Any) -> None:
            if ledger.forward:
                ledger.category = LOGITS

        def leave_head(module: nn.Module, args: Any, output: Any) -> None:
            x = _first_tensor(args)
            if ledger.forward and x is not None and x.requires_grad:  # its gradient ends the head's backward
                x.register_hook(lambda g: setattr(ledger, "category", ACT))

        hooks += [head.register_forward_pre_hook(enter_head), head.register_forward_hook(leave_head)]
    if marks is not None:
        def block_hooks(index: int, block: nn.Module) -> None:
            def before(module: nn.Module, args: Any) -> None:
                if ledger.forward and index == 1:
                    ledger.mark("f1s")

            def after(module: nn.Module, args: Any, output: Any) -> None:
                if not ledger.forward:
                    return
                if index == 1:
                    ledger.mark("f1e")
                out = _first_tensor(output)
                if out is not None and out.requires_grad:
                    out.register_hook(lambda g: ledger.mark(f"b{index}"))

            hooks.extend([block.register_forward_pre_hook(before), block.register_forward_hook(after)])

        for i, block in enumerate(marks):
            block_hooks(i, block)

    sdpa, autocast = torch.nn.functional.scaled_dot_product_attention, torch.autocast
    torch.nn.functional.scaled_dot_product_attention = _attention(s.device, sdpa)
    torch.autocast = _MetaSafeAutocast
    target = s.target_seq or s.seq
    try:
        with _dispatch_mode(ledger), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if s.accum > 1:  # later micro-batches start with every gradient allocated
                for p in trainable:
                    p.grad = torch.zeros_like(p)
                    ledger.retag(p.grad, GRADS)
            inputs = _inputs(model, task, s.batch, s.seq, target)
            if s.loss == "fused" and task in ("causal_lm", "seq2seq") and head is not None:
                loss = _fused_linear_loss(model, inputs, ledger, s, task)
            elif s.loss in ("chunked", "compiled") and task == "causal_lm" and head is not None:
                loss = _chunked_loss(model, inputs, ledger, fused=s.loss == "compiled")
            else:
                loss = model(**inputs).loss
            ledger.forward = False
            ledger.mark("fe")  # the forward's outputs other than the loss are gone
            ledger.category = LOGITS if head is not None else ACT
            del inputs
            ran = loss.requires_grad
            if ran:
                loss.backward()
            del loss
            ledger.category = ACT
            ledger.record()
    finally:
        torch.nn.functional.scaled_dot_product_attention, torch.autocast = sdpa, autocast
        for h in hooks:
            h.remove()
        for p in trainable:
            p.grad = None
    return ledger, ran


def _peak_of(timeline: list[tuple[int, int, int]]) -> _Peak:
    best = max(timeline, key=sum, default=(0, 0, 0))
    return _Peak(*best)


def _extrapolate(ledger: _Ledger, depth: int) -> _Peak | None:
    """The peak of a `depth`-block run from a 3-block run: block 1's forward and backward stretches of the
    timeline repeated depth - 2 times, everything after each repetition shifted by what one block leaves
    behind. None when the run's marks are missing (then the whole depth must run).

    Marks are timeline entries taken at the boundaries: f1s before block 1's forward, f1e after it; b1 when
    the gradient of block 1's output is complete (its backward starts), b0 when block 0's is (it ends)."""
    T, m = ledger.timeline, ledger.marks
    if "f1s" not in m or "f1e" not in m or not m["f1s"] < m["f1e"]:
        return None
    has_backward = "b1" in m and "b0" in m
    if ("b1" in m) != ("b0" in m) or (has_backward and not m["f1e"] <= m["b1"] < m["b0"]):
        return None
    reps = depth - 2  # copies of the middle block

    def add(a: tuple[int, ...], b: tuple[int, ...], k: int = 1) -> tuple[int, ...]:
        return tuple(x + k * y for x, y in zip(a, b))

    def top(segment: list[tuple[int, int, int]], shift: tuple[int, ...]) -> tuple[int, ...] | None:
        return add(max(segment, key=sum), shift) if segment else None

    zero = (0, 0, 0)
    f1s, f1e = m["f1s"], m["f1e"]
    d_fwd = add(T[f1e], T[f1s], -1)  # what one block's forward leaves behind
    candidates = [top(T[:f1s + 1], zero),
                  top(T[f1s + 1:f1e + 1], add(zero, d_fwd, (reps - 1) if sum(d_fwd) > 0 else 0))]
    after_fwd = add(zero, d_fwd, reps - 1)
    if has_backward:
        b1, b0 = m["b1"], m["b0"]
        d_bwd = add(T[b0], T[b1], -1)  # what one block's backward leaves behind (negative: it frees)
        fe = m.get("fe")
        if fe is not None and f1e <= fe <= b1:
            # once the forward has ended, a block holds only what survives it (its KV cache entry, say, is gone)
            candidates.append(top(T[f1e + 1:fe + 1], after_fwd))
            after_fwd = add(zero, add(d_fwd, ledger.gone, -1), reps - 1)
            candidates.append(top(T[fe + 1:b1 + 1], after_fwd))
        else:
            candidates.append(top(T[f1e + 1:b1 + 1], after_fwd))
        candidates.append(top(T[b1 + 1:b0 + 1], add(after_fwd, d_bwd, (reps - 1) if sum(d_bwd) > 0 else 0)))
        candidates.append(top(T[b0 + 1:], add(after_fwd, d_bwd, reps - 1)))
    else:
        candidates.append(top(T[f1e + 1:], after_fwd))
    return _Peak(*max((c for c in candidates if c is not None), key=sum))


class _Subject:
    """A model config + a method: weights counted on the full-depth meta model, steps simulated on a
    three-block copy when the blocks are alike."""

    def __init__(self, hf_config: Any, task: str, deltas: list[tuple[str, DeltaConfig]], trust_remote_code: bool = False,
                 extrapolate: bool = True):
        self.hf_config, self.task, self.deltas, self.remote = hf_config, task, deltas, trust_remote_code
        self.delta = deltas[-1][1]
        self.extrapolate = extrapolate
        self._full: dict[tuple[str, str | None], tuple[nn.Module, DeltaConfig]] = {}
        self._sims: dict[Setting, _Peak] = {}

    def attached(self, dtype: str, attention: str | None, depth: int | None = None) -> tuple[nn.Module, DeltaConfig]:
        config = self.hf_config
        if depth is not None:
            config = _with_depth(config, depth)
            if config is None:
                raise DeltaError("no depth setting")
        model = _build(config, self.task, DTYPES[dtype], attention, self.remote)
        try:
            for name, delta in self.deltas:  # the last one trains (AdapterFusion over frozen adapters)
                if getattr(delta, "rewrites_base", False):
                    # PiSSA / OLoRA decompose the base weight's values, which the meta device lacks: the same
                    # tensors come from the default init, and _weights adds the originals they keep in host RAM
                    default = next(f.default for f in dataclasses.fields(delta) if f.name == "init")
                    delta = delta.replace(init=default)
                    model._planner_rewrites = True
                api.attach(model, delta.replace(), name=name)
            resolved = api.attached(model)[self.deltas[-1][0]]
        except (DeltaError, TypeError, NotImplementedError) as err:
            if isinstance(err, DeltaError):
                raise DeltaError(f"{self.delta.method} cannot attach to {type(model).__name__}: {err}") from None
            raise DeltaError(f"{self.delta.method} cannot attach to {type(model).__name__} on the meta device: {err}") from None
        return model, resolved

    def full(self, dtype: str, attention: str | None) -> tuple[nn.Module, DeltaConfig]:
        key = (dtype, attention)
        if key not in self._full:
            self._full[key] = self.attached(dtype, attention)
        return self._full[key]

    def peak(self, s: Setting) -> _Peak:
        key = dataclasses.replace(s, optimizer="adamw", quant=None)  # the step's tensors depend on neither
        if key not in self._sims:
            self._sims[key] = self._run(s)
        return self._sims[key]

    def _run(self, s: Setting) -> _Peak:
        full, _ = self.full(s.dtype, s.attention)
        stacks = block_stacks(full)
        depth = stacks[0][1] if len(stacks) == 1 else None
        if self.extrapolate and depth is not None and depth > 3 and _alike(full, stacks[0][0]):
            try:
                small, _ = self.attached(s.dtype, s.attention, depth=3)
            except DeltaError:
                small = None
            small_stacks = block_stacks(small) if small is not None else []
            if small is not None and len(small_stacks) == 1 and small_stacks[0][1] == 3:
                blocks = small.get_submodule(small_stacks[0][0])
                _prepare(small, s)
                ledger, ran = _simulate(small, self.task, s, [blocks[0], blocks[1]])
                if not ran:
                    return _Peak(0, 0, 0)
                peak = _extrapolate(ledger, depth)
                if peak is not None:
                    return peak
        model, _ = self.attached(s.dtype, s.attention)
        _prepare(model, s)
        ledger, ran = _simulate(model, self.task, s, None)
        return _peak_of(ledger.timeline) if ran else _Peak(0, 0, 0)


def _prepare(model: nn.Module, s: Setting) -> None:
    """As the pipeline prepares a model: train mode, and checkpointing as `deltatune train` enables it."""
    model.train()
    if s.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise DeltaError(f"{type(model).__name__} does not support gradient checkpointing")
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _with_depth(hf_config: Any, depth: int) -> Any | None:
    config = copy.deepcopy(hf_config)
    for key in _DEPTH_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, depth)
            types = getattr(config, "layer_types", None)
            if isinstance(types, list):
                config.layer_types = types[:depth]
            return config
    return None


def _alike(model: nn.Module, stack: str) -> bool:
    """Every block of the stack has the same parameters (names, shapes, dtypes, trainable or not) and the
    config declares no per-layer kinds (sliding-window layers, MoE every other layer)."""
    blocks = model.get_submodule(stack)
    signatures = {tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in b.named_parameters()) for b in blocks}
    types = getattr(model.config, "layer_types", None)
    return len(signatures) == 1 and (not isinstance(types, list) or len(set(types)) <= 1)


# ---------------------------------------------------------------- the plan


def _master_bytes(w: _Weights, s: Setting) -> tuple[int, int, int]:
    """(masters, bytes the optimizer steps over, its largest tensor): with fp32 masters (the default) a trainable
    16-bit tensor is stepped, and its gradient kept, as its 4-byte master; with kahan it keeps a 16-bit
    compensation buffer (the "masters" here) and is stepped through a transient fp32 stand-in (fp32 states)."""
    if s.master_weights == "none":
        return 0, w.trainable_bytes, w.largest_trainable
    if s.master_weights == "kahan":
        masters = sum(numel * size for numel, size in w.trainable_tensors if size < 4)
    else:
        masters = sum(4 * numel for numel, size in w.trainable_tensors if size < 4)
    stepped = sum(numel * max(size, 4) for numel, size in w.trainable_tensors)
    return masters, stepped, max((numel * max(size, 4) for numel, size in w.trainable_tensors), default=0)


def _optimizer_bytes(w: _Weights, s: Setting) -> tuple[int, int]:
    """(states, step temporaries) for the trainable tensors (as their fp32 masters, where they have them)."""
    _, stepped, largest = _master_bytes(w, s)
    name = s.optimizer
    if name in BNB_STATES:
        per = BNB_STATES[name]
        states = 0
        for numel, size in w.trainable_tensors:
            if per == 2 and numel >= 4096:
                states += 2 * numel + 2 * 4 * math.ceil(numel / 256)  # uint8 m and v + an fp32 absmax per 256
            else:
                states += 8 * numel  # 32-bit states
        return states, 0
    count = TORCH_STATES[name]
    states = count * stepped
    if s.master_weights == "kahan" and any(size < 4 for _, size in w.trainable_tensors):
        # one 16-bit tensor at a time: its fp32 stand-in and gradient, and the step's own temporaries over it
        return states, (2 + (1 if name in FOREACH_TEMPS else 0)) * largest
    if count == 0 or name not in FOREACH_TEMPS:
        return states, 0
    if s.device == "cuda":  # torch's foreach path: sqrt(v) of every tensor at once
        return states, stepped
    return states, 2 * largest  # the CPU's per-tensor path: sqrt(v), then / bias correction


def _compose(subject: _Subject, s: Setting, model_name: str, memory: int | None) -> Plan:
    full, resolved = subject.full(s.dtype, s.attention)
    w = _weights(full, s.quant)
    peak = subject.peak(s)
    states, temps = _optimizer_bytes(w, s)
    masters, stepped, _ = _master_bytes(w, s)
    # with masters: the fp32 gradients they accumulate (each 16-bit one freed by its hook); kahan keeps the 16-bit ones
    grads_all = w.trainable_bytes if s.master_weights == "kahan" else stepped
    # the simulated backward's gradients are the parameters' own; with masters they are held in fp32 instead
    peak_grads = peak.gradients * grads_all // max(1, w.trainable_bytes)
    dequant = w.largest_quantised * DTYPES[s.dtype].itemsize if s.quant else 0
    backward_peak = peak.total - peak.gradients + peak_grads + states + dequant
    step_peak = grads_all + states + temps
    phase = "backward" if backward_peak >= step_peak else "optimizer step"
    if phase == "backward":
        activations, logits, grads, temporaries = peak.activations + dequant, peak.logits, peak_grads, 0
    else:
        activations, logits, grads, temporaries = 0, 0, grads_all, temps
    dynamic = activations + logits + grads + temporaries
    if s.device == "cuda":
        overhead = CUDA_CONTEXT + CUBLAS_WORKSPACE + int(FRAGMENTATION * dynamic)
        kept_here, host = w.kept_device, w.kept_host
    else:
        overhead = CPU_PROCESS
        kept_here, host = w.kept_device + w.kept_host, 0
    # the reference's forward runs under no_grad before the policy's and frees its activations, so only its
    # weights count; a delta method's reference is its own weights with the delta off: nothing more
    reference = w.frozen_bytes + w.trainable_bytes if s.reference and METHODS[resolved.method].kind == "select" else 0
    total = (w.frozen_bytes + w.trainable_bytes + masters + kept_here + reference + grads + states + temporaries
             + activations + logits + overhead)
    plan = Plan(model=model_name, architecture=f"{type(full).__name__} ({getattr(full.config, 'model_type', '?')}), "
                f"{w.parameters / 1e9:.2f}B parameters", method=_describe_method(resolved), delta=resolved,
                setting=s, parameters=w.parameters, trainable=w.trainable, frozen_weights=w.frozen_bytes,
                trainable_weights=w.trainable_bytes, kept_copies=kept_here, gradients=grads, optimizer_states=states,
                optimizer_temporaries=temporaries, activations=activations, logits=logits, overhead=overhead,
                total=total, peak_phase=phase, master_weights=masters, host_copies=host, memory=memory,
                reference_weights=reference,
                attention=str(getattr(full.config, "_attn_implementation", None) or s.attention or "sdpa"))
    sixteen = plan.sixteen_bit_trainable = sum(numel for numel, size in w.trainable_tensors if size < 4)
    if reference:
        plan.notes.append(f"reference: {resolved.method} trains the base weights, so the stage's reference is a "
                          f"second, frozen copy of them ({format_size(reference)}); a delta method such as LoRA "
                          "switches its delta off instead and holds no copy")
    if sixteen and s.master_weights == "fp32":
        plan.notes.append(f"master weights fp32: the {sixteen:,} trainable {s.dtype} parameters train through fp32 "
                          f"copies ({format_size(masters)}), with fp32 gradients and optimizer states; "
                          "master_weights 'none' drops them but loses every update under half a 16-bit spacing")
    elif sixteen and s.master_weights == "kahan":
        plan.notes.append(f"master weights kahan: the {sixteen:,} trainable {s.dtype} parameters keep a {s.dtype} "
                          f"compensation buffer ({format_size(masters)}) instead of an fp32 copy; gradients stay "
                          f"{s.dtype}, optimizer states fp32, and one tensor at a time has a transient fp32 copy")
    elif sixteen:
        plan.notes.append(f"master weights none: the {sixteen:,} trainable {s.dtype} parameters are updated in "
                          f"{s.dtype}, gradients and optimizer states too (updates under half a spacing round away)")
    return plan


def _describe_method(config: DeltaConfig) -> str:
    shown = []
    for f in dataclasses.fields(config):
        if f.name in ("task_type", "base_model_name_or_path", "revision") or not f.metadata.get("serialise", True):
            continue
        value = getattr(config, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value != default or f.name in ("r", "target_modules", "num_virtual_tokens"):
            if value is not None:
                text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                shown.append(f"{f.name}={text[:60]}")
    return config.method + (f" ({', '.join(shown)})" if shown else "")


class _FirstOfEach(logging.Filter):
    """Passes the first record of each (logger, level, message), drops its repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextlib.contextmanager
def _each_message_once():
    """transformers logs some warnings from every model it builds (BertLMHeadModel's "add is_decoder=True"), and
    one plan builds dozens (a model per method, the depth extrapolation, the search): show each once. The filter
    sits on the handlers transformers' records reach (its own, or the root's when it propagates)."""
    import transformers  # its logger's handler is installed on first use: look for it after

    handlers, logger = [], transformers.utils.logging.get_logger()
    while logger is not None:
        handlers += logger.handlers
        logger = logger.parent if logger.propagate else None
    handlers = handlers or [logging.lastResort]  # no handler configured: Python's last resort prints them
    # one filter per handler: a record passes every handler, and each shows it once
    filters = [(handler, _FirstOfEach()) for handler in handlers if handler is not None]
    for handler, once in filters:
        handler.addFilter(once)
    try:
        yield
    finally:
        for handler, once in filters:
            handler.removeFilter(once)


def _messages_once(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _each_message_once():
            return fn(*args, **kwargs)
    return wrapper


@_messages_once
def plan(model: Any, method: str | DeltaConfig | dict[str, DeltaConfig] = "lora", *, batch: int = 8, seq: int = 1024, dtype: str = "bf16",
         quant: str | None = None, gradient_checkpointing: bool = False, optimizer: str = "adamw", accum: int = 1,
         memory: str | int | None = None, device: str = "cuda", task: str | None = None, attention: str | None = None,
         loss: str = "standard", target_seq: int | None = None, search: bool = True, trust_remote_code: bool = False,
         master_weights: str = "fp32", num_labels: int | None = None, reference: bool = False, **fields: Any) -> Plan:
    """The peak memory of training `model` with `method` in one setting, by what holds it.

    model: a hub id, a model folder, a config.json path or a transformers config (only the config is read).
    method: a method name with its config fields as keywords (`r=16, target_modules="all-linear"`), a
    DeltaConfig, or {adapter name: DeltaConfig} attached in order, the last one training (AdapterFusion).
    memory: what the device has ("24GB", "80GiB", bytes); with it the plan says whether the run fits and, with
    `search`, which changes would make it fit and the largest batch and max_length that fit.
    loss: "standard" is transformers' loss (the logits upcast to fp32 whole); "fused" deltatune's fused linear +
    cross-entropy (deltatune.losses, what `deltatune train` runs for causal LMs and seq2seq); "chunked" is torchtune's chunked
    cross-entropy; "compiled" the same under torch.compile (only the 16-bit logits kept).
    master_weights: how trainable 16-bit parameters train: "fp32" masters (the pipeline's default, master.py),
    "kahan" (a 16-bit compensation buffer instead) or "none" (updated in 16 bits).
    num_labels: a sequence classifier's output count (a reward model's one score); None: the config's own.
    reference: the training stage compares the model with a reference (DPO, KTO, GRPO with beta > 0); a method
    that trains the base weights (full, freeze, bitfit) then holds a frozen copy of them, counted as one more
    copy of the weights (a delta method adds nothing: its reference is the base with the delta off)."""
    setting = Setting(batch=batch, seq=seq, dtype=dtype, quant=quant, gradient_checkpointing=gradient_checkpointing,
                      optimizer=optimizer.lower() if isinstance(optimizer, str) else optimizer, accum=accum,
                      device=device, attention=attention, loss=loss, target_seq=target_seq, master_weights=master_weights,
                      reference=reference)
    setting.check()
    budget = parse_size(memory) if memory is not None else None
    hf_config = load_model_config(model, trust_remote_code)
    task, task_note = (task, None) if task else default_task(hf_config)
    if task not in TASKS:
        raise DeltaError(f"task = {task!r} is not allowed: expected one of {', '.join(TASKS)}")
    if num_labels is not None and task == "seq_cls":
        hf_config.num_labels = num_labels  # load_model_config gave a copy: the caller's config is left alone
    if task == "seq_cls" and getattr(hf_config, "pad_token_id", 0) is None:
        # a decoder's classifier finds each row's last token by the pad id and refuses a batch without one; a run
        # sets it from the tokenizer (load_base), and which id it is changes no tensor's size
        hf_config.pad_token_id = 0
    name = model if isinstance(model, str) else type(model).__name__
    limit = _position_limit(hf_config)
    check_positions(hf_config, seq, "seq (--seq)", name)
    if target_seq is not None:
        check_positions(hf_config, target_seq, "target_seq", name)
    subject = _Subject(hf_config, task, _method_configs(method, fields), trust_remote_code)
    result = _compose(subject, setting, name, budget)
    if task_note:
        result.notes.append(task_note)
    if setting.loss == "fused" and task in ("causal_lm", "seq2seq"):
        fused, standard = subject.peak(setting), subject.peak(dataclasses.replace(setting, loss="standard"))
        result.notes.append(f"loss: fused (deltatune.losses; train.loss: fused), {format_size(fused.logits)} at the peak; "
                            f"transformers' standard loss would hold {format_size(standard.logits)} of logits and loss "
                            f"buffers, a step peak {format_size(max(0, standard.total - fused.total))} higher")
    result.activations_by_checkpointing = {
        on: _activations_only(subject, dataclasses.replace(setting, gradient_checkpointing=on)) for on in (False, True)
        if _supports_checkpointing(subject, setting) or not on}
    if budget is not None and search:
        _search(subject, result, limit)
    return result


def _activations_only(subject: _Subject, s: Setting) -> int:
    return subject.peak(s).activations


def _supports_checkpointing(subject: _Subject, s: Setting) -> bool:
    full, _ = subject.full(s.dtype, s.attention)
    return bool(getattr(full, "supports_gradient_checkpointing", False))


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _position_limit(hf_config: Any) -> int | None:
    return next((n for _, n in _position_keys(hf_config)), None)


def _position_keys(hf_config: Any) -> list[tuple[str, int]]:
    return [(k, v) for k in _POSITION_KEYS if isinstance(v := getattr(hf_config, k, None), int) and v > 0]


def check_positions(hf_config: Any, length: int, what: str, model: str) -> None:
    """A sequence longer than the model's positions is refused before anything runs: a forward pass would
    fail deep in the model (the position embeddings end there), and a plan of it would plan nothing real."""
    keys = _position_keys(hf_config)
    if keys and length > keys[0][1]:
        key, limit = keys[0]
        raise DeltaError(f"{what} {length} is longer than the {limit} positions of {model} ({key} = {limit} in its "
                         f"config); lower {what.split()[-1].strip('()')} to {limit} or less")


def _total(subject: _Subject, s: Setting, name: str) -> int:
    return _compose(subject, s, name, None).total


def _accepts(subject: _Subject, s: Setting, name: str) -> bool:
    try:
        _total(subject, s, name)
    except DeltaError:
        return False
    return True


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest n in [low, high] with fits(n), for a monotone fits; None if not even low fits."""
    if not fits(low):
        return None
    n = low
    while n * 2 <= high and fits(n * 2):
        n *= 2
    lo, hi = n, min(high, n * 2)  # fits(lo), and nothing above hi is tried
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _search(subject: _Subject, plan: Plan, limit: int | None) -> None:
    s, name, budget = plan.setting, plan.model, plan.memory
    assert budget is not None

    def fits(setting: Setting) -> bool:
        return _total(subject, setting, name) <= budget

    plan.searched = True
    plan.max_batch = _largest(lambda b: fits(dataclasses.replace(s, batch=b)), 1, 1 << 16)
    plan.max_seq = _largest(lambda n: fits(dataclasses.replace(s, seq=n)), 1, limit or (1 << 20))
    if plan.fits:
        return
    alts: list[tuple[str, Setting | None, DeltaConfig | None]] = []
    if plan.max_batch is not None and plan.max_batch < s.batch:
        b = plan.max_batch
        accum = math.ceil(s.batch * s.accum / b)
        alts.append((f"batch {b} with accum {accum} ({b * accum} examples per step)",
                     dataclasses.replace(s, batch=b, accum=accum), None))
    if not s.gradient_checkpointing and _supports_checkpointing(subject, s):
        alts.append(("gradient checkpointing", dataclasses.replace(s, gradient_checkpointing=True), None))
    four_bit = dataclasses.replace(s, quant="nf4", dtype="bf16" if s.dtype == "fp32" else s.dtype)
    quantisable = s.quant is None and _accepts(subject, four_bit, name)  # full fine-tuning trains the weights: no
    if quantisable:
        alts.append(("a 4-bit (nf4) base", four_bit, None))
    if s.optimizer in ("adam", "adamw") and plan.optimizer_states > GiB // 4:
        alts.append(("an 8-bit optimizer (adamw8bit)", dataclasses.replace(s, optimizer="adamw8bit"), None))
    if plan.max_seq is not None and plan.max_seq < s.seq:
        alts.append((f"max_length {plan.max_seq}", dataclasses.replace(s, seq=plan.max_seq), None))
    if subject.delta.method != "lora":
        alts.append(("LoRA r=16 on the default targets instead", s, METHODS["lora"].config_cls(r=16)))
    combined = dataclasses.replace(s, batch=1, accum=s.batch * s.accum,
                                   gradient_checkpointing=_supports_checkpointing(subject, s))
    if quantisable:
        combined = dataclasses.replace(combined, quant="nf4", dtype="bf16" if s.dtype == "fp32" else s.dtype)
    alts.append(("all of: batch 1 with accumulation, checkpointing" + (", a 4-bit base" if quantisable else ""),
                 combined, None))
    for label, setting, other in alts:
        try:
            if other is not None:
                alt_subject = _Subject(subject.hf_config, subject.task, [("default", other)], subject.remote)
                total = _total(alt_subject, setting, name)
            else:
                total = _total(subject, setting, name)
        except DeltaError:
            continue
        if total < plan.total:  # a change that saves nothing here is no advice
            plan.alternatives.append(Alternative(label, total, total <= budget, setting, other))


# ---------------------------------------------------------------- the pipeline's check


def visible_memory(device: str) -> int | None:
    """What this machine can give a run: free CUDA memory or available RAM, plus what this process already
    holds (the plan counts the weights loaded before it is made)."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return int(free) + torch.cuda.memory_reserved() + CUDA_CONTEXT  # the context exists already; the plan counts it
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        return (int(info["MemAvailable"].split()[0]) + int(status["VmRSS"].split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


QLORA_65B_FULL_GB = 780  # Dettmers et al. 2023 (QLoRA): 16-bit full fine-tuning of LLaMA 65B needs more than 780 GB


def compare_master_modes(model: Any, method: str = "full", *, planned: str | None = None, **kwargs: Any) -> str:
    """The same run planned with each way of training 16-bit weights (and on an fp32 base), side by side:
    total, and bytes per trainable parameter of what the optimizer side holds (weights, masters or compensation,
    gradients, states). What `deltatune plan --method full` prints under its plan; `planned` (a mode) marks the
    row that plan is, so the reader finds it among the others."""
    kwargs = {**kwargs, "search": False, "memory": None}
    dtype = kwargs.pop("dtype", "bf16")
    rows = [(f"{dtype}, master_weights fp32", dtype, "fp32"), (f"{dtype}, master_weights kahan", dtype, "kahan"),
            (f"{dtype}, master_weights none", dtype, "none"), ("fp32 base", "fp32", "none")]
    lines = [f"  {'trainable 16-bit weights as':<32}{'bytes/param':>12}{'total':>14}{'':>12}   loses"]
    loses = {"fp32": "nothing the optimizer computes", "kahan": "the compensation's own 16-bit rounding; 16-bit "
             "gradient sums", "none": "every update under half a 16-bit spacing"}
    for label, d, mode in rows:
        p = plan(model, method, dtype=d, master_weights=mode, **kwargs)
        # every gradient, as after backward (the plan's own figure is what is held at the peak): 16-bit ones with
        # kahan and none, the fp32 masters' with fp32 (each 16-bit tensor's master is twice its bytes)
        grads = p.trainable_weights if mode != "fp32" else p.master_weights + p.trainable_weights - p.master_weights // 2
        per = (p.trainable_weights + p.master_weights + grads + p.optimizer_states) / max(1, p.trainable)
        note = "nothing, at twice the weight memory" if d == "fp32" else loses[mode]
        mark = "   <- the plan above" if d == dtype and mode == planned else ""
        lines.append(f"  {label:<32}{per:>12.1f}{format_size(p.total):>14}{f'({p.total / 1e9:,.0f} GB)':>12}   {note}{mark}")
    lines.append(f"  (QLoRA paper, Dettmers et al. 2023: 16-bit full fine-tuning of LLaMA-65B needs more than "
                 f"{QLORA_65B_FULL_GB} GB)")
    return "\n".join(lines)


def rows_note(batch: int, rows_per_example: int) -> str:
    """What the plan's batch is when an example puts several rows into the forward (a preference pair: 2)."""
    return (f"each example is {rows_per_example} rows in the forward: planned for batch {batch} x {rows_per_example} "
            f"= {batch * rows_per_example} rows")


def plan_run(config: Any, model: nn.Module, seq: int, target_seq: int | None = None, rows_per_example: int = 1,
             task: str | None = None, reference: bool = False) -> Plan:
    """The plan of a `deltatune train` run: its model config, method, batch, data length and optimizer
    (a quantised base trains with checkpointing on where the model supports it, as the pipeline sets it).

    task: the model class the run loads, when it is not model.task's (a reward model is a sequence classifier
    loaded from a causal LM's checkpoint, whose config still names the causal LM); the loaded model's config
    carries the head's size (num_labels), so the plan counts that head and no vocabulary-sized logits.

    rows_per_example: the rows each example puts into the training forward (its stage says: a preference pair's
    chosen and rejected completion are 2), so the plan simulates train.batch_size x that many rows. A stage's
    extra forward without gradients (DPO's reference, KTO's reference and mismatched rows) frees its activations
    before the training forward keeps any, so it does not raise the peak: the stages run those forwards first.
    reference: the run holds a separate frozen reference copy of the weights (stages/reference.needs_copy: a
    preference stage on full, freeze or bitfit), planned as one more copy of the weights."""
    task = task or config.model.task
    device = "cuda" if torch.cuda.is_available() else "cpu"
    optimizer = config.train.optimizer.lower()
    if optimizer not in TORCH_STATES and optimizer not in BNB_STATES:
        optimizer = "adamw"
    rows = config.train.batch_size * rows_per_example
    result = plan(model.config, config.delta, batch=rows, seq=max(1, seq),
                  dtype=config.model.dtype, quant=config.model.quant,
                  gradient_checkpointing=config.train.gradient_checkpointing or (
                      config.model.quant is not None and bool(getattr(model, "supports_gradient_checkpointing", False))),
                  optimizer=optimizer, accum=config.train.grad_accum, memory=visible_memory(device), device=device,
                  task=task, target_seq=target_seq, search=False,
                  loss="fused" if getattr(config.train, "loss", "standard") == "fused" and task in (
                      "causal_lm", "seq2seq") else "standard",
                  trust_remote_code=config.model.trust_remote_code,
                  master_weights=getattr(config.train, "master_weights", "fp32"), reference=reference)
    if rows_per_example > 1:
        result.notes.append(rows_note(config.train.batch_size, rows_per_example))
    return result


def check_run(config: Any, model: nn.Module, seq: int, say: Callable[[str], Any],
              target_seq: int | None = None, rows_per_example: int = 1, task: str | None = None,
              reference: bool = False) -> Plan | None:
    """Print the run's memory plan; warn when its total exceeds what this machine can give."""
    try:
        result = plan_run(config, model, seq, target_seq, rows_per_example, task, reference)
    except Exception as err:  # a plan is advice: it never stops a run
        say(f"memory plan unavailable: {str(err).splitlines()[0][:200]}")
        return None
    say(result.table())
    if result.fits is False:
        say(f"WARNING: the plan's peak ({format_size(result.total)}) exceeds the {format_size(result.memory or 0)} "
            f"this machine can give; `deltatune plan` lists changes that fit")
    return result
