"""The reference model of the preference stages for methods that train the base weights (full, freeze, bitfit):
a frozen copy of the base loaded beside the policy (stages/reference.py). DPO on `full` starts at log 2 and learns,
its reference stays the base and is never saved, a resumed run equals the straight one, KTO and GRPO train on
freeze and bitfit, a delta method loads no copy, `deltatune eval` of full weights finds its reference, and the
memory plan counts the copy."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.config import DeltaError
from deltatune.pipeline import train as train_module
from deltatune.pipeline.config import load_run_config
from deltatune.pipeline.data import prepare
from deltatune.pipeline.evaluate import evaluate
from deltatune.pipeline.stages import reference
from deltatune.pipeline.stages import named
from deltatune.pipeline.stages.reference import needs_copy, needs_copy_by_default
from deltatune.pipeline.train import load_base, load_tokenizer, run
from pipeline_models import save_tiny, stage_flags, train_records, write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
PAIRS = [{"prompt": f"Repeat {w}:", "chosen": f" {w} {w}", "rejected": " no idea"} for w in WORDS]
FEEDBACK = [row for w in WORDS[:4] for row in ({"prompt": f"Repeat {w}:", "completion": f" {w} {w}", "label": True},
                                               {"prompt": f"Repeat {w}:", "completion": " no idea", "label": False})]
QUIET = {"echo": lambda *a, **k: None}


def _without_lora(flags: dict) -> dict:
    flags.pop("lora.r", None)
    return flags


def _dpo(tmp_path, method: str = "full", **extra) -> dict:
    return _without_lora(stage_flags(tmp_path, PAIRS, "preference", method=method, **{
        "train.lr": 1e-3, "train.scheduler": "constant", **extra}))


@pytest.fixture
def loads(monkeypatch):
    """The reference copies loaded (the real loader, spied on): what a run holds beside the policy."""
    copies: list[torch.nn.Module] = []
    real = reference.load_reference

    def spy(*args, **kwargs):
        copies.append(real(*args, **kwargs))
        return copies[-1]

    monkeypatch.setattr(reference, "load_reference", spy)
    return copies


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_dpo_on_full_starts_at_log_2_learns_and_its_reference_stays_the_base_unsaved(tmp_path, loads):
    config = load_run_config(None, _dpo(tmp_path, **{"train.max_steps": 6, "train.save_every": 3}))
    assert needs_copy(config)
    out = run(config, **QUIET).output_dir
    records = train_records(out)
    # step 0: the policy is the base and so is the reference, so h = 0 and the loss is log 2
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # measured: 0.693 -> 0.526, margin 0 -> 0.37 in 6 steps at lr 1e-3
    assert records[-1]["loss"] < records[0]["loss"] - 0.1 and records[-1]["rewards/margins"] > 0.1
    (copy,) = loads  # one copy, loaded once for the whole run
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())
    base = _weights(load_base(config, load_tokenizer(config)))
    after = _weights(copy)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)  # never stepped
    # the saved files hold the trained weights once: no second copy, nothing of the reference
    parameters = sum(t.numel() for t in base.values())
    saved = [*sorted((out / "adapter").glob("*.safetensors")), *sorted(out.glob("checkpoints/*/delta.safetensors"))]
    assert len(saved) == 3  # the adapter, the checkpoints at steps 3 and 6
    for path in saved:
        tensors = load_file(path)
        assert 0 < sum(t.numel() for t in tensors.values()) <= parameters, path
    trained = load_file(saved[0])
    assert any(not torch.equal(t, base[k]) for k, t in trained.items() if k in base)  # the policy moved, the copy not


def test_a_resumed_full_dpo_run_equals_the_straight_one(tmp_path):
    common = {"train.save_every": 2, "dpo.beta": 0.2, "train.batch_size": 2}
    whole = run(load_run_config(None, _dpo(tmp_path, **common, **{"train.max_steps": 4,
                                                                    "output.dir": str(tmp_path / "a")})), **QUIET)
    part = _dpo(tmp_path, **common, **{"train.max_steps": 2, "output.dir": str(tmp_path / "b")})
    run(load_run_config(None, part), **QUIET)  # stops at step 2 (its checkpoint), as a killed run would have
    resumed = run(load_run_config(None, {**part, "train.max_steps": 4, "train.resume": True}), **QUIET)
    straight, again = train_records(whole.output_dir), train_records(resumed.output_dir)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margins"):
        assert [r[key] for r in again] == pytest.approx([r[key] for r in straight], abs=1e-6), key
    # the resumed run's reference is the base again (re-read), not a copy of the weights it resumed with: a copy
    # would put the loss of step 3 back at log 2
    assert again[2]["loss"] < math.log(2) - 1e-3
    (a,), (b,) = ([load_file(f) for f in r.adapter_dir.glob("*.safetensors")] for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_kto_trains_on_freeze_against_a_frozen_copy(tmp_path, loads):
    flags = _without_lora(stage_flags(tmp_path, FEEDBACK, "kto", method="freeze", **{
        "freeze.trainable_layers": 1, "train.max_steps": 4, "train.lr": 1e-2, "train.scheduler": "constant"}))
    records = train_records(run(load_run_config(None, flags), **QUIET).output_dir)
    first, last = records[0], records[-1]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # r = 0 and z0 = 0: each row loses 1 - sigma(0)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert len(loads) == 1
    # measured: 0.5 -> 0.42, rewards/chosen 0.93 against rewards/rejected 0.03 after 4 steps
    assert last["loss"] < first["loss"] and last["rewards/chosen"] > last["rewards/rejected"]


def test_grpo_with_beta_trains_bitfit_against_a_frozen_copy(tmp_path, loads):
    rows = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in WORDS[:4]]
    model = save_tiny(tmp_path, "qwen2")  # a llama has no biases for BitFit to train
    reward = tmp_path / "letters.py"  # a reward that varies within a group (a random model's lengths do not)
    reward.write_text("def count_a(completion, answer):\n    return float(completion.count('a'))\n")
    flags = {"model.name": str(model), "data.train": str(write_jsonl(tmp_path / "p.jsonl", rows)),
             "data.format": "instruction", "stage": "grpo", "method": "bitfit",
             "grpo": {"rewards": [f"{reward}:count_a"], "num_generations": 4, "max_new_tokens": 8,
                      "beta": 0.1},
             "train.max_steps": 2, "train.batch_size": 2, "train.lr": 5e-2, "train.log_every": 1,
             "train.progress": False, "output.dir": str(tmp_path / "out")}
    records = train_records(run(load_run_config(None, flags), **QUIET).output_dir)
    assert len(loads) == 1
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # before any update the policy is the reference
    assert records[1]["kl"] > 0 and all(math.isfinite(r["loss"]) for r in records)  # then it has moved from it


def test_a_delta_method_loads_no_copy_and_plans_none(tmp_path, loads, monkeypatch):
    planned: list[dict] = []
    monkeypatch.setattr(train_module, "check_run", lambda *a, **k: planned.append(k))
    config = load_run_config(None, stage_flags(tmp_path, PAIRS, "preference", **{"train.max_steps": 1}))
    assert config.method == "lora" and not needs_copy(config)
    records = train_records(run(config, **QUIET).output_dir)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the delta switched off is the reference
    assert loads == [] and planned[0]["reference"] is False
    simpo = load_run_config(None, _dpo(tmp_path, **{"dpo.loss_type": "simpo"}))  # no reference at all: no copy
    assert not needs_copy(simpo)


def test_evaluating_full_weights_loads_the_reference_when_asked_and_lets_it_go(tmp_path, loads):
    config = load_run_config(None, _dpo(tmp_path, **{"data.eval": str(write_jsonl(tmp_path / "eval.jsonl", PAIRS))}))
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    dt.attach(model, config.delta)  # what `deltatune eval --adapter` of a full run builds
    prepared = prepare(config, tokenizer, None)
    with pytest.raises(DeltaError, match="trains its base weights.*separate copy"):
        with reference.reference(model):
            pass
    assert evaluate(model, prepared, config, tokenizer)["loss"] == pytest.approx(math.log(2), abs=1e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the "trained" weights: now the policy differs from the base
    moved = evaluate(model, prepared, config, tokenizer)
    assert moved["rewards/margins"] != pytest.approx(0.0, abs=1e-4)
    assert len(loads) == 2 and not reference.is_held(model)  # one copy per evaluation, released after it
    base = _weights(load_base(config, tokenizer))
    assert all(torch.equal(loads[-1].state_dict()[k], base[k]) for k in base)


def test_the_plan_counts_one_more_copy_of_the_weights_for_a_reference(tmp_path):
    from deltatune.planner import plan_run

    dpo = load_run_config(None, _dpo(tmp_path))
    sft = load_run_config(None, _without_lora(stage_flags(
        tmp_path, [{"instruction": "a", "output": "b"}], "instruction", method="full")))
    model = load_base(dpo, load_tokenizer(dpo))
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # rotary inv_freq too
    with_copy = plan_run(dpo, model, 16, reference=needs_copy(dpo))
    without = plan_run(sft, model, 16, reference=needs_copy(sft))
    assert needs_copy(dpo) and not needs_copy(sft)
    assert with_copy.reference_weights == weights and without.reference_weights == 0
    assert with_copy.total - without.total == weights and with_copy.static - without.static == weights
    assert "reference copy" in with_copy.table() and "reference copy" not in without.table()
    assert any("second, frozen copy" in note for note in with_copy.notes)
    # a delta method's reference is its own base with the delta off: planned with no copy
    lora = [dt.plan(model.config, "lora", r=4, batch=2, seq=16, device="cpu", dtype="fp32", search=False,
                    reference=ref) for ref in (False, True)]
    assert lora[0].total == lora[1].total and lora[1].reference_weights == 0

    # `deltatune plan --stage S --method M`, with no config: the stage's defaults decide
    assert [needs_copy_by_default(named(n), "full") for n in ("sft", "dpo", "kto", "grpo", "orpo", "reward")] == [
        False, True, True, False, False, False]  # grpo's default beta is 0: no reference
    assert not needs_copy_by_default(named("dpo"), "lora") and needs_copy_by_default(named("kto"), "bitfit")


def test_a_quantised_base_gets_a_reference_computed_as_the_policy_is(tmp_path, loads):
    pytest.importorskip("bitsandbytes")
    # BitFit on a 4-bit base: the policy's norms, head and biases go to fp32 (prepare_kbit), and so do the copy's;
    # without that the step-0 loss is off log 2 by about 5e-6 and the margin by 1e-5 (measured)
    flags = _dpo(tmp_path, method="bitfit", **{"model.name": str(save_tiny(tmp_path, "qwen2", width=64)),
                                               "model.quant": "nf4", "model.dtype": "bf16", "train.max_steps": 2,
                                               "train.lr": 1e-2})
    records = train_records(run(load_run_config(None, flags), **QUIET).output_dir)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    assert records[1]["loss"] < records[0]["loss"] and len(loads) == 1


def test_the_plan_command_shows_the_reference_copy_only_where_one_is_held(tmp_path, capsys):
    from deltatune.cli import main

    config = str(save_tiny(tmp_path, "llama") / "config.json")
    shown = {}
    for stage, method in (("dpo", "full"), ("sft", "full"), ("dpo", "lora"), ("grpo", "full")):
        main(["plan", "--model", config, "--method", method, "--stage", stage, "--batch", "2", "--seq", "32"])
        shown[stage, method] = "reference copy" in capsys.readouterr().out
    # grpo's default beta is 0.0: no KL term, so no reference
    assert shown == {("dpo", "full"): True, ("sft", "full"): False, ("dpo", "lora"): False, ("grpo", "full"): False}
