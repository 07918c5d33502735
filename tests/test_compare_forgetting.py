"""Forgetting on reference data: forgetting.py's two numbers, and `deltatune compare --reference-data`.

The base is a tiny llama first fitted (in this process, 40 full steps) to a few sentences of reference text, so it
has something to forget; the task is one narrow answer ("zeta zeta zeta"). A run trained on it at a high lr must
move away from the base there (loss up, KL above 0); one at lr 1e-20 (train.lr must be above 0) changes no weight
in float32, so both numbers are 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

from deltatune import forgetting
from deltatune.cli import main as cli
from deltatune.compare import compare
from deltatune.config import DeltaError
from deltatune.pipeline.config import load_run_config
from deltatune.pipeline.train import run
from pipeline_models import save_tiny, write_jsonl

SENTENCES = [f"the {w} of the {v} is here" for w in ("cat", "dog", "sun", "sea") for v in ("hill", "road", "town")]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("forgetting")
    reference = root / "reference.txt"
    reference.write_text("\n\n".join(SENTENCES))
    source = save_tiny(root, "llama")
    tokenizer = tf.AutoTokenizer.from_pretrained(source)
    model = tf.AutoModelForCausalLM.from_pretrained(source)
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):  # the base learns the reference text: what a narrow fine-tune can then forget
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    rows = write_jsonl(root / "narrow.jsonl", [{"instruction": "Say the word", "output": "zeta zeta zeta"}] * 16)
    return {"root": root, "base": base, "reference": reference, "rows": rows}


def train(task: dict, method: str, lr: float, name: str) -> Path:
    out = task["root"] / name
    run(load_run_config(None, {"model.name": str(task["base"]), "data.train": str(task["rows"]),
                               "data.format": "instruction", "method": method, "train.max_steps": 8,
                               "train.batch_size": 4, "train.lr": lr, "train.progress": False, "output.dir": str(out)}))
    return out


def test_a_hard_narrow_run_forgets_and_a_run_that_changed_nothing_does_not(task):
    still = forgetting.run(train(task, "lora", 1e-20, "lora-still"), str(task["reference"]))
    hard = forgetting.run(train(task, "lora", 5e-2, "lora-hard"), str(task["reference"]))
    assert still["base_loss"] == hard["base_loss"]  # the same base, the same reference tokens
    assert still["tokens"] == hard["tokens"] > 100 and still["format"] == "text"  # a .txt reference is plain text
    assert still["kl"] == pytest.approx(0.0, abs=1e-7) and still["loss_increase"] == pytest.approx(0.0, abs=1e-7)
    assert hard["kl"] > 0.05 and hard["loss_increase"] > 0.1  # measured: about 0.47 and 1.15
    assert hard["tuned_loss"] == pytest.approx(hard["base_loss"] + hard["loss_increase"])
    record = json.loads((task["root"] / "lora-hard" / forgetting.FILE).read_text())
    assert record["kl"] == hard["kl"] and record["reference"] == str(task["reference"].resolve())


def test_full_fine_tuning_is_compared_with_the_base_loaded_again(task):
    """full trains the base weights: switching its delta off would leave them, so a KL above 0 shows the base was
    loaded again (the trained model against itself would give exactly 0)."""
    full = forgetting.run(train(task, "full", 1e-2, "full-hard"), str(task["reference"]))
    lora = json.loads((task["root"] / "lora-still" / forgetting.FILE).read_text())
    assert full["base_loss"] == pytest.approx(lora["base_loss"], abs=1e-5)
    assert full["kl"] > 0.05 and full["loss_increase"] > 0.1


def test_a_record_is_current_only_for_its_reference_and_its_adapter(task):
    run_dir = task["root"] / "lora-still"
    reference = str(task["reference"])
    assert forgetting.is_current(run_dir, reference, None) is not None
    assert forgetting.is_current(run_dir, reference, "text") is not None
    other = task["root"] / "other.txt"
    other.write_text("\n\n".join(SENTENCES[:3]))
    assert forgetting.is_current(run_dir, str(other), None) is None  # another reference
    task["reference"].write_text(task["reference"].read_text() + "\n\nthe end of the road is here")
    try:
        assert forgetting.is_current(run_dir, reference, None) is None  # the same path, changed bytes
    finally:
        task["reference"].write_text("\n\n".join(SENTENCES))
    assert forgetting.is_current(run_dir, reference, None) is not None
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.touch()  # a retrained run writes its adapter again
    assert forgetting.is_current(run_dir, reference, None) is None


def test_compare_reports_forgetting_and_a_second_call_measures_nothing_again(task, capsys):
    """The YAML key on the first call, the flag on the second: the same comparison, nothing trained or measured."""
    root = task["root"]
    config = {"model": {"name": str(task["base"])},
              "data": {"train": str(task["rows"]), "format": "instruction", "eval_fraction": 0.25},
              "train": {"max_steps": 8, "batch_size": 4, "lr": 5e-2, "progress": False},
              "compare": {"reference_data": str(task["reference"])}}
    path = root / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / "cmp"
    comparison = compare(path, ["lora"], out, echo=lambda line: None)
    (row,) = comparison.rows
    record = json.loads((out / "lora" / forgetting.FILE).read_text())
    assert row.status == "ok" and row.ref_kl == record["kl"] > 0.05 and row.ref_loss_increase == record["loss_increase"] > 0.1
    md = (out / "comparison.md").read_text()
    assert f"| {record['loss_increase']:+.4f} | {record['kl']:.6f} |" in md and "| KL(base‖tuned) |" in md
    assert "reference loss increase" in md and "loaded again" in md  # what the columns mean
    header, line = (out / "comparison.csv").read_text().splitlines()
    cells = dict(zip(header.split(","), line.split(",")))
    assert float(cells["ref_kl"]) == record["kl"] and float(cells["ref_loss_increase"]) == record["loss_increase"]
    assert "logs/lora.forgetting.log" in json.loads((out / "compare.json").read_text())["wrote"]

    stamp = (out / "lora" / forgetting.FILE).stat().st_mtime_ns
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "compare"}))
    assert cli(["compare", str(path), "--methods", "lora", "--out", str(out), "--reference-data", str(task["reference"])]) == 0
    assert "measuring forgetting" not in capsys.readouterr().out
    assert (out / "lora" / forgetting.FILE).stat().st_mtime_ns == stamp
    assert (out / "comparison.md").read_text().split("\n", 3)[3] == md.split("\n", 3)[3]  # the table, the command aside


@pytest.mark.slow  # one more child process (~10 s on 2 busy cores)
def test_a_reference_that_cannot_be_read_is_a_note_and_the_row_stays(task):
    """The comparison above again with another reference (the same comparison: compare's own keys are no run's):
    lora is kept, its measure fails in its child, and the row stays, with a note saying why."""
    bad = task["root"] / "bad.jsonl"
    bad.write_text('{"nothing": "here"}\n')
    out = task["root"] / "cmp"
    comparison = compare(task["root"] / "compare.yaml", ["lora"], out, reference_data=str(bad), echo=lambda line: None)
    (row,) = comparison.rows
    assert row.status == "ok" and row.action == "kept" and row.ref_kl is None
    assert len(comparison.notes) == 1 and comparison.notes[0].startswith("lora: forgetting not measured: ")
    assert "bad.jsonl" in comparison.notes[0]
    assert "forgetting not measured" in (out / "comparison.md").read_text()
    with pytest.raises(DeltaError, match="no data file at"):
        compare(task["root"] / "compare.yaml", ["lora"], task["root"] / "cmp-none",
                reference_data=str(task["root"] / "missing.txt"))
    assert not (task["root"] / "cmp-none").exists()
