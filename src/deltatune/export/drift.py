"""How far an exported model's logits are from the model it came from: what every export prints after writing."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Drift:
    """The written file's model against the unmerged model, on the probe sequences."""
    max_abs_logit: float  # max |logit difference| over every probe position and vocabulary entry
    mean_kl: float  # mean KL(unmerged || file) of the next-token distributions, in nats
    top1_agreement: float  # share of positions whose most likely next token is the same
    positions: int

    def line(self) -> str:
        return (f"max |Δlogit| {self.max_abs_logit:.3g}, mean KL {self.mean_kl:.3g} nats, top-1 agreement "
                f"{100 * self.top1_agreement:.1f}% over {self.positions} positions")


def probe_ids(vocab_size: int, sequences: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (sequences, length), generator=generator)


@torch.no_grad()
def compare_logits(model: torch.nn.Module, rebuilt: torch.nn.Module, ids: torch.Tensor | None) -> Drift:
    """Drift of `rebuilt`'s logits from `model`'s on `ids` (default: fixed random probe sequences)."""
    ids = probe_ids(model.config.vocab_size) if ids is None else ids
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        reference = model(input_ids=ids.to(device)).logits.float().cpu()
    finally:
        model.train(was_training)
    written = rebuilt(input_ids=ids.to(next(rebuilt.parameters()).device)).logits.float().cpu()
    log_p, log_q = reference.log_softmax(-1), written.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0)  # >= 0; rounding can make a tiny one negative
    return Drift(max_abs_logit=(reference - written).abs().max().item(), mean_kl=kl.mean().item(),
                 top1_agreement=(reference.argmax(-1) == written.argmax(-1)).float().mean().item(),
                 positions=kl.numel())
