"""Part of the fault catalogue (see test_faults.py): the pipeline's crashes (issue 12).

Each test feeds one run that used to crash (in transformers, mid-training, or at the final
eval after the training was done) and asserts what deltatune does now: the run works, or it
stops before any step with a ConfigError that names the counts and says what to do, and a
failure after training never loses the trained delta. The eval of every method on every task
is in test_eval_every_method.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf

import deltatune as dt
import deltatune.pipeline.train as train_module
from deltatune.cli import main as cli
from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.train import TrainingError, run
from pipeline_models import save_tiny, write_jsonl


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults_pipeline")


def quiet(*args, **kwargs):
    pass


def causal(root: Path, out: str, **flags):
    words = ["alpha", "beta", "gamma", "delta"]
    data = write_jsonl(root / "ins.jsonl", [{"instruction": f"Repeat {words[i % 4]}", "output": words[i % 4]} for i in range(16)])
    base = {"model.name": str(save_tiny(root, "llama")), "data.train": str(data), "data.format": "instruction",
            "data.eval_fraction": 0.25, "train.max_steps": 2, "train.batch_size": 4, "train.progress": False,
            "output.dir": str(root / out)}
    return load_run_config(None, {**base, **flags})


def classify(root: Path, out: str, labels: list[str], model: Path | None = None, **flags):
    data = write_jsonl(root / f"cls-{'-'.join(labels)}.jsonl",
                       [{"text": f"{labels[i % len(labels)]} sky {i}", "label": labels[i % len(labels)]} for i in range(12)])
    base = {"model.name": str(model or save_tiny(root, "bert")), "model.task": "seq_cls", "data.train": str(data),
            "data.format": "classification", "data.eval_fraction": 0.25, "train.max_steps": 2, "train.batch_size": 4,
            "train.progress": False, "output.dir": str(root / out)}
    return load_run_config(None, {**base, **flags})


def eval_loss(capsys, config: Path, adapter: Path) -> float:
    capsys.readouterr()
    assert cli(["eval", str(config), "--adapter", str(adapter)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("loss"))
    return float(line.split()[-1])


def nothing_trained(out: Path) -> bool:
    return not (out / "adapter").exists() and not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()


# ---------------------------------------------------------------- soft prompts at evaluation


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_a_soft_prompt_on_a_causal_lm_evaluates_during_the_run_at_its_end_and_from_the_command(root, method, capsys):
    # was: ValueError "Expected input batch_size (368) to match target batch_size (336)" at every eval,
    # the logits holding a row per virtual token that the labels lack; the run left only its log
    result = run(causal(root, f"soft-{method}", **{"method": method, "train.eval_every": 1}), echo=quiet)
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["perplexity"])
    log = [json.loads(l) for l in (result.output_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_loss" in r] == [1, 2]
    # deltatune eval on the saved adapter: the run's final eval, to print precision
    loss = eval_loss(capsys, result.output_dir / "config.yaml", result.adapter_dir)
    assert loss == pytest.approx(result.metrics["loss"], abs=1e-4)


def test_a_failing_final_eval_leaves_the_adapter_tokenizer_and_config_saved(root, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("eval exploded")

    monkeypatch.setattr(train_module, "evaluate", broken)
    out = root / "eval-fails"
    with pytest.raises(TrainingError, match=r"the final evaluation failed \(RuntimeError: eval exploded\); the trained "
                                            r"delta is saved at \S+adapter .*deltatune eval \S+config.yaml --adapter"):
        run(causal(root, "eval-fails"), echo=quiet)
    assert (out / "config.yaml").is_file() and (out / "adapter" / "tokenizer_config.json").is_file()
    model = dt.load(tf.AutoModelForCausalLM.from_pretrained(save_tiny(root, "llama")), out / "adapter")
    assert dt.attached(model)  # the trained delta loads back


# ---------------------------------------------------------------- AdaLoRA's step count


def test_adalora_trains_through_the_pipeline_with_total_step_filled_in(root):
    # was: "AdaLoraConfig.total_step is required" before anything ran, with or without --adalora.total_step
    config = causal(root, "adalora", **{"method": "adalora", "train.max_steps": None, "train.epochs": 2})
    assert "total_step" not in config.as_dict()["adalora"] and "total_step" not in config.command()
    result = run(config, echo=quiet)
    assert result.steps == 6  # 2 epochs of 12 examples, 4 a step
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["total_step"] == 6 and saved["rank_pattern"]  # the schedule ran to its end
    assert load_run_config(result.output_dir / "config.yaml").delta.total_step == 6  # the saved config re-runs
    assert math.isfinite(result.metrics["loss"])


def test_adalora_total_step_given_on_the_command_line(root):
    out = root / "adalora-cli"
    data = causal(root, "unused").data.train
    assert cli(["train", "--model.name", str(save_tiny(root, "llama")), "--data.train", data, "--data.format", "instruction",
                "--train.max_steps", "2", "--train.batch_size", "4", "--train.progress", "false", "--method", "adalora",
                "--adalora.total_step", "2", "--output.dir", str(out)]) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["total_step"] == 2


def test_adalora_total_step_above_the_run_is_refused_before_training(root):
    out = root / "adalora-over"
    with pytest.raises(ConfigError, match=r"adalora.total_step = 50 but the run trains 2 steps, so the rank budget would "
                                          r"stop part-way .*drop adalora.total_step .* or set train.max_steps: 50"):
        run(causal(root, "adalora-over", **{"method": "adalora", "adalora.total_step": 50}), echo=quiet)
    assert nothing_trained(out)


def test_adalora_total_step_below_the_run_is_said(root):
    said = []
    result = run(causal(root, "adalora-under", **{"method": "adalora", "adalora.total_step": 2, "train.max_steps": 3}),
                 echo=said.append)
    assert any("adalora.total_step = 2 is below the run's 3 steps" in line for line in said)
    assert result.steps == 3


def test_adalora_tinit_past_the_runs_steps_names_the_step_count(root):
    with pytest.raises(ConfigError, match=r"adalora: with the run's 3 steps as total_step: .*tinit=5 must be below"):
        run(causal(root, "adalora-tinit", **{"method": "adalora", "adalora.tinit": 5, "train.max_steps": None,
                                             "train.epochs": 1}), echo=quiet)


# ---------------------------------------------------------------- a label set that does not fit the head


def test_three_labels_on_a_two_label_checkpoint_are_refused_before_training(root):
    out = root / "three-on-two"
    with pytest.raises(ConfigError, match=r"the classifier head of '\S+bert-0' has 2 labels \(LABEL_0, LABEL_1\), but this "
                                          r"run needs the data's 3 labels \(a, b, c\); add model.reinit_head: true"):
        run(classify(root, "three-on-two", ["a", "b", "c"]), echo=quiet)
    assert nothing_trained(out)


def test_reinit_head_trains_a_fresh_head_of_the_datas_size(root, capsys):
    result = run(classify(root, "reinit", ["a", "b", "c"], **{"model.reinit_head": True}), echo=quiet)
    assert set(result.metrics) == {"accuracy", "macro_f1", "loss"} and math.isfinite(result.metrics["loss"])
    saved = dt.load(tf.AutoModelForSequenceClassification.from_pretrained(save_tiny(root, "bert"), num_labels=3,
                                                                            ignore_mismatched_sizes=True), result.adapter_dir)
    assert saved(input_ids=torch.tensor([[5, 9, 33]])).logits.shape == (1, 3)
    loss = eval_loss(capsys, result.output_dir / "config.yaml", result.adapter_dir)  # config.yaml keeps reinit_head
    assert loss == pytest.approx(result.metrics["loss"], abs=1e-4)


def test_two_labels_on_a_three_label_checkpoint_are_refused(root):
    three = save_tiny(root, "bert", seed=3, num_labels=3)
    with pytest.raises(ConfigError, match=r"has 3 labels \(LABEL_0, LABEL_1, LABEL_2\), but this run needs the data's 2 "
                                          r"labels \(a, b\); add model.reinit_head: true"):
        run(classify(root, "two-on-three", ["a", "b"], model=three), echo=quiet)


def test_one_label_only_is_refused(root):
    out = root / "one-label"
    with pytest.raises(ConfigError, match=r"has one label only \(\['a'\]\); a classifier needs at least two"):
        run(classify(root, "one-label", ["a"], **{"model.reinit_head": True}), echo=quiet)
    assert nothing_trained(out)


def test_num_labels_below_the_datas_labels_is_refused(root):
    # was: an index error in the loss mid-training (label 2 on a 2-way head)
    with pytest.raises(ConfigError, match=r"model.num_labels = 2 but the data has 3 labels \(a, b, c\); set "
                                          r"model.num_labels: 3 or drop it"):
        run(classify(root, "num-labels", ["a", "b", "c"], **{"model.num_labels": 2, "model.reinit_head": True}), echo=quiet)


def test_reinit_head_on_a_task_without_a_classifier_head_is_refused(root):
    with pytest.raises(ConfigError, match=r"model.reinit_head applies to model.task = 'seq_cls' .*drop model.reinit_head"):
        causal(root, "reinit-causal", **{"model.reinit_head": True})


def test_eval_refuses_the_mismatch_with_the_same_message(root, capsys):
    config = classify(root, "eval-mismatch", ["a", "b", "c"])
    (root / "mismatch.yaml").write_text(json.dumps(config.as_dict()))  # JSON is YAML
    assert cli(["eval", str(root / "mismatch.yaml")]) == 2
    assert "has 2 labels (LABEL_0, LABEL_1), but this run needs the data's 3 labels" in capsys.readouterr().err


# ---------------------------------------------------------------- generate with a classifier


def test_generate_with_a_classifier_adapter_says_it_has_no_generation_head(root, capsys):
    # was: AttributeError ('BertForSequenceClassification' object has no attribute 'generate')
    result = run(classify(root, "for-generate", ["a", "b"], **{"train.max_steps": 1}), echo=quiet)
    capsys.readouterr()
    assert cli(["generate", "--model", str(save_tiny(root, "bert")), "--adapter", str(result.adapter_dir),
                "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "was trained for task SEQ_CLS: its model has no generation head" in err
    assert "generate needs a causal LM or seq2seq adapter" in err and "deltatune eval" in err
