"""Odds ratio preference optimisation: supervised fine-tuning on the chosen completion plus a penalty that makes the
rejected one less likely than the chosen, with no reference model (Hong et al. 2024).

For a prompt x and completion y, let a(y) be the mean log-probability of the completion's tokens (the prompt never
counts, nor padding) and p(y) = exp(a(y)) its length-normalised probability. With lambda = orpo.beta (TRL's name):

    log odds(y) = log(p / (1 - p)) = a(y) - log(1 - exp(a(y)))
    L_OR        = -log sigma(log odds(y_w) - log odds(y_l))
    loss        = NLL(y_w) + lambda * L_OR,   NLL(y_w) = -a(y_w)

log(1 - exp(a)) is computed as log(-expm1(a)), exact near a = 0, with a held below -1e-6 so that a completion the
model is certain of (p = 1 in floating point) gives a finite value.

One pair is one loss item: the stage returns the sum over the batch's pairs and the loop divides by the step's pairs.
NLL(y_w) is therefore each pair's per-token mean, averaged over pairs (TRL averages the chosen tokens of the whole
batch, which weighs long completions more). Per pair it also sums what TRL logs for ORPO: rewards/chosen =
lambda * a(y_w), rewards/rejected = lambda * a(y_l), rewards/margins their difference, rewards/accuracies 1 where
the margin is > 0, nll_loss = NLL(y_w), log_odds_ratio = log sigma(log odds(y_w) - log odds(y_l)) and log_odds_chosen
= log odds(y_w) - log odds(y_l).

Nothing here needs a reference, so every method trains with ORPO, full fine-tuning included. A batch of B pairs is
one padded batch of 2B rows (chosen rows, then rejected rows), run once; the log-probabilities come from the fused
head + cross-entropy (losses.sequence_log_probs), so the full logits are never held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...config import check
from . import Stage
# a pair is one loss item and two rows of one forward, chosen then rejected, as in DPO
from .dpo import collator, completion_log_probs, items, rows as pair_rows

CERTAIN = -1e-6  # the highest mean log-probability used: keeps log(1 - p) finite


@dataclass(kw_only=True)
class OrpoSection:
    """The `orpo:` section of a run config (TRL's default)."""

    beta: float = check(0.1, gt=0)  # lambda: the weight of the odds-ratio term against the chosen answer's NLL


def log_odds(mean_log_probs: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean log-probability), elementwise."""
    a = mean_log_probs.clamp(max=CERTAIN)
    return a - torch.log(-torch.expm1(a))


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, NLL of the chosen, log sigma of the log-odds difference), each (P,), from the completions' mean
    per-token log-probabilities."""
    ratio = F.logsigmoid(log_odds(chosen) - log_odds(rejected))
    nll = -chosen
    return nll - beta * ratio, nll, ratio


def loss(forward: Callable[..., Any], model: torch.nn.Module, batch: dict[str, Any],
         config: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    settings: OrpoSection = config.stage_settings["orpo"]
    means = completion_log_probs(forward, model, batch, average=True)  # a(y) of each row, (2B,)
    pairs = means.shape[0] // 2
    chosen, rejected = means[:pairs], means[pairs:]
    losses, nll, ratio = pair_losses(chosen, rejected, settings.beta)
    with torch.no_grad():
        reward_chosen, reward_rejected = settings.beta * chosen, settings.beta * rejected
        margin = reward_chosen - reward_rejected
        metrics = {"rewards/chosen": reward_chosen.sum(), "rewards/rejected": reward_rejected.sum(),
                   "rewards/margins": margin.sum(), "rewards/accuracies": (margin > 0).float().sum(),
                   "nll_loss": nll.sum(), "log_odds_ratio": ratio.sum(),
                   "log_odds_chosen": (log_odds(chosen) - log_odds(rejected)).sum()}
    return losses.sum(), metrics


def check_config(config: Any) -> str | None:
    """Why this run cannot train with ORPO, or None."""
    fmt = config.data.format
    if fmt != "preference":
        return (f"stage = 'orpo' trains on preference pairs, but data.format is {fmt!r}: use data.format: preference "
                "(columns prompt, chosen, rejected), or drop stage for the format's own stage")
    if config.model.task != "causal_lm":
        return f"stage = 'orpo' trains causal LMs; model.task is {config.model.task!r}: set model.task: causal_lm"
    if config.data.packing:
        return ("stage = 'orpo' does not pack: each pair's two completions are scored as whole rows; "
                "set data.packing: false")
    if config.train.label_smoothing:
        return "train.label_smoothing smooths the SFT loss; ORPO's NLL term has none: drop train.label_smoothing"
    return None


ORPO = Stage(name="orpo", formats=frozenset({"preference"}), items=items, collator=collator, loss=loss,
             settings=OrpoSection, check=check_config, rows=pair_rows)
