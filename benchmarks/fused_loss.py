"""The loss side of a training step: transformers' standard causal-LM loss against deltatune's fused
linear + cross-entropy (deltatune.losses), measured side by side on one machine.

    PYTHONPATH=src python benchmarks/fused_loss.py                 # vocab 151,936 (Qwen2.5), hidden 896
    PYTHONPATH=src python benchmarks/fused_loss.py --tokens 2048 4096 --answer-share 0.5

What runs: hidden states (tokens x hidden, fp32, requiring grad as under LoRA) and a frozen head (vocab x
hidden); the loss and its backward to the hidden states. Each measurement runs in a fresh process
(forked before any torch op); *peak* is the resident-set growth of the loss and its backward (VmHWM reset
through /proc/self/clear_refs after the inputs exist), *time* the median of 3 repeats after a warm-up.
`--answer-share` labels that share of the tokens (the rest -100, a prompt under answer-only loss): the
fused loss drops those rows before the head; the standard loss computes their logits anyway.
"""

from __future__ import annotations

import argparse
import statistics
import time

from fresh import in_fresh_process, peak_growth



def _measure(kind: str, tokens: int, vocab: int, hidden: int, answer_share: float, threads: int) -> tuple[int, float]:
    import torch
    import torch.nn.functional as F

    from deltatune.losses import fused_linear_cross_entropy

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    h = torch.randn(1, tokens, hidden, requires_grad=True)
    weight = torch.randn(vocab, hidden) * 0.02
    labels = torch.randint(0, vocab, (1, tokens))
    labels[0, : int(tokens * (1 - answer_share))] = -100

    def step() -> None:
        if kind == "standard":  # what transformers' ForCausalLMLoss does: logits, upcast, shift, cross-entropy
            logits = F.linear(h, weight).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
        else:
            loss = fused_linear_cross_entropy(h[:, :-1], weight, labels[:, 1:])
        loss.backward()
        h.grad = None

    step()  # warm-up: allocator pools and kernels
    times, peaks = [], []
    for _ in range(3):
        start = time.perf_counter()
        peaks.append(peak_growth(step))
        times.append(time.perf_counter() - start)
    return max(peaks), statistics.median(times)


def measure(kind: str, tokens: int, vocab: int, hidden: int, answer_share: float, threads: int) -> tuple[int, float]:
    return in_fresh_process(_measure, kind, tokens, vocab, hidden, answer_share, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--answer-share", type=float, default=1.0, help="share of tokens with a label (1.0: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"vocab {args.vocab:,}, hidden {args.hidden}, fp32, {args.threads} threads, "
          f"{args.answer_share:.0%} of tokens labelled")
    print("| tokens | standard peak MiB | fused peak MiB | peak ratio | standard s | fused s | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        s_peak, s_time = measure("standard", tokens, args.vocab, args.hidden, args.answer_share, args.threads)
        f_peak, f_time = measure("fused", tokens, args.vocab, args.hidden, args.answer_share, args.threads)
        print(f"| {tokens:,} | {s_peak / 2**20:,.0f} | {f_peak / 2**20:,.0f} | {f_peak / s_peak:.2f} | "
              f"{s_time:.2f} | {f_time:.2f} | {f_time / s_time:.2f} |")


if __name__ == "__main__":
    main()
