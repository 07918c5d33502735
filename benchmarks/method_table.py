"""Trainable parameters of each method on reference shapes, built on the meta device.

    python benchmarks/method_table.py

Prints the README's method table: per method, the trainable count and percentage
on RoBERTa-base (sequence classification head excluded: RobertaModel) and on a
Llama-3.2-3B-shaped causal LM. No weights are allocated, so it runs in seconds.
"""

from __future__ import annotations

import warnings

import torch
import transformers as tf

import deltatune as dt

warnings.filterwarnings("ignore")
tf.logging.set_verbosity_error()

REFERENCES = {
    "RoBERTa-base": (tf.RobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                      intermediate_size=3072, vocab_size=50265), tf.RobertaModel),
    "Llama-3.2-3B": (tf.LlamaConfig(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                                    head_dim=128, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
                     tf.LlamaForCausalLM),
}

METHODS = {
    "LoRA r=8 (default targets)": lambda: dt.LoraConfig(r=8, alpha=16),
    "LoRA r=8 all-linear": lambda: dt.LoraConfig(r=8, alpha=16, target_modules="all-linear"),
    "DoRA r=8 (default targets)": lambda: dt.LoraConfig(r=8, alpha=16, use_dora=True),
    # PiSSA / OLoRA train LoRA's own tensors; their SVD / QR needs real weights, so count them with LoRA's init
    "PiSSA / OLoRA r=8 (default targets)": lambda: dt.LoraConfig(r=8, alpha=16),
    "AdaLoRA init_r=12, at init (LoRA's targets)": lambda: dt.AdaLoraConfig(init_r=12, target_r=8, total_step=1000,
                                                                           target_modules=LORA_TARGETS),
    "AdaLoRA, at target_r=8 (saved)": lambda: dt.AdaLoraConfig(init_r=12, target_r=8, total_step=1000,
                                                              target_modules=LORA_TARGETS, rank_pattern=AT_TARGET),
    "(IA)³ (default targets)": lambda: dt.IA3Config(),
    "VeRA r=256 (default targets)": lambda: dt.VeraConfig(),
    "HRA r=8 (default targets)": lambda: dt.HRAConfig(),
    "LoHa r=8 (default targets)": lambda: dt.LoHaConfig(r=8, alpha=16),
    "LoKr r=8 (default targets)": lambda: dt.LoKrConfig(r=8, alpha=16),
    "Prompt tuning, 20 tokens": lambda: dt.PromptTuningConfig(num_virtual_tokens=20),
    "Prompt ensemble, 4 x 20 tokens": lambda: dt.PromptTuningConfig(num_virtual_tokens=20, num_prompts=4),
    "P-tuning, 20 tokens, MLP (training)": lambda: dt.PTuningConfig(num_virtual_tokens=20),
    "P-tuning, 20 tokens (saved / inference)": lambda: dt.PTuningConfig(num_virtual_tokens=20, inference_mode=True),
    "Prefix tuning, 20 tokens, projection (training)": lambda: dt.PrefixTuningConfig(num_virtual_tokens=20),
    "Prefix tuning, 20 tokens (saved / inference)": lambda: dt.PrefixTuningConfig(num_virtual_tokens=20, projection=False),
    "P-tuning v2, 20 tokens": lambda: dt.PTuningV2Config(num_virtual_tokens=20),
    "BitFit (all biases)": lambda: dt.BitFitConfig(),
    "Freeze: top 2 blocks": lambda: dt.FreezeConfig(trainable_layers=2, train_head=False),
    "Freeze: linear probe (head only)": lambda: dt.FreezeConfig(trainable_layers=0),
    "Full fine-tuning": lambda: dt.FullConfig(),
    "Diff pruning 0.5% (trains / keeps)": lambda: dt.DiffPruningConfig(target_sparsity=0.005),
    "Houlsby adapters, reduction 16": lambda: dt.AdapterConfig(placement="houlsby"),
    "Pfeiffer adapter, reduction 16": lambda: dt.AdapterConfig(placement="pfeiffer"),
    "Parallel adapter, reduction 16": lambda: dt.AdapterConfig(placement="parallel", scaling=4.0),
    "AdapterFusion of 2 Pfeiffer adapters": lambda: dt.AdapterFusionConfig(adapters=["a", "b"]),
    "LN tuning (default norms)": lambda: dt.LNTuningConfig(),
    "FourierFT n=1000 (default targets)": lambda: dt.FourierFTConfig(n_frequency=1000),
}

WHY_NOT = {"no bias terms": "n/a (no biases)", "leaves nothing to train": "n/a (no head)"}


# AdaLoRA on the modules LoRA's defaults take on both models (peft's AdaLoRA defaults for RoBERTa add key and dense).
LORA_TARGETS = ["query", "value", "q_proj", "v_proj"]
# The saved size at the target budget: every module at 8 of its 12 triplets (on RoBERTa, whose targets share one
# shape, any split of the total rank 8 x modules gives the same count).
AT_TARGET: dict = {}


def _two_pfeiffer_adapters(model: torch.nn.Module) -> None:
    for name in ("a", "b"):
        dt.attach(model, dt.AdapterConfig(placement="pfeiffer"), name=name)


# What a method needs attached before it (counted as frozen parameters of the model).
PREPARE = {"AdapterFusion of 2 Pfeiffer adapters": _two_pfeiffer_adapters}


def count(reference: str, method: str, make) -> str:
    config, cls = REFERENCES[reference]
    with torch.device("meta"):
        model = cls(config)
    AT_TARGET.clear()
    AT_TARGET.update({f"{n}.lora_E": [True] * 8 + [False] * 4 for n, _ in model.named_modules()
                      if n.rsplit(".", 1)[-1] in LORA_TARGETS})
    try:
        PREPARE.get(method, lambda _: None)(model)
        dt.attach(model, make())
    except dt.DeltaError as err:
        return next((v for k, v in WHY_NOT.items() if k in str(err)), f"n/a ({err})")
    stats = dt.summary(model, print_table=False)
    if isinstance(dt.attached(model)["default"], dt.DiffPruningConfig):
        from deltatune.methods.diff_pruning import kept_entries

        # w and alpha train per targeted entry; what the file keeps after dt.finalize, as a share of the base model
        base = stats.total - stats.trainable
        kept = kept_entries(model)
        return f"{stats.trainable:,} ({stats.trainable / base:.2f}x the model) / {kept:,} ({100 * kept / base:.3f}%)"
    return f"{stats.trainable:,} ({stats.percent:.3f}%)"


def main() -> None:
    names = list(REFERENCES)
    rows = [[method] + [count(ref, method, make) for ref in names] for method, make in METHODS.items()]
    widths = [max(len(r[i]) for r in rows + [["method"] + names]) for i in range(len(names) + 1)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(["method"] + names))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


if __name__ == "__main__":
    main()
