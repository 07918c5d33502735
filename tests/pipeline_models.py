"""Tiny models saved as folders with a tokenizer, so the pipeline and the CLI can load them by path.

The models and the tokenizer are deltatune.tiny's (what `deltatune tiny` writes); this file only caches
them per test folder: one tokenizer per root, one model folder per (arch, seed, width)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import transformers as tf

from deltatune.tiny import build_tokenizer, write_tiny


@functools.lru_cache(maxsize=None)
def _tokenizer_files(folder: str) -> str:
    build_tokenizer().save_pretrained(folder)
    return folder


def tokenizer_folder(root: Path) -> Path:
    folder = root / "tokenizer"
    if not folder.exists():
        _tokenizer_files(str(folder))
    return folder


def save_tiny(root: Path, arch: str, seed: int = 0, width: int = 32, **overrides) -> Path:
    """A tiny random model of `arch` with the shared BPE tokenizer, saved at root/arch-seed (cached).

    width: the hidden size (feed-forward twice that); 4-bit bases need 64 (bitsandbytes' CPU block)."""
    folder = root / (f"{arch}-{seed}" if width == 32 else f"{arch}-{seed}-w{width}")
    if folder.exists():
        return folder
    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_folder(root))
    return write_tiny(arch, folder, seed=seed, width=width, tokenizer=tokenizer, **overrides)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stage_flags(root: Path, rows: list[dict], data_format: str, **extra) -> dict:
    """A short LoRA run of a training stage on a tiny llama, as load_run_config flags: `rows` written to a file
    under `root`, two steps of four examples, logged every step, no bar; `extra` adds or overrides keys."""
    data = write_jsonl(root / f"{data_format}.jsonl", rows)
    return {"model.name": str(save_tiny(root, "llama")), "data.train": str(data), "data.format": data_format,
            "method": "lora", "lora.r": 4, "train.max_steps": 2, "train.batch_size": 4, "train.lr": 1e-2,
            "train.log_every": 1, "train.progress": False, "output.dir": str(root / "out"), **extra}


def train_records(out: Path) -> list[dict]:
    """The training steps' lines of a run's log.jsonl (evaluation lines left out)."""
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r and "eval_loss" not in r]
