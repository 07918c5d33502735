"""AdaLoRA specifics: the SVD-form forward, the orthogonality penalty, the rank budget on its
cubic schedule, pruned files, parity with peft's training loop, and the user's mistakes."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from checks import assert_unchanged, fingerprint
from deltatune.methods.adalora import AdaLoraLayer
from test_lora import perturb
from tiny_models import batch, build, logits

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 3 modules x 2 layers


def ada(**kw) -> dt.AdaLoraConfig:
    defaults = dict(init_r=6, target_r=2, alpha=16, total_step=30, tinit=4, tfinal=6, deltaT=2, target_modules=TARGETS)
    return dt.AdaLoraConfig(**{**defaults, **kw})


def train(model, data, steps, lr=2e-2, call_step=True):
    """The user's loop: loss + dt.regularization, backward, optimizer step, dt.step, zero_grad."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses, ranks = [], []
    for t in range(steps):
        out = model(**data)
        (out.loss + dt.regularization(model)).backward()
        opt.step()
        if call_step:
            dt.step(model, t)
        opt.zero_grad()
        losses.append(out.loss.item())
        pattern = dt.attached(model)["default"].rank_pattern
        ranks.append(sum(map(sum, pattern.values())) if pattern else None)
    model.eval()
    return losses, ranks


def layers(model):
    return [m for m in model.modules() if isinstance(m, AdaLoraLayer)]


def test_forward_is_the_svd_form():
    model = build("llama")
    dt.attach(model, ada(init="none", target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 32)
    W, Q, lam, P = layer.base_layer.weight, layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    assert (Q.shape, lam.shape, P.shape) == ((6, 32), (6, 1), (32, 6))
    s = 16 / (6 + 1e-5)  # alpha / (init_r + 1e-5), as peft and the paper's code scale it
    d = torch.float64
    expected = x.to(d) @ W.T.to(d) + s * (x.to(d) @ Q.T.to(d) @ torch.diag(lam.view(-1)).to(d) @ P.T.to(d))
    torch.testing.assert_close(layer(x).to(d), expected, rtol=1e-4, atol=1e-5)


def test_init_leaves_outputs_unchanged_and_lambda_zero():
    model = build("llama")
    dt.attach(model, ada())
    for layer in layers(model):
        assert torch.count_nonzero(layer.lora_E["default"]) == 0
        assert layer.lora_A["default"].std().item() == pytest.approx(0.02, rel=0.3)


def test_regularization_is_the_orthogonality_penalty():
    model = build("llama")
    dt.attach(model, ada(init="none", orth_reg_weight=0.3))
    norms = []
    for layer in layers(model):
        Q, P = layer.lora_A["default"], layer.lora_B["default"]
        norms.append(torch.sqrt(((Q @ Q.T - torch.eye(6)) ** 2).sum()))
        norms.append(torch.sqrt(((P.T @ P - torch.eye(6)) ** 2).sum()))
    penalty = dt.regularization(model)
    torch.testing.assert_close(penalty, 0.3 * torch.stack(norms).mean())
    penalty.backward()
    assert all(layer.lora_A["default"].grad is not None for layer in layers(model))
    with dt.disabled(model):  # inactive deltas add nothing
        assert dt.regularization(model) == 0.0
    dt.set_trainable(model, "default", False)  # nor do frozen ones
    assert dt.regularization(model) == 0.0


def expected_budget(t: int, config: dt.AdaLoraConfig, start: int, target: int) -> int:
    """The paper's cubic schedule, written out independently of the library."""
    end = config.total_step - config.tfinal
    if t <= config.tinit:
        return start
    if t >= end:
        return target
    return int(target + (start - target) * (1 - (t - config.tinit) / (end - config.tinit)) ** 3)


def test_total_rank_falls_on_the_cubic_schedule_and_the_loss_still_falls():
    config = ada()
    model = build("llama")
    data = batch("llama")
    dt.attach(model, config)
    start, target = 6 * 6, 2 * 6
    losses, ranks = train(model, data, steps=config.total_step + 3)
    last = start
    for t, total in enumerate(ranks):
        end = config.total_step - config.tfinal
        if t <= config.tinit:
            assert total is None, t  # no allocation yet
            continue
        if t < end and t % config.deltaT:
            assert (total or start) == last, t  # re-allocated only every deltaT steps
            continue
        assert total == expected_budget(t, config, start, target), (t, total)
        last = total
    assert ranks[config.tinit + 2] < start and ranks[-1] == target
    allocated = [r for r in ranks if r is not None]
    assert all(a >= b for a, b in zip(allocated, allocated[1:]))  # the budget only falls
    # after the final allocation, exactly the kept triplets have a non-zero lambda
    kept = sum(int(torch.count_nonzero(layer.lora_E["default"])) for layer in layers(model))
    assert kept == target
    assert losses[-1] < losses[0] - 0.2, losses


def test_saved_adapter_has_the_final_ranks_and_loads_with_them(tmp_path):
    model = build("llama")
    data = batch("llama")
    dt.attach(model, ada())
    train(model, data, steps=30)
    out = logits(model, data)
    pattern = dt.attached(model)["default"].rank_pattern
    assert set(pattern) == {f"model.layers.{i}.{m}.lora_E" for i in (0, 1)
                            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    dt.save(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert saved == pattern
    for key, kept in pattern.items():
        prefix = "base_model.model." + key.removesuffix(".lora_E")
        r = sum(kept)
        assert tensors[prefix + ".lora_A"].shape[0] == r and tensors[prefix + ".lora_E"].shape == (r, 1)
        assert tensors[prefix + ".lora_B"].shape[1] == r
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_E")) == 12

    fresh = build("llama")
    dt.load(fresh, tmp_path, trainable=True)
    torch.testing.assert_close(logits(fresh, data), out, rtol=0, atol=1e-6)
    assert dt.summary(fresh, print_table=False).trainable < dt.summary(model, print_table=False).trainable
    # a loaded adapter has its final ranks: dt.step has nothing left to allocate, and training goes on
    before = {k: v.clone() for k, v in dt.delta_parameters(fresh, "default").items()}
    _, ranks = train(fresh, data, steps=3, lr=1e-3)
    after = dt.delta_parameters(fresh, "default")
    assert ranks == [12, 12, 12]
    assert all(v.shape == after[k].shape for k, v in before.items())
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    # the trained model saves again, the same way
    dt.save(fresh, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == pattern


def test_a_module_pruned_to_rank_zero_still_works(tmp_path):
    model = build("llama")
    config = ada(target_modules=["q_proj"], init="none")
    pattern = {"model.layers.0.self_attn.q_proj.lora_E": [False] * 6,
               "model.layers.1.self_attn.q_proj.lora_E": [True, False, True, False, True, True]}
    dt.attach(model, config.replace(rank_pattern=pattern))
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert q0.lora_A["default"].shape == (0, 32) and q1.lora_A["default"].shape == (4, 32)
    data = batch("llama")
    out = logits(model, data)
    (model(**data).loss + dt.regularization(model)).backward()
    dt.merge(model)
    torch.testing.assert_close(logits(model, data), out, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)
    dt.save(model, tmp_path)
    torch.testing.assert_close(logits(dt.load(build("llama"), tmp_path), data), out, rtol=0, atol=1e-6)


def test_step_is_a_no_op_for_other_methods_and_inactive_deltas():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2))
    before = fingerprint(model)
    dt.step(model, 3)
    assert dt.regularization(model) == 0.0
    dt.finalize(model)
    assert_unchanged(model, before)
    dt.step(build("llama"), 0)  # no delta at all: nothing to do


def test_training_matches_peft_step_for_step():
    """The same adapter trained by both libraries' loops: same losses, same allocation, same outputs."""
    peft = pytest.importorskip("peft")
    config = ada(total_step=14, tinit=2, tfinal=3, deltaT=1)
    base = build("llama")
    data = batch("llama")
    ours = copy.deepcopy(base)
    dt.attach(ours, config)
    perturb(ours, scale=0.1)  # lambda away from zero, so every part has gradients from the start
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=6, target_r=2, lora_alpha=16, total_step=14, tinit=2, tfinal=3, deltaT=1, target_modules=TARGETS,
        task_type="CAUSAL_LM"))  # fmt: skip
    with torch.no_grad():
        mine = dict(ours.named_parameters())
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[n.removeprefix("base_model.model.")])
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    ours.train(), theirs.train()
    for t in range(16):
        loss = ours(**data).loss + dt.regularization(ours)  # peft adds its penalty inside forward
        loss.backward()
        opt_ours.step()
        dt.step(ours, t)
        opt_ours.zero_grad()
        reference = theirs(**data).loss
        reference.backward()
        opt_theirs.step()
        theirs.base_model.update_and_allocate(t)
        opt_theirs.zero_grad()
        assert loss.item() == pytest.approx(reference.item(), abs=1e-5), t
    ours.eval(), theirs.eval()
    peft_pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert dt.attached(ours)["default"].rank_pattern == peft_pattern
    inputs = {k: v for k, v in data.items() if k != "labels"}
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- mistakes


def test_step_without_gradients_says_where_to_call_it():
    model = build("llama")
    dt.attach(model, ada())
    model(**batch("llama")).loss.backward()
    model.zero_grad(set_to_none=True)
    with pytest.raises(dt.DeltaError, match=r"no gradient on model.layers.0.self_attn.q_proj.lora_A.*after optimizer.step\(\) "
                                            r"and before optimizer.zero_grad\(\)"):
        dt.step(model, 5)


def test_step_wants_an_integer_step():
    model = build("llama")
    dt.attach(model, ada())
    for bad in ("5", 2.5, -1, True):
        with pytest.raises(dt.DeltaError, match="step expects the global step as an int >= 0"):
            dt.step(model, bad)


def test_several_adalora_deltas_allocate_each_their_own_budget():
    model = build("llama")
    data = batch("llama")
    dt.attach(model, ada(init_r=4, target_r=2, total_step=6, tinit=0, tfinal=0, target_modules=["q_proj"]), name="a")
    dt.attach(model, ada(init_r=4, target_r=1, total_step=6, tinit=0, tfinal=0, target_modules=["v_proj"]), name="b")
    dt.set_active(model, ["a", "b"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for t in range(8):
        (model(**data).loss + dt.regularization(model)).backward()
        opt.step()
        dt.step(model, t)
        opt.zero_grad()
    totals = {n: sum(map(sum, c.rank_pattern.values())) for n, c in dt.attached(model).items()}
    assert totals == {"a": 2 * 2, "b": 2 * 1}


def test_step_first_called_at_the_final_allocation_is_refused():
    model = build("llama")
    dt.attach(model, ada())
    model(**batch("llama")).loss.backward()
    with pytest.raises(dt.DeltaError, match="no importance scores .*after every optimizer step from the start"):
        dt.step(model, 24)


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(total_step=None), "total_step is required"),
        (dict(total_step=0), "total_step = 0 is not allowed"),
        (dict(tinit=20, tfinal=10), "leaves no steps to allocate the budget: tinit=20"),
        (dict(target_r=8), "target_r = 8 is above init_r = 6"),
        (dict(beta1=1.0), "beta1 = 1.0 is not allowed"),
        (dict(orth_reg_weight=-1), "orth_reg_weight = -1 is not allowed"),
        (dict(deltaT=0), "deltaT = 0 is not allowed"),
        (dict(rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True, False]}), "has 2 entries; it needs one per"),
        (dict(rank_pattern={"q.lora_E": [1, 0, 1, 0, 1, 0]}), "rank_pattern = .* expected a dict of a string to a list of True or False"),
        (dict(init="kaiming"), "one of 'normal', 'none'"),
    ],
)
def test_bad_configs_are_refused(kw, fragment):
    with pytest.raises(dt.DeltaError, match=fragment):
        ada(**kw)


def test_bad_targets_and_rank_patterns_are_refused():
    model = build("llama")
    before = fingerprint(model)
    with pytest.raises(dt.DeltaError, match=r"adalora cannot wrap model.embed_tokens \(Embedding\)"):
        dt.attach(model, ada(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(dt.DeltaError, match=r"rank_pattern names 'model.layers.0.mlp.up_proj.lora_E', which is not one of the targeted"):
        dt.attach(model, ada(rank_pattern={"model.layers.0.mlp.up_proj.lora_E": [True] * 6}))
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"]), name="lora")
    with pytest.raises(dt.DeltaError, match="q_proj is already wrapped by LoraLayer; stacking AdaLoraLayer"):
        dt.attach(model, ada(), name="ada")
    dt.detach(model)
    assert_unchanged(model, before)


def test_adalora_file_with_unused_peft_fields_loads(tmp_path):
    """peft's AdaLoRA ignores r, alpha_pattern and use_rslora; a file that sets them still loads."""
    model = build("llama")
    dt.attach(model, ada(init="none"))
    dt.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "ADALORA" and config["rank_pattern"] is None
    config.update(r=32, alpha_pattern={"q_proj": 4}, use_rslora=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = dt.load(build("llama"), tmp_path, verify=False)
    torch.testing.assert_close(logits(loaded, batch("llama")), logits(model, batch("llama")), rtol=0, atol=1e-6)
    config.update(use_dora=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(dt.DeltaError, match="the peft option use_dora=True is not supported"):
        dt.load(build("llama"), tmp_path, verify=False)


def test_counts_follow_the_rank_pattern():
    """r (in + out + 1) per module: 6 x (32 + 32 + 1) per q_proj, 6 x (32 + 16 + 1) per v_proj (2 KV heads of 8)."""
    model = build("llama")
    dt.attach(model, ada(target_modules=["q_proj", "v_proj"]))
    assert dt.summary(model, print_table=False).trainable == 2 * 6 * (65 + 49)
    pattern = {f"model.layers.{i}.self_attn.{m}.lora_E": [True, True] + [False] * 4 for i in (0, 1) for m in ("q_proj", "v_proj")}
    model = build("llama")
    dt.attach(model, ada(target_modules=["q_proj", "v_proj"], rank_pattern=pattern))
    assert dt.summary(model, print_table=False).trainable == 2 * 2 * (65 + 49)
    assert math.isclose(model.model.layers[0].self_attn.q_proj.scaling["default"], 16 / (6 + 1e-5))  # scale of init_r
