"""The DPO stage: the loss formulas, the per-sequence log-probabilities, the step-0 value, a short run that
learns the preference, the config keys and the refusals."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

import deltatune as dt
from deltatune.pipeline import rundir
from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.data import IGNORE, prepare
from deltatune.pipeline.evaluate import evaluate
from deltatune.pipeline.stages import stage_for
from deltatune import api
from deltatune.pipeline.stages.dpo import DPO, DpoSection, completion_log_probs, pair_losses, simpo_losses
from deltatune.pipeline.train import load_base, load_tokenizer, run
from pipeline_models import stage_flags, train_records, write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
ROWS = [{"prompt": f"Repeat {w}:", "chosen": f" {w} {w}", "rejected": " no idea"} for w in WORDS]
QUIET = {"echo": lambda *a, **k: None}


def _flags(tmp_path, **extra) -> dict:
    return stage_flags(tmp_path, ROWS, "preference", **extra)


_records = train_records


# ---------------------------------------------------------------- the formulas


def test_the_pair_losses_are_the_formulas():
    chosen, rejected = torch.tensor([-3.0, -5.0, -2.5]), torch.tensor([-4.0, -4.5, -6.0])
    ref_chosen, ref_rejected = torch.tensor([-3.2, -4.0, -2.0]), torch.tensor([-3.9, -4.9, -5.0])
    beta = 0.3
    for i in range(3):
        h = beta * ((chosen[i] - ref_chosen[i]) - (rejected[i] - ref_rejected[i])).item()
        sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
        by_hand = {"sigmoid": -math.log(sig(h)), "cdpo": -0.9 * math.log(sig(h)) - 0.1 * math.log(sig(-h)),
                   "ipo": (h / beta - 1 / (2 * beta)) ** 2}
        got = {"sigmoid": pair_losses(chosen, rejected, ref_chosen, ref_rejected, beta)[i].item(),
               "cdpo": pair_losses(chosen, rejected, ref_chosen, ref_rejected, beta, "sigmoid", 0.1)[i].item(),
               "ipo": pair_losses(chosen, rejected, ref_chosen, ref_rejected, beta, "ipo")[i].item()}
        for kind in by_hand:
            assert got[kind] == pytest.approx(by_hand[kind], rel=1e-6), kind


# ---------------------------------------------------------------- on a tiny llama


def _model_and_batch(tmp_path, **extra):
    config = load_run_config(None, _flags(tmp_path, **extra))
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    dt.attach(model, config.delta)
    prepared = prepare(config, tokenizer, None)
    batch = DPO.collator(config, tokenizer)(prepared.train[:3])
    return config, model, batch


def test_the_sequence_log_probs_equal_those_of_the_full_logits(tmp_path):
    config, model, batch = _model_and_batch(tmp_path)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)  # LoRA's B starts at zero: make the delta change the log-probabilities
    assert batch["input_ids"].shape[0] == 6  # three pairs: chosen rows, then rejected rows, one padded batch
    for average in (False, True):
        fused = completion_log_probs(model, model, batch, average)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        full = (picked * mask).sum(-1)
        if average:
            full = full / mask.sum(-1)
        assert fused.detach() == pytest.approx(full.detach(), abs=1e-4)
        # and the gradients a delta parameter gets agree too
        lora = next(p for n, p in model.named_parameters() if "lora_A" in n)
        g_fused = torch.autograd.grad(fused.sum(), lora)[0]
        g_full = torch.autograd.grad(full.sum(), lora)[0]
        assert torch.allclose(g_fused, g_full, atol=1e-5)
    # the prompt never counts: every row's first labelled token comes after its prompt
    assert all((row[: 3] == IGNORE).all() for row in batch["labels"])


def test_at_step_zero_the_policy_is_the_reference_so_the_loss_is_log_2(tmp_path):
    config, model, batch = _model_and_batch(tmp_path)
    total, metrics = DPO.loss(model, model, batch, config)  # LoRA's B = 0: the delta changes nothing yet
    assert total.item() / 3 == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)
    total.backward()  # and the loss has gradients for the delta
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_a_short_dpo_run_learns_the_preference(tmp_path):
    config = load_run_config(None, _flags(tmp_path, **{"train.max_steps": 10, "train.lr": 5e-2, "train.scheduler": "constant"}))
    assert stage_for(config).name == "dpo"  # preference data implies the DPO stage
    records = _records(run(config, **QUIET).output_dir)
    assert len(records) == 10
    first, last = records[0], records[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # before any update the policy is the reference
    assert first["rewards/accuracies"] == 0.0 and first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # on this tiny random model beta = 0.1 moves slowly; measured: 0.693 -> 0.58, margin 0 -> 0.24 in 10 steps
    assert last["loss"] < first["loss"] - 0.05
    assert last["rewards/accuracies"] >= 0.75 and last["rewards/margins"] > max(0.1, records[1]["rewards/margins"])
    assert all(k in last for k in ("rewards/chosen", "rewards/rejected"))


def test_an_ipo_run_takes_its_settings(tmp_path):
    config = load_run_config(None, _flags(tmp_path, **{"dpo": {"loss_type": "ipo", "beta": 0.5}, "train.max_steps": 1}))
    assert config.stage_settings["dpo"].loss_type == "ipo"
    records = _records(run(config, **QUIET).output_dir)
    assert records[0]["loss"] == pytest.approx((1 / (2 * 0.5)) ** 2, rel=1e-5)  # h = 0 at step 0: (0 - 1/(2 beta))^2


# ---------------------------------------------------------------- config and refusals


def test_the_dpo_keys_round_trip_and_an_older_run_without_a_new_key_resumes(tmp_path):
    config = load_run_config(None, _flags(tmp_path, **{"stage": "dpo", "dpo.beta": 0.2, "dpo.label_smoothing": 0.1}))
    values = config.as_dict()
    assert values["dpo"] == {"beta": 0.2, "loss_type": "sigmoid", "label_smoothing": 0.1,
                              "simpo_gamma": None}
    assert "--dpo.beta 0.2" in config.command()
    # naming the stage the data implies is the same run as leaving it out: recorded the same, so either resumes the other
    assert "stage" not in values and "--stage" not in config.command()
    implied = load_run_config(None, _flags(tmp_path, **{"dpo.beta": 0.2, "dpo.label_smoothing": 0.1}))
    assert rundir.differences(rundir.flat(implied), rundir.flat(config)) == []
    assert rundir.identity(rundir.flat(implied)) == rundir.identity(rundir.flat(config))
    orpo = load_run_config(None, _flags(tmp_path, stage="orpo"))  # another stage than the implied one is recorded
    assert orpo.as_dict()["stage"] == "orpo" and "--stage orpo" in orpo.command()
    # a run recorded before dpo.label_smoothing existed ran with its default: no difference
    plain = rundir.flat(load_run_config(None, _flags(tmp_path)))
    older = {k: v for k, v in plain.items() if k not in ("dpo.label_smoothing", "dpo.simpo_gamma")}
    assert rundir.differences(older, plain) == []
    # an SFT run records neither stage nor a dpo section: older SFT runs resume as before
    sft = load_run_config(None, {**_flags(tmp_path), "data.format": "instruction",
                                 "data.train": str(write_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}]))})
    assert "stage" not in sft.as_dict() and "dpo" not in sft.as_dict()


@pytest.mark.parametrize("flags, message", [
    ({"stage": "dpo", "data.format": "instruction"}, r"stage = 'dpo' trains on preference pairs, but data.format is 'instruction'"),
    ({"data.packing": True}, r"stage = 'dpo' does not pack.*data.packing: false"),
    ({"model.task": "seq_cls"}, r"data.format = 'preference' does not fit model.task = 'seq_cls'"),
    ({"dpo.loss_type": "kto"}, r"dpo.loss_type = 'kto' is not allowed"),
    ({"dpo.beta": 0}, r"dpo.beta"),
    ({"dpo.loss_type": "ipo", "dpo.label_smoothing": 0.1}, r"dpo.label_smoothing applies to dpo.loss_type: sigmoid"),
    ({"train.label_smoothing": 0.1}, r"for DPO use dpo.label_smoothing"),
    ({"stage": "ppo"}, r"stage = 'ppo' is not allowed: expected one of sft, dpo"),
])
def test_the_refusals_name_the_problem_and_the_fix(tmp_path, flags, message):
    values = _flags(tmp_path)
    for key, value in flags.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, values)


def test_a_dpo_section_for_an_sft_run_and_sft_on_pairs_are_refused(tmp_path):
    data = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(ConfigError, match=r"section 'dpo' does not apply: the run trains with stage 'sft'.*set stage: dpo"):
        load_run_config(None, {**_flags(tmp_path), "data.format": "instruction", "data.train": str(data), "dpo.beta": 0.2})
    config = load_run_config(None, _flags(tmp_path, stage="sft"))
    with pytest.raises(ConfigError, match=r"stage = 'sft' does not train on data.format = 'preference'; set stage: dpo"):
        stage_for(config)


def test_accumulated_micro_batches_give_the_step_the_same_loss_and_rewards(tmp_path):
    whole = _records(run(load_run_config(None, _flags(tmp_path, **{"output.dir": str(tmp_path / "a")})), **QUIET).output_dir)
    split = _records(run(load_run_config(None, _flags(tmp_path, **{"output.dir": str(tmp_path / "b"), "train.batch_size": 2,
                                                                  "train.grad_accum": 2})), **QUIET).output_dir)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert [r[key] for r in split] == pytest.approx([r[key] for r in whole], abs=1e-5), key


def test_a_resumed_dpo_run_continues_as_the_uninterrupted_one_and_its_config_yaml_reloads(tmp_path):
    common = {"train.scheduler": "constant", "train.save_every": 2, "dpo.beta": 0.2}
    whole = run(load_run_config(None, _flags(tmp_path, **common, **{"train.max_steps": 4, "output.dir": str(tmp_path / "a")})),
                **QUIET)
    part = _flags(tmp_path, **common, **{"train.max_steps": 2, "output.dir": str(tmp_path / "b")})
    run(load_run_config(None, part), **QUIET)
    resumed = run(load_run_config(None, {**part, "train.max_steps": 4, "train.resume": True}), **QUIET)
    assert [r["loss"] for r in _records(resumed.output_dir)] == pytest.approx([r["loss"] for r in _records(whole.output_dir)],
                                                                               abs=1e-6)
    again = load_run_config(whole.output_dir / "config.yaml")  # the saved config, dpo section and all
    assert again.stage_settings["dpo"].beta == 0.2 and again.as_dict() == load_run_config(None, _flags(
        tmp_path, **common, **{"train.max_steps": 4, "output.dir": str(tmp_path / "a")})).as_dict()


# ---------------------------------------------------------------- evaluation

EVAL_KEYS = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_rewards/accuracies")


def test_evaluation_reports_the_dpo_loss_and_rewards_and_they_rise_with_training(tmp_path):
    flags = _flags(tmp_path, **{"data.eval": str(write_jsonl(tmp_path / "eval.jsonl", ROWS)), "train.max_steps": 10,
                                "train.lr": 5e-2, "train.scheduler": "constant", "train.eval_every": 5})
    config = load_run_config(None, flags)
    # step 0: the attached delta (LoRA's B = 0) changes nothing, so the policy is the reference
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    dt.attach(model, config.delta)
    prepared = prepare(config, tokenizer, None)
    before = evaluate(model, prepared, config, tokenizer)
    assert set(before) == {k.removeprefix("eval_") for k in EVAL_KEYS}  # no perplexity of the chosen answers alone
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["rewards/accuracies"] == 0.0 and before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # and the pipeline's evaluations, during the run and at its end, log the same keys with the eval_ prefix
    out = run(config, **QUIET).output_dir
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all(k in r for r in evals for k in EVAL_KEYS)
    last = evals[-1]
    # measured: eval loss 0.693 -> ~0.58, accuracy 0 -> 1, margin 0 -> ~0.24 (the train pairs, 10 steps)
    assert last["eval_loss"] < math.log(2) - 0.05
    assert last["eval_rewards/accuracies"] >= 0.75 and last["eval_rewards/margins"] > 0.1
    assert last["eval_rewards/margins"] == pytest.approx(last["eval_rewards/chosen"] - last["eval_rewards/rejected"], abs=1e-5)


def test_evaluation_in_batches_equals_one_batch_and_the_base_alone_is_its_own_reference(tmp_path):
    config = load_run_config(None, _flags(tmp_path, **{"data.eval": str(write_jsonl(tmp_path / "eval.jsonl", ROWS))}))
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    prepared = prepare(config, tokenizer, None)
    base = evaluate(model, prepared, config, tokenizer)  # `deltatune eval` without an adapter: no delta to switch off
    assert base["loss"] == pytest.approx(math.log(2), abs=1e-6) and base["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    dt.attach(model, config.delta)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    whole = evaluate(model, prepared, replace(config, eval=replace(config.eval, batch_size=len(ROWS))), tokenizer)
    split = evaluate(model, prepared, replace(config, eval=replace(config.eval, batch_size=3)), tokenizer)
    assert split == pytest.approx(whole, abs=1e-5) and whole["rewards/margins"] != pytest.approx(0.0, abs=1e-4)


# ---------------------------------------------------------------- SimPO


def test_the_simpo_loss_is_the_formula_and_its_defaults_follow_the_paper():
    chosen, rejected = torch.tensor([-1.2, -2.0, -0.7]), torch.tensor([-1.5, -1.1, -2.4])  # per-token means
    beta, gamma = 2.0, 0.8
    for i in range(3):
        z = beta * (chosen[i] - rejected[i]).item() - gamma
        assert simpo_losses(chosen, rejected, beta, gamma)[i].item() == pytest.approx(math.log(1 + math.exp(-z)), rel=1e-6)
    # beta's default depends on the loss: 0.1 for DPO (TRL's), 2.0 for SimPO; gamma defaults to beta / 2
    assert DpoSection().beta == 0.1 and DpoSection(loss_type="simpo").beta == 2.0
    assert DpoSection(loss_type="simpo").gamma == 1.0 and DpoSection(loss_type="simpo", beta=2.5).gamma == 1.25
    assert DpoSection(loss_type="simpo", simpo_gamma=0.3).gamma == 0.3


def test_simpo_runs_no_reference_forward_and_its_loss_is_that_of_the_mean_log_probs(tmp_path, monkeypatch):
    config, model, batch = _model_and_batch(tmp_path, **{"dpo.loss_type": "simpo"})
    assert config.stage_settings["dpo"].beta == 2.0 and config.as_dict()["dpo"]["beta"] == 2.0  # the run records it
    forwards, disabled = [], []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    real = api.disabled
    monkeypatch.setattr(api, "disabled", lambda m: disabled.append(1) or real(m))
    total, metrics = DPO.loss(model, model, batch, config)
    assert forwards == [1] and disabled == []  # one policy forward (chosen and rejected rows), no reference
    with torch.no_grad():
        means = completion_log_probs(model, model, batch, average=True)
    chosen, rejected = means[:3], means[3:]
    expected = -torch.nn.functional.logsigmoid(2.0 * (chosen - rejected) - 1.0).sum()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["rewards/chosen"].item() == pytest.approx(2.0 * chosen.sum().item(), rel=1e-5)
    # DPO, for contrast: the reference forward under the delta switched off, then the policy's
    forwards.clear()
    sigmoid = replace(config, stage_settings={"dpo": DpoSection()})
    DPO.loss(model, model, batch, sigmoid)
    assert forwards == [1, 1] and disabled == [1]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_short_simpo_run_learns_the_preference_with_a_delta_or_the_full_model(tmp_path, method):
    flags = _flags(tmp_path, **{"dpo.loss_type": "simpo", "train.max_steps": 8, "train.scheduler": "constant",
                                "method": method, "train.lr": 5e-2 if method == "lora" else 1e-3})
    if method != "lora":
        flags.pop("lora.r")  # full fine-tuning: SimPO needs no reference, so no copy of the base is held
    records = _records(run(load_run_config(None, flags), **QUIET).output_dir)
    first, last = records[0], records[-1]
    # measured: loss 1.38 -> 1.07 (lora) and 0.63 (full), margin -0.09 -> 0.34 and 1.13, accuracy 0.25 -> 1
    assert last["loss"] < first["loss"] - 0.1, (first, last)
    assert last["rewards/accuracies"] >= 0.75 and last["rewards/margins"] > first["rewards/margins"]


def test_simpo_refusals(tmp_path):
    with pytest.raises(ConfigError, match=r"dpo.simpo_gamma = -1"):
        load_run_config(None, _flags(tmp_path, **{"dpo.loss_type": "simpo", "dpo.simpo_gamma": -1}))
    with pytest.raises(ConfigError, match=r"dpo.label_smoothing applies to dpo.loss_type: sigmoid"):
        load_run_config(None, _flags(tmp_path, **{"dpo.loss_type": "simpo", "dpo.label_smoothing": 0.1}))
    # every loss takes the methods that train the base weights; only sigmoid and ipo hold a reference copy for
    # them (tests/test_stage_reference.py), SimPO none
    from deltatune.pipeline.stages.reference import needs_copy

    for method in ("full", "freeze", "bitfit"):
        for loss_type, copy in (("simpo", False), ("sigmoid", True), ("ipo", True)):
            values = {k: v for k, v in _flags(tmp_path, method=method, **{"dpo.loss_type": loss_type}).items()
                      if k != "lora.r"}
            assert needs_copy(load_run_config(None, values)) is copy, (method, loss_type)


# ---------------------------------------------------------------- what a pair holds: the memory plan, tokens/s


def test_the_memory_plan_counts_both_rows_of_a_pair_and_tokens_per_second_counts_the_rejected_tokens(tmp_path,
                                                                                                      monkeypatch):
    from types import SimpleNamespace

    from deltatune.pipeline import train as train_module

    planned = []
    monkeypatch.setattr(train_module, "check_run", lambda *a, **k: planned.append((a, k)))
    # a clock that advances one second per reading: each step then takes exactly one second of train time
    ticks = iter(range(10_000))
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    rows = [dict(r, rejected=" no idea at all, none whatsoever") for r in ROWS]  # rejected rows longer than chosen
    flags = _flags(tmp_path, **{"data.train": str(write_jsonl(tmp_path / "long.jsonl", rows)), "train.batch_size": 8})
    config = load_run_config(None, flags)
    out = run(config, **QUIET).output_dir
    tokenizer = load_tokenizer(config)
    prepared = prepare(config, tokenizer, None)
    (args, kwargs), = planned
    assert kwargs["rows_per_example"] == 2  # the chosen and the rejected row of each pair
    assert args[2] == max(len(e.rejected.input_ids) for e in prepared.train)  # the longest row, here a rejected one
    assert args[2] > max(len(e.input_ids) for e in prepared.train)
    # all 8 pairs each step, one second a step: tokens/s is the pair's chosen plus rejected tokens
    pair_tokens = sum(len(e.input_ids) + len(e.rejected.input_ids) for e in prepared.train)
    assert [r["tokens_per_s"] for r in _records(out)] == [pair_tokens, pair_tokens]


def test_plan_run_plans_batch_times_rows_per_example(tmp_path):
    from deltatune.planner import plan_run

    config, model, _ = _model_and_batch(tmp_path)
    one, two = plan_run(config, model, 16), plan_run(config, model, 16, rows_per_example=2)
    assert one.setting.batch == 4 and two.setting.batch == 8
    assert two.total > one.total and any("2 rows in the forward" in note for note in two.notes)
    assert not any("rows in the forward" in note for note in one.notes)
    # what the loop plans and counts by: a pair is its two rows, any other example itself (SFT: len(input_ids))
    from deltatune.pipeline.stages.sft import SFT

    example = prepare(config, load_tokenizer(config), None).train[0]
    assert DPO.rows_of(example) == (example, example.rejected) and SFT.rows_of(example) == (example,)


def test_a_margin_column_on_a_dpo_run_is_named_as_ignored_and_the_reward_stage_reads_it(tmp_path):
    from deltatune.pipeline.data import Example
    from deltatune.pipeline.stages import ignored_columns, named

    with_margin = [Example([1], [1], rejected=Example([1], [1]), margin=0.5)]
    without = [Example([1], [1], rejected=Example([1], [1]))]
    (note,) = ignored_columns(named("dpo"), with_margin)
    assert "'margin' is read by stage reward only; stage 'dpo' ignores it" in note
    assert ignored_columns(named("reward"), with_margin) == [] and ignored_columns(named("dpo"), without) == []
    # and a run says so where it prints its data notes
    lines: list[str] = []
    rows = [dict(row, margin=1.0) for row in ROWS]
    config = load_run_config(None, stage_flags(tmp_path, rows, "preference", **{"train.max_steps": 1}))
    run(config, echo=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("'margin' is read by stage reward only" in line for line in lines)
