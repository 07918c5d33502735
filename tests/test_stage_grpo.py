"""The GRPO stage: the loss and the advantages by hand, deterministic sampling, the rewards, a short run whose
reward goes up, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

import deltatune as dt
from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.data import IGNORE, prepare
from deltatune.pipeline.stages import stage_for
from deltatune.pipeline.stages.grpo import (GRPO, GrpoSection, completion_mask, group_advantages, group_loss, kl_k3,
                                            reward_functions,
                                            sample, sample_seed, sequence_means, token_log_probs,
                                            token_losses)
from deltatune.pipeline.train import load_base, load_tokenizer, run
from pipeline_models import save_tiny, write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta"]
ROWS = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in WORDS]
QUIET = {"echo": lambda *a, **k: None}


def _flags(tmp_path, **extra) -> dict:
    data = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    return {"model.name": str(save_tiny(tmp_path, "llama")), "data.train": str(data), "data.format": "instruction",
            "stage": "grpo", "grpo": {"rewards": ["length"], "num_generations": 4, "max_new_tokens": 6},
            "method": "lora", "lora.r": 4, "train.max_steps": 1, "train.batch_size": 2, "train.lr": 1e-2,
            "train.log_every": 1, "train.progress": False, "output.dir": str(tmp_path / "out"), **extra}


def _full(tmp_path, **extra) -> dict:
    flags = _flags(tmp_path, method="full", **extra)
    del flags["lora.r"]
    return flags


def _records(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r and "eval_loss" not in r]


# ---------------------------------------------------------------- the formulas


def test_the_advantages_are_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    got = group_advantages(rewards)
    for g, row in enumerate(rewards.tolist()):
        mean = sum(row) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / 3)  # unbiased, as torch.std
        for i, r in enumerate(row):
            assert got[g, i].item() == pytest.approx((r - mean) / (std + 1e-4), rel=1e-5, abs=1e-6)
    assert torch.all(got[1] == 0)  # equal rewards: no signal


def test_scale_rewards_none_only_centres():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 5.0]])
    torch.testing.assert_close(group_advantages(rewards, "none"), rewards - 1.5)


def test_the_loss_types_weigh_the_tokens_as_their_papers_say():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])  # a 4-token and a 1-token completion
    assert group_loss(per_token, mask, "grpo", 8).item() == pytest.approx(10 / 4 + 10 / 1)
    assert group_loss(per_token, mask, "dr_grpo", 8).item() == pytest.approx((10 + 10) / 8)
    assert group_loss(per_token, mask, "dapo", 8).item() == pytest.approx(2 * (10 + 10) / 5)
    # the weight of one token in the gradient: grpo 1/|y_i| (the short completion's token weighs 4x), dapo and
    # dr_grpo the same for every token
    for loss_type, ratio in (("grpo", 4.0), ("dr_grpo", 1.0), ("dapo", 1.0)):
        x = per_token.clone().requires_grad_(True)
        group_loss(x, mask, loss_type, 8).backward()
        assert (x.grad[1, 0] / x.grad[0, 0]).item() == pytest.approx(ratio)
        assert torch.all(x.grad[1, 1:] == 0)  # nothing after the stop token


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo"])
def test_a_grpo_step_runs_with_each_loss_type(tmp_path, loss_type):
    config = load_run_config(None, _flags(tmp_path, grpo={"rewards": ["length"], "num_generations": 3, "max_new_tokens": 4,
                                                          "loss_type": loss_type, "scale_rewards": "none"}))
    assert config.as_dict()["grpo"]["loss_type"] == loss_type
    out = run(config, **QUIET).output_dir
    (first,) = _records(out)
    # rho = 1, so the loss is -sum_i A_i |y_i| / L (dr_grpo) or -G sum_i A_i |y_i| / sum |y| (dapo): not zero unless
    # the lengths are equal; |loss| <= G max|A_i|, and with rewards -|length - 32| for lengths 1..4 in a group of 3
    # the centred advantages are at most 2 in size
    assert math.isfinite(first["loss"]) and abs(first["loss"]) <= 3 * 2.0 + 1e-6
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match="loss_type"):
        load_run_config(None, _flags(tmp_path, grpo={"rewards": ["length"], "loss_type": "ppo"}))


def test_the_token_loss_is_the_formula_with_clipping_and_kl():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    old = torch.tensor([[-1.5, -1.0], [-0.5, -2.0]])  # ratios e^0.5, e^-1, 1, e^-1: two outside [0.8, 1.2]
    ref = torch.tensor([[-1.2, -2.5], [-0.4, -2.0]])
    adv = torch.tensor([1.5, -0.7])
    eps, beta = 0.2, 0.04
    got = token_losses(logp, old, adv, eps, beta, ref)
    for i in range(2):
        for t in range(2):
            rho = math.exp(logp[i, t] - old[i, t])
            a = adv[i].item()
            clipped = min(max(rho, 1 - eps), 1 + eps)
            d = ref[i, t].item() - logp[i, t].item()
            by_hand = -min(rho * a, clipped * a) + beta * (math.exp(d) - d - 1)
            assert got[i, t].item() == pytest.approx(by_hand, rel=1e-6)
    # beta = 0 drops the KL term; with old = logp.detach() the value is -A and the gradient is -A grad logp
    p = logp.clone().requires_grad_(True)
    out = token_losses(p, p.detach(), adv, eps)
    assert torch.allclose(out, -adv[:, None].expand(2, 2))
    out.sum().backward()
    assert torch.allclose(p.grad, -adv[:, None].expand(2, 2))
    assert kl_k3(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0


def test_the_sequence_mean_counts_only_completion_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert sequence_means(values, mask).tolist() == [1.5, 5.0]
    stops = completion_mask(torch.tensor([[5, 2, 7, 7], [5, 6, 8, 9], [2, 2, 2, 2]]), stops=[2])
    assert stops.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]  # up to and with the first stop


def test_the_builtin_rewards(tmp_path):
    user = tmp_path / "my_reward.py"
    user.write_text("def score(completion, answer):\n    return 2.0 * completion.count('x')\n")
    settings = GrpoSection(rewards=["exact_match", "contains", "length", f"{user}:score"], length_target=3)
    exact, contains, length, mine = reward_functions(settings)
    assert exact(" cat ", "cat", 1) == 1.0 and exact("cat!", "cat", 1) == 0.0
    assert contains("the cat sat", "cat", 3) == 1.0 and contains("dog", "cat", 1) == 0.0
    assert length("", "", 5) == -2.0 and length("", "", 3) == 0.0
    assert mine("xax", "", 3) == 4.0


# ---------------------------------------------------------------- on a tiny llama


def test_sampling_is_deterministic_for_a_seed_and_prompt(tmp_path):
    config = load_run_config(None, _flags(tmp_path))
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    dt.attach(model, config.delta)
    model.train()
    batch = GRPO.collator(config, tokenizer)(prepare(config, tokenizer, None).train[:2])
    prompt = batch["prompt_ids"][0, : int(batch["prompt_lengths"][0])]
    settings = config.stage_settings["grpo"]
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = sample(model, prompt, settings, sample_seed(7, prompt, 0), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert torch.equal(torch.rand(1), expected)  # the run's own random stream is untouched
    again = sample(model, prompt, settings, sample_seed(7, prompt, 0), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    other = sample(model, prompt, settings, sample_seed(8, prompt, 0), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert first.shape[0] == 4 and torch.equal(first, again) and not torch.equal(first, other)
    assert sample_seed(7, prompt, 0) != sample_seed(7, prompt, 1)
    assert model.training  # sampling ran in eval mode and put the mode back


def test_the_loss_is_repeatable_and_its_token_log_probs_are_the_full_logits(tmp_path):
    config = load_run_config(None, _flags(tmp_path, grpo={"rewards": ["length"], "num_generations": 3,
                                                          "max_new_tokens": 5, "temperature": 0.7}))
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    dt.attach(model, config.delta)
    model.train()
    batch = GRPO.collator(config, tokenizer)(prepare(config, tokenizer, None).train[:2])
    first, second = GRPO.loss(model, model, batch, config), GRPO.loss(model, model, batch, config)
    assert torch.equal(first[0], second[0])  # same weights, same batch: the same samples, the same loss
    assert {k: v.item() for k, v in first[1].items()} == {k: v.item() for k, v in second[1].items()}
    rows = torch.randint(3, 300, (3, 9))
    mask = torch.ones_like(rows)
    with torch.no_grad():
        got = token_log_probs(model, model, rows, mask, 4, 0.7)
        full = (model(input_ids=rows).logits[:, 4:8].float() / 0.7).log_softmax(-1)
    assert torch.allclose(got, full.gather(-1, rows[:, 5:, None]).squeeze(-1), atol=1e-5)


def test_the_prompt_is_everything_before_the_answer(tmp_path):
    config = load_run_config(None, _flags(tmp_path))
    tokenizer = load_tokenizer(config)
    example = prepare(config, tokenizer, None).train[0]
    batch = GRPO.collator(config, tokenizer)([example])
    n = int(batch["prompt_lengths"][0])
    answer = [t for t in batch["answer_ids"][0].tolist() if t != -100]
    assert example.input_ids[:n] + answer == example.input_ids[: n + len(answer)]
    assert "alpha alpha" in tokenizer.decode(answer) and "alpha alpha" not in tokenizer.decode(example.input_ids[:n])


def test_a_grpo_step_runs_with_the_kl_term_and_logs_trl_metrics(tmp_path):
    config = load_run_config(None, _flags(tmp_path, grpo={"rewards": ["length", "contains"], "num_generations": 3,
                                                          "max_new_tokens": 4, "beta": 0.04}, **{"train.max_steps": 2}))
    assert stage_for(config).name == "grpo"
    records = _records(run(config, **QUIET).output_dir)
    first = records[0]
    for name in ("reward", "reward_std", "kl", "completion_length"):
        assert name in first and math.isfinite(first[name])
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # before any update the policy is the reference
    assert 1 <= first["completion_length"] <= 4
    assert first["loss"] == pytest.approx(0.0, abs=1e-5)  # rho = 1 and the advantages sum to zero in a group
    assert records[1]["kl"] > 0  # after one update the policy has moved off the reference


@pytest.mark.slow
def test_a_short_grpo_run_raises_the_reward(tmp_path):
    # a reward of the user's own, easy to learn from a random tiny model: how often the letter "a" is written
    # (the `length` reward would give no signal here: a random model never samples its stop token early)
    reward = tmp_path / "letters.py"
    reward.write_text("def count_a(completion, answer):\n    return float(completion.count('a'))\n")
    flags = _flags(tmp_path, **{"grpo": {"rewards": [f"{reward}:count_a"], "num_generations": 8, "max_new_tokens": 8},
                                "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                        "down_proj", "lm_head"],
                                "train.max_steps": 12, "train.lr": 5e-2, "train.scheduler": "constant"})
    records = _records(run(load_run_config(None, flags), **QUIET).output_dir)
    rewards = [r["reward"] for r in records]
    # measured (train.seed 0, 1, 2): the mean reward goes from 0.2-0.6 over the first steps to 5.8-7.7 at step 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 1.0, rewards


# ---------------------------------------------------------------- config and refusals


def test_the_refusals(tmp_path):
    with pytest.raises(ConfigError, match="grpo.rewards"):
        load_run_config(None, _flags(tmp_path, grpo={"rewards": []}))
    with pytest.raises(ConfigError, match="'nope' is not a reward.*exact_match, contains, length"):
        load_run_config(None, _flags(tmp_path, grpo={"rewards": ["nope"]}))
    with pytest.raises(ConfigError, match="no file"):
        load_run_config(None, _flags(tmp_path, grpo={"rewards": ["missing.py:f"]}))
    with pytest.raises(ConfigError, match="packing"):
        load_run_config(None, _flags(tmp_path, **{"data.packing": True}))
    from deltatune.pipeline.stages.reference import needs_copy

    # full fine-tuning takes either beta; only beta > 0 holds a reference copy (tests/test_stage_reference.py)
    assert needs_copy(load_run_config(None, _full(tmp_path, grpo={"rewards": ["length"], "beta": 0.1})))
    assert not needs_copy(load_run_config(None, _full(tmp_path, grpo={"rewards": ["length"]})))  # beta = 0
    with pytest.raises(ConfigError, match="causal"):
        load_run_config(None, _flags(tmp_path, **{"model.task": "seq2seq"}))
    with pytest.raises(ConfigError, match="num_generations"):
        load_run_config(None, _flags(tmp_path, grpo={"rewards": ["length"], "num_generations": 1}))


def test_the_settings_round_trip_through_the_run_config(tmp_path):
    import yaml

    config = load_run_config(None, _flags(tmp_path, grpo={"rewards": ["contains", "length"], "beta": 0.04}))
    recorded = config.as_dict()
    assert recorded["stage"] == "grpo" and recorded["grpo"]["rewards"] == ["contains", "length"]
    assert recorded["grpo"]["beta"] == 0.04 and recorded["grpo"]["num_generations"] == 8  # TRL's G
    assert "--stage grpo" in config.command() and "--grpo.beta 0.04" in config.command()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(recorded))
    assert load_run_config(str(path), {}).stage_settings["grpo"] == config.stage_settings["grpo"]


# ---------------------------------------------------------------- evaluation


def test_evaluation_logs_eval_reward_and_is_the_reward_of_the_sampled_completions(tmp_path):
    from deltatune.pipeline.evaluate import evaluate
    from deltatune.pipeline.stages.grpo import weights_fingerprint

    reward = tmp_path / "letters.py"
    reward.write_text("def count_a(completion, answer):\n    return float(completion.count('a'))\n")
    rewards = [f"{reward}:count_a", "length"]
    flags = _flags(tmp_path, **{"data.eval": str(write_jsonl(tmp_path / "eval.jsonl", ROWS[:3])),
                                "grpo": {"rewards": rewards, "num_generations": 3, "max_new_tokens": 5},
                                "train.max_steps": 2, "train.eval_every": 1, "eval.batch_size": 2})
    config = load_run_config(None, flags)
    out = run(config, **QUIET).output_dir
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_reward" in r]
    assert len(evals) == 2  # at step 1 (eval_every) and at the end
    for record in evals:
        for name in ("eval_reward", "eval_reward_std", "eval_completion_length", "eval_rewards/count_a/mean",
                     "eval_rewards/length/mean"):
            assert math.isfinite(record[name]), name
        assert record["eval_reward"] == pytest.approx(record["eval_rewards/count_a/mean"]
                                                      + record["eval_rewards/length/mean"], rel=1e-5)

    # by hand, on the untrained model: sample each eval prompt's group with the documented seed, score it
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    dt.attach(model, config.delta)
    prepared = prepare(config, tokenizer, None)
    first, second = evaluate(model, prepared, config, tokenizer), evaluate(model, prepared, config, tokenizer)
    assert first == second  # the same weights: the same samples, the same numbers
    settings = config.stage_settings["grpo"]
    batch = GRPO.collator(config, tokenizer)(prepared.eval)
    totals, stds, lengths = [], [], []
    for i in range(len(prepared.eval)):
        prompt = batch["prompt_ids"][i, : int(batch["prompt_lengths"][i])]
        seed = sample_seed(config.train.seed, prompt, -1 - i, weights_fingerprint(model))
        completions = sample(model, prompt, settings, seed, [tokenizer.eos_token_id], tokenizer.pad_token_id)
        keep = completion_mask(completions, [tokenizer.eos_token_id])
        group = []
        for c, n in zip(completions, keep.sum(-1).tolist()):
            text = tokenizer.decode(c[:n].tolist(), skip_special_tokens=True)
            group.append(text.count("a") - abs(n - settings.length_target))
            lengths.append(n)
        totals += group
        mean = sum(group) / len(group)
        stds.append(math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1)))
    assert first["reward"] == pytest.approx(sum(totals) / len(totals), rel=1e-6)
    assert first["reward_std"] == pytest.approx(sum(stds) / len(stds), rel=1e-5, abs=1e-6)
    assert first["completion_length"] == pytest.approx(sum(lengths) / len(lengths))


def test_the_plan_counts_each_prompts_g_sampled_rows_at_their_longest(tmp_path):
    from deltatune.pipeline.data import Example

    config = load_run_config(None, _flags(tmp_path, grpo={"rewards": ["length"], "num_generations": 3, "max_new_tokens": 5}))
    example = Example([7, 8, 9, 4, 4], [IGNORE, IGNORE, IGNORE, 4, 4])  # a 3-token prompt and its 2-token answer
    rows = GRPO.rows_of(example, config)
    assert len(rows) == 3 and all(len(r.input_ids) == 3 + 5 and r.input_ids[:3] == [7, 8, 9] for r in rows)
    assert GRPO.rows_per_example() == 8  # TRL's default G, for `deltatune plan --stage grpo`
