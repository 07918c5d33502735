"""What a newcomer meets: `deltatune tiny`, the run report's figures, `deltatune info`'s lines, `deltatune plan`'s
default task and its warnings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers as tf

from deltatune.cli import main
from deltatune.config import DeltaError
from deltatune.tiny import ARCHITECTURES, build_model, build_tokenizer, write_tiny


# ---------------------------------------------------------------- deltatune tiny


def test_every_tiny_architecture_builds_and_runs_a_forward():
    tokenizer = build_tokenizer()
    ids = torch.tensor([tokenizer("Return the number of items.")["input_ids"]])
    for model_type in ARCHITECTURES:
        model = build_model(model_type, tokenizer)
        assert model.config.model_type == model_type and model.config.vocab_size == len(tokenizer)
        extra = {"decoder_input_ids": ids[:, :2]} if model.config.is_encoder_decoder else {}
        with torch.no_grad():
            out = model(input_ids=ids, **extra)
        assert torch.isfinite(out.logits).all(), model_type


def test_deltatune_tiny_writes_a_model_and_tokenizer_that_transformers_loads(tmp_path, capsys):
    folder = tmp_path / "models" / "tiny-llama"
    assert main(["tiny", "llama", str(folder)]) == 0
    assert str(folder) in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == ["tiny-llama"]  # no temporary left
    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    assert isinstance(model, tf.LlamaForCausalLM) and model.config.hidden_size == 32
    assert tokenizer.decode(tokenizer("def f(x): return x")["input_ids"]) == "def f(x): return x"  # byte-level: any text
    assert tokenizer.pad_token == "<pad>" and model.config.pad_token_id == tokenizer.pad_token_id


def test_deltatune_tiny_is_deterministic_and_fills_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    write_tiny("bert", tmp_path / "empty", seed=3)
    write_tiny("bert", tmp_path / "again", seed=3)
    a, b = (tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / n) for n in ("empty", "again"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_deltatune_tiny_refuses_a_folder_with_files_and_touches_nothing(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main(["tiny", "gpt2", str(folder)]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "not empty" in err and "choose a new folder" in err
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_deltatune_tiny_lists_the_known_types_for_an_unknown_one(tmp_path, capsys):
    assert main(["tiny", "falcon", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'falcon'" in err and all(name in err for name in ("llama", "gpt2", "bert", "roberta", "t5", "gpt_bigcode"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(DeltaError, match="multiple of 4"):
        write_tiny("llama", tmp_path / "y", width=30)
    assert not (tmp_path / "y").exists()


# ---------------------------------------------------------------- deltatune plan: the default task, each warning once

BERT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)


@pytest.mark.parametrize("config, task, noted", [
    (tf.BertConfig(architectures=["BertForSequenceClassification"], **BERT), "seq_cls", False),
    (tf.BertConfig(**BERT), "seq_cls", True),  # an encoder without a head
    (tf.BertConfig(architectures=["BertForMaskedLM"], **BERT), "seq_cls", True),
    (tf.BertConfig(architectures=["BertLMHeadModel"], is_decoder=True, **BERT), "causal_lm", False),
    (tf.T5Config(architectures=["T5ForConditionalGeneration"]), "seq2seq", False),
    (tf.T5Config(), "seq2seq", False),
    (tf.LlamaConfig(architectures=["LlamaForCausalLM"]), "causal_lm", False),
    (tf.LlamaConfig(), "causal_lm", False),
    (tf.GPT2Config(architectures=["GPT2LMHeadModel"]), "causal_lm", False),
    (tf.LlamaConfig(architectures=["LlamaForSequenceClassification"]), "seq_cls", False),
])
def test_the_planned_task_comes_from_the_architecture(config, task, noted):
    from deltatune.planner import default_task

    found, note = default_task(config)
    assert found == task and bool(note) == noted
    if note:
        assert "bert" in note and "sequence classification" in note and "--task" in note


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """What transformers logs at WARNING and above, seen by a handler on its logger (as a user's terminal sees it)."""
    logger, level = tf.utils.logging.get_logger(), tf.utils.logging.get_verbosity()
    handler = Records()
    logger.addHandler(handler)
    tf.utils.logging.set_verbosity_warning()
    yield handler.messages
    logger.removeHandler(handler)
    tf.utils.logging.set_verbosity(level)


def test_plan_on_an_encoder_plans_classification_and_says_so(tmp_path, capsys):
    tf.BertConfig(**BERT).save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--batch", "2", "--seq", "32"]) == 0
    out = capsys.readouterr().out
    assert "BertForSequenceClassification" in out and "note: bert is an encoder" in out


def test_plan_shows_each_transformers_warning_once(tmp_path, transformers_warnings):
    from deltatune.planner import plan

    # BertLMHeadModel warns "add is_decoder=True" each time it is built; the search builds it many times
    config = tf.BertConfig(**BERT)
    result = plan(config, "lora", batch=2, seq=32, task="causal_lm", memory="1GB")
    assert result.searched and result.max_batch
    repeated = [m for m in transformers_warnings if "is_decoder" in m]
    assert len(repeated) == 1, transformers_warnings
    assert len(transformers_warnings) == len(set(transformers_warnings))
    plan(config, "lora", batch=2, seq=32, task="causal_lm")  # the next plan shows it again (its first time there)
    assert len([m for m in transformers_warnings if "is_decoder" in m]) == 2
    assert not any(isinstance(f, logging.Filter) and type(f).__name__ == "_FirstOfEach"
                   for h in tf.utils.logging.get_logger().handlers for f in h.filters)  # the filter is removed after


# ---------------------------------------------------------------- deltatune info


def _rows(text: str) -> dict[str, str]:
    """method -> its row with the continuation lines joined (the reason column wraps)."""
    rows: dict[str, str] = {}
    last = None
    for line in text.split("trainable parameters with each method's defaults")[1].splitlines()[1:]:
        if line.startswith("    ") and line[4] != " ":
            last = line.split()[0]
            rows[last] = line[4 + len(last):].strip()
        elif last:
            rows[last] += " " + line.strip()
    return rows


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny("llama", tmp_path_factory.mktemp("info") / "llama")


def test_info_gives_whole_reasons_wrapped_at_spaces(tiny_llama):
    import deltatune as dt
    from deltatune.info import LINE_WIDTH, describe

    text = describe(str(tiny_llama))
    rows = _rows(text)
    assert set(rows) == set(dt.METHODS)
    with pytest.raises(DeltaError) as adalora:
        dt.METHODS["adalora"].config_cls()
    assert rows["adalora"] == "n/a  " + str(adalora.value)  # all of it, and the words rejoin exactly
    assert rows["bitfit"].startswith("n/a  LlamaForCausalLM has no bias terms") and "use a method" in rows["bitfit"]
    assert all(len(line) <= LINE_WIDTH for line in text.splitlines()[5:])


def test_info_reports_what_diff_pruning_stores(tiny_llama):
    from deltatune.info import describe

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama)
    total = sum(p.numel() for p in model.parameters())
    targeted = sum(p.numel() for n, p in model.named_parameters() if n != "lm_head.weight")  # not the output head
    row = _rows(describe(str(tiny_llama)))["diff_pruning"]
    stored = round(0.005 * targeted)
    assert row.startswith(f"{stored:,}  ({100 * stored / total:.4f}%)  stored: 0.5% (target_sparsity) of the {targeted:,}")
    assert f"({2 * targeted:,})" in row  # what training holds, said once, not as the headline


# ---------------------------------------------------------------- the run report's curves


def fake_log(steps: int = 60, log_every: int = 5, eval_every: int = 20, accuracy: float = 0.6, seed: int = 0) -> list[dict]:
    """What train.run logs: a noisy falling loss every log_every steps, eval points every eval_every and at the end."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for step in range(1, steps + 1):
        if step % log_every == 0:
            records.append({"step": step, "loss": 2.0 * 0.97**step + 0.3 * float(torch.rand(1, generator=g)), "lr": 1e-3})
        if step % eval_every == 0:
            records.append({"step": step, "eval_loss": 2.0 * 0.97**step, "eval_accuracy": accuracy + step / 1000,
                            "eval_macro_f1": accuracy})
    return records


def lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_smooth_is_a_debiased_moving_average():
    from deltatune.pipeline.report import smooth

    assert smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # no pull toward 0 at the start
    noisy = [1.0 + (0.5 if i % 2 else -0.5) for i in range(40)]
    assert max(smooth(noisy)[10:]) - min(smooth(noisy)[10:]) < 0.5 * (max(noisy) - min(noisy))


def test_the_report_draws_raw_and_smoothed_loss_the_eval_points_and_a_title(tmp_path):
    from types import SimpleNamespace

    from deltatune.pipeline.report import RunLog, curves_figure, run_title, smooth, write_report

    log = RunLog(tmp_path, enabled=True)
    for record in fake_log():
        log.write(record)
    config = SimpleNamespace(method="lora", model=SimpleNamespace(name="tiny/llama"), output=SimpleNamespace(dir="out/run1"))
    counts = SimpleNamespace(trainable=10, total=1000, percent=1.0)
    summary = write_report(tmp_path, config, counts, log, {"accuracy": 0.66}, wall=1.0, tokens_per_s=1.0, echo=lambda *a: None)
    assert summary["eval_accuracy"] == 0.66 and (tmp_path / "curves.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp.png"))

    assert run_title(config) == "lora on tiny/llama  (out/run1)"  # what write_report titles curves.png with
    long = SimpleNamespace(method="ia3", model=SimpleNamespace(name="/very/long/site-packages/path/to/some/model/folder"),
                           output=config.output)
    assert run_title(long) == "ia3 on .../model/folder  (out/run1)"
    fig = curves_figure({"run": log.records()}, run_title(config))
    loss_ax, metric_ax = fig.axes
    assert fig._suptitle.get_text() == "lora on tiny/llama  (out/run1)"
    loss = lines(loss_ax)
    assert sorted(loss) == ["eval loss", "train loss (logged steps)", "train loss (moving average)"]
    raw, smoothed, evals = loss["train loss (logged steps)"], loss["train loss (moving average)"], loss["eval loss"]
    assert len(raw.get_xdata()) == len(smoothed.get_xdata()) == 12
    assert raw.get_alpha() < 0.5 and smoothed.get_alpha() in (None, 1)  # the raw faint, the average over it
    assert list(smoothed.get_ydata()) == pytest.approx(smooth(list(raw.get_ydata())))
    assert list(evals.get_xdata()) == [20, 40, 60] and evals.get_marker() == "o"
    assert len(metric_ax.get_lines()) == 1 and list(metric_ax.get_lines()[0].get_xdata()) == [20, 40, 60]
    assert metric_ax.get_ylim() == (0, 1.02) and metric_ax.get_title() == "eval accuracy"
    assert loss_ax.get_xlim()[0] == 0  # the run from its start, not a window around the points


def test_a_single_eval_point_gets_a_sensible_range():
    from deltatune.pipeline.report import curves_figure

    records = [{"step": s, "loss": 2.0 - s / 400} for s in range(25, 301, 25)] + [{"step": 300, "eval_accuracy": 0.71}]
    _, metric_ax = curves_figure({"run": records}, "t").axes
    assert metric_ax.get_ylim() == (0, 1.02) and metric_ax.get_xlim()[0] == 0 and metric_ax.get_xlim()[1] >= 300
    records[-1] = {"step": 300, "eval_perplexity": 12.0}  # unbounded: +-10% around the point
    _, metric_ax = curves_figure({"run": records}, "t").axes
    assert metric_ax.get_ylim() == pytest.approx((10.8, 13.2))


@pytest.mark.parametrize("metric, fraction", [("eval_rewards/accuracies", True), ("eval_reward", False)])
def test_the_preference_and_grpo_stages_get_their_metric_panel(metric, fraction):
    from deltatune.pipeline.report import curves_figure

    records = [{"step": s, "loss": 0.69 - s / 1000} for s in range(1, 11)] + [{"step": 10, "eval_loss": 0.6, metric: 0.75}]
    axes = curves_figure({"run": records}, "t").axes
    assert len(axes) == 2 and metric.removeprefix("eval_") in axes[1].get_ylabel()
    assert (axes[1].get_ylim() == (0, 1.02)) == fraction


def test_the_demo_draws_its_three_runs_in_one_figure(tmp_path):
    from deltatune.pipeline.demo import demo_figure

    fig = demo_figure({"head only": fake_log(accuracy=0.5), "LoRA": fake_log(accuracy=0.8, seed=1)},
                      {"accuracy": 0.49, "macro_f1": 0.4, "loss": 0.7}, tmp_path)
    loss_ax, metric_ax = fig.axes
    assert "head only and LoRA" in fig._suptitle.get_text() and str(tmp_path) in fig._suptitle.get_text()
    assert len(loss_ax.get_lines()) == 6  # per run: raw, smoothed, eval
    assert {t.get_text() for t in loss_ax.get_legend().get_texts()} == {
        f"{run}: {what}" for run in ("head only", "LoRA") for what in ("train loss (moving average)", "eval loss")}
    accuracy = lines(metric_ax)
    assert sorted(accuracy) == ["LoRA", "head only", "untuned"]
    assert list(accuracy["untuned"].get_ydata()) == [0.49, 0.49]  # a dashed level: the untuned model has no steps
    assert accuracy["LoRA"].get_color() != accuracy["head only"].get_color()
    assert {t.get_text() for t in metric_ax.get_legend().get_texts()} == {"LoRA", "head only", "untuned"}


def test_a_run_that_logged_nothing_still_gets_a_titled_figure(recwarn):
    from deltatune.pipeline.report import curves_figure

    fig = curves_figure({"run": []}, "freeze on m  (out)")
    assert len(fig.axes) == 1 and not fig.axes[0].get_lines() and fig._suptitle.get_text() == "freeze on m  (out)"
    assert not [w for w in recwarn if "legend" in str(w.message).lower()]


# ---------------------------------------------------------------- counts and fresh heads


def test_full_fine_tuning_of_a_classifier_counts_100_percent(tmp_path):
    """The classifier head trained whole keeps a frozen original beside its copy; the copy stands in for it."""
    import deltatune as dt

    write_tiny("roberta", tmp_path / "roberta")
    model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "roberta")
    plain = sum(p.numel() for p in model.parameters())
    dt.attach(model, dt.FullConfig())
    stats = dt.summary(model, print_table=False)
    assert stats.trainable == stats.total == plain
    lora = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "roberta")
    dt.attach(lora, dt.LoraConfig(r=2))
    stats = dt.summary(lora, print_table=False)
    added = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert stats.total == plain + added  # the head once, though it is held twice


def test_a_fresh_classifier_head_starts_from_the_runs_seed(tmp_path):
    from deltatune.pipeline.config import load_run_config
    from deltatune.pipeline.train import load_base, load_tokenizer

    write_tiny("bert", tmp_path / "tiny")
    encoder = tf.AutoModel.from_pretrained(tmp_path / "tiny")  # an encoder with no classifier, as MiniLM is
    encoder.save_pretrained(tmp_path / "bert")
    tf.AutoTokenizer.from_pretrained(tmp_path / "tiny").save_pretrained(tmp_path / "bert")
    (tmp_path / "rows.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    heads = []
    for seed, noise in [(0, 1), (0, 2), (5, 1)]:
        config = load_run_config(None, {"model.name": str(tmp_path / "bert"), "model.task": "seq_cls", "data.train": str(tmp_path / "rows.jsonl"),
                                        "data.format": "classification", "train.seed": seed, "output.dir": str(tmp_path / "out")})
        torch.manual_seed(noise)  # whatever ran before must not matter
        model = load_base(config, load_tokenizer(config), ["x", "y"])
        heads.append(model.classifier.weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_info_says_how_16_bit_weights_train(tmp_path, capsys):
    folder = write_tiny("llama", tmp_path / "llama")
    tf.AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tf.AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "bf16")
    assert main(["info", str(tmp_path / "bf16")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "weights are bfloat16" in out and "train through fp32 master copies (train.master_weights: fp32, the default" in out
    assert main(["info", str(folder)]) == 0
    assert "weights are float32" in " ".join(capsys.readouterr().out.split())
