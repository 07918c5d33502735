"""The reward-model stage: the Bradley-Terry loss by hand, the scores being the classifier's own logits, a short run
that learns the preference, the saved adapter scoring the same on a fresh base, the config keys and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune.cli import main
from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.data import prepare
from deltatune.pipeline.stages import stage_for
from deltatune.pipeline.stages.reward import REWARD, evaluate, pair_losses, scores
from deltatune.pipeline.train import load_base, load_tokenizer, run
from pipeline_models import stage_flags, train_records, write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
# the chosen completion ends in "good", the rejected one in "bad"; the score is read at the end of the turn after it
ROWS = [{"prompt": f"Rate {w}:", "chosen": f" {w} good", "rejected": f" {w} bad"} for w in WORDS]
QUIET = {"echo": lambda *a, **k: None}


def _flags(tmp_path, **extra) -> dict:
    return stage_flags(tmp_path, ROWS, "preference", stage="reward", **extra)


_records = train_records


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------- the formula


def test_the_pair_losses_are_the_bradley_terry_formula():
    chosen, rejected = torch.tensor([1.5, -0.2, 0.3]), torch.tensor([0.5, 0.4, 0.3])
    margin = torch.tensor([0.0, 0.5, 1.0])
    plain = pair_losses(chosen, rejected)
    with_margin = pair_losses(chosen, rejected, margin)
    centred = pair_losses(chosen, rejected, margin, center=0.01)
    for i in range(3):
        w, l, m = chosen[i].item(), rejected[i].item(), margin[i].item()
        assert plain[i].item() == pytest.approx(-math.log(_sigmoid(w - l)), rel=1e-6)
        assert with_margin[i].item() == pytest.approx(-math.log(_sigmoid(w - l - m)), rel=1e-6)
        assert centred[i].item() == pytest.approx(-math.log(_sigmoid(w - l - m)) + 0.01 * (w + l) ** 2, rel=1e-6)
    assert plain[2].item() == pytest.approx(math.log(2))  # equal scores: log 2


# ---------------------------------------------------------------- on a tiny llama


def test_the_scores_are_the_classifiers_own_logits_and_the_loss_their_formula(tmp_path):
    config = load_run_config(None, _flags(tmp_path, **{"reward.center_rewards_coefficient": 0.05}))
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    assert isinstance(model, tf.LlamaForSequenceClassification) and model.config.num_labels == 1
    dt.attach(model, config.delta)
    assert model.score.modules_to_save["default"].weight.requires_grad  # the fresh head trains whole
    examples = prepare(config, tokenizer, None).train[:3]
    batch = REWARD.collator(config, tokenizer)(examples)
    assert batch["input_ids"].shape[0] == 6 and "labels" not in batch  # chosen rows, then rejected rows
    values = scores(model, batch)
    # each row scored alone, unpadded: the head's output at its last token
    alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0, 0].item()
             for e in [*examples, *(e.rejected for e in examples)]]
    assert values.detach().tolist() == pytest.approx(alone, abs=1e-5)
    total, metrics = REWARD.loss(model, model, batch, config)
    expected = pair_losses(values[:3], values[3:], center=0.05)
    assert total.item() == pytest.approx(expected.sum().item(), abs=1e-5)
    margin = values[:3] - values[3:]
    assert metrics["accuracy"].item() == (margin > 0).sum().item()
    assert metrics["margin"].item() == pytest.approx(margin.sum().item(), abs=1e-5)
    total.backward()
    assert model.score.modules_to_save["default"].weight.grad.abs().sum() > 0


def test_the_fresh_score_head_is_seeded_from_train_seed(tmp_path):
    def head(seed: int) -> torch.Tensor:
        config = load_run_config(None, _flags(tmp_path, **{"train.seed": seed}))
        return load_base(config, load_tokenizer(config)).score.weight.detach().clone()

    assert torch.equal(head(1), head(1)) and not torch.equal(head(1), head(2))


def test_a_short_reward_run_learns_the_preference_and_its_adapter_scores_the_same_on_a_fresh_base(tmp_path, capsys):
    values = _flags(tmp_path, **{"train.max_steps": 8, "train.lr": 3e-2, "train.scheduler": "constant",
                                 "data.eval": str(tmp_path / "preference.jsonl")})
    config = load_run_config(None, values)
    assert stage_for(config).name == "reward"
    result = run(config, **QUIET)
    records = _records(result.output_dir)
    assert len(records) == 8
    first, last = records[0], records[-1]
    # measured on this tiny random model: loss 0.694 -> 0.023, accuracy 0.0 -> 1.0 in 8 steps
    assert last["loss"] < first["loss"] - 0.3
    assert last["accuracy"] > first["accuracy"] and last["accuracy"] == 1.0 and last["margin"] > first["margin"]
    assert all(k in last for k in ("rewards/chosen", "rewards/rejected"))
    assert set(result.metrics) == {"loss", "accuracy", "margin"} and result.metrics["accuracy"] == 1.0

    # the documented way to score with the trained model: a one-output classifier + dt.load (the head is in the adapter)
    adapter = result.adapter_dir
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    torch.manual_seed(12345)  # another fresh head than the run's: the adapter's head must replace it
    tokenizer = tf.AutoTokenizer.from_pretrained(adapter)
    fresh = tf.AutoModelForSequenceClassification.from_pretrained(config.model.name, num_labels=1,
                                                                  pad_token_id=tokenizer.pad_token_id)
    dt.load(fresh, adapter)
    again = evaluate(fresh, prepare(config, tokenizer, None), config, tokenizer)
    assert again == pytest.approx(result.metrics, abs=1e-5)

    # config.yaml reloads as a reward run, and `deltatune eval` measures the adapter as the run did
    assert stage_for(load_run_config(result.output_dir / "config.yaml", {})).name == "reward"
    capsys.readouterr()
    assert main(["eval", str(result.output_dir / "config.yaml"), "--adapter", str(adapter)]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy  {result.metrics['accuracy']:.4f}" in printed and f"margin    {result.metrics['margin']:.4f}" in printed

    # `deltatune merge` writes a one-output classifier that transformers loads alone and that scores the same
    assert main(["merge", "--model", config.model.name, "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.num_labels == 1
    assert evaluate(merged, prepare(config, tokenizer, None), config, tokenizer) == pytest.approx(result.metrics, abs=1e-4)


# ---------------------------------------------------------------- config and refusals


def test_preference_data_stays_dpo_unless_the_run_names_reward(tmp_path):
    values = _flags(tmp_path)
    assert stage_for(load_run_config(None, values)).name == "reward"
    values.pop("stage")
    assert stage_for(load_run_config(None, values)).name == "dpo"


def test_the_reward_keys_round_trip(tmp_path):
    config = load_run_config(None, _flags(tmp_path, **{"reward.center_rewards_coefficient": 0.01}))
    assert config.as_dict()["stage"] == "reward"
    assert config.as_dict()["reward"] == {"center_rewards_coefficient": 0.01}
    assert "--reward.center_rewards_coefficient 0.01" in config.command()
    assert load_run_config(None, _flags(tmp_path)).stage_settings["reward"].center_rewards_coefficient is None


@pytest.mark.parametrize("flags, message", [
    ({"data.format": "kto", "data.train": None}, r"stage = 'reward' trains on preference pairs, but data.format is 'kto'.*drop stage"),
    ({"data.packing": True}, r"stage = 'reward' does not pack.*data.packing: false"),
    ({"model.task": "seq_cls"}, r"stage = 'reward' loads the base itself as a sequence classifier.*model.task is 'seq_cls'"),
    ({"model.task": "seq2seq"}, r"stage = 'reward' loads the base itself.*model.task is 'seq2seq'.*drop model.task"),
    ({"model.num_labels": 3}, r"one output \(the score\); model.num_labels is 3: drop model.num_labels"),
    ({"train.label_smoothing": 0.1}, r"a reward model has no token loss: drop train.label_smoothing"),
    ({"eval.generate": True}, r"a reward model scores text and does not generate: drop eval.generate"),
    ({"reward.center_rewards_coefficient": -1}, r"reward.center_rewards_coefficient"),
    ({"stage": "dpo", "reward.center_rewards_coefficient": 0.1}, r"section 'reward' does not apply.*set stage: reward"),
])
def test_the_refusals_name_the_problem_and_the_fix(tmp_path, flags, message):
    values = _flags(tmp_path)
    for key, value in flags.items():
        if value is None:
            values["data.train"] = str(write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True}]))
        else:
            values[key] = value
    with pytest.raises(ConfigError, match=message):
        stage_for(load_run_config(None, values))


def test_a_resumed_reward_run_continues_as_the_uninterrupted_one(tmp_path):
    """The checkpoint holds the score head with the delta: steps after the resume are the same as without a stop."""
    import shutil

    values = _flags(tmp_path, **{"train.max_steps": 4, "train.batch_size": 2, "train.grad_accum": 2, "train.lr": 3e-2,
                                 "train.save_every": 2, "data.eval_fraction": 0.25, "train.eval_every": 2})
    out = run(load_run_config(None, values), **QUIET).output_dir
    whole = _records(out)
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_accuracy" in r] == [2, 4]
    shutil.rmtree(out / "checkpoints" / "step-000004")
    run(load_run_config(None, {**values, "train.resume": True}), **QUIET)
    resumed = _records(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["accuracy"] == a["accuracy"]


# ---------------------------------------------------------------- the memory plan


def test_the_memory_plan_of_a_reward_run_is_the_classifier_it_loads(tmp_path):
    from deltatune.planner import check_run
    from deltatune.pipeline.train import model_task

    config = load_run_config(None, _flags(tmp_path))
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    assert model_task(config) == "seq_cls" and config.model.task == "causal_lm"
    lines: list[str] = []
    reward = check_run(config, model, 32, lines.append, rows_per_example=2, task=model_task(config))
    assert reward is not None and reward.architecture.startswith("LlamaForSequenceClassification")
    assert "ForSequenceClassification" in lines[0] and "ForCausalLM" not in lines[0]
    assert not any("loss: fused" in note for note in reward.notes)  # no LM head, no fused-loss advice
    # the same checkpoint planned as model.task's causal LM holds vocabulary-sized logits; the classifier a score
    lm = check_run(config, model, 32, lines.append, rows_per_example=2)
    assert lm is not None and "ForCausalLM" in lm.architecture
    assert reward.logits * 100 < lm.logits, (reward.logits, lm.logits)


# ---------------------------------------------------------------- margins (TRL's `margin` column)


def test_the_margin_column_reaches_the_pair_and_enters_the_loss(tmp_path):
    margins = [0.5, None, 2.0, "1.25"]  # a pair without one has m = 0; CSV-style text is read as a number
    rows = [dict(row, **({} if m is None else {"margin": m})) for row, m in zip(ROWS[:4], margins)]
    flags = _flags(tmp_path, **{"data.train": str(write_jsonl(tmp_path / "margins.jsonl", rows)),
                                "data.max_length": 64})
    config = load_run_config(None, flags)
    tokenizer = load_tokenizer(config)
    examples = prepare(config, tokenizer, None).train  # through tokenising (datasets) and truncation
    assert [e.margin for e in examples] == [0.5, None, 2.0, 1.25]
    model = load_base(config, tokenizer)
    dt.attach(model, config.delta)
    batch = REWARD.collator(config, tokenizer)(examples)
    values = scores(model, batch).detach()
    total, metrics = REWARD.loss(model, model, batch, config)
    by_hand = sum(-math.log(_sigmoid(values[i].item() - values[4 + i].item() - m))
                  for i, m in enumerate([0.5, 0.0, 2.0, 1.25]))
    assert total.item() == pytest.approx(by_hand, rel=1e-5)
    # the logged margin is r_w - r_l itself, whatever m is
    assert metrics["margin"].item() == pytest.approx((values[:4] - values[4:]).sum().item(), abs=1e-5)
    assert evaluate(model, type("P", (), {"eval": examples})(), config, tokenizer)["loss"] == pytest.approx(by_hand / 4,
                                                                                                         rel=1e-5)


@pytest.mark.parametrize("bad", ["wide", True, [1.0], "nan"])
def test_a_margin_that_is_not_a_number_is_refused_naming_file_row_and_column(tmp_path, bad):
    from deltatune.pipeline.rows import DataError

    rows = [dict(ROWS[0], margin=1.0), dict(ROWS[1], margin=bad)]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    config = load_run_config(None, _flags(tmp_path, **{"data.train": str(path)}))
    with pytest.raises(DataError, match=r"bad\.jsonl.*row 2, column 'margin': expected a (finite )?number"):
        prepare(config, load_tokenizer(config), None)
