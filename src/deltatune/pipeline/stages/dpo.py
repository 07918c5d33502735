"""Direct preference optimisation: train the delta so the model prefers the chosen completion of each pair.

For a prompt x with a chosen completion y_w and a rejected one y_l, log pi(y|x) is the sum of the completion's
token log-probabilities (the prompt never counts, nor padding); pi_ref is the reference (reference.py): the same
model with the delta switched off (`dt.disabled`), so no second copy of the model is held, or, for a method that
trains the base weights (full, freeze, bitfit), a frozen copy of the base loaded beside it. With beta > 0:

    h = beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))]
    sigmoid (DPO, Rafailov et al. 2023):      loss = -(1 - e) log sigma(h) - e log sigma(-h)
                                              (e = dpo.label_smoothing: conservative DPO; e = 0 is plain DPO)
    ipo (IPO, Azar et al. 2023):              loss = (h / beta - 1 / (2 beta))^2, with the log-probabilities
                                              averaged over each completion's tokens (as TRL computes IPO)
    simpo (SimPO, Meng et al. 2024):          loss = -log sigma(beta (avg log pi(y_w|x) - avg log pi(y_l|x)) - gamma)
                                              no reference at all; avg: the mean over the completion's tokens;
                                              gamma = dpo.simpo_gamma (default beta / 2, the paper's gamma/beta = 0.5)

beta's default depends on the loss: 0.1 for sigmoid and ipo (TRL's), 2.0 for simpo (the paper's range is 2.0-2.5:
a per-token mean is a far smaller number than a sum, so it needs the larger scale). Every loss trains every method;
sigmoid and ipo on `full`, `freeze` and `bitfit` hold the base's weights twice (the frozen reference), SimPO, with
no reference, never does.

One pair is one loss item: the stage returns the sum over the batch's pairs and the loop divides by the step's
pairs. Per pair it also sums what TRL logs: rewards/chosen = beta (log pi(y_w|x) - log pi_ref(y_w|x)),
rewards/rejected likewise for y_l, rewards/margins their difference, rewards/accuracies 1 where the margin is > 0
(for simpo, with no reference: rewards/chosen = beta avg log pi(y_w|x), and so on). At evaluation the same five,
loss included, are means over the eval pairs (the loop logs them as eval_loss, eval_rewards/chosen, ...).

A batch of B pairs is one padded batch of 2B rows (chosen rows, then rejected rows), run once through the policy
and once, under no_grad, through the reference; the log-probabilities come from the fused head + cross-entropy
(losses.sequence_log_probs), so the full logits are never held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from ...config import check
from ...losses import sequence_log_probs
from ..data import IGNORE, Collator
from . import Stage
from .reference import reference as reference_of


@dataclass(kw_only=True)
class DpoSection:
    """The `dpo:` section of a run config (TRL's defaults for sigmoid and ipo; the SimPO paper's for simpo)."""

    # how far the policy may move from the reference (larger: closer); for simpo the scale of the reward.
    # None: 0.1 for sigmoid and ipo, 2.0 for simpo (filled in when the section is read, so runs record the number)
    beta: float | None = check(None, gt=0)
    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    # conservative DPO: the share of pairs whose preference is taken to be flipped (sigmoid only)
    label_smoothing: float = check(0.0, ge=0, le=0.5)
    # simpo's target reward margin gamma; None: beta / 2 (the paper's gamma/beta = 0.5)
    simpo_gamma: float | None = check(None, ge=0)

    def __post_init__(self) -> None:
        if self.beta is None:
            self.beta = SIMPO_BETA if self.loss_type == "simpo" else DPO_BETA

    @property
    def gamma(self) -> float:
        return self.beta / 2.0 if self.simpo_gamma is None else self.simpo_gamma


DPO_BETA = 0.1  # TRL's default for sigmoid and ipo
SIMPO_BETA = 2.0  # the low end of SimPO's published 2.0-2.5


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss of each pair, (P,), from the policy's and the reference's log-probabilities of the completions
    (sums for sigmoid, per-token means for ipo)."""
    h = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))  # (P,)
    if loss_type == "ipo":
        return (h / beta - 1.0 / (2.0 * beta)) ** 2
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def simpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO's loss of each pair, (P,), from the policy's per-token mean log-probabilities of the completions."""
    return -F.logsigmoid(beta * (chosen - rejected) - gamma)


def items(example: Any, config: Any) -> int:
    return 1  # one pair, one loss item, whatever its length


def collator(config: Any, tokenizer: Any) -> Callable[[list[Any]], dict[str, Any]]:
    rows = Collator(pad_id=tokenizer.pad_token_id, task="causal_lm")

    def collate(examples: list[Any]) -> dict[str, Any]:
        # chosen rows first, then the rejected ones, padded to one width: one forward for both
        return rows(list(examples) + [e.rejected for e in examples])

    return collate


def completion_log_probs(forward: Callable[..., Any], model: torch.nn.Module, batch: dict[str, Any],
                         average: bool) -> torch.Tensor:
    """log pi(y|x) of each row (the sum over its labelled tokens; the mean over them when `average`), (2B,)."""
    logps = sequence_log_probs(model, batch, forward=forward)
    if average:
        tokens = (batch["labels"][:, 1:] != IGNORE).sum(-1).clamp(min=1)  # the causal shift: position 0 predicts nothing
        logps = logps / tokens.to(logps.dtype)
    return logps


def pair_terms(forward: Callable[..., Any], model: torch.nn.Module, batch: dict[str, Any],
               settings: DpoSection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of each pair of the batch and its rewards for the chosen and the rejected completion, each (P,);
    the rewards carry no gradient."""
    average = settings.loss_type in ("ipo", "simpo")
    if settings.loss_type == "simpo":  # no reference forward at all: half the compute of DPO
        policy = completion_log_probs(forward, model, batch, average).float()
        pairs = policy.shape[0] // 2
        chosen, rejected = policy[:pairs], policy[pairs:]
        losses = simpo_losses(chosen, rejected, settings.beta, settings.gamma)
        return losses, settings.beta * chosen.detach(), settings.beta * rejected.detach()
    # the reference first, so its activations are gone before the policy's forward keeps its own; no gradient,
    # and a module itself rather than a DistributedDataParallel wrapper, since nothing of it is reduced
    with torch.no_grad(), reference_of(model) as ref:
        reference = completion_log_probs(ref, ref, batch, average).float()
    policy = completion_log_probs(forward, model, batch, average).float()
    pairs = policy.shape[0] // 2
    chosen, rejected = policy[:pairs], policy[pairs:]
    ref_chosen, ref_rejected = reference[:pairs], reference[pairs:]
    losses = pair_losses(chosen, rejected, ref_chosen, ref_rejected, settings.beta, settings.loss_type,
                         settings.label_smoothing)
    return losses, settings.beta * (chosen - ref_chosen).detach(), settings.beta * (rejected - ref_rejected).detach()


def _sums(losses: torch.Tensor, reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch's sums of what is logged per pair (TRL's names)."""
    margin = reward_chosen - reward_rejected
    return {"rewards/chosen": reward_chosen.sum(), "rewards/rejected": reward_rejected.sum(),
            "rewards/margins": margin.sum(), "rewards/accuracies": (margin > 0).float().sum()}


def loss(forward: Callable[..., Any], model: torch.nn.Module, batch: dict[str, Any],
         config: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    losses, reward_chosen, reward_rejected = pair_terms(forward, model, batch, config.stage_settings["dpo"])
    return losses.sum(), _sums(losses, reward_chosen, reward_rejected)


@torch.no_grad()
def evaluate(model: torch.nn.Module, prepared: Any, config: Any, tokenizer: Any) -> dict[str, float]:
    """The loss and rewards over the eval pairs, means per pair; eval.batch_size pairs (2x the rows) a batch."""
    settings: DpoSection = config.stage_settings["dpo"]
    collate = collator(config, tokenizer)
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    pairs = 0
    for i in range(0, len(prepared.eval), config.eval.batch_size):
        batch = {k: v.to(device) for k, v in collate(prepared.eval[i:i + config.eval.batch_size]).items()}
        losses, reward_chosen, reward_rejected = pair_terms(model, model, batch, settings)
        for name, value in {"loss": losses.sum(), **_sums(losses, reward_chosen, reward_rejected)}.items():
            totals[name] = totals.get(name, 0.0) + value.item()
        pairs += losses.numel()
    return {name: value / max(1, pairs) for name, value in totals.items()}


def rows(example: Any, settings: Any = None) -> tuple[Any, ...]:
    return (example, example.rejected)  # both completions run in the policy's forward


def check_config(config: Any) -> str | None:
    """Why this run cannot train with DPO, or None."""
    fmt = config.data.format
    if fmt != "preference":
        return (f"stage = 'dpo' trains on preference pairs, but data.format is {fmt!r}: use data.format: preference "
                "(columns prompt, chosen, rejected), or drop stage for the format's own stage")
    if config.model.task != "causal_lm":
        return f"stage = 'dpo' trains causal LMs; model.task is {config.model.task!r}: set model.task: causal_lm"
    if config.data.packing:
        return ("stage = 'dpo' does not pack: each pair's two completions are scored as whole rows; "
                "set data.packing: false")
    settings = config.stage_settings["dpo"]
    if config.train.label_smoothing:
        return ("train.label_smoothing smooths the SFT loss; for DPO use dpo.label_smoothing (conservative DPO) "
                "and drop train.label_smoothing")
    if settings.label_smoothing and settings.loss_type != "sigmoid":
        return (f"dpo.label_smoothing applies to dpo.loss_type: sigmoid (conservative DPO); loss_type is "
                f"{settings.loss_type!r}: drop dpo.label_smoothing or set dpo.loss_type: sigmoid")
    return None


DPO = Stage(name="dpo", formats=frozenset({"preference"}), items=items, collator=collator, loss=loss,
            settings=DpoSection, check=check_config, evaluate=evaluate, rows=rows,
            reference=lambda config: config.stage_settings["dpo"].loss_type != "simpo")
