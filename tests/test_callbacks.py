"""DeltaCallback: transformers.Trainer adds dt.regularization to its loss, calls dt.step and dt.finalize."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune.methods.diff_pruning import DiffPruningLayer, kept_entries
from test_integration import FixedBatches
from tiny_models import batch, build, logits

LAMBDA = 1e-2


class GrabGradients(tf.TrainerCallback):
    """The gradients of the gates' alpha just before the first optimizer step (after clipping, which is off)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if ".diff_log_alpha." in n and p.grad is not None}


def _args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-2, per_device_train_batch_size=2,
                    report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, max_grad_norm=0.0)
    return tf.TrainingArguments(**{**defaults, **kw})


def _four_rows(arch):
    data = batch(arch)
    return FixedBatches({k: torch.cat([v, v]) for k, v in data.items()})


def _first_gradients(model, arch, tmp_path, callbacks, accumulation):
    grab = GrabGradients()
    torch.manual_seed(0)  # the same gate samples in both runs: the penalty draws no random numbers
    trainer = tf.Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=accumulation),
                         train_dataset=_four_rows(arch), callbacks=callbacks + [grab])
    trainer.train()
    return grab.grads


@pytest.mark.parametrize("arch,loss_kwargs", [("gpt2", True), ("gpt2", False), ("bert", None)],
                         ids=["gpt2-normalised-by-items", "gpt2-divided-by-trainer", "bert"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_penalty_reaches_the_gradient_once_per_step(arch, loss_kwargs, accumulation, tmp_path):
    # loss_kwargs: the model normalises its loss over the whole accumulated batch (num_items_in_batch),
    # or the Trainer divides each micro-batch's loss by the accumulation steps; None: what the Trainer
    # reads from the model's forward (BERT's takes **kwargs from transformers 5, none in 4.x)
    base = build(arch)
    if loss_kwargs is not None:
        base.accepts_loss_kwargs = loss_kwargs
    dt.attach(base, dt.DiffPruningConfig(target_sparsity=0.05, l0_penalty=LAMBDA))
    with_penalty = _first_gradients(copy.deepcopy(base), arch, tmp_path, [dt.DeltaCallback(finalize=False)], accumulation)
    without = _first_gradients(copy.deepcopy(base), arch, tmp_path, [], accumulation)
    assert with_penalty.keys() == without.keys() and len(with_penalty) > 10
    # alpha is 5 everywhere at the first step: d/dalpha lambda sigmoid(alpha - log(-l/r)) = lambda s (1 - s), l = -r
    s = torch.sigmoid(torch.tensor(5.0))
    for name, grad in with_penalty.items():
        torch.testing.assert_close(grad - without[name], torch.full_like(grad, LAMBDA * s * (1 - s)), rtol=1e-4, atol=1e-9)


def test_a_trainer_run_ends_at_the_target_sparsity(tmp_path):
    model = build("gpt2")
    data = batch("gpt2")
    dt.attach(model, dt.DiffPruningConfig(target_sparsity=0.05, l0_penalty=1e-4))
    before = logits(model, data)
    loss_before = model(**data).loss.item()
    callback = dt.DeltaCallback()
    trainer = tf.Trainer(model=model, args=_args(tmp_path, max_steps=20, learning_rate=2e-2), train_dataset=_four_rows("gpt2"),
                         callbacks=[callback])
    trainer.train()
    model.eval()
    assert callback.handle is None and callback._hook not in model._forward_hooks.values()  # removed at train end
    layers = [m for m in model.modules() if isinstance(m, DiffPruningLayer)]
    kept = sum(int(m.diff_mask["default"].get_buffer(p).sum()) for m in layers for p in m.names)
    assert kept == kept_entries(model) == round(0.05 * sum(getattr(m.base_layer, p).numel() for m in layers for p in m.names))
    nonzero = sum(int((m.diff("default", p) != 0).sum()) for m in layers for p in m.names)
    assert 0 < nonzero <= kept
    assert model(**data).loss.item() < loss_before - 0.05  # still better than the base with 5% of the diff
    assert not torch.equal(logits(model, data), before)
    assert dt.regularization(model) == 0.0  # the mask is fixed: no penalty left


def test_the_hook_leaves_evaluation_and_other_methods_alone(tmp_path):
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2))
    twin = copy.deepcopy(model)
    for m, callbacks in ((model, [dt.DeltaCallback()]), (twin, [])):
        torch.manual_seed(0)
        tf.Trainer(model=m, args=_args(tmp_path, max_steps=3), train_dataset=_four_rows("llama"), callbacks=callbacks).train()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # no regularization: the same run exactly
    pruned = build("llama")
    dt.attach(pruned, dt.DiffPruningConfig(l0_penalty=1.0))
    callback = dt.DeltaCallback()
    callback.on_train_begin(_args(tmp_path), None, None, model=pruned)
    data = batch("llama")
    pruned.eval()
    plain = pruned(**data).loss
    pruned.train()
    with torch.no_grad():
        assert torch.equal(pruned(**data).loss, plain)  # no autograd: not a training step
    torch.testing.assert_close(pruned(**data).loss, plain + dt.regularization(pruned))
    callback.on_train_end(_args(tmp_path), None, None, model=pruned)
    assert callback._hook not in pruned._forward_hooks.values()


def test_label_smoothing_would_drop_the_penalty_and_is_refused(tmp_path):
    model = build("gpt2")
    dt.attach(model, dt.DiffPruningConfig())
    trainer = tf.Trainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1), train_dataset=_four_rows("gpt2"),
                         callbacks=[dt.DeltaCallback()])
    with pytest.raises(dt.DeltaError, match=r"label_smoothing_factor=0.1 .* the delta's regularization .* would be dropped"):
        trainer.train()
    with pytest.raises(dt.DeltaError, match=r"finalize=\.\.\.\) expects True or False"):
        dt.DeltaCallback(finalize="yes")
    with pytest.raises(dt.DeltaError, match="needs the model"):
        dt.DeltaCallback().on_train_begin(_args(tmp_path), None, None)


def test_a_users_own_loop_uses_the_same_three_calls():
    model = build("bert")
    data = batch("bert")
    dt.attach(model, dt.DiffPruningConfig(target_sparsity=0.1, l0_penalty=1e-5))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(10):
        loss = model(**data).loss + dt.regularization(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        dt.step(model, step + 1)
    dt.finalize(model)
    layers = [m for m in model.modules() if isinstance(m, DiffPruningLayer)]
    assert sum(int(m.diff_mask["default"].get_buffer(p).sum()) for m in layers for p in m.names) == kept_entries(model)


def test_adalora_allocates_its_budget_inside_the_trainer(tmp_path):
    """dt.step reads the gradients, so the callback must run it before the Trainer zeroes them."""
    model = build("llama")
    dt.attach(model, dt.AdaLoraConfig(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=2, alpha=12))
    args = _args(tmp_path, max_steps=12, learning_rate=1e-2)
    tf.Trainer(model=model, args=args, train_dataset=_four_rows("llama"), callbacks=[dt.DeltaCallback()]).train()
    kept = sum(sum(mask) for mask in dt.attached(model)["default"].rank_pattern.values())
    assert kept == 2 * len(dt.attached(model)["default"].rank_pattern)  # the target budget: target_r per module


# ---------------------------------------------------------------- trainable 16-bit weights


def _callback_warnings(model, tmp_path, lr=1e-5, callback=None) -> list[str]:
    import warnings

    callback = callback or dt.DeltaCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_train_begin(_args(tmp_path, learning_rate=lr), None, None, model=model)
    callback.on_train_end(_args(tmp_path), None, None, model=model)
    return [str(w.message) for w in caught if str(w.message).startswith("DeltaCallback")]


def test_a_bf16_model_whose_own_weights_train_is_warned_once_with_the_share_that_rounds_away(tmp_path):
    model = build("llama").to(torch.bfloat16)
    dt.attach(model, dt.FullConfig(originals="none"))
    weights = [p for p in model.parameters() if p.requires_grad]
    # by hand: the weights that an update of the learning rate's size leaves exactly where they were
    stuck = sum(int(((p.float() + 1e-5).to(torch.bfloat16) == p).sum()) for p in weights)
    total = sum(p.numel() for p in weights)
    callback = dt.DeltaCallback()
    said = _callback_warnings(model, tmp_path, callback=callback)
    assert len(said) == 1, said
    assert f"{total:,} of the {total:,} trainable parameters (100%) are bfloat16" in said[0]
    assert f"an update of the learning rate's size (1e-05) rounds away on {stuck / total:.0%} of them" in said[0]
    assert stuck / total > 0.5  # the tiny llama's weights are ~0.02: most updates of 1e-5 are lost
    assert "deltatune train" in said[0] and "torch_dtype=torch.float32" in said[0] and "bf16=True" in said[0]
    assert _callback_warnings(model, tmp_path, callback=callback) == []  # a second train() with the same callback


def test_fp32_weights_and_fp32_deltas_on_a_bf16_base_are_not_warned(tmp_path):
    full = build("llama")
    dt.attach(full, dt.FullConfig(originals="none"))
    lora = build("llama").to(torch.bfloat16)
    dt.attach(lora, dt.LoraConfig(r=2))  # the base is bf16 but frozen; LoRA's own parameters are fp32
    assert all(p.dtype == torch.float32 for p in lora.parameters() if p.requires_grad)
    assert _callback_warnings(full, tmp_path) == [] and _callback_warnings(lora, tmp_path) == []


def test_a_trainer_run_on_a_bf16_model_gets_the_warning(tmp_path):
    model = build("llama").to(torch.bfloat16)
    dt.attach(model, dt.FreezeConfig(trainable_layers=1))
    with pytest.warns(UserWarning, match=r"DeltaCallback: [\d,]+ of the [\d,]+ trainable parameters \(100%\) are bfloat16"):
        tf.Trainer(model=model, args=_args(tmp_path, max_steps=1, learning_rate=1e-5), train_dataset=_four_rows("llama"),
                   callbacks=[dt.DeltaCallback()]).train()
