"""Reward model: train a scalar score r(x, y) that ranks the chosen completion of each pair above the rejected one
(the Bradley-Terry model of pairwise preference, as in InstructGPT's reward model, Ouyang et al. 2022).

The model is the base loaded as a sequence classifier with one output (`...ForSequenceClassification`,
num_labels = 1, whatever model.task says of the checkpoint): r(x, y) is its logit at the last token that is not
padding (transformers' rule with the model's pad_token_id), over the prompt and completion rendered as for SFT.
The score head is new, seeded from train.seed, and trains whole (the delta keeps it in modules_to_save, as for any
sequence classifier). With sigma the logistic function and an optional margin m per pair:

    P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l))
    loss             = -log sigma(r(x, y_w) - r(x, y_l) - m)
                       + c * (r(x, y_w) + r(x, y_l))^2          (c = reward.center_rewards_coefficient, TRL's
                                                                  name; it keeps the scores centred near 0)

m is the row's `margin` column (TRL's reward-trainer name, read by the preference reader; a positive m asks the
chosen score to lead by at least about m), 0 for a pair without one. The metrics stay margin-free: accuracy and
margin below are of r_w - r_l itself.

One pair is one loss item: the stage returns the sum over the batch's pairs and the loop divides by the step's pairs.
Per pair it also sums accuracy (1 where r_w > r_l), margin (r_w - r_l), rewards/chosen (r_w) and rewards/rejected
(r_l). Evaluation reports the same over the eval pairs (loss, accuracy, margin), not LM metrics.

A batch of B pairs is one padded batch of 2B rows (chosen rows, then rejected rows), run once.

To score text with the trained model: load the base as AutoModelForSequenceClassification with num_labels=1 (and
pad_token_id set to the tokenizer's), `deltatune.load(model, "out/run/adapter")` (the adapter holds the score head),
render the prompt and completion as training did (the adapter folder's tokenizer carries the chat template), and
read `model(**tokenizer(text, return_tensors="pt")).logits[:, 0]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...config import check
from ..data import Example
from . import Stage
# a pair is one loss item and two rows of one forward, as in DPO
from .dpo import collator as pair_collator, items, rows as pair_rows


@dataclass(kw_only=True)
class RewardSection:
    """The `reward:` section of a run config (TRL's default)."""

    # c: the weight of (r_w + r_l)^2, which pulls the scores towards a mean of 0 (Eisenstein et al. 2023); None: off
    center_rewards_coefficient: float | None = check(None, ge=0)


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                center: float | None = None) -> torch.Tensor:
    """The loss of each pair, (P,), from the scores of its chosen and rejected rows."""
    losses = -F.logsigmoid(chosen - rejected - margin)
    if center:
        losses = losses + center * (chosen + rejected) ** 2
    return losses


def collator(config: Any, tokenizer: Any) -> Callable[[list[Example]], dict[str, Any]]:
    pairs = pair_collator(config, tokenizer)  # chosen rows, then rejected ones, one padded batch

    def collate(examples: list[Example]) -> dict[str, Any]:
        batch = pairs(examples)
        # the token labels are dropped: a classifier given labels would compute a loss of its own against them
        batch.pop("labels")
        # popped again by `scores` before the forward; a pair without a margin column has m = 0
        batch["margins"] = torch.tensor([0.0 if e.margin is None else e.margin for e in examples], dtype=torch.float32)
        return batch

    return collate


def scores(forward: Callable[..., Any], batch: dict[str, Any]) -> torch.Tensor:
    """r(x, y) of each row, (2B,): the one-output head's logit at the row's last non-padding token."""
    inputs = {k: v for k, v in batch.items() if k != "margins"}  # the model takes no margins
    logits = forward(**inputs).logits  # (2B, 1)
    return logits[:, 0].float()


def _pair_terms(values: torch.Tensor, config: Any,
                margins: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    settings: RewardSection = config.stage_settings["reward"]
    pairs = values.shape[0] // 2
    chosen, rejected = values[:pairs], values[pairs:]
    margin_term = 0.0 if margins is None else margins.to(chosen.device, chosen.dtype)  # (P,)
    losses = pair_losses(chosen, rejected, margin_term, center=settings.center_rewards_coefficient)
    with torch.no_grad():
        margin = chosen - rejected
        metrics = {"accuracy": (margin > 0).float().sum(), "margin": margin.sum(),
                   "rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum()}
    return losses.sum(), metrics


def loss(forward: Callable[..., Any], model: torch.nn.Module, batch: dict[str, Any],
         config: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return _pair_terms(scores(forward, batch), config, batch.get("margins"))


@torch.no_grad()
def evaluate(model: torch.nn.Module, prepared: Any, config: Any, tokenizer: Any) -> dict[str, float]:
    """Loss, pairwise accuracy and mean margin over the eval pairs."""
    was_training = model.training
    model.eval()
    try:
        collate = collator(config, tokenizer)
        device = next(model.parameters()).device
        size = config.eval.batch_size
        total, sums, pairs = 0.0, {"accuracy": 0.0, "margin": 0.0}, len(prepared.eval)
        for i in range(0, pairs, size):
            batch = {k: v.to(device) for k, v in collate(prepared.eval[i:i + size]).items()}
            loss_sum, metrics = _pair_terms(scores(model, batch), config, batch.get("margins"))
            total += loss_sum.item()
            for name in sums:
                sums[name] += metrics[name].item()
        return {"loss": total / max(1, pairs), **{name: value / max(1, pairs) for name, value in sums.items()}}
    finally:
        model.train(was_training)


def check_config(config: Any) -> str | None:
    """Why this run cannot train a reward model, or None."""
    fmt = config.data.format
    if fmt != "preference":
        return (f"stage = 'reward' trains on preference pairs, but data.format is {fmt!r}: use data.format: preference "
                "(columns prompt, chosen, rejected), or drop stage for the format's own stage")
    if config.model.task != "causal_lm":
        return (f"stage = 'reward' loads the base itself as a sequence classifier with one score (a fresh head on a "
                f"causal LM's checkpoint); model.task is {config.model.task!r}: drop model.task (causal_lm, the default)")
    if config.model.num_labels is not None:
        return (f"stage = 'reward' trains a head with one output (the score); model.num_labels is "
                f"{config.model.num_labels}: drop model.num_labels")
    if config.data.packing:
        return ("stage = 'reward' does not pack: each completion is scored at its own last token; "
                "set data.packing: false")
    if config.train.label_smoothing:
        return "train.label_smoothing smooths the SFT loss; a reward model has no token loss: drop train.label_smoothing"
    if config.eval.generate:
        return ("eval.generate measures generated text; a reward model scores text and does not generate: "
                "drop eval.generate (the eval reports loss, accuracy and margin on the eval pairs)")
    return None


REWARD = Stage(name="reward", formats=frozenset({"preference"}), items=items, collator=collator, loss=loss,
               settings=RewardSection, check=check_config, task="seq_cls", num_labels=1, evaluate=evaluate,
               rows=pair_rows, reads=frozenset({"margin"}))
