"""Training-step time of every method that peft also has: deltatune vs peft, side by side.

    python benchmarks/methods_vs_peft.py                   # every case, ~2-4 min on 2 CPU cores
    python benchmarks/methods_vs_peft.py --cases lora ia3  # some of them

For each case both libraries get the same adapter on copies of one llama-shaped
model (random init, fixed seed, no downloads): deltatune attaches it, writes it in
peft's format, and peft loads those weights, so the logits are checked equal before
anything is timed. Then forward + loss + backward + AdamW steps of the two are
interleaved (the order alternates each round) and the medians and the median of
the per-round ratio peft / deltatune are printed (> 1: deltatune is faster).

A method joins with one entry in CASES: a deltatune config and the peft config
that computes the same thing.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from safetensors.torch import load_file

import deltatune as dt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_vs_peft import core_count, cpu_model, load_note, med_iqr, paired_ratio, timeit_interleaved  # noqa: E402

warnings.filterwarnings("ignore")


@dataclass(frozen=True)
class Case:
    deltatune: Callable[[], dt.DeltaConfig]
    peft: Callable[[Any], Any]  # (the peft module) -> a peft config
    # For a method that trains through an encoder its file folds away: deltatune's trainable name -> peft's,
    # so peft gets the same encoder weights (else the weights go through deltatune's saved file).
    names: Callable[[str], str] | None = None


def _prefix_names(name: str) -> str:
    """prefix_embeddings.default -> prompt_encoder.default.embedding.weight; the projection -> peft's transform."""
    if name.startswith("prefix_embeddings."):
        return "prompt_encoder.default.embedding.weight"
    return name.replace("prefix_projection.default.", "prompt_encoder.default.transform.")


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]

CASES: dict[str, Case] = {
    "lora": Case(lambda: dt.LoraConfig(r=16, alpha=32, target_modules=ALL),
                 lambda peft: peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL, task_type="CAUSAL_LM")),
    "dora": Case(lambda: dt.LoraConfig(r=16, alpha=32, target_modules=ALL, use_dora=True),
                 lambda peft: peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL, use_dora=True, task_type="CAUSAL_LM")),
    "pissa": Case(lambda: dt.LoraConfig(r=16, alpha=32, target_modules=ALL, init="pissa"),
                  lambda peft: peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL, init_lora_weights="pissa",
                                               task_type="CAUSAL_LM")),
    "olora": Case(lambda: dt.LoraConfig(r=16, alpha=32, target_modules=ALL, init="olora"),
                  lambda peft: peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL, init_lora_weights="olora",
                                               task_type="CAUSAL_LM")),
    # the budget phase (importance scores and a re-allocation after every step) is the costly one
    "adalora": Case(lambda: dt.AdaLoraConfig(init_r=16, target_r=8, alpha=32, total_step=1000, target_modules=ALL),
                    lambda peft: peft.AdaLoraConfig(init_r=16, target_r=8, lora_alpha=32, total_step=1000,
                                                    target_modules=ALL, task_type="CAUSAL_LM")),
    "ia3": Case(lambda: dt.IA3Config(),  # llama's defaults: k_proj, v_proj, down_proj (feed-forward)
                lambda peft: peft.IA3Config(task_type="CAUSAL_LM")),
    "vera": Case(lambda: dt.VeraConfig(r=256, target_modules=ALL),  # one shared A, B; lambda_b, lambda_d per target
                 lambda peft: peft.VeraConfig(r=256, target_modules=ALL, task_type="CAUSAL_LM")),
    "hra": Case(lambda: dt.HRAConfig(r=8, target_modules=ALL),  # reflections of the input vs peft's W H built per step
                lambda peft: peft.HRAConfig(r=8, target_modules=ALL, task_type="CAUSAL_LM")),
    "loha": Case(lambda: dt.LoHaConfig(r=16, alpha=32, target_modules=ALL),
                 lambda peft: peft.LoHaConfig(r=16, alpha=32, target_modules=ALL, task_type="CAUSAL_LM")),
    "lokr": Case(lambda: dt.LoKrConfig(r=16, alpha=32, target_modules=ALL),
                 lambda peft: peft.LoKrConfig(r=16, alpha=32, target_modules=ALL, task_type="CAUSAL_LM")),
    "prompt_tuning": Case(lambda: dt.PromptTuningConfig(num_virtual_tokens=20),
                          lambda peft: peft.PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")),
    "p_tuning": Case(lambda: dt.PTuningConfig(num_virtual_tokens=20, encoder_hidden_size=128),
                     lambda peft: peft.PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128, task_type="CAUSAL_LM"),
                     names=lambda name: name),  # the same module names as peft's encoder
    "p_tuning_lstm": Case(lambda: dt.PTuningConfig(num_virtual_tokens=20, encoder="lstm", encoder_hidden_size=128),
                          lambda peft: peft.PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128, task_type="CAUSAL_LM",
                                                                encoder_reparameterization_type="LSTM"),
                          names=lambda name: name),
    "prefix_tuning": Case(lambda: dt.PrefixTuningConfig(num_virtual_tokens=20, projection_hidden_size=128),
                          lambda peft: peft.PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True,
                                                               encoder_hidden_size=128, task_type="CAUSAL_LM"),
                          names=_prefix_names),
    "p_tuning_v2": Case(lambda: dt.PTuningV2Config(num_virtual_tokens=20),
                        lambda peft: peft.PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")),
}


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).eval()


def nudge(model: torch.nn.Module) -> None:
    """Move every trainable tensor off its init, so both libraries compute a non-trivial delta."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def pair(name: str, case: Case, base: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    import peft

    ours = copy.deepcopy(base)
    dt.attach(ours, case.deltatune())
    nudge(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), case.peft(peft))
    if case.names is not None:
        params = dict(theirs.named_parameters())
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if p.requires_grad:
                    params[case.names(name)].copy_(p)
        return ours, theirs
    with tempfile.TemporaryDirectory() as tmp:
        dt.save(ours, tmp)  # peft's file format
        peft.set_peft_model_state_dict(theirs, load_file(os.path.join(tmp, "adapter_model.safetensors")))
    return ours, theirs


def step_fn(model: torch.nn.Module, ids: torch.Tensor, library: str) -> Callable[[], float]:
    """One training step as each library's documentation writes it: deltatune adds dt.regularization to the
    loss and calls dt.step after the optimizer (both no-ops for methods without training hooks); peft's AdaLoRA
    adds its penalty inside forward and wants update_and_allocate after the optimizer."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = itertools.count()
    allocate = getattr(getattr(model, "base_model", None), "update_and_allocate", None)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if library == "deltatune":
            loss = loss + dt.regularization(model)
        loss.backward()
        opt.step()
        if library == "deltatune":
            dt.step(model, next(steps))
        elif allocate is not None:
            allocate(next(steps))
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="0: the number of usable cores")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import peft
    import transformers

    torch.set_num_threads(args.threads or core_count())
    print("deltatune vs peft: training step per method")
    print(f"  python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; CPU {cpu_model()}, torch threads {torch.get_num_threads()}")
    print(f"  llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} x {args.seq} tokens, fp32; "
          f"{args.warmup} warm-up + {args.repeats} interleaved rounds; load average {load_note(0)}")
    base = build_base(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    print(f"\n  {'case':<16}{'max |logit diff|':>18}{'deltatune ms':>14}{'peft ms':>10}{'peft / deltatune':>24}")
    for name in args.cases:
        ours, theirs = pair(name, CASES[name], base)
        with torch.no_grad():
            diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
        ours.train(), theirs.train()
        times = timeit_interleaved({"deltatune": step_fn(ours, ids, "deltatune"), "peft": step_fn(theirs, ids, "peft")},
                                   args.repeats, args.warmup)
        mine, other = med_iqr(times["deltatune"])[0], med_iqr(times["peft"])[0]
        flag = "" if diff < 1e-4 else "   MISMATCH: not the same computation"
        print(f"  {name:<16}{diff:>18.1e}{mine * 1e3:>14.1f}{other * 1e3:>10.1f}{paired_ratio(times, 'peft', 'deltatune'):>24}{flag}")
    print(f"\n  total {time.perf_counter() - start:.0f} s; load average at end {load_note(torch.get_num_threads())}")


if __name__ == "__main__":
    main()
