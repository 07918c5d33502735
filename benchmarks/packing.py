"""Real (non-padding) tokens per second of training steps on padded vs packed batches.

    PYTHONPATH=src python benchmarks/packing.py [--examples 384] [--max-length 256] [--batch 8] [--width 128] [--repeats 3]

Example lengths are log-normal (exp(N(4.2, 0.8)), clipped to [4, max_length]), as instruction data is.
A tiny-ish random llama (deltatune.tiny, `--width` hidden, 4 layers) takes a forward and backward of
the causal-LM loss and an AdamW step per batch, on every weight, for each of:

  padded   examples in a seeded random order, batch_size per batch, padded to the longest (attention_mask)
  grouped  the same with data.group_by_length's order (data.global_batch with lengths)
  packed   whole examples packed into rows of max_length (pipeline/packing.py), batch_size rows per batch

Each covers the same examples once (one epoch); the table gives the share of padding cells, the time
and the real tokens per second of the fastest of --repeats interleaved passes, and the ratio to padded. Numbers on this machine's CPU in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from deltatune.pipeline.data import IGNORE, Collator, Example, global_batch
from deltatune.pipeline.packing import pack
from deltatune.tiny import build_model, build_tokenizer


def lognormal_examples(n: int, max_length: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = max(4, min(max_length, int(rng.lognormvariate(4.2, 0.8))))
        ids = [rng.randrange(10, 390) for _ in range(length)]
        out.append(Example(ids, list(ids)))
    return out


def epoch(model: torch.nn.Module, batches: list[list[Example]], collate: Collator) -> tuple[float, int, int]:
    """(seconds, real tokens, cells) of one pass of training steps over the batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = cells = 0
    start = time.perf_counter()
    for examples in batches:
        batch = collate(examples)
        kwargs = {"use_cache": False} if "position_ids" in batch else {}
        loss = model(**batch, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real += sum(len(e.input_ids) for e in examples)
        cells += batch["input_ids"].numel()
    return time.perf_counter() - start, real, cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=384)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="passes per kind, interleaved; the fastest counts")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = build_model("llama", tokenizer, width=args.width, num_hidden_layers=4,
                        max_position_embeddings=args.max_length).train()
    data = lognormal_examples(args.examples, args.max_length)
    count, size = len(data), args.batch
    lengths = [len(e.input_ids) for e in data]
    plans = {
        "padded": [[data[i] for i in global_batch(count, 0, at, size)] for at in range(0, count, size)],
        "grouped": [[data[i] for i in global_batch(count, 0, at, size, lengths)] for at in range(0, count, size)],
    }
    rows = pack(data, args.max_length)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    plans["packed"] = [[rows[i] for i in order[at:at + size]] for at in range(0, len(rows), size)]
    collate = Collator(pad_id=tokenizer.pad_token_id, task="causal_lm")
    epoch(model, plans["padded"][:2], collate)  # warm-up
    print(f"{count} examples, lengths log-normal (mean {sum(lengths) / count:.0f}, max {max(lengths)}), "
          f"max_length {args.max_length}, batch {size}, llama width {args.width} x 4 layers, "
          f"{torch.get_num_threads()} threads")
    print(f"{'batches':<8} {'steps':>5} {'padding':>8} {'seconds':>8} {'real tok/s':>11} {'vs padded':>9}")
    best: dict[str, tuple[float, int, int]] = {}
    for _ in range(args.repeats):  # interleaved, so a busy machine slows every kind alike
        for name, batches in plans.items():
            result = epoch(model, batches, collate)
            best[name] = min(best.get(name, result), result)
    base = best["padded"][1] / best["padded"][0]
    for name, (seconds, real, cells) in best.items():
        rate = real / seconds
        print(f"{name:<8} {len(plans[name]):>5} {1 - real / cells:>8.1%} {seconds:>8.1f} {rate:>11,.0f} {rate / base:>8.2f}x")

if __name__ == "__main__":
    main()
