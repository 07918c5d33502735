"""Supervised fine-tuning: maximise the likelihood of the labelled tokens (or the class of a classifier's example).

loss = sum over labelled tokens t of -log p(y_t | y_<t, x), for causal LMs (the label of position t + 1 predicted
at t) and the decoder of seq2seq models; cross-entropy of the class for sequence classifiers. The loop divides the
sum by the step's items, counted over every micro-batch and process before the first forward, so each token
weighs the same however the step is split.

Causal LMs and seq2seq models take the fused linear + cross-entropy by default (losses.py: the full logits are
never held); `train.loss: standard` and classifiers use the model's own loss.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...losses import lm_loss
from ..data import IGNORE, Collator
from . import Stage


def items(example: Any, config: Any) -> int:
    """What the model's mean loss averages over, for one example: its label tokens (after the
    causal LM's one-token shift), or 1 for a classifier."""
    task = config.model.task
    if task == "seq_cls":
        return 1
    if task == "seq2seq":
        return sum(t != IGNORE for t in example.decoder_labels)
    return sum(t != IGNORE for t in example.labels[1:])


def collator(config: Any, tokenizer: Any) -> Callable[[list[Any]], dict[str, Any]]:
    return Collator(pad_id=tokenizer.pad_token_id, task=config.model.task)


def loss(forward: Callable[..., Any], model: torch.nn.Module, batch: dict[str, Any], config: Any) -> torch.Tensor:
    if "position_ids" in batch:  # packed rows: transformers masks per example only without a cache
        batch = {**batch, "use_cache": False}
    if config.train.loss == "fused" and config.model.task in ("causal_lm", "seq2seq"):
        return lm_loss(model, batch, reduction="sum", forward=forward, label_smoothing=config.train.label_smoothing)
    output = forward(**batch)
    # the model's loss is the mean over the batch's items; times their count: the sum
    count = (batch["labels"].numel() if config.model.task == "seq_cls" else
             int((batch["labels"][:, 1:] != IGNORE).sum()) if config.model.task == "causal_lm" else
             int((batch["labels"] != IGNORE).sum()))
    return output.loss * count if count else output.logits.sum() * 0.0


SFT = Stage(name="sft", formats=None, items=items, collator=collator, loss=loss,
            refuses=("preference", "kto"))
