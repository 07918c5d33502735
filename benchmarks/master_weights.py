"""fp32 master weights against pure 16-bit updates, for the methods that train the base's own weights.

    PYTHONPATH=src:tests USE_HUB_KERNELS=0 python benchmarks/master_weights.py      # ~2 min on 2 CPU cores

What it does
  * one AdamW step at lr 1e-5 under full fine-tuning of the suite's tiny llama (hidden 32, weights ~0.02):
    the share of weights that move, fp32 model vs bf16 model with fp32 masters (train.master_weights: fp32,
    the masters read) vs bf16 updated in place (none);
  * `deltatune.pipeline.train.run` of full, freeze (top block) and bitfit (tiny qwen2, it has biases) on 48
    instruction rows, every step the whole set (batch 48, constant lr, so the drop is the run's, not noise):
    the loss drop (first logged loss minus last) of bf16 runs as a fraction of the fp32 run's;
  * per mode (fp32 weights, fp32 weights with bf16 autocast as transformers.Trainer's bf16=True, bf16 with fp32
    masters / kahan / none, fp16 with fp32 masters / kahan under dynamic loss scaling): bytes per trained parameter
    actually held at the step (weights + masters or compensation + gradients + AdamW states, counted from the
    tensors), the median time of a training step (forward, backward, step) of a wider llama (hidden 256, 4 layers)
    on this machine, and the loss drop of `train.run` (full, 8 steps, lr 3e-5) against the fp32 run's.

    --modes-only: only the per-mode table (~1 min)
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.pipeline.config import load_run_config
from deltatune.pipeline.train import run
from pipeline_models import save_tiny, write_jsonl
from test_pipeline_train import instruction_rows
from tiny_models import batch, build


def moved_share(dtype: torch.dtype, mode: str) -> float:
    model = build("llama").to(dtype)
    dt.attach(model, dt.FullConfig(originals="none"))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().float().clone() for n, p in named.items()}
    master = dt.MasterWeights(model, mode, warn=lambda message: None)
    optimizer = torch.optim.AdamW(master.param_groups(model.parameters()), lr=1e-5)
    model(**batch("llama")).loss.backward()
    master.step(optimizer)
    masters = {master.names[k]: m for k, m in master.masters.items()}
    moved = [(masters.get(n, p).detach().float() != start[n]).reshape(-1) for n, p in named.items()]
    return float(torch.cat(moved).float().mean())


def drop(root: Path, method: str, dtype: str, mode: str, flags: dict) -> float:
    data = write_jsonl(root / "instructions.jsonl", instruction_rows())
    flags = dict(flags)
    config = load_run_config(None, {
        "model.name": str(save_tiny(root, flags.pop("arch", "llama"))), "data.train": str(data),
        "data.format": "instruction", "data.eval_fraction": 0.0, "train.batch_size": 48, "train.log_every": 1,
        "train.scheduler": "constant", "train.progress": False, "method": method, "model.dtype": dtype,
        "train.master_weights": mode, "output.dir": str(root / f"{method}-{dtype}-{mode}"), **flags})
    result = run(config, echo=lambda *a, **k: None)
    losses = [r["loss"] for r in map(json.loads, (result.output_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]
    return losses[0] - losses[-1]


RUNS = {"full": {"train.lr": 3e-5, "train.max_steps": 8},
        "freeze": {"train.lr": 3e-5, "train.max_steps": 8, "freeze.trainable_layers": 1},
        "bitfit": {"train.lr": 3e-3, "train.max_steps": 8, "arch": "qwen2"}}


MODES = {  # label: (model dtype, master_weights, autocast)
    "fp32 weights": ("fp32", "fp32", False),
    "fp32 weights + bf16 autocast": ("fp32", "fp32", True),
    "bf16, master fp32": ("bf16", "fp32", False),
    "bf16, master kahan": ("bf16", "kahan", False),
    "bf16, master none": ("bf16", "none", False),
    "fp16, master fp32 + loss scale": ("fp16", "fp32", False),
    "fp16, master kahan + loss scale": ("fp16", "kahan", False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def held_bytes(dtype: str, mode: str, autocast: bool, steps: int = 6) -> tuple[float, float]:
    """(bytes per trained parameter held at the step, median seconds per training step) on a wider llama."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4)
    model = tf.AutoModelForCausalLM.from_config(config).to(DTYPES[dtype])
    dt.attach(model, dt.FullConfig(originals="none"))
    master = dt.MasterWeights(model, mode, warn=lambda message: None)
    scaler = dt.LossScaler(enabled=dtype == "fp16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(master.param_groups(trainable), lr=1e-5)
    ids = torch.randint(0, 1024, (4, 128))
    times, grads = [], 0
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        held = master.gradients(trainable)
        grads = sum(g.numel() * g.element_size() for g in held)
        if scaler.unscale_(held):
            master.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    count = sum(p.numel() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in trainable)
    copies = sum(t.numel() * t.element_size() for t in (*master.masters.values(), *master.comps.values()))
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    return (weights + copies + grads + states) / count, statistics.median(times[1:])


def modes_table(root: Path) -> None:
    print("per mode: bytes per trained parameter held at the step, step time (hidden-256 llama, batch 4 x 128, this "
          "machine), loss drop of train.run (full, 8 steps, lr 3e-5) / the fp32 run's")
    print(f"  {'mode':<34}{'bytes/param':>12}{'step s':>9}{'drop':>9}{'/ fp32':>8}")
    ref = None
    for label, (dtype, mode, autocast) in MODES.items():
        per, seconds = held_bytes(dtype, mode, autocast)
        flags = {**RUNS["full"], **({"train.mixed_precision": "bf16"} if autocast else {})}
        loss_drop = drop(root, "full", dtype, mode, {**flags, "output.dir": str(root / f"modes-{len(label)}-{dtype}-{mode}-{autocast}")})
        ref = loss_drop if ref is None else ref
        print(f"  {label:<34}{per:>12.1f}{seconds:>9.3f}{loss_drop:>9.4f}{loss_drop / ref:>8.2f}", flush=True)


def main() -> None:
    torch.manual_seed(0)
    if "--modes-only" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            modes_table(Path(tmp))
        return
    print("one AdamW step, lr 1e-5, full fine-tuning, tiny llama: share of weights that move")
    fp32 = moved_share(torch.float32, "fp32")
    print(f"  fp32 model                 {fp32:7.1%}")
    print(f"  bf16, fp32 masters         {moved_share(torch.bfloat16, 'fp32'):7.1%}")
    print(f"  bf16, none (16-bit update) {moved_share(torch.bfloat16, 'none'):7.1%}")
    print()
    print("loss drop of a bf16 run / the fp32 run's (8 steps, whole set each step)")
    print(f"  {'method':<8}{'lr':>8}{'fp32 drop':>11}{'bf16 master':>13}{'bf16 none':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for method, flags in RUNS.items():
            ref = drop(root, method, "fp32", "fp32", flags)
            master = drop(root, method, "bf16", "fp32", flags)
            pure = drop(root, method, "bf16", "none", flags)
            print(f"  {method:<8}{flags['train.lr']:>8.0e}{ref:>11.4f}{master / ref:>13.2f}{pure / ref:>11.2f}", flush=True)
        print()
        modes_table(root)


if __name__ == "__main__":
    sys.exit(main())
