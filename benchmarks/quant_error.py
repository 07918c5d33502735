"""How far a quantised base, and a LoRA merged into it, move a model's logits.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/quant_error.py --threads 1

For each architecture (random-weight models of a small shape; no hub download) and each
bitsandbytes format (NF4, FP4, int8), on a fixed batch of token ids:

  base       the quantised base against the fp32 base (what quantising costs before any adapter)
  requant    a LoRA (r=16, all-linear, trained a few steps on the quantised base) merged with
             dt.merge, which re-quantises the merged weights, against the same adapter unmerged
  export     the pipeline's merged export (base dequantised to fp32, adapter merged exactly,
             export_merged / `deltatune merge --dtype fp32`) against the same adapter unmerged;
             rounding only for 4-bit, but for int8 also the activation rounding: LLM.int8()'s kernel
             quantises its inputs row-wise to int8 too, which the fp32 export does not

Errors are relative L2 norms of the logits, ||y - y_ref|| / ||y_ref||, with the share of
positions whose top-1 token stays the same. |dW|/|W| is the trained delta's size relative to the
dequantised base weight (mean over layers): re-quantisation error grows with the merged weight.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
import warnings

import torch
import transformers as tf

import deltatune as dt
from deltatune import quant
from deltatune.pipeline.export import export_merged
from deltatune.surgery import DeltaLayer

warnings.filterwarnings("ignore")
tf.logging.set_verbosity_error()
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

VOCAB = 512
SHAPES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=704,
                                                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=8, n_positions=128)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=256, ffn_dim=1024, num_hidden_layers=4,
                                                   num_attention_heads=8, word_embed_proj_dim=256, max_position_embeddings=128)),
}


def relative(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y - reference).norm() / reference.norm()).item()


def top1(y: torch.Tensor, reference: torch.Tensor) -> float:
    return (y.argmax(-1) == reference.argmax(-1)).float().mean().item()


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def train_lora(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> None:
    torch.manual_seed(0)
    dt.attach(model, dt.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def delta_size(model: torch.nn.Module) -> float:
    ratios = [(m.delta_weight("default").norm() / m.base_weight().norm()).item()
              for m in model.modules() if isinstance(m, DeltaLayer) and m.quantized]
    return sum(ratios) / len(ratios)


def measure(arch: str, kinds: list[str], steps: int, root: str) -> list[tuple]:
    torch.manual_seed(0)
    full = SHAPES[arch]().eval()
    folder = f"{root}/{arch}"
    full.save_pretrained(folder)
    ids = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    reference = logits(full, ids)
    rows = []
    for kind in kinds:
        model = dt.load_base(folder, quant=kind).eval()
        base = logits(model, ids)
        train_lora(model, ids, steps)
        unmerged = logits(model, ids)
        export_merged(model, None, f"{root}/{arch}-{kind}-merged", dtype=torch.float32)
        exported = logits(tf.AutoModelForCausalLM.from_pretrained(f"{root}/{arch}-{kind}-merged").eval(), ids)
        size = delta_size(model)
        dt.merge(model)  # re-quantises the merged weights
        requant = logits(model, ids)
        rows.append((arch, kind, size, relative(base, reference), top1(base, reference), relative(requant, unmerged),
                     top1(requant, unmerged), relative(exported, unmerged)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--kinds", nargs="+", default=list(quant.KINDS), choices=list(quant.KINDS))
    parser.add_argument("--steps", type=int, default=20, help="LoRA training steps on the quantised base")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import bitsandbytes

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        rows = [row for arch in args.archs for row in measure(arch, args.kinds, args.steps, root)]
    print(f"relative L2 error of the logits (top-1 agreement); bitsandbytes {bitsandbytes.__version__}, "
          f"torch {torch.__version__}, random-weight models, 4 x 64 tokens\n")
    print("| model | format | \\|dW\\|/\\|W\\| | base vs fp32 base | merged + re-quantised vs unmerged | dequantised export vs unmerged |")
    print("|---|---|---|---|---|---|")
    for arch, kind, size, base, base_top, requant, requant_top, exported in rows:
        print(f"| {arch} | {kind} | {size:.3f} | {base:.4f} ({100 * base_top:.1f}%) | {requant:.4f} ({100 * requant_top:.1f}%) "
              f"| {exported:.1e} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
