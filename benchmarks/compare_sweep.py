"""The lr a sweep picks per method on a tiny task, and what each run forgot: `deltatune compare --sweep lr`.

    python benchmarks/compare_sweep.py                            # lora ia3 prompt_tuning, each method's default grid
    python benchmarks/compare_sweep.py --methods lora bitfit --lrs 1e-4,1e-3,1e-2 --steps 40 --out /tmp/sweep

The model is `deltatune tiny llama` (random init, hidden size 32), the task 48 "Repeat the word X" rows with a
quarter held out, the reference text a few sentences the model has never seen. A bare `--sweep lr` trains each
method at a third, once and three times its starting lr (compare.SWEEP_CENTRE); printed per method are every
run's eval loss and forgetting, the best lr and whether it sits at the edge of the grid (then the sweep did not
bracket it). The numbers describe this tiny random model only: they justify no library default, which needs
real models on real tasks. The folder is a comparison like any other: run again to resume, or read its
comparison_sweep.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from deltatune.compare import compare
from deltatune.tiny import build_tokenizer, write_tiny

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
REFERENCE = [f"the {a} of the {b} is near the {c}" for a in ("cat", "dog", "sun") for b in ("hill", "road")
             for c in ("town", "sea")]


def task(root: Path, steps: int) -> Path:
    model = root / "tiny-llama"
    if not model.exists():
        write_tiny("llama", model, seed=0, tokenizer=build_tokenizer())
    rows = [{"instruction": f"Repeat the word {WORDS[i % 8]}", "output": f"{WORDS[i % 8]} {WORDS[i % 8]}"} for i in range(48)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "reference.txt").write_text("\n\n".join(REFERENCE))
    config = {"model": {"name": str(model)},
              "data": {"train": str(root / "rows.jsonl"), "format": "instruction", "eval_fraction": 0.25},
              "train": {"max_steps": steps, "batch_size": 4, "seed": 0, "progress": False}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "ia3", "prompt_tuning"])
    parser.add_argument("--lrs", help="e.g. 1e-4,1e-3,1e-2 (default: each method's grid around its starting lr)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", help="the comparison's folder (default: a new temporary one)")
    args = parser.parse_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="compare-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    config = task(root, args.steps)
    start = time.perf_counter()
    comparison = compare(config, args.methods, root / "cmp", reference_data=str(root / "reference.txt"),
                         sweep="lr" if args.lrs is None else f"lr={args.lrs}", echo=lambda line: None)
    print(f"tiny llama, {args.steps} steps per run, {len(comparison.grid)} runs in {time.perf_counter() - start:.0f} s "
          f"({root / 'cmp'})\n")
    print(f"{'method':<15}{'lr':>10}{'eval loss':>11}{'ref loss +':>12}{'KL(base||tuned)':>17}")
    for row in comparison.grid:
        loss = f"{row.eval['loss']:.4f}" if "loss" in row.eval else row.status
        more = f"{row.ref_loss_increase:+.4f}" if row.ref_loss_increase is not None else "-"
        kl = f"{row.ref_kl:.5f}" if row.ref_kl is not None else "-"
        print(f"{row.method:<15}{row.lr:>10g}{loss:>11}{more:>12}{kl:>17}")
    print("\nbest lr per method (lowest eval loss):")
    for row in sorted(comparison.rows, key=lambda r: r.method):
        lrs = [r.lr for r in comparison.grid if r.method == row.method]
        edge = " (at the edge of the grid: widen it)" if row.lr in (min(lrs), max(lrs)) and len(lrs) > 2 else ""
        print(f"  {row.method:<15}{row.lr:g}{edge}" if row.status == "ok" else f"  {row.method:<15}failed: {row.error}")
    for note in comparison.notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
