"""Each YAML in examples/ runs offline as its header says: `deltatune tiny` writes a tiny model of the
example's architecture, and `deltatune train EXAMPLE --model.name DIR --train.max_steps 2 --output.dir OUT`
trains on it for two steps, with the data the example ships in examples/data/."""

from __future__ import annotations

import json
import shlex
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


def offline_commands(name: str) -> list[list[str]]:
    """The commands the example's header gives for trying it offline, as argument lists."""
    lines = (EXAMPLES / name).read_text().splitlines()
    return [shlex.split(line.removeprefix("#").strip()) for line in lines
            if line.startswith("#   deltatune ")]


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs_offline_on_a_tiny_model(name, tmp_path, monkeypatch):
    """The header's two commands, run as written, the out/ folders moved under tmp_path."""
    if "quant" in read_yaml((EXAMPLES / name).read_text())["model"]:
        pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(EXAMPLES.parent)  # the examples name their data relative to the repository
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_cmd, train_cmd = offline_commands(name)
    assert tiny_cmd[:3] == ["deltatune", "tiny", TINY[name]] and train_cmd[:3] == ["deltatune", "train", f"examples/{name}"]
    # each example its own folder: trying a second one is never refused as another run's folder
    assert train_cmd[3:] == ["--model.name", tiny_cmd[3], "--train.max_steps", "2", "--output.dir", f"out/try-{Path(name).stem}"]
    moved = lambda args: [str(tmp_path / a) if a.startswith("out/") else a for a in args]  # noqa: E731
    assert main(moved(tiny_cmd)[1:]) == 0
    assert main(moved(train_cmd)[1:]) == 0
    tiny, out = tmp_path / tiny_cmd[3], tmp_path / train_cmd[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(tiny) and any(k.startswith("eval_") for k in summary)
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 2
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    config = load_run_config(EXAMPLES / name, {"model.name": str(tiny)})
    assert saved["peft_type"] == type(config.delta).peft_type
