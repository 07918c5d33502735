"""A whole LoRA training step on a Qwen2.5-0.5B-shaped model: deltatune (fused loss, answer-only labels,
padding-free packing) against peft + transformers' standard loss on padded batches of the same examples.

    PYTHONPATH=src python benchmarks/lean_step.py                       # 2,048 and 4,096 real tokens, 4 layers
    PYTHONPATH=src python benchmarks/lean_step.py --layers 24 --tokens 2048

The model: Qwen2.5-0.5B's shape (vocabulary 151,936, hidden 896, FFN 4,864, 14 heads, 2 KV heads, tied
embeddings), random weights, fp32, fewer layers by default (the loss side, which this measures, does not
depend on depth). The data: examples of log-normal length (median 180 tokens), the first half of each a
prompt (label -100) and the rest the answer, drawn until they hold the step's real tokens. LoRA r=16 on
q_proj and v_proj in both libraries, AdamW. Each variant runs in a fresh process (forked before any torch
op): *peak* is the resident-set growth of one step (forward, backward, AdamW) over the process after a
warm-up step (VmHWM reset through /proc/self/clear_refs), *time* the median of 3 steps.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

from fresh import MeasurementFailed, in_fresh_process, peak_growth



def examples(tokens: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(ids, prompt length) pairs of log-normal length holding `tokens` real tokens in all."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < tokens:
        length = min(tokens - total, max(8, int(math.exp(rng.gauss(math.log(180), 0.6)))))
        out.append(([rng.randrange(10, vocab) for _ in range(length)], length // 2))
        total += length
    return out


def packed_batch(rows: list[tuple[list[int], int]], torch):
    """One row, positions restarting per example, labels -100 on prompts and on each example's first token."""
    ids, positions, labels = [], [], []
    for example, prompt in rows:
        ids += example
        positions += list(range(len(example)))
        labels += [-100] * max(1, prompt) + example[max(1, prompt):]
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "labels": torch.tensor([labels]), "use_cache": False}


def padded_batch(rows: list[tuple[list[int], int]], torch):
    width = max(len(e) for e, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (example, prompt) in enumerate(rows):
        ids[i, : len(example)] = torch.tensor(example)
        mask[i, : len(example)] = 1
        labels[i, prompt: len(example)] = torch.tensor(example[prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _run(variant: str, tokens: int, layers: int, threads: int) -> tuple[int, float, int]:
    import torch
    import transformers as tf

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = tf.Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                            max_position_embeddings=32768)
    model = tf.Qwen2ForCausalLM(config)
    rows = examples(tokens, config.vocab_size)
    if variant == "deltatune":
        import deltatune as dt

        dt.attach(model, dt.LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
        batch = packed_batch(rows, torch)
        loss_of = lambda: dt.lm_loss(model, batch)  # noqa: E731
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
        batch = padded_batch(rows, torch)
        loss_of = lambda: model(**batch).loss  # noqa: E731
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: AdamW's states exist, allocator pools are warm
    times, peaks = [], []
    for _ in range(3):
        start = time.perf_counter()
        peaks.append(peak_growth(step))
        times.append(time.perf_counter() - start)
    return max(peaks), statistics.median(times), int(batch["input_ids"].numel())


def measure(variant: str, tokens: int, layers: int, threads: int) -> tuple[int, float, int]:
    return in_fresh_process(_run, variant, tokens, layers, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096], help="real tokens per step")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", choices=["peft", "deltatune"], default=["peft", "deltatune"])
    args = ap.parse_args()
    print(f"Qwen2.5-0.5B shape, {args.layers} layers, fp32, LoRA r=16 on q_proj/v_proj, AdamW, {args.threads} threads")
    print("| real tokens | variant | tokens in batch | peak MiB | step s | real tokens/s |")
    print("|---|---|---|---|---|---|")
    for tokens in args.tokens:
        found = {}
        for variant in args.variants:
            name = ("peft + transformers' loss, padded" if variant == "peft" else "deltatune: fused loss, packed")
            try:
                peak, seconds, held = measure(variant, tokens, args.layers, args.threads)
            except MeasurementFailed as err:  # peft's padded step at 4,096 tokens outgrows a 24 GiB machine
                print(f"| {tokens:,} | {name} | | failed: {err} | | |", flush=True)
                continue
            found[variant] = (peak, seconds)
            print(f"| {tokens:,} | {name} | {held:,} | {peak / 2**20:,.0f} | {seconds:.2f} | {tokens / seconds:,.0f} |",
                  flush=True)
        if len(found) < 2:
            continue
        (p_peak, p_time), (d_peak, d_time) = found["peft"], found["deltatune"]
        print(f"| {tokens:,} | deltatune / peft | | {d_peak / p_peak:.2f}x | {d_time / p_time:.2f}x | "
              f"{p_time / d_time:.2f}x |")


if __name__ == "__main__":
    main()
