"""Forgetting: what a finished run lost on reference data that was not its task.

Two numbers over the labelled tokens of the reference set (every token of plain text; the answers of
instruction or chat rows):

    loss_increase = CE(fine-tuned) - CE(base)                        nats per token; > 0: it got worse there
    kl            = mean_t KL(p_base(. | x_<t) || p_tuned(. | x_<t))  how far its next-token distributions moved

The base is the same model with its delta switched off (`dt.disabled`), so no second copy is held; a method that
trains the base weights themselves (full, freeze, bitfit) has nothing to switch off, and the base is loaded again
(the preference stages' reference does the same: stages/reference.py). Both forwards see the same batch, so the
two numbers are exactly 0 for a delta that changed nothing.

`python -m deltatune.forgetting RUN_DIR REFERENCE [--format FORMAT]` measures one finished run (its config.yaml
and adapter/) and writes RUN_DIR/forgetting.json, with what it was measured from, so a caller can tell a record
of this reference and this adapter from a stale one (`is_current`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import DeltaError
from .files import write_atomic

FILE = "forgetting.json"


def default_format(reference: str, run_format: str) -> str:
    """A .txt file or folder is plain text; any other reference is read as the run's own data is."""
    path = Path(reference)
    return "text" if path.suffix.lower() == ".txt" or path.is_dir() else run_format


def fingerprint(run_dir: Path, reference: str, data_format: str) -> dict[str, Any]:
    """What a record was measured from: the reference's bytes and the adapter file's size and time (a run trained
    again since has another), so a changed file or a retrained run is measured again, an unchanged one never."""
    from .io import WEIGHTS_NAME

    digest = hashlib.sha256()
    path = Path(reference)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    if not files:  # a `datasets` name: its name is all there is to compare
        digest.update(reference.encode())
    weights = run_dir / "adapter" / WEIGHTS_NAME
    stat = weights.stat() if weights.is_file() else None
    return {"reference": str(path.resolve()) if files else reference, "format": data_format,
            "reference_sha256": digest.hexdigest(),
            "adapter": None if stat is None else {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}}


def is_current(run_dir: Path, reference: str, data_format: str | None) -> dict[str, Any] | None:
    """The run's forgetting record when it was measured from this reference and this adapter, else None."""
    path = run_dir / FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        fmt = data_format or record["format"]
        wanted = fingerprint(run_dir, reference, fmt)
        return record if all(record.get(k) == v for k, v in wanted.items()) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # damaged: measured again


def reference_config(run_dir: Path, reference: str, data_format: str | None) -> Any:
    """The run's own config (its config.yaml) with the reference as its data: the same tokenizer, chat template,
    max_length and eval batch size; every example is scored (no eval split, no packing)."""
    import yaml

    from .pipeline.config import build_run_config

    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    section = dict(data.get("data") or {})
    fmt = data_format or default_format(reference, section.get("format", "text"))
    if fmt != section.get("format"):  # the run's column names belong to its own format
        for key in ("columns", "message_keys", "roles"):
            section.pop(key, None)
    section.update(train=reference, eval=None, eval_fraction=0.0, format=fmt, packing=False, max_examples=None)
    data["data"] = section
    # the run's stage belongs to its task data; the reference is scored as plain next-token prediction
    data.pop("stage", None)
    return build_run_config(data, f"{run_dir / 'config.yaml'} (reference data {reference})")


@torch.no_grad()
def measure(model: torch.nn.Module, examples: list[Any], config: Any, tokenizer: Any) -> dict[str, float]:
    """Loss of the base and of the fine-tuned model, and the mean KL(base || tuned), over the labelled tokens."""
    from .pipeline.data import IGNORE, Collator
    from .pipeline.evaluate import token_logits
    from .pipeline.stages import reference

    F = torch.nn.functional
    collate = Collator(pad_id=tokenizer.pad_token_id, task=config.model.task)
    device = next(model.parameters()).device
    size = config.eval.batch_size
    base_sum = tuned_sum = kl_sum = 0.0
    tokens = 0
    model.eval()
    # full, freeze, bitfit: `ready` loads the base again as a separate copy; any other delta is switched off
    with reference.ready(model, config, tokenizer):
        for i in range(0, len(examples), size):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + size]).items()}
            if "position_ids" in batch:
                batch["use_cache"] = False
            labels = batch.pop("labels")
            shifted = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
            mask = shifted != IGNORE
            n = int(mask.sum())
            if not n:
                continue
            tuned = token_logits(model(**batch).logits.float(), labels)[:, :-1][mask]  # (N, V)
            with reference.reference(model) as base_model:
                base = token_logits(base_model(**batch).logits.float(), labels)[:, :-1][mask]  # (N, V)
            target = shifted[mask]  # (N,)
            base_logp, tuned_logp = F.log_softmax(base, -1), F.log_softmax(tuned, -1)
            base_sum += F.nll_loss(base_logp, target, reduction="sum").item()
            tuned_sum += F.nll_loss(tuned_logp, target, reduction="sum").item()
            # KL(p || q) = sum_v p (log p - log q); log_target: both given as log-probabilities
            kl_sum += F.kl_div(tuned_logp, base_logp, log_target=True, reduction="sum").item()
            tokens += n
    if not tokens:
        raise DeltaError("the reference data has no labelled token within max_length: nothing to measure forgetting on")
    base_loss, tuned_loss = base_sum / tokens, tuned_sum / tokens
    return {"base_loss": base_loss, "tuned_loss": tuned_loss, "loss_increase": tuned_loss - base_loss,
            "kl": max(0.0, kl_sum / tokens), "tokens": tokens}


def run(run_dir: str | Path, reference: str, data_format: str | None = None) -> dict[str, Any]:
    """Measure a finished run's forgetting on `reference` and write run_dir/forgetting.json."""
    from . import io as dt_io
    from .pipeline.data import prepare
    from .pipeline.train import load_base, load_tokenizer, model_limit
    from .model_files import RESTORED

    run_dir = Path(run_dir)
    if not (run_dir / "adapter").is_dir() or not (run_dir / "config.yaml").is_file():
        raise DeltaError(f"{run_dir} holds no finished run (adapter/ and config.yaml): train it first")
    config = reference_config(run_dir, reference, data_format)
    if config.model.task != "causal_lm":
        raise DeltaError(f"forgetting is measured on next-token prediction; {run_dir} is a {config.model.task} run")
    start = time.perf_counter()
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer, fate=RESTORED)
    prepared = prepare(config, tokenizer, model_limit(model, tokenizer))
    dt_io.load(model, run_dir / "adapter")
    numbers = measure(model, prepared.train, config, tokenizer)
    record = {**fingerprint(run_dir, reference, config.data.format), **numbers, "examples": len(prepared.train),
              "wall_s": round(time.perf_counter() - start, 2)}
    write_atomic(run_dir / FILE, json.dumps(record, indent=1).encode())
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltatune.forgetting",
                                     description="Measure a finished run's forgetting on reference data.")
    parser.add_argument("run_dir")
    parser.add_argument("reference", help="a data file or folder in any format the pipeline reads")
    parser.add_argument("--format", help="the reference's data.format (default: text for .txt, else the run's)")
    args = parser.parse_args(argv)
    try:
        record = run(args.run_dir, args.reference, args.format)
    except DeltaError as err:
        print(f"deltatune forgetting: error: {err}", file=sys.stderr)
        return 2
    print(f"forgetting of {args.run_dir} on {args.reference}: loss {record['base_loss']:.4f} -> "
          f"{record['tuned_loss']:.4f} ({record['loss_increase']:+.4f}), KL(base||tuned) {record['kl']:.6f} per token "
          f"over {record['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
