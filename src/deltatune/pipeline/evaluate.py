"""Metrics: accuracy and macro-F1 for classification, loss and perplexity for language
modelling, a stage's own metrics where it has them (DPO's loss and rewards on preference pairs), and
exact match, BLEU (sacrebleu) and ROUGE-L (rouge-score) for generation when the data has references
(seq2seq targets, instruction outputs, the last assistant turn)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import DeltaError
from ..losses import lm_loss
from .data import IGNORE, Collator, Prepared
from .stages import reference, stage_for


@torch.no_grad()
def evaluate(model: torch.nn.Module, prepared: Prepared, config: Any, tokenizer: Any) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        metrics = _scores(model, prepared, config, tokenizer)
        if config.eval.generate and config.model.task != "seq_cls":
            metrics.update(generation_metrics(model, prepared, config, tokenizer))
        return metrics
    finally:
        model.train(was_training)


def _scores(model: torch.nn.Module, prepared: Prepared, config: Any, tokenizer: Any) -> dict[str, float]:
    stage = stage_for(config)
    if stage.evaluate is not None:  # a stage that scores its own way (DPO: its loss and rewards over the eval pairs)
        # full, freeze, bitfit: the reference is a separate copy of the base, held by training or loaded here
        # (`deltatune eval` of such a run's weights) when the stage first asks for it
        with reference.ready(model, config, tokenizer):
            return stage.evaluate(model, prepared, config, tokenizer)
    collate = Collator(pad_id=tokenizer.pad_token_id, task=config.model.task)
    device = next(model.parameters()).device
    size = config.eval.batch_size
    if config.model.task == "seq_cls":
        predictions, truth, loss_sum = [], [], 0.0
        for i in range(0, len(prepared.eval), size):
            batch = {k: v.to(device) for k, v in collate(prepared.eval[i:i + size]).items()}
            out = model(**batch)
            loss_sum += out.loss.item() * len(batch["labels"])
            predictions += out.logits.argmax(-1).tolist()
            truth += batch["labels"].tolist()
        return classification_metrics(truth, predictions) | {"loss": loss_sum / len(truth)}
    # the fused loss (losses.py) when training used it: the full logits of an eval batch are the same
    # (tokens x vocabulary) buffer the training step avoids holding
    fused = config.train.loss == "fused"
    total_loss, total_tokens = 0.0, 0
    for i in range(0, len(prepared.eval), size):
        batch = {k: v.to(device) for k, v in collate(prepared.eval[i:i + size]).items()}
        if "position_ids" in batch:
            batch["use_cache"] = False
        labels = batch["labels"]
        shifted = labels[:, 1:] if config.model.task == "causal_lm" else labels
        n = int((shifted != IGNORE).sum())
        if not n:
            continue
        if fused:
            total_loss += lm_loss(model, batch, reduction="sum").item()
        else:
            logits = token_logits(model(**batch).logits.float(), labels)
            if config.model.task == "causal_lm":
                logits = logits[:, :-1]
            total_loss += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                                            ignore_index=IGNORE, reduction="sum").item()
        total_tokens += n
    mean = total_loss / max(1, total_tokens)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def token_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits of the labelled positions: a soft prompt (prompt tuning, P-tuning) prepends virtual
    tokens inside the model's forward, so its logits start with one row per virtual token that the
    batch's labels never had. Those rows come first; the rest line up with the labels."""
    extra = logits.shape[1] - labels.shape[1]  # (B, n_virtual + T, V) against (B, T)
    if extra < 0:
        raise DeltaError(f"evaluation: the model returned logits for {logits.shape[1]} positions but the batch has "
                         f"{labels.shape[1]} labelled positions; a delta that removes positions cannot be evaluated here")
    return logits[:, extra:]


def classification_metrics(truth: list[int], predictions: list[int]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(truth, predictions)),
            "macro_f1": float(f1_score(truth, predictions, average="macro", zero_division=0))}


def references(prepared: Prepared, config: Any) -> list[tuple[str, str]]:
    """(prompt text, reference answer) for every eval row that has one."""
    pairs = (prepared.renderer.reference(row) for row in prepared.eval_rows)
    return [pair for pair in pairs if pair is not None]


def generation_metrics(model: torch.nn.Module, prepared: Prepared, config: Any, tokenizer: Any) -> dict[str, float]:
    pairs = references(prepared, config)
    if not pairs:
        return {}
    device = next(model.parameters()).device
    outputs = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the last real token
    try:
        for i in range(0, len(pairs), config.eval.batch_size):
            prompts = [p for p, _ in pairs[i:i + config.eval.batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=config.model.task == "seq2seq").to(device)
            # Only ids and mask: older tokenizers add token_type_ids, which generate() refuses on decoders.
            generated = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                       max_new_tokens=config.eval.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=(prepared.renderer.chat.stop_ids() or None) if config.model.task != "seq2seq" else None)
            if config.model.task != "seq2seq":
                generated = generated[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(generated, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return text_metrics([o.strip() for o in outputs], [r.strip() for _, r in pairs])


def text_metrics(predictions: list[str], references_: list[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    exact = sum(p == r for p, r in zip(predictions, references_)) / len(references_)
    bleu = sacrebleu.corpus_bleu(predictions, [references_]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references_)) / len(references_)
    return {"exact_match": exact, "bleu": bleu, "rouge_l": rouge}
