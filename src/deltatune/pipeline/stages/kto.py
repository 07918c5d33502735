"""Kahneman-Tversky optimisation: train the delta from unpaired feedback, each completion marked desirable or not.

For a prompt x and completion y, log pi(y|x) is the sum of the completion's token log-probabilities (the prompt
never counts, nor padding); pi_ref is the reference (reference.py): the same model with the delta switched off
(`dt.disabled`), or for a method that trains the base weights (full, freeze, bitfit) a frozen copy of the base.
With beta > 0 and the weights l_D, l_U (Ethayarajh et al. 2024, as TRL computes it):

    r  = log pi(y|x) - log pi_ref(y|x)                        the implied reward of the row
    z0 = max(0, mean over the batch of [log pi(y'|x) - log pi_ref(y'|x)])   detached: no gradient flows through it
         with (x, y') mismatched pairs: each row's prompt with the *next* row's completion (the last row's prompt
         takes the first row's completion), a batch estimate of KL(pi || pi_ref)
    desirable row:    loss = l_D (1 - sigma(beta (r - z0)))
    undesirable row:  loss = l_U (1 - sigma(beta (z0 - r)))

The prompt/completion split of a row comes from its labels: the prompt is every token before the first labelled
one (label != -100; for chat rows that includes the assistant header the template puts before the answer), the
completion the first labelled token and all after it, labels and all. A mismatched row is prompt(i) +
completion(i + 1), cut to the batch's width (the longest matched row), which always keeps at least one token of
the completion, since every row has a labelled token after its prompt.

z0 is estimated over one micro-batch (with several processes, over each process's rows; TRL gathers it over the
processes), so train.batch_size must be 2 or more: with one row the mismatched pair would be the row itself and z0 = r.

One row is one loss item: the stage returns the sum over the batch's rows, and the loop divides by the step's rows.
The metrics, as TRL names them: rewards/chosen and rewards/rejected, the mean of beta * r over the desirable and
the undesirable rows (TRL's rewards are beta * r, as DPO's are), and kl, the z0 of the step. The loop divides each
metric's sum by the step's rows, so per micro-batch rewards/chosen is returned as (mean over its desirable rows) x
(its rows): the step's value is then exactly TRL's mean when the step is one micro-batch, and the row-weighted mean of
the micro-batches' means when it is accumulated (a micro-batch without desirable rows counts as 0).

A batch is one padded batch of the B rows (with their `desirable` flags) and one of the B mismatched rows. The
policy runs with gradients on the rows; the policy on the mismatched rows and the reference on both run under
no_grad. Log-probabilities come from the fused head + cross-entropy (losses.sequence_log_probs): no full logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...config import check
from ...losses import sequence_log_probs
from ..data import IGNORE, Collator, Example
from . import Stage
from .reference import reference as reference_of


@dataclass(kw_only=True)
class KtoSection:
    """The `kto:` section of a run config (TRL's defaults)."""

    beta: float = check(0.1, gt=0)  # how far the policy may move from the reference (larger: closer)
    desirable_weight: float = check(1.0, gt=0)  # l_D: weighs the desirable rows' losses
    undesirable_weight: float = check(1.0, gt=0)  # l_U: weighs the undesirable rows' losses


def kl_estimate(kl_policy: torch.Tensor, kl_reference: torch.Tensor) -> torch.Tensor:
    """z0: the mean log-ratio of the mismatched rows, clamped at 0, detached (a scalar)."""
    return (kl_policy - kl_reference).mean().clamp(min=0).detach()


def row_losses(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor,
               beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """The loss of each row, (B,), from the policy's and the reference's log-probabilities of its completion, its
    label (True: desirable) and the KL estimate z0."""
    r = policy - reference  # (B,)
    good = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, good, bad)


def mismatched(examples: list[Example]) -> list[Example]:
    """Each row's prompt with the next row's completion (the last with the first's), cut to the rows' width."""
    width = max(len(e.input_ids) for e in examples)
    out = []
    for i, e in enumerate(examples):
        other = examples[(i + 1) % len(examples)]
        prompt = _prompt_length(e)
        start = _prompt_length(other)
        ids = (e.input_ids[:prompt] + other.input_ids[start:])[:width]
        labels = ([IGNORE] * prompt + list(other.labels[start:]))[:width]
        out.append(Example(ids, labels))
    return out


def _prompt_length(example: Example) -> int:
    """The tokens before the first labelled one: the prompt (the labels are -100 there)."""
    return next(i for i, label in enumerate(example.labels) if label != IGNORE)


def items(example: Any, config: Any) -> int:
    return 1  # one row, one loss item, whatever its length


def collator(config: Any, tokenizer: Any) -> Callable[[list[Example]], dict[str, Any]]:
    rows = Collator(pad_id=tokenizer.pad_token_id, task="causal_lm")

    def collate(examples: list[Example]) -> dict[str, Any]:
        batch = rows(examples)
        kl = rows(mismatched(examples))
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["desirable"] = torch.tensor([bool(e.desirable) for e in examples])
        return batch

    return collate


def _part(batch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    return {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "labels")}


def loss(forward: Callable[..., Any], model: torch.nn.Module, batch: dict[str, Any],
         config: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    settings: KtoSection = config.stage_settings["kto"]
    rows, kl_rows, desirable = _part(batch), _part(batch, "kl_"), batch["desirable"].bool()
    # the reference (the delta off, or the separate copy); no gradient, and a module itself rather than a
    # DistributedDataParallel wrapper, since nothing of it is reduced. The three no-grad forwards run before the
    # one with gradients on purpose: each frees its activations before the training forward keeps any, so they
    # never add to the step's peak (what the memory plan assumes); after it, they would sit on top of its saved
    # activations. tests/test_stage_kto.py checks the order.
    with torch.no_grad():
        with reference_of(model) as ref:
            reference = sequence_log_probs(ref, rows).float()
            kl_reference = sequence_log_probs(ref, kl_rows).float()
        kl_policy = sequence_log_probs(model, kl_rows).float()
    z0 = kl_estimate(kl_policy, kl_reference)
    policy = sequence_log_probs(model, rows, forward=forward).float()
    losses = row_losses(policy, reference, desirable, z0, settings.beta, settings.desirable_weight,
                        settings.undesirable_weight)
    with torch.no_grad():
        rewards = settings.beta * (policy - reference)
        count = float(desirable.shape[0])
        metrics = {"rewards/chosen": _mean(rewards, desirable) * count,
                   "rewards/rejected": _mean(rewards, ~desirable) * count, "kl": z0 * count}
    return losses.sum(), metrics


def _mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return values[where].sum() / where.sum().clamp(min=1)


def check_config(config: Any) -> str | None:
    """Why this run cannot train with KTO, or None."""
    fmt = config.data.format
    if fmt != "kto":
        return (f"stage = 'kto' trains on KTO feedback rows, but data.format is {fmt!r}: use data.format: kto "
                "(columns prompt, completion, label), or drop stage for the format's own stage")
    if config.model.task != "causal_lm":
        return f"stage = 'kto' trains causal LMs; model.task is {config.model.task!r}: set model.task: causal_lm"
    if config.data.packing:
        return "stage = 'kto' does not pack: each completion is scored as a whole row; set data.packing: false"
    if config.train.batch_size < 2:
        return ("stage = 'kto' estimates its KL term from each row's prompt paired with another row's completion of "
                "the same micro-batch; train.batch_size is 1: set train.batch_size: 2 or more")
    if config.train.label_smoothing:
        return "train.label_smoothing smooths the SFT loss; KTO has no label smoothing: drop train.label_smoothing"
    return None


KTO = Stage(name="kto", formats=frozenset({"kto"}), items=items, collator=collator, loss=loss,
            settings=KtoSection, check=check_config, reference=lambda config: True)
