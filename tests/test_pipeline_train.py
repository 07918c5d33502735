"""The pipeline end to end on tiny models: train, evaluate, report, resume after kill -9, two processes,
non-finite losses, continued training, the merged export, and each command of the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import deltatune as dt
from deltatune.cli import main as cli
from deltatune.pipeline.config import load_run_config
from deltatune.pipeline.train import TrainingError, run
from pipeline_models import save_tiny, write_jsonl


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def instruction_rows(n: int = 48) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    return [{"instruction": f"Repeat the word {words[i % 6]}", "output": f"{words[i % 6]} {words[i % 6]}"} for i in range(n)]


def pair_rows(n: int = 64) -> list[dict]:
    # the label is whether the two sentences share their first word: learnable by a tiny model
    words = ["red", "green", "blue", "gold"]
    return [{"sentence1": f"{words[i % 4]} sky", "sentence2": f"{words[(i // 2) % 4]} sea", "label": int(i % 4 == (i // 2) % 4)}
            for i in range(n)]


def causal_config(root: Path, out: str, **flags):
    data = write_jsonl(root / "instructions.jsonl", instruction_rows())
    base = {"model.name": str(save_tiny(root, "llama")), "data.train": str(data), "data.format": "instruction",
            "data.eval_fraction": 0.25, "train.max_steps": 12, "train.batch_size": 4, "train.lr": 1e-2,
            "train.progress": False, "lora.r": 4, "output.dir": str(root / out)}
    return load_run_config(None, {**base, **flags})


def classification_config(root: Path, out: str, **flags):
    data = write_jsonl(root / "pairs.jsonl", pair_rows())
    base = {"model.name": str(save_tiny(root, "bert")), "model.task": "seq_cls", "data.train": str(data),
            "data.format": "classification", "data.columns": {"text": "sentence1", "text_pair": "sentence2"},
            "data.eval_fraction": 0.25, "train.max_steps": 12, "train.batch_size": 8, "train.lr": 1e-2,
            "train.progress": False, "lora.r": 4, "output.dir": str(root / out)}
    return load_run_config(None, {**base, **flags})


def quiet(*args, **kwargs):
    pass


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------- training and what it leaves


def test_a_causal_run_trains_evaluates_and_reports(root):
    printed: list[str] = []
    result = run(causal_config(root, "causal", **{"train.eval_every": 6, "train.save_every": 6, "eval.generate": True,
                                                  "eval.max_new_tokens": 4, "train.log_every": 1}),
                 echo=lambda *a, **k: printed.append(" ".join(map(str, a))))
    # an evaluation during training is a line of its own, not only a record in log.jsonl
    assert any(line.startswith("eval at step 6/12: loss ") and "perplexity" in line for line in printed), printed
    assert {"loss", "perplexity", "exact_match", "bleu", "rouge_l"} <= set(result.metrics)  # answers generated and scored
    out = result.output_dir
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    eval_losses = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert eval_losses[-1] < eval_losses[0]
    assert [r["step"] for r in log if "eval_loss" in r] == [6, 12]  # every 6 steps and at the end
    summary = json.loads((out / "summary.json").read_text())
    # one throughput: the summary's tokens/s is the last logged one (training steps only, evals and saves excluded)
    assert summary["tokens_per_s"] == pytest.approx([r for r in log if "tokens_per_s" in r][-1]["tokens_per_s"], abs=0.06)
    for key in ("method", "trainable_parameters", "peak_memory_mb", "wall_time_s", "tokens_per_s", "eval_loss", "eval_perplexity"):
        assert key in summary, key
    assert summary["trainable_parameters"] == dt.summary(dt.load(tf.AutoModelForCausalLM.from_pretrained(save_tiny(root, "llama")),
                                                                 out / "adapter", trainable=True), print_table=False).trainable
    assert (out / "curves.png").stat().st_size > 1000 and (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000012"]
    again = load_run_config(out / "config.yaml")  # the saved config is a valid config for the same run
    assert again.as_dict() == causal_config(root, "causal", **{"train.eval_every": 6, "train.save_every": 6, "eval.generate": True,
                                                               "eval.max_new_tokens": 4, "train.log_every": 1}).as_dict()


def test_only_the_last_checkpoints_are_kept(root):
    result = run(causal_config(root, "keep", **{"train.save_every": 2, "train.keep_last": 2}), echo=quiet)
    assert sorted(p.name for p in (result.output_dir / "checkpoints").iterdir()) == ["step-000010", "step-000012"]


def test_classification_reports_accuracy_and_macro_f1(root):
    result = run(classification_config(root, "pairs", **{"train.max_steps": 40}), echo=quiet)
    assert set(result.metrics) == {"accuracy", "macro_f1", "loss"}
    assert result.metrics["accuracy"] > 0.6
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]


def test_seq2seq_generation_metrics(root):
    data = write_jsonl(root / "s2s.jsonl", [{"source": f"copy {w}", "target": w} for w in ["one", "two", "six", "ten"] * 8])
    config = load_run_config(None, {"model.name": str(save_tiny(root, "t5")), "model.task": "seq2seq", "data.train": str(data),
                                    "data.format": "seq2seq", "data.eval_fraction": 0.25, "train.max_steps": 6,
                                    "train.progress": False, "eval.generate": True, "eval.max_new_tokens": 4,
                                    "output.dir": str(root / "s2s")})
    metrics = run(config, echo=quiet).metrics
    assert {"loss", "perplexity", "exact_match", "bleu", "rouge_l"} <= set(metrics)
    assert 0 <= metrics["exact_match"] <= 1 and 0 <= metrics["rouge_l"] <= 1


# ---------------------------------------------------------------- non-finite losses


def test_a_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoint(root):
    config = causal_config(root, "nan", **{"train.optimizer": "sgd", "train.lr": 1e12, "train.max_grad_norm": None,
                                           "train.save_every": 1, "train.max_steps": 30})
    # the loss turns non-finite, or an update first pushes a weight to inf: either way the step is named
    with pytest.raises(TrainingError, match=r"step \d+: (the loss is (nan|inf).*the last good checkpoint is .*step-0+\d+|"
                                            r"\S+ holds non-finite values, so nothing is saved \(the previous checkpoint stays\))"
                                            r"; lower train.lr"):
        run(config, echo=quiet)
    for checkpoint in (root / "nan" / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in adapter_tensors(checkpoint / "adapter").values()), checkpoint


def test_on_nan_skip_skips_the_step(root, monkeypatch):
    import deltatune.api as api

    calls = {"n": 0}
    original = api.regularization

    def poisoned(model):  # the third forward's loss is NaN
        calls["n"] += 1
        return float("nan") if calls["n"] == 3 else original(model)

    monkeypatch.setattr(api, "regularization", poisoned)
    result = run(causal_config(root, "skip", **{"train.on_nan": "skip"}), echo=quiet)
    assert result.summary["skipped_steps"] == 1 and result.steps == 12
    assert all(torch.isfinite(t).all() for t in adapter_tensors(result.adapter_dir).values())


# ---------------------------------------------------------------- continued training


def test_continued_training_from_an_adapter_and_from_a_checkpoint(root):
    first = run(causal_config(root, "first", **{"train.max_steps": 6}), echo=quiet)
    start = adapter_tensors(first.adapter_dir)
    said = []
    second = run(causal_config(root, "second", **{"train.max_steps": 4, "train.init_adapter": str(first.adapter_dir)}),
                 echo=said.append)
    assert any("continuing the adapter" in line for line in said)
    continued = adapter_tensors(second.adapter_dir)
    assert continued.keys() == start.keys() and any(not torch.equal(continued[k], start[k]) for k in start)
    said.clear()
    checkpoint = first.output_dir / "checkpoints" / "step-000006"
    run(causal_config(root, "third", **{"train.max_steps": 2, "train.init_adapter": str(checkpoint)}), echo=said.append)
    assert "kept the checkpoint's optimizer state" in said


def test_continued_training_from_a_peft_adapter(root, tmp_path):
    peft = pytest.importorskip("peft")
    base = tf.AutoModelForCausalLM.from_pretrained(save_tiny(root, "llama"))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(str(tmp_path / "peft"))
    result = run(causal_config(root, "from_peft", **{"train.max_steps": 3, "train.init_adapter": str(tmp_path / "peft")}), echo=quiet)
    assert set(adapter_tensors(result.adapter_dir)) == set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))


# ---------------------------------------------------------------- the merged export


def test_the_merged_export_loads_without_deltatune(root, tmp_path):
    result = run(causal_config(root, "to_merge", **{"train.max_steps": 4}), echo=quiet)
    assert cli(["merge", "--model", str(save_tiny(root, "llama")), "--adapter", str(result.adapter_dir), "--out", str(tmp_path / "merged")]) == 0
    model = dt.load(tf.AutoModelForCausalLM.from_pretrained(save_tiny(root, "llama")), result.adapter_dir).eval()
    ids = torch.tensor([[5, 9, 33, 2, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    script = (
        "import sys, json, torch\n"
        "sys.modules['deltatune'] = None  # any import of deltatune fails\n"
        "import transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(m(input_ids=torch.tensor([[5, 9, 33, 2, 7]])).logits.tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- a quantised base (QLoRA)


def test_merge_reads_the_base_from_the_adapter_and_keeps_the_runs_labels(root, tmp_path, capsys):

    """An encoder without a classifier (as MiniLM): the run's label names reach the merged model, `merge` and
    `eval` say the adapter's head replaces the fresh one instead of printing transformers' MISSING report."""
    encoder = tmp_path / "encoder"
    tf.AutoModel.from_pretrained(save_tiny(root, "bert")).save_pretrained(encoder)
    tf.AutoTokenizer.from_pretrained(save_tiny(root, "bert")).save_pretrained(encoder)
    logged = Records()  # what transformers logs from here on, as a user's terminal sees it
    tf.utils.logging.get_logger().addHandler(logged)
    rows = [{"text": f"{w} sky", "label": "swapped" if i % 2 else "original"} for i, w in enumerate(["red", "blue"] * 8)]
    config = load_run_config(None, {"model.name": str(encoder), "model.task": "seq_cls", "data.format": "classification",
                                    "data.train": str(write_jsonl(tmp_path / "rows.jsonl", rows)), "data.eval_fraction": 0.25,
                                    "train.max_steps": 2, "train.progress": False, "output.dir": str(tmp_path / "run")})
    result = run(config, echo=quiet)
    capsys.readouterr()
    assert cli(["merge", "--adapter", str(result.adapter_dir), "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert f"base model: {encoder} (recorded in the adapter's config" in out
    assert "has no classifier: initialised at random; the adapter's trained copy replaces it" in out
    assert not [m for m in logged.messages if "MISSING" in m or "newly initialized" in m]
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == {0: "original", 1: "swapped"}
    assert merged.config.label2id == {"original": 0, "swapped": 1}
    assert cli(["eval", str(result.output_dir / "config.yaml"), "--adapter", str(result.adapter_dir)]) == 0
    captured = capsys.readouterr()
    assert "initialised from seed 0; the adapter's trained copy replaces it" in captured.out
    tf.utils.logging.get_logger().removeHandler(logged)
    assert not [m for m in logged.messages if "LOAD REPORT" in m or "newly initialized" in m], logged.messages


def test_a_quantised_run_trains_resumes_and_exports_merged(root, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from deltatune import quant

    prepared = []
    real_prepare = quant.prepare_kbit
    monkeypatch.setattr(quant, "prepare_kbit", lambda model, **kw: prepared.append(model) or real_prepare(model, **kw))
    flags = {"model.quant": "nf4", "lora.target_modules": "all-linear", "lora.dropout": 0.0, "train.optimizer": "adamw8bit",
             "train.scheduler": "constant", "train.lr": 5e-3, "train.log_every": 1}
    whole = run(causal_config(root, "qlora_whole", **flags, **{"train.max_steps": 6, "output.merged": True}), echo=quiet)
    assert len(prepared) == 1 and prepared[0].is_gradient_checkpointing  # the pipeline prepared the quantised base
    losses = [r["loss"] for r in map(json.loads, (whole.output_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]
    optimizer_state = load_file(str(whole.output_dir / "checkpoints" / "step-000006" / "optimizer.safetensors"))
    # bitsandbytes' Adam state (state1, state2; 32-bit here: tensors under 4096 elements stay 32-bit), checkpointed
    assert any(k.endswith(".state1") for k in optimizer_state) and not any("exp_avg" in k for k in optimizer_state)
    # stopped after 3 steps, then resumed from that checkpoint to 6: the same adapter as the whole run
    run(causal_config(root, "qlora_resumed", **flags, **{"train.max_steps": 3}), echo=quiet)
    said = []
    resumed = run(causal_config(root, "qlora_resumed", **flags, **{"train.max_steps": 6, "train.resume": True}), echo=said.append)
    assert any("resuming from" in line for line in said)
    a, b = adapter_tensors(whole.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys() and len(a) == 2 * 14  # A and B on the 14 linear layers of the tiny llama
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # the merged export: the base dequantised and the adapter merged exactly, a plain fp32 model
    merged = tf.AutoModelForCausalLM.from_pretrained(whole.output_dir / "merged").eval()
    assert not quant.quantized_layers(merged) and merged.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert "quantization_config" not in json.loads((whole.output_dir / "merged" / "config.json").read_text())
    model = dt.load(dt.load_base(str(save_tiny(root, "llama")), quant="nf4"), whole.adapter_dir).eval()
    ids = torch.tensor([[5, 9, 33, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- resume after kill -9


def _train_process(config_path: Path, out: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "deltatune.cli", "train", str(config_path), "--output.dir", str(out), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_ends_with_the_same_adapter(root, tmp_path):
    data = write_jsonl(root / "instructions.jsonl", instruction_rows())
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: {save_tiny(root, 'llama')}}}\n"
                      f"data: {{train: {data}, format: instruction}}\n"
                      "lora: {r: 4, dropout: 0.1}\n"  # dropout: the RNG state must be restored too
                      "train: {max_steps: 160, batch_size: 4, grad_accum: 2, lr: 5.0e-3, save_every: 10, keep_last: 3, progress: false}\n")
    whole = _train_process(config, tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]

    killed = _train_process(config, tmp_path / "killed")
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "checkpoints" / "step-000030").exists():
        assert killed.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _train_process(config, tmp_path / "killed", "--train.resume", "true")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert b"resuming from" in out
    a, b = adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(tmp_path / "killed" / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # what the killed run logged after its checkpoint was dropped


# ---------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_reach_the_loss_of_one_with_the_same_global_batch(root, tmp_path):
    data = write_jsonl(root / "pairs.jsonl", pair_rows())
    config = tmp_path / "run.yaml"
    # no dropout: two processes draw other masks than one, and the comparison is of the arithmetic alone
    model = save_tiny(root, "bert", seed=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config.write_text(f"model: {{name: {model}, task: seq_cls}}\n"
                      f"data: {{train: {data}, format: classification, columns: {{text: sentence1, text_pair: sentence2}}, "
                      "eval_fraction: 0.25}\n"
                      "lora: {r: 4}\ntrain: {max_steps: 10, lr: 1.0e-2, progress: false}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", str(config), "--train.batch_size", "8",
                          "--output.dir", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # `--multi_gpu` selects accelerate's torchrun launcher; with no GPU the processes join over gloo on the CPU
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "deltatune.cli", "train",
                          str(config), "--train.batch_size", "4", "--output.dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "4 x 2 process(es)" in two.stdout  # two processes really took part
    loss_one = json.loads((tmp_path / "one" / "summary.json").read_text())["eval_loss"]
    loss_two = json.loads((tmp_path / "two" / "summary.json").read_text())["eval_loss"]
    assert loss_two == pytest.approx(loss_one, rel=1e-3, abs=1e-4)
    a, b = adapter_tensors(tmp_path / "one" / "adapter"), adapter_tensors(tmp_path / "two" / "adapter")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)


# ---------------------------------------------------------------- the other commands


def test_eval_prints_the_same_table_for_a_base_and_a_base_with_an_adapter(root, capsys):
    result = run(classification_config(root, "for_eval"), echo=quiet)
    config = root / "for_eval" / "config.yaml"
    assert cli(["eval", str(config)]) == 0
    base = capsys.readouterr().out
    assert cli(["eval", str(config), "--adapter", str(result.adapter_dir)]) == 0
    adapted = capsys.readouterr().out
    assert "(base)" in base and str(result.adapter_dir) in adapted
    for out in (base, adapted):
        assert "accuracy" in out and "macro_f1" in out


def test_data_marks_the_trained_tokens(root, capsys):
    data = write_jsonl(root / "instructions.jsonl", instruction_rows())
    assert cli(["data", "--model.name", str(save_tiny(root, "llama")), "--data.train", str(data), "--data.format",
                "instruction", "--examples", "2"]) == 0
    out = capsys.readouterr().out
    assert "recommended max_length" in out
    assert "<|im_start|>user\nRepeat the word alpha<|im_end|>\n<|im_start|>assistant\n[[alpha alpha<|im_end|>\n]]" in out


def test_generate_chats_over_stdin(root, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Repeat the word beta\nand again\n\n"))
    assert cli(["generate", "--model", str(save_tiny(root, "llama")), "--chat", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2  # two turns, then the empty line ends the chat


def test_generate_and_info(root, capsys):
    result = run(causal_config(root, "for_generate", **{"train.max_steps": 2}), echo=quiet)
    prompts = root / "prompts.txt"
    prompts.write_text("Repeat the word beta\n\nRepeat the word gamma\n")
    assert cli(["generate", "--model", str(save_tiny(root, "llama")), "--adapter", str(result.adapter_dir),
                "--file", str(prompts), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count(">>> Repeat the word") == 2
    assert cli(["info", str(save_tiny(root, "llama"))]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "default lora targets: q_proj, v_proj" in out and "ia3" in out


def test_bad_input_to_the_command_is_one_clear_line(root, capsys, tmp_path):
    assert cli(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "deltatune train: error: no config file at" in capsys.readouterr().err
    assert cli(["train", "--model.name", "m", "--data.train", "d.jsonl", "--train.lr", "fast"]) == 2
    assert "train.lr = 'fast' is not allowed: expected a number" in capsys.readouterr().err
    assert cli(["merge", "--model", str(save_tiny(root, "llama")), "--adapter", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [{"train.mixed_precision": "bf16"}, {"model.dtype": "bf16"}], ids=["autocast-bf16", "bf16-base"])
def test_half_precision_runs_keep_fp32_trainables(root, flags):
    result = run(causal_config(root, "half-" + "-".join(flags), **flags), echo=quiet)
    tensors = adapter_tensors(result.adapter_dir)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert result.final_loss == result.final_loss  # not NaN
