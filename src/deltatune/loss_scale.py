"""Dynamic loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision Training").

fp16 has 5 exponent bits: its smallest normal value is 2^-14 ~ 6.1e-5 (subnormals reach 6e-8) and its largest
65504. Gradients of a trained model are small, and in an fp16 backward many of them flush to zero. Scaling the
loss by S before backward scales every gradient by S (backward is linear in the loss), lifting them into
fp16's range; they are divided by S again, in fp32 where they have fp32 masters, before clipping and the step:

    (S * loss).backward()                     gradients are S * g
    g := g / S; finite = all(isfinite(g))     `unscale_`, before clipping
    finite:     step;            clean += 1;  clean == GROWTH_INTERVAL -> S *= 2, clean = 0
    not finite: skip the step;   S /= 2;      clean = 0

An S too large overflows (inf/NaN in some gradient: the step is skipped, the scale halved); after
GROWTH_INTERVAL clean steps it doubles again, so S stays near the largest value that does not overflow. The
loss itself is never scaled where it is checked or logged. bf16 has fp32's exponent range and needs none of it.

    scaler = deltatune.LossScaler()                     # enabled: pass enabled=False for bf16 / fp32
    scaler.scale(loss).backward()
    if scaler.unscale_(grads):                          # the gradients the optimizer uses (master.gradients())
        optimizer.step()
    scaler.update()                                     # after every step, skipped or not

`state_dict()` (the scale and the clean-step count) goes in the checkpoint so a resumed run is bit-equal.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .config import DeltaError

INIT_SCALE = 2.0 ** 16  # read when a scaler is made (tests monkeypatch it)
GROWTH_INTERVAL = 2000  # clean steps before the scale doubles (a module constant; tests monkeypatch it)
MIN_SCALE = 2.0 ** -24  # a scale this small that still overflows: the gradients are NaN, not large


class LossScaler:
    """Dynamic loss scale (see the module docstring). Disabled, every call is a no-op and unscale_ says finite."""

    def __init__(self, enabled: bool = True, init_scale: float | None = None) -> None:
        self.enabled = enabled
        self.scale_value = float(INIT_SCALE if init_scale is None else init_scale) if enabled else 1.0
        self.clean = 0  # steps since the last overflow or growth
        self.skipped = 0  # overflow steps skipped (this process's count, not checkpointed)
        self._finite: bool | None = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, grads: Iterable[torch.Tensor | None]) -> bool:
        """Divide every gradient by the scale in place; True when all are finite (the step may go ahead)."""
        if not self.enabled:
            self._finite = True
            return True
        inv = 1.0 / self.scale_value
        bad = None
        for g in grads:
            if g is None:
                continue
            g.mul_(inv)
            flag = (~torch.isfinite(g)).any()
            bad = flag if bad is None else bad | flag.to(bad.device)
        self._finite = bad is None or not bool(bad)
        return self._finite

    def update(self, finite: bool | None = None) -> None:
        """After each step: halve on overflow, double after GROWTH_INTERVAL clean steps (the module reads it each call)."""
        if not self.enabled:
            return
        finite = self._finite if finite is None else finite
        if finite is None:
            raise DeltaError("LossScaler.update() needs unscale_(grads) first (or update(finite) with its verdict)")
        self._finite = None
        if not finite:
            self.skipped += 1
            self.clean = 0
            self.scale_value /= 2
            if self.scale_value < MIN_SCALE:
                raise DeltaError(f"the loss scale fell to {self.scale_value:g} and the gradients still overflow: they are "
                                 "NaN or inf at any scale (a forward that overflows fp16); train in bf16 "
                                 "(model.dtype: bf16) or lower train.lr")
            return
        self.clean += 1
        if self.clean >= GROWTH_INTERVAL:
            self.scale_value *= 2
            self.clean = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale_value, "clean": self.clean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale_value, self.clean = float(state["scale"]), int(state["clean"])


def needs_scaling(model: torch.nn.Module) -> bool:
    """True when any trainable parameter, or any weight the forward uses, is fp16."""
    return any(p.dtype == torch.float16 for p in model.parameters())
