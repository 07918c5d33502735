"""The command line's own surface: --version, a start without torch, and `plan`'s defaults and limits.

`deltatune --help` and `--version` answer without importing torch (the package root imports its
torch-backed API on first use). `plan` plans for the machine it runs on unless told otherwise, and says
so; a sequence longer than the model's positions is refused before anything is simulated, in `plan`
(--seq) and in `train` (data.max_length), naming the model's limit and what to change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import transformers as tf

from deltatune.cli import main
from pipeline_models import save_tiny, write_jsonl

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"deltatune {version('deltatune')}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["plan", "--help"], ["train", "--help"]])
def test_help_and_version_start_without_torch(argv):
    code = ("import sys\nfrom deltatune.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": SRC, "PATH": ""})
    assert run.returncode == 0, run.stderr
    assert "deltatune" in run.stdout


def test_the_package_root_still_gives_the_whole_api():
    code = ("import sys, deltatune as dt\nassert 'torch' not in sys.modules\n"
            "assert dt.LoraConfig and dt.attach and dt.plan and dt.save and dt.load and dt.summary\n"
            "from deltatune import merge, DeltaCallback\nassert callable(dt.summary) and len(dt.METHODS) > 10\n"
            "assert set(dt.__all__) <= set(dir(dt))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": SRC, "PATH": "", "USE_HUB_KERNELS": "0"})
    assert run.returncode == 0, run.stderr


def test_a_submodule_first_leaves_the_registry_full_and_summary_a_function():
    code = ("import deltatune.planner\nfrom deltatune.config import METHODS, config_from_dict\n"
            "assert 'lora' in METHODS and config_from_dict({'method': 'lora', 'r': 4}).r == 4\n"
            "import deltatune as dt\nassert callable(dt.summary)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": SRC, "PATH": "", "USE_HUB_KERNELS": "0"})
    assert run.returncode == 0, run.stderr


def one_line_error(capsys, argv: list[str], command: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if "%|" not in line]  # transformers' progress bars aside
    assert len(lines) == 1 and lines[0].startswith(f"deltatune {command}: error: "), err
    return lines[0]


def bert(tmp_path: Path, positions: int = 64) -> Path:
    tf.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=100,
                  max_position_embeddings=positions, architectures=["BertForSequenceClassification"]).save_pretrained(tmp_path)
    return tmp_path


def test_plan_refuses_a_seq_longer_than_the_model_positions(tmp_path, capsys):
    model = str(bert(tmp_path))
    line = one_line_error(capsys, ["plan", "--model", model, "--batch", "8", "--seq", "128", "--memory", "24GB"], "plan")
    assert "128" in line and "64 positions" in line and "max_position_embeddings" in line and "--seq" in line
    assert main(["plan", "--model", model, "--batch", "2", "--seq", "64", "--memory", "24GB"]) == 0
    assert "longest max_length that fits at batch 2: 64" in capsys.readouterr().out  # the search stops there too


def test_train_refuses_a_max_length_longer_than_the_model_positions(tmp_path, capsys):
    folder = save_tiny(tmp_path, "gpt2")
    positions = json.loads((folder / "config.json").read_text())["n_positions"]
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(4)])
    flags = ["--model.name", str(folder), "--data.train", str(data), "--data.max_length", str(positions + 1),
             "--train.max_steps", "1", "--output.dir", str(tmp_path / "run")]
    line = one_line_error(capsys, ["train", *flags], "train")
    assert f"data.max_length {positions + 1}" in line and f"{positions} positions" in line
    assert f"lower data.max_length to {positions} or less" in line
    line = one_line_error(capsys, ["eval", *flags, "--data.eval_fraction", "0.5"], "eval")
    assert f"{positions} positions" in line


@pytest.mark.parametrize("gpu", [False, True])
def test_plan_defaults_to_this_machine_and_says_so(tmp_path, capsys, monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    model = str(bert(tmp_path))
    assert main(["plan", "--model", model, "--batch", "2", "--seq", "32"]) == 0
    out = capsys.readouterr().out
    if gpu:
        assert "fp32 base" not in out and "bf16 base" in out and ", cuda" in out
        assert "note: planned for cuda, bf16 (this machine has a GPU); pass --device cpu --dtype fp32" in out
    else:
        assert "fp32 base" in out and ", cpu" in out
        assert "note: planned for cpu, fp32 (this machine has no GPU); pass --device cuda --dtype bf16" in out
    assert main(["plan", "--model", model, "--batch", "2", "--seq", "32", "--device", "cuda", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "bf16 base" in out and "planned for" not in out
    assert main(["plan", "--model", model, "--batch", "2", "--seq", "32", "--device", "cpu"]) == 0
    assert "planned with a fp32 base, the default on cpu; pass --dtype" in capsys.readouterr().out
