"""Every method against the floor and against peft: training step, step memory, inference.

    python benchmarks/floor.py                              # every method, ~4-5 min on 2 CPU cores (BENCHMARKS.md: --threads 1)
    python benchmarks/floor.py --quick                      # floor, full, lora, ia3, prompt_tuning; few rounds
    python benchmarks/floor.py --methods lora dora prefix_tuning
    python benchmarks/floor.py --profile lora               # torch.profiler top ops: the floor's step, lora's

The floor. A copy of the model with every weight frozen, whose embedding output is made to require grad, so
forward + loss + backward runs through every layer down to the inputs but computes no weight gradient and
takes no optimizer step. A method that keeps the base frozen and trains something at or below the first layer
has to do at least that work, so its step cannot be faster (one that trains only the top layers, such as
`freeze` with its defaults, can: its backward stops early, and the table says so).

The contestants, all on copies of one llama-shaped model (random init, fixed seed, no downloads):
  * full fine-tuning (deltatune's `full`), with AdamW over every weight;
  * every method in deltatune's registry (`dt.METHODS`) that attaches to this model: with the config of
    benchmarks/methods_vs_peft.py's CASES where it has one (so peft computes the same thing), else the
    method's defaults; a method that does not attach is listed with the reason and skipped;
  * the CASES variants (dora, pissa, olora, p_tuning_lstm) too;
  * for each method in CASES, the same adapter through peft (same weights, via methods_vs_peft.pair).
Each step is forward + loss + backward + AdamW step (+ deltatune's training hooks or peft's AdaLoRA
allocation, as methods_vs_peft.step_fn writes them). The floor, deltatune's step and peft's step are
interleaved in one process, the order rotating each round; printed are the medians and the median of
the per-round ratios (step / floor, step / peft: > 1 means deltatune is slower).

Memory. Each (method, library) runs in a fresh process forked before this one has run any torch op
(benchmarks/fresh.py): it builds the model, attaches, runs one warm-up step, drops the optimizer states and
returns freed memory to the OS, then records the peak resident-set growth over two training steps. So both
libraries are charged the same things: activations, gradients, AdamW's states and the step's temporaries
(not the weights, which both hold alike). Printed: deltatune's growth and its ratio to peft's.

Inference. Under torch.no_grad, interleaved: the bare base model, the method unmerged, and a copy merged with
dt.merge (methods that add inputs rather than weights cannot merge: "-"). Ratios are to the base forward.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch

import deltatune as dt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fresh import in_fresh_process, peak_growth  # noqa: E402
from lora_vs_peft import core_count, cpu_model, infer_fn, load_note, med_iqr, timeit_interleaved  # noqa: E402
from methods_vs_peft import CASES, build_base, pair, step_fn  # noqa: E402

warnings.filterwarnings("ignore")

TARGET = 1.03  # issue 14: a frozen-base method's step within 3 % of the floor
QUICK = ["full", "lora", "ia3", "prompt_tuning"]


# ---------------------------------------------------------------- what runs


def all_methods() -> list[str]:
    """The registry's methods, then the CASES variants that are configs of a registry method (dora, pissa...)."""
    names = list(dt.METHODS)
    return names + [n for n in CASES if n not in names]


def delta_config(name: str) -> dt.DeltaConfig:
    # CASES' config where there is one: peft then computes the same thing, and AdaLoRA needs total_step
    if name in CASES:
        return CASES[name].deltatune()
    return dt.METHODS[name].config_cls()


def freeze_all(model: torch.nn.Module) -> torch.nn.Module:
    """The floor's model: no weight trains, but the embedding output requires grad, so backward reaches the inputs."""
    for p in model.parameters():
        p.requires_grad_(False)
    # A leaf made to require grad: autograd then builds the whole graph above it, with no weight gradient.
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    return model


def floor_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.item()

    return step


def attach_ours(base: torch.nn.Module, name: str) -> torch.nn.Module:
    model = copy.deepcopy(base)
    dt.attach(model, delta_config(name))
    return model


# ---------------------------------------------------------------- memory, in a fresh process


def _memory(name: str, library: str, args: argparse.Namespace) -> int | str:
    """Peak resident growth of two training steps (see the docstring); runs in a forked child."""
    try:
        torch.set_num_threads(args.threads or core_count())
        libc = ctypes.CDLL("libc.so.6")
        # a fixed mmap threshold: glibc's dynamic one would keep freed tensors resident and blur the peak
        libc.mallopt(-3, 64 * 1024)
        base = build_base(args)
        if library == "floor":
            model = freeze_all(base)
        elif library == "peft":
            import peft

            model = peft.get_peft_model(base, CASES[name].peft(peft))
        else:
            dt.attach(base, delta_config(name))
            model = base
        model.train()
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
        if library == "floor":
            step = floor_step(model, ids)
        else:
            step = step_fn(model, ids, "peft" if library == "peft" else "deltatune")
        step()  # warm-up: kernels, thread pools, allocator state
        # step_fn keeps its optimizer in its closure; the measured steps must create their own AdamW states
        for cell in step.__closure__ or ():
            if isinstance(cell.cell_contents, torch.optim.Optimizer):
                cell.cell_contents.state.clear()
        gc.collect()
        libc.malloc_trim(0)
        return peak_growth(lambda: (step(), step()))
    except Exception as err:  # shown in the table, never silently dropped
        return f"{type(err).__name__}: {str(err)[:120]}"


def memory(name: str, library: str, args: argparse.Namespace) -> int | str:
    return in_fresh_process(_memory, name, library, args)


# ---------------------------------------------------------------- timing


def flops(step: Callable[[], float]) -> int:
    """Matmul and attention FLOPs of one step (torch's counter; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def run_method(name: str, base: torch.nn.Module, floor: torch.nn.Module, ids: torch.Tensor,
               args: argparse.Namespace) -> dict[str, Any]:
    """Times one method's training step against the floor (and peft), then its inference against the base."""
    row: dict[str, Any] = {"name": name}
    if name in CASES:
        ours, theirs = pair(name, CASES[name], base)
        theirs.train()
    else:
        ours, theirs = attach_ours(base, name), None
    ours.train()
    fns = {"floor": floor_step(floor, ids), "deltatune": step_fn(ours, ids, "deltatune")}
    if theirs is not None:
        fns["peft"] = step_fn(theirs, ids, "peft")
    # the arithmetic a method adds (its delta's matmuls, a prompt's longer sequence) separates a cost that
    # is the method's own from overhead in how it is applied
    row["flops"] = flops(fns["deltatune"]) / flops(fns["floor"])
    times = timeit_interleaved(fns, args.repeats, args.warmup)
    row["floor_ms"] = statistics.median(times["floor"]) * 1e3
    row["ms"] = statistics.median(times["deltatune"]) * 1e3
    row["vs_floor"] = paired(times, "deltatune", "floor")
    row["floor_iqr"] = med_iqr([a / b for a, b in zip(times["deltatune"], times["floor"])])[1]
    if theirs is not None:
        row["peft_ms"] = statistics.median(times["peft"]) * 1e3
        row["vs_peft"] = paired(times, "deltatune", "peft")
    del theirs, fns
    gc.collect()

    # inference: the bare base, the delta unmerged, a merged copy (the training above moved the delta off its
    # init, so the unmerged forward does real delta work)
    ours.eval()
    infer = {"base": infer_fn(base, ids), "unmerged": infer_fn(ours, ids)}
    if dt.METHODS[delta_config(name).method].mergeable:
        merged = copy.deepcopy(ours)
        dt.merge(merged)
        infer["merged"] = infer_fn(merged, ids)
    times = timeit_interleaved(infer, args.repeats, 1)
    row["unmerged"] = paired(times, "unmerged", "base")
    row["merged"] = paired(times, "merged", "base") if "merged" in infer else None
    return row


def profile(name: str, base: torch.nn.Module, floor: torch.nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    """torch.profiler's top operators (self CPU time) of the floor's step and the method's, for reading a miss."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = attach_ours(base, name).train()
    for label, step in (("floor", floor_step(floor, ids)), (name, step_fn(model, ids, "deltatune"))):
        step()  # warm-up outside the profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        print(f"\n  {label}: {steps} steps, top operators by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


# ---------------------------------------------------------------- report


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def mib(x: int | str | None) -> str:
    return "-" if x is None else (f"{x / 2**20:.1f}" if isinstance(x, int) else "error")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=None, help=f"some of: {' '.join(all_methods())}")
    ap.add_argument("--quick", action="store_true", help=f"{' '.join(QUICK)} only, 4 rounds")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    ap.add_argument("--threads", type=int, default=0, help="0: the number of usable cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", metavar="METHOD", help="only profile METHOD's step against the floor's, then exit")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 4), 1
    names = args.methods or (QUICK if args.quick else all_methods())
    unknown = [n for n in names if n not in all_methods()]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {' '.join(all_methods())}")

    import peft
    import transformers

    print("Every method against the floor (frozen weights, gradients to the inputs) and against peft")
    print(f"  python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; CPU {cpu_model()}, {core_count()} usable cores")
    print(f"  llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} x {args.seq} "
          f"tokens, fp32; {args.warmup} warm-up + {args.repeats} interleaved rounds; load average {load_note(0)}")
    start = time.perf_counter()
    if args.profile:
        torch.set_num_threads(args.threads or core_count())
        base = build_base(args)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
        profile(args.profile, base, freeze_all(copy.deepcopy(base)).train(), ids)
        return

    # Memory first: the children are forked before this process runs any torch op (fresh.py's premise).
    mem: dict[tuple[str, str], int | str] = {}
    skipped: dict[str, str] = {}
    if not args.no_memory:
        mem[("floor", "floor")] = memory("floor", "floor", args)
        for name in names:
            mem[(name, "deltatune")] = memory(name, "deltatune", args)
            if isinstance(mem[(name, "deltatune")], str):
                skipped[name] = mem[(name, "deltatune")]
            elif name in CASES:
                mem[(name, "peft")] = memory(name, "peft", args)
        print(f"  memory: {len(mem)} fresh processes, {time.perf_counter() - start:.0f} s")

    torch.set_num_threads(args.threads or core_count())
    base = build_base(args)
    floor = freeze_all(copy.deepcopy(base)).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    rows = []
    for name in names:
        if name in skipped:
            continue
        try:
            rows.append(run_method(name, base, floor, ids, args))
        except Exception as err:  # a method that does not attach with these settings: say why, go on
            skipped[name] = f"{type(err).__name__}: {str(err)[:120]}"
            continue
        r = rows[-1]
        print(f"  {name}: {r['ms']:.1f} ms, {r['vs_floor']:.3f} x floor", flush=True)

    floor_mem = mem.get(("floor", "floor"))
    print(f"\n  floor step: median {statistics.median(r['floor_ms'] for r in rows):.1f} ms over all rounds; "
          f"step memory growth {mib(floor_mem)} MiB")
    head = (f"  {'method':<19}{'step ms':>9}{'/ floor':>9}{'(IQR)':>8}{'peft ms':>9}{'/ peft':>8}"
            f"{'FLOPs/floor':>12}{'mem MiB':>9}{'/ peft':>8}{'unmerged/base':>15}{'merged/base':>13}  target")
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in rows:
        m_ours, m_peft = mem.get((r["name"], "deltatune")), mem.get((r["name"], "peft"))
        m_ratio = m_ours / m_peft if isinstance(m_ours, int) and isinstance(m_peft, int) and m_peft > 0 else None
        # full fine-tuning trains the base, so the floor is no bound for it: shown, not judged
        verdict = "n/a" if r["name"] == "full" else ("ok" if r["vs_floor"] <= TARGET else "MISS")
        print(f"  {r['name']:<19}{r['ms']:>9.1f}{r['vs_floor']:>9.3f}{r['floor_iqr']:>8.3f}"
              f"{fmt(r.get('peft_ms'), '.1f'):>9}{fmt(r.get('vs_peft')):>8}{r['flops']:>12.3f}{mib(m_ours):>9}{fmt(m_ratio):>8}"
              f"{fmt(r['unmerged']):>15}{fmt(r['merged']):>13}  {verdict}")
    for name, why in skipped.items():
        print(f"  {name:<19}skipped: {why}")
    print("  FLOPs/floor: matmul + attention FLOPs of one step (torch.utils.flop_counter), the method's over the floor's")
    print(f"\n  target: step <= {TARGET} x floor; / floor and / peft are medians of per-round ratios "
          f"(> 1: deltatune slower); total {time.perf_counter() - start:.0f} s; load average at end "
          f"{load_note(torch.get_num_threads())}")


if __name__ == "__main__":
    main()
