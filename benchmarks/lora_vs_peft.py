"""LoRA speed: deltatune vs peft on one llama-shaped model, side by side.

    python benchmarks/lora_vs_peft.py                 # defaults: ~1-3 min on 2 CPU cores
    python benchmarks/lora_vs_peft.py --repeats 20 --hidden 768 --layers 6

What it does
  * builds one LlamaForCausalLM from a LlamaConfig in code (random init, fixed seed,
    no downloads) and deep-copies it for each contestant;
  * attaches the same LoRA (r, alpha, targets, dropout 0) with deltatune and with
    peft.get_peft_model, then copies deltatune's adapter weights (B made non-zero)
    into the peft model through deltatune's own peft-format save, and checks that
    logits, loss and every LoRA gradient agree, so both time the same work;
  * times (a) a training step: forward + loss + backward + AdamW step over the
    trainable parameters, and (b) an inference forward under torch.no_grad for the
    bare base model, deltatune unmerged, peft unmerged and deltatune merged;
    optionally (c) one wrapped layer alone (--layer-bench), which isolates the
    per-layer cost of the LoRA wrapper from the rest of the model;
  * warms up, then interleaves the contestants (the order rotates every repeat, so
    drift in CPU clock or cache state hits all of them alike) and reports medians
    and inter-quartile ranges.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable

import torch

import deltatune as dt

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation chatter


# ---------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_note(own: float) -> str:
    """1-minute load average; more than our own `own` threads means other processes shared the cores."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "n/a"
    busy = load > own + 0.5
    return f"{load:.2f}" + ("  (other processes compete for the cores: expect noisy timings; try --threads 1)" if busy else "")


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------- timing


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Run every fn `warmup` times, then `repeats` rounds; the order rotates each round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        k = i % len(names)
        order = names[k:] + names[:k]
        if i % 2:  # alternate the direction too: A,B / B,A for two contestants
            order = order[::-1]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def med_iqr(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return statistics.median(xs), float("nan")
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[2] - q[0]


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> str:
    """Median (and IQR) of the per-round ratio num/den: both were timed in the same round, so drift cancels."""
    ratios = [a / b for a, b in zip(times[num], times[den])]
    m, iqr = med_iqr(ratios)
    return f"{m:.3f} (IQR {iqr:.3f})"


def print_table(title: str, times: dict[str, list[float]], ref: str | None = None) -> dict[str, float]:
    print(f"\n{title}")
    head = f"  {'variant':<26}{'median ms':>11}{'IQR ms':>9}{'min ms':>9}"
    if ref:
        head += f"{'vs ' + ref:>24}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    meds = {}
    for n, xs in times.items():
        m, iqr = med_iqr(xs)
        meds[n] = m
        row = f"  {n:<26}{m * 1e3:>11.1f}{iqr * 1e3:>9.1f}{min(xs) * 1e3:>9.1f}"
        if ref:
            row += f"{(m / statistics.median(times[ref]) - 1) * 100:>+23.1f}%"
        print(row)
    return meds


# ---------------------------------------------------------------- models


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max(args.seq, 512),
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def make_deltatune(base: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    model = copy.deepcopy(base)
    dt.attach(model, dt.LoraConfig(r=args.r, alpha=args.alpha, dropout=0.0, target_modules=args.targets))
    # B starts at zero; make it non-zero so the output check compares real LoRA paths.
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, p in dt.delta_parameters(model, "default").items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def make_peft(base: torch.nn.Module, dt_model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    import peft
    from safetensors.torch import load_file

    model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(args.targets), task_type="CAUSAL_LM"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        dt.save(dt_model, tmp)  # peft's file format
        result = peft.set_peft_model_state_dict(model, load_file(os.path.join(tmp, "adapter_model.safetensors")))
    lora_missing = [k for k in result.missing_keys if "lora_" in k]
    if lora_missing or result.unexpected_keys:
        sys.exit(f"peft load mismatch: missing {lora_missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model


def lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters keyed by their path in the underlying transformers model."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n.removeprefix("base_model.model.")] = p
    return out


# ---------------------------------------------------------------- checks


def check_equal(base, dt_model, peft_model, merged, ids, labels) -> None:
    print("\nequivalence (same adapter weights in both libraries)")
    with torch.no_grad():
        y_base = base(input_ids=ids, use_cache=False).logits
        y_dt = dt_model(input_ids=ids, use_cache=False).logits
        y_peft = peft_model(input_ids=ids, use_cache=False).logits
        y_merged = merged(input_ids=ids, use_cache=False).logits
    scale = y_dt.abs().max().item()
    print(f"  |logits| max                        {scale:.3e}")
    print(f"  max |deltatune - base|               {(y_dt - y_base).abs().max().item():.3e}   (LoRA is live: must be >> the diffs below)")
    d_peft = (y_dt - y_peft).abs().max().item()
    d_merged = (y_dt - y_merged).abs().max().item()
    print(f"  max |deltatune - peft|               {d_peft:.3e}")
    print(f"  max |deltatune - deltatune merged|   {d_merged:.3e}")

    p_dt, p_peft = lora_params(dt_model), lora_params(peft_model)
    if set(p_dt) != set(p_peft):
        sys.exit(f"trainable parameter sets differ: {sorted(set(p_dt) ^ set(p_peft))[:4]}")
    w_diff = max((p_dt[k] - p_peft[k]).abs().max().item() for k in p_dt)
    losses, grads = [], []
    for m in (dt_model, peft_model):
        m.train()
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({k: p.grad.clone() for k, p in lora_params(m).items()})
        m.zero_grad(set_to_none=True)
        m.eval()
    g_diff = max((grads[0][k] - grads[1][k]).abs().max().item() / (grads[0][k].abs().max().item() + 1e-30) for k in grads[0])
    print(f"  trainable tensors / params           {len(p_dt)} / {sum(p.numel() for p in p_dt.values()):,} (both), max weight diff {w_diff:.1e}")
    print(f"  loss deltatune / peft                {losses[0]:.6f} / {losses[1]:.6f}")
    print(f"  max rel. LoRA grad diff              {g_diff:.3e}")
    ok = d_peft <= 1e-4 * max(scale, 1) and d_merged <= 1e-3 * max(scale, 1) and g_diff < 1e-3 and abs(losses[0] - losses[1]) < 1e-4
    print(f"  => {'OK: same outputs and gradients' if ok else 'MISMATCH: timings below do not compare equal work'}")


# ---------------------------------------------------------------- benchmarks


def train_step_fn(model, ids, labels, lr: float) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)  # same defaults (foreach) for both

    def step() -> float:
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def infer_fn(model, ids) -> Callable[[], object]:
    def fwd():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    return fwd


def layer_bench(dt_model, peft_model, base, args) -> None:
    """One wrapped q_proj / down_proj alone: forward and forward+backward."""
    import peft

    for target in ("q_proj", "down_proj"):
        name = next(n for n, _ in base.named_modules() if n.endswith(target))
        dt_layer = dt_model.get_submodule(name)
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert isinstance(peft_layer, peft.tuners.lora.Linear) and isinstance(dt_layer, dt.methods.lora.LoraLayer)
        base_layer = base.get_submodule(name)
        x = torch.randn(args.batch, args.seq, base_layer.in_features, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert torch.allclose(dt_layer(x), peft_layer(x), atol=1e-5, rtol=1e-4)
        fns = {}
        for label, layer in (("base nn.Linear", base_layer), ("deltatune", dt_layer), ("peft", peft_layer)):
            fns[label + " fwd"] = (lambda l=layer: _no_grad(l, x))
        t = timeit_interleaved(fns, args.layer_repeats, args.warmup)
        print_table(f"(c) single {target} layer {tuple(x.shape)} -> {base_layer.out_features}, no_grad forward", t, ref="base nn.Linear fwd")
        print(f"  peft / deltatune: median per-round ratio {paired_ratio(t, 'peft fwd', 'deltatune fwd')}")

        # A contiguous upstream gradient, as in a real model (``.sum().backward()`` would feed an
        # expanded stride-0 gradient and time the copies it forces instead of the layer).
        xg = x.clone().requires_grad_(True)
        gy = torch.randn(*x.shape[:-1], base_layer.out_features, generator=torch.Generator().manual_seed(4))
        fns = {}
        for label, layer in (("deltatune", dt_layer), ("peft", peft_layer)):
            fns[label + " fwd+bwd"] = (lambda l=layer: l(xg).backward(gy))
        t = timeit_interleaved(fns, args.layer_repeats, args.warmup)
        print_table(f"(c) single {target} layer, forward + backward (grads of LoRA weights and input)", t)
        print(f"  peft / deltatune: median per-round ratio {paired_ratio(t, 'peft fwd+bwd', 'deltatune fwd+bwd')}")
        for m in (dt_layer, peft_layer):
            m.zero_grad(set_to_none=True)
        xg.grad = None


def _no_grad(layer, x):
    with torch.no_grad():
        return layer(x)


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=0, help="0: same as --heads")
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per benchmark (each contestant once per round)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=0, help="0: the number of usable cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-infer", action="store_true")
    ap.add_argument("--layer-bench", action="store_true", help="also time one wrapped layer alone")
    ap.add_argument("--layer-repeats", type=int, default=30)
    args = ap.parse_args()

    import peft
    import transformers

    threads = args.threads or core_count()
    torch.set_num_threads(threads)
    print("deltatune LoRA vs peft LoRA")
    print(f"  python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, deltatune {dt.__version__}")
    print(f"  CPU: {cpu_model()}; usable cores {core_count()}; torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})")
    print(f"  model: llama hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads or args.heads}, "
          f"intermediate {args.intermediate}, vocab {args.vocab}; batch {args.batch} x seq {args.seq}, fp32")
    print(f"  LoRA: r {args.r}, alpha {args.alpha:g}, dropout 0, targets {','.join(args.targets)}")
    print(f"  timing: {args.warmup} warm-up + {args.repeats} interleaved rounds, medians (IQR = q3 - q1)")
    print(f"  load average at start: {load_note(0)}")

    t_start = time.perf_counter()
    base = build_base(args)
    base.requires_grad_(False)
    dt_model = make_deltatune(base, args)
    peft_model = make_peft(base, dt_model, args)
    merged = copy.deepcopy(dt_model)
    dt.merge(merged)
    for m in (dt_model, peft_model, merged):
        m.eval()
    print(f"  base params {sum(p.numel() for p in base.parameters()):,}")

    g = torch.Generator().manual_seed(args.seed + 2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()

    check_equal(base, dt_model, peft_model, merged, ids, labels)

    if not args.skip_infer:
        fns = {
            "base (no adapter)": infer_fn(base, ids),
            "deltatune unmerged": infer_fn(dt_model, ids),
            "peft unmerged": infer_fn(peft_model, ids),
            "deltatune merged": infer_fn(merged, ids),
        }
        t = timeit_interleaved(fns, args.repeats, args.warmup)
        meds = print_table("(b) inference forward, torch.no_grad, eval", t, ref="base (no adapter)")
        print(f"  peft / deltatune (unmerged): ratio of medians {meds['peft unmerged'] / meds['deltatune unmerged']:.3f}, "
              f"median per-round ratio {paired_ratio(t, 'peft unmerged', 'deltatune unmerged')}   (>1: deltatune faster)")
        for n in ("deltatune unmerged", "peft unmerged", "deltatune merged"):
            print(f"  {n} / base: median per-round ratio {paired_ratio(t, n, 'base (no adapter)')}")
        tok = args.batch * args.seq
        print("  throughput tokens/s: " + ", ".join(f"{n} {tok / m:,.0f}" for n, m in meds.items()))

    if not args.skip_train:
        for m in (dt_model, peft_model):
            m.train()
        fns = {
            "deltatune": train_step_fn(dt_model, ids, labels, args.lr),
            "peft": train_step_fn(peft_model, ids, labels, args.lr),
        }
        t = timeit_interleaved(fns, args.repeats, args.warmup)
        meds = print_table("(a) training step: forward + loss + backward + AdamW step", t)
        print(f"  peft / deltatune: ratio of medians {meds['peft'] / meds['deltatune']:.3f}, "
              f"median per-round ratio {paired_ratio(t, 'peft', 'deltatune')}   (>1: deltatune faster)")
        for m in (dt_model, peft_model):
            m.eval()

    if args.layer_bench:
        layer_bench(dt_model, peft_model, base, args)

    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s; load average at end: {load_note(torch.get_num_threads())}")


if __name__ == "__main__":
    main()
