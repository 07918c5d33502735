"""The memory planner against measured peaks: predicted vs measured over a grid of models x methods x batch x
sequence length x gradient checkpointing, each point trained in a fresh process.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory.py --threads 1            # the full grid, BENCHMARKS.md
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory.py --threads 1 --quick    # a small subset

What is measured. Each grid point runs in its own process, forked from this one before it has run any torch
op (torch, transformers and deltatune already imported, so a point does not pay their import). The child
builds the model (Qwen2-shaped, random fp32 weights; QLoRA: saved and reloaded through deltatune.load_base with
an NF4 base), attaches the method, turns checkpointing on when asked, builds torch's AdamW, and runs one
warm-up step at the point's batch and length, so that kernels, thread pools, the autograd engine and MKL's cached
GEMM packing buffers (a few MiB its memory manager keeps: library workspace, which the planner counts with the
process, like cuBLAS's workspace on a GPU) exist; then it drops the warm-up's gradients and optimizer states and
returns freed memory to the OS (malloc_trim).

    baseline  = VmRSS after that, with VmHWM reset by writing "5" to /proc/self/clear_refs
    measured  = VmHWM after two full training steps (forward, backward, AdamW step, zero_grad) - baseline

So the measurement is the peak resident growth of a training step over a process that holds the model, the
delta and the optimizer object: activations, logits and loss buffers, gradients, AdamW's two states (created by
the first step and alive through the second) and the step's temporaries. The prediction is the planner's
`plan.step_growth` (its total minus the weights, kept originals and process it counts as static) for the same
setting on device "cpu". glibc's mmap threshold is pinned to 64 KiB in the child (mallopt), as its default
dynamic threshold grows to 32 MiB after the first large free and then keeps freed tensors in the heap, so the
resident set would count memory torch no longer holds.

On CUDA (--device cuda) the measurement is torch.cuda.max_memory_allocated over the same two steps minus the
memory allocated before them, against the plan's allocated growth (its overhead excluded).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing as mp
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

import deltatune as dt
from deltatune.planner import plan

tf.logging.set_verbosity_error()
tf.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore")

# Qwen2-shaped (grouped-query attention, SwiGLU, RMSNorm, biases on q, k, v so that BitFit has something to train)
SIZES = {
    "xs": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
    "s": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
    "m": dict(hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, vocab_size=8192),
    "l": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, vocab_size=8192),
}
METHODS = {  # name -> (deltatune method, its fields, quantised base)
    "full": ("full", {}, None),
    "lora": ("lora", dict(r=8), None),
    "qlora": ("lora", dict(r=8, target_modules="all-linear"), "nf4"),
    "prompt": ("prompt_tuning", dict(num_virtual_tokens=16), None),
    "bitfit": ("bitfit", {}, None),
    "ia3": ("ia3", {}, None),
    "adapter": ("bottleneck_adapter", dict(placement="houlsby", bottleneck_size=16), None),
    "prefix": ("prefix_tuning", dict(num_virtual_tokens=16), None),
}
BATCHES = (2, 4, 8)
SEQS = (128, 256)


@dataclass(frozen=True)
class Point:
    size: str
    method: str
    batch: int
    seq: int
    checkpointing: bool

    def label(self) -> str:
        return f"{self.size:<3}{self.method:<8}b{self.batch:<2} s{self.seq:<4} {'ckpt' if self.checkpointing else '    '}"


def model_config(size: str) -> tf.Qwen2Config:
    return tf.Qwen2Config(**SIZES[size], max_position_embeddings=1024, tie_word_embeddings=False)


def delta_config(method: str) -> dt.DeltaConfig:
    name, fields, _ = METHODS[method]
    return dt.METHODS[name].config_cls(**fields)


def predicted(p: Point, device: str) -> int:
    name, fields, quant = METHODS[p.method]
    result = plan(model_config(p.size), delta_config(p.method), batch=p.batch, seq=p.seq, dtype="fp32", quant=quant,
                  gradient_checkpointing=p.checkpointing, optimizer="adamw", device=device, search=False)
    if device == "cpu":
        return result.step_growth
    # torch's allocator: no CUDA context, no cuBLAS workspace, no fragmentation allowance
    return result.total - result.overhead - (result.frozen_weights + result.trainable_weights + result.kept_copies)


# ---------------------------------------------------------------- the measured process


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _build(p: Point, folder: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    quant = METHODS[p.method][2]
    if quant is not None:
        model = dt.load_base(folder, quant, dtype="fp32")
    else:
        model = tf.AutoModelForCausalLM.from_config(model_config(p.size))
    dt.attach(model, delta_config(p.method))
    if quant is not None:
        dt.prepare_kbit(model, gradient_checkpointing=p.checkpointing)
    elif p.checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int, seq: int, device: str) -> None:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _measure(p: Point, folder: str | None, device: str, threads: int, conn) -> None:
    try:
        torch.set_num_threads(threads)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so freed tensors leave the resident set
        model = _build(p, folder).to(device)
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        # warm-up at the point's own shapes: kernels, thread pools, the autograd engine and MKL's cached GEMM
        # packing buffers (a few MiB, kept by its memory manager: library workspace, like cuBLAS's on a GPU)
        _step(model, optimizer, p.batch, p.seq, device)
        optimizer.state.clear()  # the real run's states are created by its own first step
        gc.collect()
        libc.malloc_trim(0)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        for _ in range(2):
            _step(model, optimizer, p.batch, p.seq, device)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status("VmHWM")
        conn.send(("ok", peak - base))
    except Exception as err:  # reported in the table, never silently dropped
        conn.send(("error", f"{type(err).__name__}: {str(err)[:200]}"))
    finally:
        conn.close()


def measured(p: Point, folder: str | None, device: str, threads: int) -> int | str:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure, args=(p, folder, device, threads, child))
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        status, value = "error", "the process died"
    proc.join()
    return value if status == "ok" else f"error: {value}"


# ---------------------------------------------------------------- the grid


def grid(quick: bool) -> list[Point]:
    if quick:
        return [Point(size, method, batch, 128, ckpt) for size in ("xs", "m") for method in ("full", "lora", "qlora", "prompt")
                for batch in (2, 8) for ckpt in (False, True)]
    return [Point(size, method, batch, seq, ckpt) for size in SIZES for method in METHODS for batch in BATCHES
            for seq in SEQS for ckpt in (False, True)]


def quantised_folders(points: list[Point], root: Path) -> dict[str, str]:
    """A saved copy of each size's random model, for the QLoRA points to load quantised (in a child, so that
    this process runs no torch op before forking)."""
    folders = {}
    for size in sorted({p.size for p in points if METHODS[p.method][2]}):
        folder = root / size
        ctx = mp.get_context("fork")
        proc = ctx.Process(target=_save, args=(size, str(folder)))
        proc.start()
        proc.join()
        folders[size] = str(folder)
    return folders


def _save(size: str, folder: str) -> None:
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(model_config(size)).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help=f"{len(grid(True))} points instead of {len(grid(False))}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=None, help="write the table here (default: BENCHMARKS.md for the full grid)")
    args = parser.parse_args()
    points = grid(args.quick)
    out = args.out or (None if args.quick else str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    t0 = time.perf_counter()
    rows: list[tuple[Point, int, int | str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = quantised_folders(points, Path(tmp))
        print(f"{'point':<30}{'predicted':>12}{'measured':>12}{'error':>9}", flush=True)
        for p in points:
            pred = predicted(p, args.device)
            meas = measured(p, folders.get(p.size), args.device, args.threads)
            rows.append((p, pred, meas))
            err = f"{(pred - meas) / meas:+.1%}" if isinstance(meas, int) else meas
            print(f"{p.label():<30}{pred / 2**20:>10.1f}Mi{(meas / 2**20 if isinstance(meas, int) else 0):>10.1f}Mi{err:>9}",
                  flush=True)
    elapsed = time.perf_counter() - t0
    errors = [abs(pred - meas) / meas for _, pred, meas in rows if isinstance(meas, int)]
    failed = [p for p, _, meas in rows if not isinstance(meas, int)]
    worst = max(errors) if errors else float("nan")
    median = statistics.median(errors) if errors else float("nan")
    over = sum(e > 0.10 for e in errors)
    summary = (f"{len(rows)} points in {elapsed / 60:.1f} min: worst |error| {worst:.1%}, median {median:.1%}, "
               f"{over} above 10%, {len(failed)} failed")
    print(summary)
    if out:
        write_markdown(Path(out), rows, summary, args)
        print(f"wrote {out}")


def gaps(rows) -> list[str]:
    """Where the errors come from, from the numbers."""
    done = [(p, pred, meas) for p, pred, meas in rows if isinstance(meas, int)]
    if not done:
        return []
    under = sum(pred < meas for _, pred, meas in done)
    diffs = sorted(meas - pred for _, pred, meas in done)
    big = max(done, key=lambda r: r[2] - r[1])[0]
    worst = max(done, key=lambda r: abs(r[1] - r[2]) / r[2])[0]
    return [f"The plan is below the measurement at {under} of {len(done)} points, by {diffs[len(diffs) // 2] / 2**20:.1f} "
            f"MiB (median) and {diffs[-1] / 2**20:.1f} MiB at most ({big.method}, {big.size}, batch {big.batch} x {big.seq}"
            f"{', checkpointing' if big.checkpointing else ''}): what the planner does not count (autograd's graph "
            "nodes, Python objects, small heap allocations, page rounding) is small and weighs most where the step "
            f"is smallest; the worst relative error is at {worst.method}, {worst.size}, batch {worst.batch} x {worst.seq}"
            f"{', checkpointing' if worst.checkpointing else ''}."]


def write_markdown(path: Path, rows, summary: str, args) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    command = f"OMP_NUM_THREADS={args.threads} PYTHONPATH=src python benchmarks/memory.py --threads {args.threads}" + (
        " --quick" if args.quick else "") + (" --device cuda" if args.device == "cuda" else "")
    lines = [
        "# Benchmarks",
        "",
        "## Memory planner: predicted vs measured peak",
        "",
        f"`{command}` on {cpu}, torch {torch.__version__}, transformers {tf.__version__}, {args.device}.",
        "",
        f"**{summary}.**",
        "",
        *gaps(rows),
        "",
        "Each point trains in a fresh process (forked before any torch op). *Measured*: the peak resident-set growth",
        "(VmHWM, reset through /proc/self/clear_refs) of two AdamW training steps over the process after the model,",
        "the delta and the optimizer object exist and a warm-up step of the same shape has run and been cleared",
        "(its gradients and AdamW states dropped, freed memory trimmed). *Predicted*:",
        "`deltatune.plan(..., device='cpu').step_growth` (activations, logits and loss buffers, gradients,",
        "AdamW states and step temporaries at the peak). Models: Qwen2-shaped, fp32, random weights:",
        "",
        "| size | hidden | layers | heads (kv) | FFN | vocab | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in SIZES.items():
        n = sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(model_config(name)).parameters())
        lines.append(f"| {name} | {s['hidden_size']} | {s['num_hidden_layers']} | {s['num_attention_heads']} "
                     f"({s['num_key_value_heads']}) | {s['intermediate_size']} | {s['vocab_size']} | {n / 1e6:.2f}M |")
    lines += ["", "Methods: " + "; ".join(f"{k} = `{v[0]}` {v[1] or ''}{' on an NF4 base (bitsandbytes)' if v[2] else ''}"
                                        for k, v in METHODS.items()) + ".", "",
              "| size | method | batch | seq | checkpointing | predicted MiB | measured MiB | error |",
              "|---|---|---|---|---|---|---|---|"]
    for p, pred, meas in rows:
        if isinstance(meas, int):
            lines.append(f"| {p.size} | {p.method} | {p.batch} | {p.seq} | {'yes' if p.checkpointing else 'no'} | "
                         f"{pred / 2**20:.1f} | {meas / 2**20:.1f} | {(pred - meas) / meas:+.1%} |")
        else:
            lines.append(f"| {p.size} | {p.method} | {p.batch} | {p.seq} | {'yes' if p.checkpointing else 'no'} | "
                         f"{pred / 2**20:.1f} | {meas} | |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
