"""Padding-free packing: whole causal-LM examples share a row, and each is computed as if it ran alone.

A packed row is examples laid end to end, at most max_length tokens, with

    position_ids  0 1 2 3 | 0 1 2 | 0 1 2 3 4     restarting at 0 for each example
    labels        - a b c | - e f | - h i j k     the first label of each example is -100 (IGNORE)

and no attention_mask. transformers (masking_utils.find_packed_sequence_indices) reads a new sequence
wherever a position does not follow the one before, and builds a block-causal mask from that, so no
token attends across an example; the -100 at each seam keeps the loss from predicting example k+1's
first token from example k's last one. Exact on three conditions, all checked here or in the Collator:

  - no attention_mask in the batch: with one, transformers uses it and ignores the positions;
  - use_cache=False in the forward: with a cache (the default, even in training) the positions are
    ignored too, and attention silently crosses examples;
  - a model whose attention masks from position_ids (llama, mistral, qwen2, starcoder2, gpt2,
    gpt_bigcode, ... in transformers 5); `check_model` runs two examples packed and alone and refuses
    a model where they differ, naming it. Methods that prepend virtual tokens (prompt tuning, p-tuning,
    prefix tuning) would give them to the first example of a row only, so they are refused too.

An example longer than max_length is truncated as without packing (data.truncate), never split
across rows. Rows are filled best-fit, longest example first; the epoch order then shuffles rows.
Padding between rows of a batch is a block of its own (positions 0, 1, ...; labels -100), so no
attention_mask is needed for it either. The flash-attention varlen path (the same position_ids,
no mask) is not set up here: transformers takes it by itself when the model loads with
attn_implementation="flash_attention_2".
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from .rows import DataError

IGNORE = -100
PACKING_OFF = "set data.packing: false to train on the examples one per row"


def pack(examples: list[Any], max_length: int) -> list[Any]:
    """Whole examples (each already at most max_length tokens) into rows of at most max_length tokens:
    best fit, longest first (a deterministic function of the examples). Each row is an Example whose
    position_ids restart at 0 for every example and whose label at each example's first token is IGNORE."""
    from .data import Example

    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the tightest row that fits is a bisect away
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise DataError(f"an example of {n} tokens is longer than max_length {max_length}; truncate before packing")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
        else:
            room, row = max_length, len(rows)
            rows.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    out = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in sorted(members):  # data order within a row
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE] + list(e.labels[1:])  # never predicted from the example before
            positions += range(len(e.input_ids))
        out.append(Example(ids, labels, position_ids=positions, length=len(ids)))
    return out


def collate_packed(examples: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, position_ids, labels of packed rows; no attention_mask (see the module docstring).
    The forward needs use_cache=False."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    positions = torch.arange(width).repeat(len(examples), 1)  # (B, T); padding: a block of its own from 0
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        positions[i, :n] = torch.tensor(e.position_ids)
        positions[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def check_method(method: str, kind: str) -> str | None:
    """Why packing is not exact with this method, or None."""
    if kind == "input":
        return (f"data.packing cannot be used with method {method!r}: it prepends virtual tokens (or key/value "
                f"prefixes) to each row, which the second and later examples of a packed row would not get; "
                f"{PACKING_OFF}, or use a method that wraps weights (lora, dora, ia3, ...)")
    return None


@torch.no_grad()
def check_model(model: torch.nn.Module, vocab: int) -> None:
    """Refuse packing on a model whose attention does not keep packed examples apart: two examples run
    packed (position_ids, no mask, no cache) and alone must give the same logits."""
    name = type(model).__name__
    arch = getattr(getattr(model, "config", None), "model_type", None) or name
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    first = torch.randint(1, max(2, vocab), (1, 24), generator=g)
    second = torch.randint(1, max(2, vocab), (1, 6), generator=g)
    ids = torch.cat([first, second], 1).to(device)
    positions = torch.cat([torch.arange(24), torch.arange(6)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        try:
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 24:].float()
        except TypeError as err:
            raise DataError(f"data.packing cannot be used with {name} (model_type {arch!r}): its forward does not "
                            f"take position_ids and use_cache ({err}); {PACKING_OFF}") from None
        alone = model(input_ids=second.to(device), use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    gap = (packed - alone).abs().max().item()
    dtype = next(model.parameters()).dtype
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2 * (1.0 + alone.abs().max().item())
    if not gap <= tolerance:
        raise DataError(f"data.packing is not exact with {name} (model_type {arch!r}): an example packed after "
                        f"another gives logits {gap:.3g} away from the example run alone (its attention does not "
                        f"build the per-example mask from position_ids); {PACKING_OFF}")
