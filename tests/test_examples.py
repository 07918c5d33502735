"""Each YAML in examples/ runs as written, on a tiny model of its architecture, for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.pipeline.config import load_run_config
from deltatune.pipeline.train import run
from pipeline_models import save_tiny

EXAMPLES = Path(__file__).parent.parent / "examples"
TINY = {"lora_sft_starcoder.yaml": "gpt_bigcode", "ia3_mrpc_roberta.yaml": "roberta", "prefix_seq2seq_t5.yaml": "t5",
        "qlora_llama.yaml": "llama"}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs_as_written(name, tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # the examples name their data relative to the repository
    config = load_run_config(EXAMPLES / name, {"model.name": str(save_tiny(tmp_path, TINY[name])), "train.max_steps": 3,
                                               "train.save_every": None, "train.progress": False,
                                               "eval.max_new_tokens": 4, "output.dir": str(tmp_path / "out")})
    result = run(config, echo=lambda *a, **k: None)
    assert result.steps == 3 and result.metrics
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == type(config.delta).peft_type
