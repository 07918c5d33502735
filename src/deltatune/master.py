"""fp32 master weights for trainable parameters stored in 16 bits.

Methods that add parameters (LoRA, adapters, prompts) create them in fp32. Methods that train
the base's own weights (full fine-tuning, layer freezing, BitFit) train tensors in the base's
dtype, and a 16-bit weight cannot take a small update. bf16 keeps 8 significant bits, so a
weight w has a spacing (ulp) of about 2^-7 |w| between neighbours, and w + u rounds back to w
whenever |u| < ulp(w) / 2 ~ 2^-8 |w| = 0.0039 |w|. An Adam(W) update is about lr in size
(m / sqrt(v) is near 1), so at lr 1e-5 every weight with |w| > 2.6e-3 stays exactly where it
was: on a bf16 llama 86% of the weights did not move in 5 steps. fp16 (11 bits) has the same
floor at lr ~ 2^-11 |w|. The optimizer's moments in 16 bits lose the same way (v = g^2 is tiny).

The fix (Micikevicius et al. 2018, "Mixed Precision Training"): keep an fp32 *master* copy of
every such weight and let the optimizer update the master; the model keeps its 16-bit weight,
which is what the forward and backward use, and after each step it is refreshed from the
master by rounding (`copy_`, round to nearest even). Small updates accumulate in the master
until they cross a 16-bit spacing. In one step:

    g16  = dL/dw16                       backward, in the base's dtype
    g32 += float(g16); w16.grad = None   a post-accumulate-grad hook, after every micro-batch:
                                         accumulation over micro-batches is fp32, and the 16-bit
                                         gradient lives only until its hook has run
    clip(g32); optimizer.step() on w32   moments in fp32 (the optimizer's params are the masters)
    w16  = round(w32)                    `sync`

Bytes per trained 16-bit parameter with AdamW: weight 2 + master 4 + gradient 4 (the fp32
accumulator; the 16-bit one is transient) + moments 8 = 18, against 2 + 2 + 4 = 8 for the pure
16-bit update (mode "none"), which loses every update under half an ulp. Parameters already
in fp32 get no master (the optimizer updates them directly).

    master = deltatune.MasterWeights(model)                    # fp32 copies, hooks installed
    optimizer = torch.optim.AdamW(master.param_groups(model.parameters()), lr=1e-5)
    for batch in batches:
        model(**batch).loss.backward()                         # gradients land in the masters
        master.clip_grad_norm_(1.0)                            # optional
        master.step(optimizer)                                 # optimizer.step(), then the 16-bit weights
        optimizer.zero_grad(set_to_none=True)                  # the optimizer's: the gradients are the masters'

Mode "kahan" (Zamirai et al. 2020, "Revisiting BFloat16 Training"): no 4-byte copy. Each 16-bit weight w
gets a 16-bit compensation buffer c holding what rounding w lost, so w + c is the weight to within c's own
rounding. The optimizer keeps fp32 moments over an fp32 stand-in that exists for one tensor at a time:

    x    = float(w) + float(c)               the stand-in, materialised for one tensor (transient fp32)
    x   += update(float(g), m, v)            optimizer.step() over that tensor alone, moments in fp32
    w    = round16(x); c = round16(x - w)    the new weight and what its rounding lost

Bytes per trained 16-bit parameter with AdamW: weight 2 + compensation 2 + gradient 2 (the 16-bit one, which
also accumulates over micro-batches in 16 bits) + moments 8 = 14, plus a transient fp32 copy and fp32
gradient of the largest tensor during the step. What it loses: c is itself 16-bit, so an accumulated
residual keeps ~8 (bf16) significant bits of its own; the micro-batch sum of gradients is in 16 bits.
The optimizer's step() runs once per 16-bit tensor (it skips parameters without a gradient), which is the
same update for per-parameter optimizers (Adam(W), SGD, Adafactor, the bitsandbytes ones) but not for one
that looks across tensors in a step (a global norm, as LAMB's trust ratio over all layers would).

(`model.zero_grad()` would not clear them: the 16-bit parameters hold none between backward and step.)
`state_dict` / `load_state_dict` carry the masters (by parameter name) so that a resumed run
continues from the fp32 values, not from their rounding (kahan: the compensation buffers). Modes
are an enum so that later ones (stochastic rounding) fit beside these. fp16 weights also need their
loss scaled (loss_scale.py): unscale `master.gradients(params)` before clipping and stepping.

Several processes (DDP): the hooks would free gradients DDP has still to reduce, so there the
gradients accumulate in the parameter's dtype and `collect()` (called by `clip_grad_norm_` and
`step`) moves them into the masters after the last micro-batch (`hooks=False`).
"""

from __future__ import annotations

import enum
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .config import DeltaError

SIXTEEN_BITS = (torch.bfloat16, torch.float16)
SAMPLE = 1 << 16  # elements per tensor the "none" mode checks for updates that rounded away


class MasterMode(str, enum.Enum):
    FP32 = "fp32"  # an fp32 copy the optimizer updates; the 16-bit weight is its rounding
    NONE = "none"  # the optimizer updates the 16-bit weight itself (updates under half an ulp are lost)
    KAHAN = "kahan"  # the 16-bit weight plus a 16-bit compensation buffer; fp32 moments, a per-tensor fp32 stand-in


def master_mode(value: str | MasterMode) -> MasterMode:
    try:
        return MasterMode(value)
    except ValueError:
        raise DeltaError(f"master weights mode {value!r} is not one deltatune knows; choose one of "
                         f"{', '.join(m.value for m in MasterMode)}") from None


class MasterWeights:
    """fp32 masters for the trainable 16-bit parameters of `model` (see the module docstring).

    mode: "fp32" (default), "kahan" (16-bit compensation buffers, the optimizer stepped one tensor at a time)
    or "none" (no copies; the first step warns with the share of weights whose update rounded away). hooks: move each 16-bit gradient into its master as soon as it is accumulated
    (False under DDP; see the module docstring). warn: where the "none" mode's warning goes."""

    def __init__(self, model: nn.Module, mode: str | MasterMode = MasterMode.FP32, *, hooks: bool = True,
                 warn: Callable[[str], Any] | None = None) -> None:
        self.mode = master_mode(mode)
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        self.names: dict[int, str] = {}
        self.masters: dict[int, nn.Parameter] = {}  # id(16-bit parameter) -> its fp32 master
        self.shadows: dict[int, nn.Parameter] = {}  # kahan: the optimizer's fp32 stand-in (empty between steps)
        self.comps: dict[int, torch.Tensor] = {}  # kahan: the 16-bit compensation buffer
        self.params: dict[int, nn.Parameter] = {}
        self.rounded_share: float | None = None  # "none" mode, after the first step
        self._handles: list[Any] = []
        self._steps = 0
        for name, p in model.named_parameters():  # tied weights come once
            if not p.requires_grad or p.dtype not in SIXTEEN_BITS:
                continue
            self.names[id(p)], self.params[id(p)] = name, p
            if self.mode is MasterMode.FP32:
                self.masters[id(p)] = nn.Parameter(p.detach().to(torch.float32, copy=True))
                if hooks:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
            elif self.mode is MasterMode.KAHAN:
                self.comps[id(p)] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                self.shadows[id(p)] = nn.Parameter(torch.empty(0, dtype=torch.float32, device=p.device))

    # ------------------------------------------------------------ the optimizer's view

    def param_groups(self, params: Iterable[Any]) -> list[Any]:
        """`params` (parameters, or groups as dicts with "params") with every 16-bit parameter
        replaced by its master: what the optimizer is built over."""
        stand_in = self.masters or self.shadows

        def swap(ps: Iterable[nn.Parameter]) -> list[nn.Parameter]:
            return [stand_in.get(id(p), p) for p in ps]

        items = list(params)
        if items and isinstance(items[0], dict):
            return [{**g, "params": swap(g["params"])} for g in items]
        return swap(items)

    def parameters(self, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """What holds the gradients to clip and unscale: `params` with the masters in place of their 16-bit
        parameters (kahan: the 16-bit parameters themselves, whose gradients the step reads)."""
        items = list(params)
        return items if self.mode is MasterMode.KAHAN else self.param_groups(items)

    def gradients(self, params: Iterable[nn.Parameter] | None = None) -> list[torch.Tensor]:
        """The gradients the optimizer will use (for a LossScaler's unscale_): the masters', or the 16-bit
        weights' in modes kahan and none, and those of `params`' other tensors."""
        self.collect()
        tensors = self.parameters(params) if params is not None else list(self.masters.values() or self.params.values())
        return [t.grad for t in tensors if t.grad is not None]

    # ------------------------------------------------------------ gradients

    def _hook(self, p: torch.Tensor) -> None:
        master = self.masters[id(p)]
        if p.grad is None:
            return
        if master.grad is None:
            master.grad = p.grad.to(torch.float32)
        else:
            master.grad.add_(p.grad)  # fp32 += 16-bit: the sum is fp32
        p.grad = None

    def collect(self) -> None:
        """Move any gradient still on a 16-bit parameter into its master (the hooks do it as backward runs)."""
        for key in self.masters:
            if self.params[key].grad is not None:
                self._hook(self.params[key])

    def zero_grad(self) -> None:
        """Drop every gradient, 16-bit and master (a skipped step)."""
        for key, p in self.params.items():
            p.grad = None
            if key in self.masters:
                self.masters[key].grad = None

    def clip_grad_norm_(self, max_norm: float, params: Iterable[nn.Parameter] | None = None) -> torch.Tensor:
        """Clip the gradients the optimizer will use (the masters', and `params`' other tensors)."""
        self.collect()
        tensors = self.parameters(params) if params is not None else list(self.masters.values() or self.params.values())
        return torch.nn.utils.clip_grad_norm_(tensors, max_norm)

    # ------------------------------------------------------------ the step

    def step(self, optimizer: Any) -> None:
        """optimizer.step() over the masters, then every 16-bit weight from its master."""
        self.collect()
        watch = self.mode is MasterMode.NONE and self._steps == 0 and self.params
        before = self._sample() if watch else None
        if self.mode is MasterMode.KAHAN:
            self._kahan_step(optimizer)
        else:
            optimizer.step()
        self._steps += 1
        if before is not None:
            self._report(before)
        self.sync()

    def _kahan_step(self, optimizer: Any) -> None:
        """One optimizer.step() for the tensors without a stand-in, then one per 16-bit tensor with its stand-in
        materialised alone (the optimizer skips parameters without a gradient), so the fp32 transient is one
        tensor's. The moments are per parameter, so stepping tensor by tensor is the same update."""
        optimizer.step()  # every stand-in is empty and gradient-free here: only the other parameters move
        others = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        held = [p.grad for p in others]
        for p in others:
            p.grad = None
        try:
            with torch.no_grad():
                for key, shadow in self.shadows.items():
                    w, comp = self.params[key], self.comps[key]
                    if w.grad is None:
                        continue
                    shadow.data = w.detach().float().add_(comp.float())  # (the weight as the optimizer knows it)
                    shadow.grad = w.grad.float()
                    w.grad = None
                    try:
                        optimizer.step()
                        rounded = shadow.detach().to(w.dtype)
                        comp.copy_(shadow.detach() - rounded.float())  # what rounding lost, itself in 16 bits
                        w.copy_(rounded)
                    finally:
                        shadow.grad = None
                        shadow.data = shadow.data.new_empty(0)
        finally:
            for p, g in zip(others, held):
                p.grad = g

    @torch.no_grad()
    def sync(self) -> None:
        """Every 16-bit weight the forward uses := its master, rounded to nearest (kahan: nothing to do)."""
        for key, master in self.masters.items():
            self.params[key].copy_(master)

    @torch.no_grad()
    def _sample(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for key, p in self.params.items():
            if p.grad is not None:
                out[key] = (p.detach().reshape(-1)[:SAMPLE].clone(), p.grad.reshape(-1)[:SAMPLE] != 0)
        return out

    @torch.no_grad()
    def _report(self, before: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        lost = moved_for = 0
        for key, (values, live) in before.items():
            now = self.params[key].detach().reshape(-1)[:SAMPLE]
            lost += int(((now == values) & live).sum())
            moved_for += int(live.sum())
        if not moved_for:
            return
        self.rounded_share = lost / moved_for
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in self.params.values()})
        self.warn(f"master weights 'none': in the first step {self.rounded_share:.0%} of the {'/'.join(dtypes)} weights "
                  "with a gradient did not move (their update was under half a 16-bit spacing and rounded away); "
                  "use fp32 master weights (train.master_weights: fp32, the default) to keep those updates")

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The masters (kahan: the compensation buffers) by parameter name, on the CPU."""
        kept = self.masters or self.comps
        return {self.names[key]: m.detach().to("cpu", copy=True).contiguous() for key, m in kept.items()}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Put the masters back (and their 16-bit weights, rounded from them); kahan: the compensation buffers."""
        kept = self.masters or self.comps
        what_kind = "compensation buffers (train.master_weights: kahan)" if self.comps else "fp32 master weights"
        mine = {self.names[key]: key for key in kept}
        missing, unexpected = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
        if missing or unexpected:
            what = f"{missing[0]} is missing" if missing else f"{unexpected[0]} has no 16-bit trainable parameter here"
            raise DeltaError(f"{source}: the {what_kind} do not fit the model ({what}); it was written by "
                             "another run or another model.dtype / train.master_weights")
        for name, key in mine.items():
            master, value = kept[key], tensors[name]
            if tuple(value.shape) != tuple(master.shape) or value.dtype != master.dtype:
                raise DeltaError(f"{source}: the {what_kind} of {name} is {value.dtype} {list(value.shape)}, the "
                                 f"model's {master.dtype} {list(master.shape)}; it was written for another model or "
                                 "model.dtype")
            master.copy_(value)
        self.sync()

    def remove(self) -> None:
        """Take the hooks off (the masters stay until dropped)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        """The 16-bit tensors with a master (fp32) or a compensation buffer (kahan)."""
        return len(self.masters) + len(self.comps)
