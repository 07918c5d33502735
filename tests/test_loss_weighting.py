"""Gradient accumulation and several processes weigh every label token the same.

The loss of an optimizer step is the sum of its token losses divided once by the step's
token count (over every micro-batch and every process), so how a step is split changes
nothing: `batch 8`, `batch 2 x accum 4` and `2 processes x batch 4` give the same update.
The examples have answers of very unequal lengths, where averaging per-micro-batch means
(the old `loss / grad_accum`) gives a different update.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.pipeline.config import load_run_config
from deltatune.pipeline.train import run
from pipeline_models import save_tiny, write_jsonl

HERE = Path(__file__).parent
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("weighting")


def uneven_rows(task: str) -> list[dict]:
    # answers of 1 to 12 words: micro-batches of two hold very different token counts
    counts = [1, 12, 2, 9, 1, 1, 7, 3]
    rows = [(f"Repeat {WORDS[i]} {n} times", " ".join([WORDS[i]] * n)) for i, n in enumerate(counts)]
    if task == "seq2seq":
        return [{"source": s, "target": t} for s, t in rows]
    return [{"instruction": s, "output": t} for s, t in rows]


def settings(root: Path, task: str, out: str) -> dict:
    arch, fmt, model_task = {"causal_lm": ("llama", "instruction", "causal_lm"),
                             "seq2seq": ("t5", "seq2seq", "seq2seq")}[task]
    data = write_jsonl(root / f"{task}.jsonl", uneven_rows(task))
    return {"model.name": str(save_tiny(root, arch, dropout_rate=0.0) if arch == "t5" else save_tiny(root, arch)),
            "model.task": model_task, "data.train": str(data), "data.format": fmt,
            "train.max_steps": 1, "train.optimizer": "sgd", "train.lr": 0.5, "train.max_grad_norm": None,
            "train.seed": 3, "train.progress": False, "lora.r": 4, "lora.dropout": 0.0,
            "output.dir": str(root / out)}


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def assert_same_delta(a: Path, b: Path) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("task", ["causal_lm", "seq2seq"])
def test_accumulated_micro_batches_give_the_update_of_one_batch(root, task):
    quiet = lambda *a, **k: None  # noqa: E731
    whole = run(load_run_config(None, {**settings(root, task, f"{task}-8x1"), "train.batch_size": 8}), echo=quiet)
    split = run(load_run_config(None, {**settings(root, task, f"{task}-2x4"), "train.batch_size": 2,
                                       "train.grad_accum": 4}), echo=quiet)
    initial = run(load_run_config(None, {**settings(root, task, f"{task}-tiny-lr"), "train.batch_size": 8,
                                         "train.lr": 1e-12}), echo=quiet)
    assert_same_delta(whole.output_dir, split.output_dir)
    assert split.final_loss == pytest.approx(whole.final_loss, rel=1e-6)
    # the step moved the delta well beyond the tolerance, so equal deltas are a real check
    assert max((adapter(whole.output_dir)[k] - adapter(initial.output_dir)[k]).abs().max().item()
               for k in adapter(whole.output_dir)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("batch,accum", [(4, 1), (2, 2)], ids=["2x4", "2x2xaccum2"])
def test_two_processes_give_the_update_of_one_process(root, tmp_path, batch, accum):
    config = tmp_path / "run.yaml"
    flags = settings(root, "causal_lm", "unused")
    lines = [f"{k}: {json.dumps(v)}" for k, v in flags.items() if k != "output.dir"]
    config.write_text("\n".join(_nest(lines)) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    one = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", str(config), "--train.batch_size", "8",
                          "--output.dir", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "deltatune.cli",
                          "train", str(config), "--train.batch_size", str(batch), "--train.grad_accum", str(accum),
                          "--output.dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"{batch} x 2 process(es) x {accum} accumulation" in two.stdout
    assert_same_delta(tmp_path / "one", tmp_path / "two")
    losses = [json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[0])["loss"] for d in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def _nest(lines: list[str]) -> list[str]:
    """`a.b: v` lines as YAML sections."""
    sections: dict[str, list[str]] = {}
    for line in lines:
        key, value = line.split(": ", 1)
        section, _, field = key.partition(".")
        sections.setdefault(section, []).append(f"  {field}: {value}")
    return [part for section, body in sections.items() for part in (f"{section}:", *body)]
