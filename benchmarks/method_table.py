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
    "(IA)³ (default targets)": lambda: dt.IA3Config(),
    "LoHa r=8 (default targets)": lambda: dt.LoHaConfig(r=8, alpha=16),
    "LoKr r=8 (default targets)": lambda: dt.LoKrConfig(r=8, alpha=16),
    "Prompt tuning, 20 tokens": lambda: dt.PromptTuningConfig(num_virtual_tokens=20),
    "BitFit (all biases)": lambda: dt.BitFitConfig(),
}


def count(reference: str, make) -> str:
    config, cls = REFERENCES[reference]
    with torch.device("meta"):
        model = cls(config)
    try:
        dt.attach(model, make())
    except dt.DeltaError:
        return "n/a (no biases)"
    stats = dt.summary(model, print_table=False)
    return f"{stats.trainable:,} ({stats.percent:.3f}%)"


def main() -> None:
    names = list(REFERENCES)
    rows = [[method] + [count(ref, make) for ref in names] for method, make in METHODS.items()]
    widths = [max(len(r[i]) for r in rows + [["method"] + names]) for i in range(len(names) + 1)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(["method"] + names))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


if __name__ == "__main__":
    main()
