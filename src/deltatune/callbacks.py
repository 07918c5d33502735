"""deltatune's training hooks inside transformers.Trainer, with no Trainer subclass.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[dt.DeltaCallback()])

A TrainerCallback cannot change the loss, so on train begin the callback registers a
forward hook on the model: while the model trains (and autograd is on), it adds
``dt.regularization(model)`` to the ``loss`` the forward returns, which is the loss the
Trainer backpropagates. After every optimizer step it calls ``dt.step(model, global_step)`` (before the gradients are zeroed),
and when training ends ``dt.finalize(model)`` (diff pruning projects onto its target
sparsity there); the hook is removed then.

Gradient accumulation: the Trainer divides each micro-batch's loss by the number of
accumulation steps, except when the model normalises its loss itself by the item count of
the whole accumulated batch (it is then passed ``num_items_in_batch``); the hook divides
the penalty in that case, so it counts once per optimizer step either way.

The penalty reaches the gradient only through the model's own ``loss``: a Trainer that
computes the loss from the logits instead (``label_smoothing_factor``, or a
``compute_loss_func``) would drop it. The first is refused at train begin; with the
second, add ``dt.regularization(model)`` in that function yourself.

Trainable 16-bit weights (full fine-tuning, layer freezing or BitFit on a model loaded in bf16/fp16): the
Trainer's optimizer steps them in their own dtype, with no fp32 master copy, and every update under half a
16-bit spacing rounds away (master.py explains the arithmetic). The callback does not rewire the
Trainer's optimizer; at train begin it warns once with the share of those weights that an update of the
learning rate's size leaves where they were, and the two ways out.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
from transformers import TrainerCallback

from . import api
from .config import DeltaError
from .master import SAMPLE, SIXTEEN_BITS
from .surgery import get_state


class DeltaCallback(TrainerCallback):
    """Adds deltatune's regularization to the Trainer's loss, and calls dt.step / dt.finalize.

    finalize=False leaves the final projection to you (to finalize after a later phase)."""

    def __init__(self, finalize: bool = True) -> None:
        if not isinstance(finalize, bool):
            raise DeltaError(f"DeltaCallback(finalize=...) expects True or False, got {finalize!r}")
        self.finalize = finalize
        self.handle: Any = None
        self.accumulation = 1
        self.warned_sixteen_bit = False  # the 16-bit warning is said once per callback, not once per train()

    # ------------------------------------------------------------ the loss hook
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return output
        penalty = api.regularization(module)
        if isinstance(penalty, float) and penalty == 0.0:
            return output
        if kwargs.get("num_items_in_batch") is not None:  # the loss is already normalised over the whole accumulation
            penalty = penalty / self.accumulation
        if isinstance(output, dict) and output.get("loss") is not None:  # a ModelOutput (a dict)
            output["loss"] = output["loss"] + penalty
        elif isinstance(output, tuple) and output and torch.is_tensor(output[0]) and output[0].dim() == 0:
            output = (output[0] + penalty,) + output[1:]  # return_dict=False: the loss comes first
        return output

    def _remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    # ------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            raise DeltaError("DeltaCallback needs the model; the Trainer passes it to its callbacks")
        if getattr(args, "label_smoothing_factor", 0) and _has_regularization(model):
            raise DeltaError(
                f"label_smoothing_factor={args.label_smoothing_factor} makes the Trainer compute the loss from the logits, "
                "so the delta's regularization added to the model's loss would be dropped; set it to 0, or compute "
                "the loss yourself and add dt.regularization(model)"
            )
        self.accumulation = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        if not self.warned_sixteen_bit:
            message = sixteen_bit_warning(model, float(getattr(args, "learning_rate", 0.0) or 0.0))
            if message is not None:
                self.warned_sixteen_bit = True
                warnings.warn(message, UserWarning, stacklevel=2)
        self._remove()  # a run that ended in an exception never reached on_train_end
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        # right after optimizer.step(), before the gradients are zeroed (AdaLoRA scores importance from
        # them); the Trainer counts this step only after it, hence + 1
        if model is not None:
            api.step(model, int(state.global_step) + 1)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        self._remove()
        if model is not None and self.finalize:
            api.finalize(model)


def _has_regularization(model: nn.Module) -> bool:
    state = get_state(model)
    return bool(state) and any(state.deltas[n].method.regularization is not None for n in state.active)


def sixteen_bit_warning(model: nn.Module, lr: float) -> str | None:
    """What a Trainer loses stepping `model`'s trainable 16-bit weights in 16 bits, or None when none train.

    An Adam(W) update is about lr in size, so the share reported is of the 16-bit weights w for which
    round16(w + lr) == w: those the first steps leave exactly where they were (sampled, SAMPLE elements per
    tensor, so a billion-parameter model is checked in a moment)."""
    sixteen = [p for p in model.parameters() if p.requires_grad and p.dtype in SIXTEEN_BITS]
    if not sixteen:
        return None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    count = sum(p.numel() for p in sixteen)
    dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in sixteen}))
    stuck = seen = 0
    with torch.no_grad():
        for p in sixteen:
            w = p.detach().reshape(-1)[:SAMPLE]
            stuck += int(((w.float() + lr).to(p.dtype) == w).sum())
            seen += w.numel()
    return (f"DeltaCallback: {count:,} of the {trainable:,} trainable parameters ({count / trainable:.0%}) are {dtypes}, "
            f"and transformers.Trainer's optimizer updates them in {dtypes}, without fp32 master weights: an update of "
            f"the learning rate's size ({lr:g}) rounds away on {stuck / max(1, seen):.0%} of them (lost, not deferred: "
            "nothing accumulates them). "
            "Fix: train with deltatune's pipeline (`deltatune train`; train.master_weights: fp32 keeps fp32 master "
            "weights), or load the model in fp32 (torch_dtype=torch.float32) and pass bf16=True to TrainingArguments, "
            "so the weights stay fp32 and the forward runs under bf16 autocast")
