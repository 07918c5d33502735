"""Evaluation of every registered method on every task, through the pipeline and the command.

Each case trains a tiny model for two steps with eval data (train.run), then checks that the
run finished with finite metrics and a saved adapter, and that `deltatune eval CONFIG --adapter`
on what it saved prints the loss of the run's final eval. The matrix is the registry
(deltatune.config.METHODS) x the three tasks, so a new method is covered by registering it.
A method whose family sibling takes the same path runs in the slow set only (SIBLING).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from deltatune.cli import main as cli
from deltatune.config import METHODS
from deltatune.pipeline.config import load_run_config
from deltatune.pipeline.train import run
from pipeline_models import save_tiny, write_jsonl

TASKS = ("causal_lm", "seq_cls", "seq2seq")
ARCH = {"causal_lm": "llama", "seq_cls": "bert", "seq2seq": "t5"}
# BitFit trains bias terms, which llama and t5 lack (attach refuses them): bases that have them.
ARCH_FOR = {"bitfit": {"causal_lm": "gpt2", "seq_cls": "bert", "seq2seq": "bart"}}
# Slow only: a method whose evaluation takes the same path as a sibling of its family that runs by
# default. A new method runs by default until it is listed here.
SIBLING = {"loha": "lora", "lokr": "lora", "ia3": "lora", "p_tuning_v2": "prefix_tuning", "freeze": "bitfit"}
# Method fields a tiny model needs (FourierFT's default 1000 coefficients exceed a 16 x 32 projection's spectrum).
FIELDS = {"fourierft": {"fourierft.n_frequency": 64}}
# Where a method cannot run through the pipeline at all, and why.
CANNOT = {
    "adapter_fusion": "AdapterFusion fuses bottleneck adapters that are already attached; a run attaches one delta, "
                      "so the pipeline has nothing for it to fuse",
}


def cases() -> list:
    out = []
    for name in METHODS:
        for task in TASKS:
            marks = [pytest.mark.slow] if name in SIBLING else []
            if name in CANNOT:
                marks.append(pytest.mark.skip(reason=CANNOT[name]))
            out.append(pytest.param(name, task, marks=marks, id=f"{name}-{task}"))
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_every_method")


def data_flags(root: Path, task: str) -> dict:
    words = ["alpha", "beta", "gamma", "delta"]
    if task == "causal_lm":
        rows = [{"instruction": f"Repeat {words[i % 4]}", "output": f"{words[i % 4]} {words[i % 4]}"} for i in range(12)]
        return {"data.train": str(write_jsonl(root / "instruction.jsonl", rows)), "data.format": "instruction"}
    if task == "seq_cls":
        rows = [{"text": f"{words[i % 4]} sky", "label": i % 2} for i in range(12)]
        return {"data.train": str(write_jsonl(root / "classification.jsonl", rows)), "data.format": "classification"}
    rows = [{"source": f"copy {words[i % 4]}", "target": words[i % 4]} for i in range(12)]
    return {"data.train": str(write_jsonl(root / "seq2seq.jsonl", rows)), "data.format": "seq2seq"}


@pytest.mark.parametrize("method,task", cases())
def test_eval_after_training(root, method, task, capsys):
    out = root / f"{method}-{task}"
    arch = ARCH_FOR.get(method, ARCH)[task]
    flags = {"model.name": str(save_tiny(root, arch)), "model.task": task, **data_flags(root, task),
             "data.eval_fraction": 0.25, "method": method, "train.max_steps": 2, "train.batch_size": 4,
             "train.progress": False, "output.dir": str(out), **FIELDS.get(method, {})}
    result = run(load_run_config(None, flags), echo=lambda *a, **k: None)
    assert result.steps == 2
    assert result.metrics and all(math.isfinite(v) for v in result.metrics.values()), result.metrics
    assert any(result.adapter_dir.glob("*.safetensors")), sorted(p.name for p in result.adapter_dir.iterdir())

    capsys.readouterr()
    assert cli(["eval", str(out / "config.yaml"), "--adapter", str(result.adapter_dir)]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines()[1:])
    assert float(printed["loss"]) == pytest.approx(result.metrics["loss"], abs=2e-4)
