"""The KTO stage: the loss formula, the mismatched rows of the KL estimate, the step-0 value, a short run that
learns from the feedback, the config keys and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

import deltatune as dt
from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.data import IGNORE, Example, prepare
from deltatune.pipeline.stages import stage_for
from deltatune.pipeline.stages.kto import KTO, kl_estimate, mismatched, row_losses
from deltatune.pipeline.train import load_base, load_tokenizer, run
from pipeline_models import stage_flags, train_records

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
ROWS = [row for w in WORDS for row in ({"prompt": f"Repeat {w}:", "completion": f" {w} {w}", "label": True},
                                       {"prompt": f"Repeat {w}:", "completion": " no idea", "label": False})]
QUIET = {"echo": lambda *a, **k: None}
sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731


def _flags(tmp_path, **extra) -> dict:
    return stage_flags(tmp_path, ROWS, "kto", **extra)


_records = train_records


# ---------------------------------------------------------------- the formulas


def test_the_row_losses_are_the_formula():
    policy, reference = torch.tensor([-3.0, -5.0, -2.5, -7.0]), torch.tensor([-3.2, -4.0, -2.0, -6.5])
    desirable = torch.tensor([True, False, True, False])
    kl_policy, kl_reference = torch.tensor([-9.0, -8.0, -7.5, -9.5]), torch.tensor([-9.5, -8.2, -7.0, -9.6])
    z0 = kl_estimate(kl_policy, kl_reference)
    assert z0.item() == pytest.approx((0.5 + 0.2 - 0.5 + 0.1) / 4) and not z0.requires_grad
    assert kl_estimate(kl_reference, kl_policy).item() == 0.0  # a negative estimate is clamped at 0
    beta, l_d, l_u = 0.3, 1.5, 0.7
    got = row_losses(policy, reference, desirable, z0, beta, l_d, l_u)
    for i in range(4):
        r, z = (policy[i] - reference[i]).item(), z0.item()
        by_hand = l_d * (1 - sig(beta * (r - z))) if desirable[i] else l_u * (1 - sig(beta * (z - r)))
        assert got[i].item() == pytest.approx(by_hand, rel=1e-6)


def test_the_mismatched_rows_pair_each_prompt_with_the_next_rows_completion():
    a = Example([1, 2, 3, 10, 11], [IGNORE, IGNORE, IGNORE, 10, 11])
    b = Example([4, 5, 20, 21, 22, 23], [IGNORE, IGNORE, 20, 21, 22, IGNORE])  # a trailing unlabelled template token
    c = Example([6, 7, 8, 9, 30], [IGNORE] * 4 + [30])
    ab, bc, ca = mismatched([a, b, c])
    assert ab.input_ids == [1, 2, 3, 20, 21, 22] and ab.labels == [IGNORE] * 3 + [20, 21, 22]  # cut to the width, 6
    assert bc.input_ids == [4, 5, 30] and bc.labels == [IGNORE, IGNORE, 30]
    assert ca.input_ids == [6, 7, 8, 9, 10, 11] and ca.labels == [IGNORE] * 4 + [10, 11]


# ---------------------------------------------------------------- on a tiny llama


def _model_and_batch(tmp_path, **extra):
    config = load_run_config(None, _flags(tmp_path, **extra))
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    dt.attach(model, config.delta)
    prepared = prepare(config, tokenizer, None)
    batch = KTO.collator(config, tokenizer)(prepared.train[:4])
    return config, model, batch


def test_at_step_zero_the_reward_and_kl_are_zero_so_each_row_loses_one_half(tmp_path):
    config, model, batch = _model_and_batch(tmp_path)
    assert batch["desirable"].tolist() == [True, False, True, False]
    assert batch["kl_input_ids"].shape[0] == 4
    total, metrics = KTO.loss(model, model, batch, config)  # LoRA's B = 0: the delta changes nothing yet
    assert total.item() / 4 == pytest.approx(0.5, abs=1e-6)  # 1 - sigma(0)
    for name in ("rewards/chosen", "rewards/rejected", "kl"):
        assert metrics[name].item() == pytest.approx(0.0, abs=1e-6), name
    total.backward()  # and the loss has gradients for the delta
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_the_no_grad_forwards_run_before_the_one_with_gradients(tmp_path):
    # the memory plan counts only the training forward: a no-grad forward after it would add its transient
    # activations on top of the saved ones, a peak the plan does not count
    config, model, batch = _model_and_batch(tmp_path)
    grad_enabled: list[bool] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: grad_enabled.append(torch.is_grad_enabled()))
    try:
        KTO.loss(model, model, batch, config)
    finally:
        hook.remove()
    assert grad_enabled == [False, False, False, True]


def test_the_metrics_are_trls_means_over_the_desirable_and_undesirable_rows(tmp_path):
    config, model, batch = _model_and_batch(tmp_path)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)  # LoRA's B starts at zero: make the delta change the log-probabilities
    from deltatune.losses import sequence_log_probs

    rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    kl_rows = {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        policy, kl_policy = sequence_log_probs(model, rows), sequence_log_probs(model, kl_rows)
        with dt.disabled(model):
            reference, kl_reference = sequence_log_probs(model, rows), sequence_log_probs(model, kl_rows)
        total, metrics = KTO.loss(model, model, batch, config)
    rewards = 0.1 * (policy - reference)
    z0 = max(0.0, (kl_policy - kl_reference).mean().item())
    assert metrics["rewards/chosen"].item() / 4 == pytest.approx(rewards[[0, 2]].mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"].item() / 4 == pytest.approx(rewards[[1, 3]].mean().item(), abs=1e-5)
    assert metrics["kl"].item() / 4 == pytest.approx(z0, abs=1e-5)
    desirable = torch.tensor([True, False, True, False])
    expected = row_losses(policy, reference, desirable, torch.tensor(z0), 0.1).sum()
    assert total.item() == pytest.approx(expected.item(), abs=1e-5)


def test_a_short_kto_run_learns_from_the_feedback(tmp_path):
    config = load_run_config(None, _flags(tmp_path, **{"train.max_steps": 10, "train.lr": 5e-2,
                                                       "train.scheduler": "constant", "kto.beta": 0.5}))
    assert stage_for(config).name == "kto"  # KTO rows imply the KTO stage
    records = _records(run(config, **QUIET).output_dir)
    assert len(records) == 10
    first, last = records[0], records[-1]
    assert first["loss"] == pytest.approx(0.5, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    # measured (beta 0.5): loss 0.5 -> 0.39, rewards/chosen 0 -> 0.34, rewards/rejected 0 -> -0.54 in 10 steps
    assert last["loss"] < first["loss"] - 0.05
    assert last["rewards/chosen"] > last["rewards/rejected"]
    assert last["kl"] >= 0.0


# ---------------------------------------------------------------- config and refusals


def test_the_kto_keys_round_trip(tmp_path):
    config = load_run_config(None, _flags(tmp_path, **{"kto.beta": 0.2, "kto.undesirable_weight": 1.5}))
    assert config.as_dict()["kto"] == {"beta": 0.2, "desirable_weight": 1.0, "undesirable_weight": 1.5}
    assert "--kto.undesirable_weight 1.5" in config.command()


@pytest.mark.parametrize("flags, message", [
    ({"stage": "kto", "data.format": "preference"}, r"stage = 'kto' trains on KTO feedback rows, but data.format is "
                                                    r"'preference'.*data.format: kto"),
    ({"data.packing": True}, r"stage = 'kto' does not pack.*data.packing: false"),
    ({"train.batch_size": 1}, r"train.batch_size is 1: set train.batch_size: 2 or more"),
    ({"train.label_smoothing": 0.1}, r"KTO has no label smoothing: drop train.label_smoothing"),
    ({"kto.beta": 0}, r"kto.beta"),
    ({"kto.desirable_weight": -1}, r"kto.desirable_weight"),
    ({"stage": "sft"}, r"stage = 'sft' does not train on data.format = 'kto'; set stage: kto"),
])
def test_the_refusals_name_the_problem_and_the_fix(tmp_path, flags, message):
    values = _flags(tmp_path)
    for key, value in flags.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    with pytest.raises(ConfigError, match=message):
        stage_for(load_run_config(None, values))
