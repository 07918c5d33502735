"""Each YAML in examples/ runs offline as the README says: `deltatune tiny` writes a tiny model of the
example's architecture, and `deltatune train EXAMPLE --model.name DIR --train.max_steps 2 --output.dir OUT`
trains on it for two steps, with the data the example ships in examples/data/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.cli import main
from deltatune.pipeline.config import load_run_config, read_yaml

EXAMPLES = Path(__file__).parent.parent / "examples"
TINY = {"lora_sft_starcoder.yaml": "gpt_bigcode", "ia3_mrpc_roberta.yaml": "roberta", "prefix_seq2seq_t5.yaml": "t5",
        "qlora_llama.yaml": "llama"}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_example_trains_on_data_shipped_beside_it(name):
    data = read_yaml((EXAMPLES / name).read_text())["data"]
    for key in ("train", "eval"):
        if key in data:  # a path relative to the repository, inside examples/data: nothing to download
            assert (EXAMPLES.parent / data[key]).is_file() and Path(data[key]).parts[:2] == ("examples", "data")


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs_offline_on_a_tiny_model(name, tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # the examples name their data relative to the repository
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny, out = tmp_path / f"tiny-{TINY[name]}", tmp_path / "out"
    assert main(["tiny", TINY[name], str(tiny)]) == 0
    flags = ["--model.name", str(tiny), "--train.max_steps", "2", "--output.dir", str(out)]
    assert main(["train", f"examples/{name}", *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(tiny) and any(k.startswith("eval_") for k in summary)
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    config = load_run_config(EXAMPLES / name, {"model.name": str(tiny)})
    assert saved["peft_type"] == type(config.delta).peft_type
