"""A fused linear + cross-entropy that never holds the full (tokens x vocabulary) logits.

For a small model with a large vocabulary the loss, not the model, holds most of a training step's
memory: transformers' causal-LM loss keeps about four logit-sized fp32 buffers (2.3 MiB per token at a
vocabulary of 151,936). Here the head and the loss run together, chunk by chunk of rows, in the forward
pass (the schedule of Liger-Kernel's fused linear cross-entropy, written in plain torch):

    for each chunk of rows h (C x H) whose label is not ignore_index:
        z  = s * (h W^T + b + scale * L B^T)            logits in the compute dtype, then fp32    (C, V)
        z  = c * tanh(z / c)                             soft-capping, when the model has it (Gemma 2)
        loss_i = lse(z_i) - (1 - e) z_{i,y_i} - e * mean(z_i)        (label smoothing e)
        dz = softmax(z) - (1 - e) onehot(y) - e / V      times (1 - tanh^2) under soft-capping, times s
        dh = dz W,  dW += dz^T h,  db += sum(dz),  dL = scale * dz B,  dB += scale * dz^T L

so the backward pass only scales what the forward stored by the incoming gradient. Rows labelled
ignore_index (a prompt under answer-only loss, padding) are dropped before the head. A low-rank addend
L B^T (L = dropout(h) A^T, one row per token) carries a LoRA on the head: autograd takes dL on to A and
through the dropout, so a delta on the head trains exactly as in the standard path. fp32 accumulation
throughout; half-precision inputs are multiplied in their own dtype, as the standard path does.

`fused_linear_cross_entropy` is the function on tensors; `lm_loss(model, batch)` runs a transformers
causal LM or seq2seq model up to its head (the model-level hooks of prompts and prefixes included) and
applies it, for users of their own loops and of `transformers.Trainer` (`compute_loss`);
`sequence_log_probs(model, batch)` gives each row's summed log-probability of its labelled tokens the same
way (what preference losses such as DPO's compare).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DeltaError

IGNORE_INDEX = -100
CPU_CHUNK_BYTES = 96 << 20  # fp32 logits and their gradient for one chunk on the CPU
GPU_CHUNK_SHARE = 8  # a chunk takes at most 1/8 of the free GPU memory (and never more than 1 GiB)


def chunk_rows(vocab: int, device: torch.device | str | None = None) -> int:
    """Rows per chunk: the chunk's fp32 logits, its gradient and a half-precision copy (~10 bytes per logit)
    fit a budget (96 MiB on the CPU; on a GPU, an eighth of the free memory, at most 1 GiB)."""
    budget = CPU_CHUNK_BYTES
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(1 << 30, max(CPU_CHUNK_BYTES, free // GPU_CHUNK_SHARE))
    rows = budget // (10 * max(1, vocab))
    return max(8, rows - rows % 8)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, left: torch.Tensor | None,
                right: torch.Tensor | None, labels: torch.Tensor, scale: float, logit_scale: float, softcap: float | None,
                smoothing: float, chunk: int) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = torch.promote_types(hidden.dtype, weight.dtype)  # an fp32 head copy over a bf16 body runs in fp32
        needs = ctx.needs_input_grad
        grad_h = torch.empty_like(hidden) if needs[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if bias is not None and needs[2] else None
        grad_left = torch.empty_like(left) if left is not None and needs[3] else None
        grad_right = torch.zeros(right.shape, dtype=torch.float32, device=right.device) if right is not None and needs[4] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        r = right.to(dtype) if right is not None else None
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            h, y = hidden[start:end].to(dtype), labels[start:end]
            z = F.linear(h, w, b)  # (C, V) in the compute dtype, as the head computes it
            if left is not None:
                z = torch.addmm(z, left[start:end].to(dtype), r.T, alpha=scale)
            z = z.float()
            if logit_scale != 1.0:
                z.mul_(logit_scale)
            if softcap is not None:
                t = torch.tanh(z / softcap)
                z = t * softcap
            lse = torch.logsumexp(z, dim=-1)  # (C,)
            picked = z.gather(1, y[:, None]).squeeze(1)
            rows_loss = lse - picked
            if smoothing:
                rows_loss = (1.0 - smoothing) * rows_loss + smoothing * (lse - z.mean(dim=-1))
            total += rows_loss.sum()
            # dz, in place over z: softmax minus the (smoothed) target
            g = z.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, y[:, None], torch.full((end - start, 1), smoothing - 1.0, device=g.device))
            if smoothing:
                g.sub_(smoothing / vocab)
            if softcap is not None:
                g.mul_(1.0 - t * t)
                del t
            if logit_scale != 1.0:
                g.mul_(logit_scale)
            g = g.to(dtype)
            if grad_h is not None:
                grad_h[start:end] = (g @ w).to(grad_h.dtype)
            if grad_w is not None:
                grad_w.add_((g.T @ h).float())
            if grad_b is not None:
                grad_b.add_(g.sum(0).float())
            if grad_left is not None:
                grad_left[start:end] = (g @ r).mul_(scale).to(left.dtype)
            if grad_right is not None:
                grad_right.add_((g.T @ left[start:end].to(dtype)).float(), alpha=scale)
            del g, z
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b, grad_left, grad_right)))
        ctx.present = [t is not None for t in (grad_h, grad_w, grad_b, grad_left, grad_right)]
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None,
                      left.dtype if left is not None else None, right.dtype if right is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grads = []
        for tensor, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes):
            grads.append((tensor * grad_out.to(tensor.dtype)).to(dtype) if present else None)
        return (*grads, None, None, None, None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None = None, low_rank: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                               ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0, softcap: float | None = None,
                               logit_scale: float = 1.0, reduction: str = "mean", num_items: int | torch.Tensor | None = None,
                               chunk: int | None = None) -> torch.Tensor:
    """Cross-entropy of `labels` under the logits `hidden @ weight.T + bias` without materialising them.

    hidden: (..., H), labels: (...) with `ignore_index` for rows that do not count (no shift is applied: for a
    causal LM pass hidden[:, :-1] and labels[:, 1:], or use `lm_loss`). low_rank: (L, B, scale) adds
    scale * L @ B.T to the logits, L (..., r) per row and B (V, r): a LoRA on the head. softcap: Gemma 2's
    final logit soft-capping c * tanh(z / c); logit_scale multiplies the logits first (Cohere).
    reduction: "sum", or "mean" over the counted rows, or over `num_items` when given (token-weighted
    across accumulation steps and processes, as transformers' num_items_in_batch)."""
    if reduction not in ("mean", "sum"):
        raise DeltaError(f"reduction = {reduction!r}; use 'mean' or 'sum'")
    if hidden.shape[:-1] != labels.shape:
        raise DeltaError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not line up: "
                         "give one label per row of hidden states (shift them first for a causal LM)")
    if weight.shape[-1] != hidden.shape[-1]:
        raise DeltaError(f"the head's weight {tuple(weight.shape)} does not take hidden states of size {hidden.shape[-1]}")
    if not 0.0 <= label_smoothing < 1.0:
        raise DeltaError(f"label_smoothing = {label_smoothing}; use a value in [0, 1)")
    keep = labels.reshape(-1) != ignore_index
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = labels.reshape(-1)[keep]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        bad = int(targets[(targets < 0) | (targets >= weight.shape[0])][0])
        raise DeltaError(f"label {bad} is outside the vocabulary (0..{weight.shape[0] - 1}); mark ignored positions "
                         f"with {ignore_index}")
    left = right = None
    scale = 0.0
    if not torch.is_grad_enabled():  # evaluation: the forward then computes no gradients it would throw away
        rows, weight = rows.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
        if low_rank is not None:
            low_rank = (low_rank[0].detach(), low_rank[1].detach(), low_rank[2])
    if low_rank is not None:
        left_all, right, scale = low_rank
        left = left_all.reshape(-1, left_all.shape[-1])[keep]
    total = _FusedLinearCrossEntropy.apply(rows, weight, bias, left, right, targets, float(scale), float(logit_scale),
                                           softcap, float(label_smoothing), chunk or chunk_rows(weight.shape[0], hidden.device))
    if reduction == "sum":
        return total
    count = num_items if num_items is not None else targets.numel()
    return total / (count if torch.is_tensor(count) else max(1, int(count)))


# ---------------------------------------------------------------- a transformers model's head


@dataclass
class Head:
    """What the output layer computes: weight, bias, and a LoRA on the head (A, B, scale, dropout) if it has one."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    lora_scale: float = 0.0
    lora_dropout: float = 0.0


def _mixed_batch(module: nn.Module) -> bool:
    state = getattr(module, "model_state", None)
    return state is not None and state.batch_adapters is not None


def _plain_linear(module: nn.Module) -> bool:
    """A Linear whose weight is the (out, in) matrix it multiplies by (a quantised Linear's is packed)."""
    return (isinstance(module, nn.Linear) and module.weight.dim() == 2
            and tuple(module.weight.shape) == (module.out_features, module.in_features) and module.weight.is_floating_point())


def head_of(module: nn.Module) -> Head:
    """The head's parts, for a plain Linear, a head trained whole (modules_to_save) or a LoRA on the head;
    anything else is a clear error (the standard loss handles every head)."""
    from .methods.lora import LoraLayer
    from .surgery import DeltaLayer, ModulesToSave

    if _mixed_batch(module):
        raise DeltaError("the fused loss does not take a mixed batch of adapters on the head; use the standard loss")
    if isinstance(module, ModulesToSave):
        module = module.modules_to_save[module.active[-1]] if module.active else module.base_layer
    if _plain_linear(module):
        return Head(module.weight, module.bias)
    if isinstance(module, LoraLayer) and not module.is_embedding and _plain_linear(module.base_layer):
        active = [n for n in module.active if n not in module.merged]
        if len(active) > 1 or any(module.is_dora(n) for n in active):
            raise DeltaError("the fused loss takes one unmerged LoRA (not DoRA) on the head; merge the others, or use "
                             "the standard loss")
        head = Head(module.base_layer.weight, module.base_layer.bias)
        if active:
            name = active[0]
            head.lora_A, head.lora_B = module.lora_A[name].weight, module.lora_B[name].weight
            head.lora_scale = module.scaling[name]
            head.lora_dropout = module.dropout[name] if module.training else 0.0
        return head
    inner = f" over {type(module.base_layer).__name__}" if isinstance(module, DeltaLayer) else ""
    raise DeltaError(f"the fused loss computes a Linear head (or one LoRA on it); this model's head is "
                     f"{type(module).__name__}{inner}; use the standard loss (train.loss: standard)")


def final_hidden(model: nn.Module, batch: dict[str, Any], forward: Any = None) -> torch.Tensor:
    """The input of the model's output layer for this batch. The head is stood in for by one that keeps its
    input and returns empty logits (B, T, 0), so the forward runs to its end without computing them (the
    model-level hooks of prompts and prefixes run as usual, and so does a DistributedDataParallel wrapper
    given as `forward`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise DeltaError(f"{type(model).__name__} has no output embeddings (a language-model head) for the fused loss")
    captured: list[torch.Tensor] = []

    def stand_in(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        captured.append(hidden)
        return hidden.new_zeros(*hidden.shape[:-1], 0)

    head.forward = stand_in  # an instance attribute: nn.Module.__call__ calls it in place of the class's forward
    # BART-style models add a bias after the head (final_logits_bias, (1, V)): empty too, for the empty logits
    bias = getattr(model, "final_logits_bias", None)
    if torch.is_tensor(bias):
        model.final_logits_bias = bias[..., :0]
    try:
        (forward or model)(**batch)
    finally:
        del head.forward
        if torch.is_tensor(bias):
            model.final_logits_bias = bias
    if len(captured) != 1:
        raise DeltaError(f"{type(model).__name__}'s forward called its output layer {len(captured)} times (once is "
                         "expected); use the standard loss (train.loss: standard)")
    return captured[0]


def _logit_transform(config: Any) -> tuple[float, float | None]:
    """(multiplier, soft-cap) a model applies to its head's output before the loss."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) not in (None, 1.0):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    cap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(cap) if cap else None)


def _head_inputs(model: nn.Module, batch: dict[str, Any], forward: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(hidden, labels, head keywords) lined up for `fused_linear_cross_entropy`: the model run to its head,
    causal LMs shifted by one (labels[t + 1] predicted at t), a soft prompt's virtual positions predicting nothing."""
    batch = dict(batch)
    labels = batch.pop("labels", None)
    if labels is None:
        raise DeltaError("lm_loss needs labels in the batch (the token ids to predict, -100 where nothing counts)")
    config = model.config
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if seq2seq and batch.get("decoder_input_ids") is None and batch.get("decoder_inputs_embeds") is None:
        batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
    hidden = final_hidden(model, batch, forward)
    head = head_of(model.get_output_embeddings())
    low_rank = None
    if head.lora_A is not None:  # over every position, as the head's own forward draws its dropout
        h = F.dropout(hidden, head.lora_dropout, training=True) if head.lora_dropout else hidden
        low_rank = (F.linear(h, head.lora_A.to(h.dtype)), head.lora_B, head.lora_scale)  # (B, T, r): A's gradient flows back
    if not seq2seq:
        extra = hidden.shape[1] - labels.shape[1]
        if extra > 0:  # virtual tokens prepended by prompt tuning: they predict nothing
            labels = F.pad(labels, (extra, 0), value=IGNORE_INDEX)
        hidden, labels = hidden[:, :-1], labels[:, 1:]
        if low_rank is not None:
            low_rank = (low_rank[0][:, :-1], low_rank[1], low_rank[2])
    logit_scale, softcap = _logit_transform(config)
    bias = head.bias
    after = getattr(model, "final_logits_bias", None)  # BART, mBART, Pegasus, Marian: logits = head(h) + this
    if torch.is_tensor(after):
        bias = after.reshape(-1) if bias is None else bias + after.reshape(-1)
    return hidden, labels.to(hidden.device), dict(weight=head.weight, bias=bias, low_rank=low_rank, softcap=softcap,
                                                  logit_scale=logit_scale)


def lm_loss(model: nn.Module, batch: dict[str, Any], *, reduction: str = "mean", num_items: int | torch.Tensor | None = None,
            label_smoothing: float = 0.0, chunk: int | None = None, forward: Any = None) -> torch.Tensor:
    """A causal LM's or seq2seq model's loss on `batch` (which holds `labels`) through the fused loss: equal to
    `model(**batch).loss` (reduction "mean") to float tolerance, with every gradient, holding no full logits.
    Causal LMs predict labels[t + 1] from position t; seq2seq models predict the labels at the decoder
    positions (decoder inputs made from the labels when the batch has none, as the model does). `forward`: what
    to call instead of the model itself (a DistributedDataParallel wrapper of it, so gradients are reduced)."""
    hidden, labels, head = _head_inputs(model, batch, forward)
    return fused_linear_cross_entropy(hidden, labels=labels, label_smoothing=label_smoothing, reduction=reduction,
                                      num_items=num_items, chunk=chunk, **head)


def sequence_log_probs(model: nn.Module, batch: dict[str, Any], *, chunk: int | None = None,
                       forward: Any = None) -> torch.Tensor:
    """log p(labelled tokens of row b) for each row b of `batch`, shape (B,): the sum of the labelled tokens'
    log-probabilities (what preference losses call log pi(y|x)), with gradients, holding no full logits.

    One forward pass for the whole batch; then the fused cross-entropy row by row (reduction "sum"), since
    its backward scales one stored gradient by one incoming number, and each row gets its own."""
    hidden, labels, head = _head_inputs(model, batch, forward)
    low_rank = head.pop("low_rank")
    rows = []
    for b in range(hidden.shape[0]):
        row_rank = (low_rank[0][b], low_rank[1], low_rank[2]) if low_rank is not None else None
        rows.append(-fused_linear_cross_entropy(hidden[b], labels=labels[b], reduction="sum", chunk=chunk,
                                                low_rank=row_rank, **head))
    return torch.stack(rows)
