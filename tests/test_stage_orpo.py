"""The ORPO stage: the loss formula, the mean log-probabilities, short runs (LoRA and full fine-tuning) that learn
the preference, the stage choice, the config keys and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

import deltatune as dt
from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.data import IGNORE, prepare
from deltatune.pipeline.stages import stage_for
from deltatune.pipeline.stages.dpo import completion_log_probs
from deltatune.pipeline.stages.orpo import ORPO, log_odds, pair_losses
from deltatune.pipeline.train import load_base, load_tokenizer, run
from pipeline_models import stage_flags, train_records, write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
ROWS = [{"prompt": f"Repeat {w}:", "chosen": f" {w} {w}", "rejected": " no idea"} for w in WORDS]
QUIET = {"echo": lambda *a, **k: None}


def _flags(tmp_path, **extra) -> dict:
    return stage_flags(tmp_path, ROWS, "preference", stage="orpo", **extra)


_records = train_records


# ---------------------------------------------------------------- the formula


def test_the_pair_losses_are_the_formula():
    chosen, rejected = torch.tensor([-0.8, -2.0, -0.05]), torch.tensor([-1.5, -1.0, -3.0])  # mean log-probs
    beta = 0.25
    loss, nll, ratio = pair_losses(chosen, rejected, beta)
    for i in range(3):
        p_w, p_l = math.exp(chosen[i].item()), math.exp(rejected[i].item())
        odds = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
        by_hand = -chosen[i].item() + beta * -math.log(1 / (1 + math.exp(-odds)))
        assert loss[i].item() == pytest.approx(by_hand, rel=1e-5)
        assert nll[i].item() == pytest.approx(-chosen[i].item())
        assert ratio[i].item() == pytest.approx(math.log(1 / (1 + math.exp(-odds))), rel=1e-5)


def test_the_log_odds_stay_finite_for_a_completion_the_model_is_certain_of():
    a = torch.tensor([0.0, -1e-9, -1e-4], requires_grad=True)
    values = log_odds(a)
    assert torch.isfinite(values).all()
    assert values[2].item() == pytest.approx(math.log(math.exp(-1e-4) / (1 - math.exp(-1e-4))), rel=1e-4)
    values.sum().backward()
    assert torch.isfinite(a.grad).all()


# ---------------------------------------------------------------- on a tiny llama


def test_the_loss_is_the_formula_on_the_full_logits(tmp_path):
    config = load_run_config(None, _flags(tmp_path))
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    dt.attach(model, config.delta)
    batch = ORPO.collator(config, tokenizer)(prepare(config, tokenizer, None).train[:3])
    assert batch["input_ids"].shape[0] == 6  # three pairs: chosen rows, then rejected rows
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    means = (picked * mask).sum(-1) / mask.sum(-1)
    assert completion_log_probs(model, model, batch, average=True).detach() == pytest.approx(means.detach(), abs=1e-5)
    total, metrics = ORPO.loss(model, model, batch, config)
    expected, nll, _ = pair_losses(means[:3], means[3:], 0.1)
    assert total.item() == pytest.approx(expected.sum().item(), abs=1e-4)
    assert metrics["nll_loss"].item() == pytest.approx(nll.sum().item(), abs=1e-4)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_preference_data_stays_dpo_unless_the_run_names_orpo(tmp_path):
    values = _flags(tmp_path)
    assert stage_for(load_run_config(None, values)).name == "orpo"
    values.pop("stage")
    assert stage_for(load_run_config(None, values)).name == "dpo"


def test_a_short_orpo_run_learns_the_preference(tmp_path):
    config = load_run_config(None, _flags(tmp_path, **{"train.max_steps": 10, "train.lr": 5e-2, "train.scheduler": "constant"}))
    records = _records(run(config, **QUIET).output_dir)
    assert len(records) == 10
    first, last = records[0], records[-1]
    # measured on this tiny random model: loss 6.06 -> 5.91 (nll_loss 5.99 -> 5.84), log_odds_chosen -0.04 -> 0.10,
    # log_odds_ratio -0.72 -> -0.65, rewards/accuracies 0.25 -> 1.0 in 10 steps
    assert last["loss"] < first["loss"] - 0.1 and last["nll_loss"] < first["nll_loss"]
    assert last["log_odds_chosen"] > first["log_odds_chosen"] + 0.05 and last["log_odds_ratio"] > first["log_odds_ratio"]
    assert last["rewards/accuracies"] >= 0.75
    assert all(k in last for k in ("nll_loss", "log_odds_ratio", "rewards/chosen", "rewards/rejected", "rewards/margins"))


def test_orpo_trains_with_full_fine_tuning(tmp_path):
    values = _flags(tmp_path, **{"method": "full", "train.max_steps": 4, "train.lr": 1e-3, "train.scheduler": "constant"})
    values.pop("lora.r")
    records = _records(run(load_run_config(None, values), **QUIET).output_dir)
    assert len(records) == 4 and records[-1]["loss"] < records[0]["loss"]


# ---------------------------------------------------------------- config and refusals


def test_the_orpo_keys_round_trip(tmp_path):
    config = load_run_config(None, _flags(tmp_path, **{"orpo.beta": 0.2}))
    assert config.as_dict()["stage"] == "orpo" and config.as_dict()["orpo"] == {"beta": 0.2}
    assert "--stage orpo" in config.command() and "--orpo.beta 0.2" in config.command()
    assert "orpo" not in load_run_config(None, {**_flags(tmp_path), "stage": "dpo"}).as_dict()


@pytest.mark.parametrize("flags, message", [
    ({"data.format": "kto", "data.train": None}, r"stage = 'orpo' trains on preference pairs, but data.format is 'kto'.*drop stage"),
    ({"data.packing": True}, r"stage = 'orpo' does not pack.*data.packing: false"),
    ({"train.label_smoothing": 0.1}, r"ORPO's NLL term has none: drop train.label_smoothing"),
    ({"orpo.beta": 0}, r"orpo.beta"),
    ({"stage": "dpo", "orpo.beta": 0.2}, r"section 'orpo' does not apply: the run trains with stage 'dpo'.*set stage: orpo"),
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


def test_an_orpo_run_plans_and_counts_both_rows_of_a_pair(tmp_path, monkeypatch):
    from deltatune.pipeline import train as train_module
    from deltatune.pipeline.data import prepare
    from deltatune.pipeline.train import load_tokenizer

    planned = []
    monkeypatch.setattr(train_module, "check_run", lambda *a, **k: planned.append((a, k)))
    config = load_run_config(None, _flags(tmp_path, **{"train.max_steps": 1}))
    run(config, **QUIET)
    prepared = prepare(config, load_tokenizer(config), None)
    (args, kwargs), = planned
    assert kwargs["rows_per_example"] == 2  # ORPO's forward runs the chosen and the rejected row of each pair
    assert args[2] == max(len(r.input_ids) for e in prepared.train for r in (e, e.rejected))
