"""fp32 master weights against pure 16-bit updates, for the methods that train the base's own weights.

    PYTHONPATH=src:tests USE_HUB_KERNELS=0 python benchmarks/master_weights.py      # ~2 min on 2 CPU cores

What it does
  * one AdamW step at lr 1e-5 under full fine-tuning of the suite's tiny llama (hidden 32, weights ~0.02):
    the share of weights that move, fp32 model vs bf16 model with fp32 masters (train.master_weights: fp32,
    the masters read) vs bf16 updated in place (none);
  * `deltatune.pipeline.train.run` of full, freeze (top block) and bitfit (tiny qwen2, it has biases) on 48
    instruction rows, every step the whole set (batch 48, constant lr, so the drop is the run's, not noise):
    the loss drop (first logged loss minus last) of bf16 runs as a fraction of the fp32 run's.
"""

from __future__ import annotations

import json
import sys
import tempfile
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


def main() -> None:
    torch.manual_seed(0)
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


if __name__ == "__main__":
    sys.exit(main())
