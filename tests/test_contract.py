"""The contract every method keeps on every architecture.

A new method joins by adding one line to METHODS below.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import deltatune as dt
from deltatune.surgery import DeltaLayer
from test_lora import perturb
from tiny_models import ARCHS, batch, build, logits


@dataclass(frozen=True)
class M:
    """A method under test: how to configure it and what its init promises."""

    name: str
    make: Callable[[], dt.DeltaConfig]
    identity_at_attach: bool = True
    mergeable: bool = True
    needs_bias: bool = False
    lr: float = 2e-2  # prompt tuning wants a larger one, as in the paper
    rewrites_base: bool = False  # PiSSA/OLoRA: the rewritten base reaches every row, so no mixed batches
    attach_atol: float = 1e-6  # PiSSA/OLoRA: (W0 - s B A) + s B A equals W0 only to float rounding
    prepare: Callable[[torch.nn.Module], None] | None = None  # what must be attached first (the adapters a fusion fuses)

    def __repr__(self) -> str:
        return self.name


def two_adapters(model: torch.nn.Module) -> None:
    """Two Pfeiffer adapters "fa" and "fb" with non-zero weights, the same on every call, for AdapterFusion."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        for seed, name in enumerate(("fa", "fb")):
            dt.attach(model, dt.AdapterConfig(placement="pfeiffer", bottleneck_size=4), name=name)
            perturb(model, seed=10 + seed, scale=0.3)


def fresh(arch: str, method: M) -> torch.nn.Module:
    """A tiny model with what the method needs attached first."""
    model = build(arch)
    if method.prepare is not None:
        method.prepare(model)
    return model


METHODS = [
    M("lora", lambda: dt.LoraConfig(r=4, alpha=8)),
    M("rslora", lambda: dt.LoraConfig(r=4, alpha=8, use_rslora=True, init="gaussian")),
    M("dora", lambda: dt.LoraConfig(r=4, alpha=8, use_dora=True)),
    M("lora_all_linear", lambda: dt.LoraConfig(r=2, alpha=4, target_modules="all-linear")),
    M("pissa", lambda: dt.LoraConfig(r=4, alpha=8, init="pissa"), rewrites_base=True, attach_atol=1e-5),
    M("olora", lambda: dt.LoraConfig(r=4, alpha=8, init="olora"), rewrites_base=True, attach_atol=1e-5),
    # s = alpha / init_r = 2, LoRA's scale above: at alpha=32 (s = 5.3) Adam overshoots once roberta's two rows are
    # fit (loss 0.02 -> 1.8 at the last step, peft's AdaLoRA step for step the same); no dt.step here, so no pruning
    M("adalora", lambda: dt.AdaLoraConfig(init_r=6, target_r=4, alpha=12, total_step=12)),
    M("ia3", lambda: dt.IA3Config(), lr=0.2),  # scales of tiny random activations: the loss moves slowly
    M("vera", lambda: dt.VeraConfig(r=8), lr=5e-2),  # shared random A, B: only two vectors train
    # paired reflections cancel to rounding; all-linear: rotating only bloom's fused qkv input barely moves the loss
    M("hra", lambda: dt.HRAConfig(r=4, target_modules="all-linear"), lr=5e-2, attach_atol=1e-5),
    M("loha", lambda: dt.LoHaConfig(r=4, alpha=8)),
    M("lokr", lambda: dt.LoKrConfig(r=4, alpha=8)),
    M("lokr_low_rank", lambda: dt.LoKrConfig(r=1, alpha=16, decompose_both=True)),  # W1 and W2 both low-rank
    M("prompt_tuning", lambda: dt.PromptTuningConfig(num_virtual_tokens=3, init="sample_vocab"), identity_at_attach=False, mergeable=False, lr=0.1),
    M("bitfit", lambda: dt.BitFitConfig(), needs_bias=True),
    M("freeze", lambda: dt.FreezeConfig(trainable_layers=1, trainable_modules=r"(?i).*(norm|\.ln_\w+)", train_head=False)),
    M("full", lambda: dt.FullConfig(), lr=1e-3),
    M("diff_pruning", lambda: dt.DiffPruningConfig(target_sparsity=0.05)),
    M("adapter_houlsby", lambda: dt.AdapterConfig(placement="houlsby", reduction_factor=8), mergeable=False),
    M("adapter_pfeiffer", lambda: dt.AdapterConfig(placement="pfeiffer", bottleneck_size=4, nonlinearity="gelu"), mergeable=False),
    M("adapter_parallel", lambda: dt.AdapterConfig(placement="parallel", bottleneck_size=4, scaling=4.0, nonlinearity="swish"), mergeable=False),
    M("adapter_fusion", lambda: dt.AdapterFusionConfig(adapters=["fa", "fb"]), identity_at_attach=False, mergeable=False, prepare=two_adapters),
    M("prompt_ensemble", lambda: dt.PromptTuningConfig(num_virtual_tokens=3, num_prompts=2, init="sample_vocab"), identity_at_attach=False, mergeable=False, lr=0.1),
    M("p_tuning", lambda: dt.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16), identity_at_attach=False, mergeable=False),
    M("p_tuning_lstm", lambda: dt.PTuningConfig(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8), identity_at_attach=False, mergeable=False),
    M("prefix_tuning", lambda: dt.PrefixTuningConfig(num_virtual_tokens=3, projection_hidden_size=16), identity_at_attach=False, mergeable=False),
    M("p_tuning_v2", lambda: dt.PTuningV2Config(num_virtual_tokens=3), identity_at_attach=False, mergeable=False, lr=0.1),
    M("ln_tuning", lambda: dt.LNTuningConfig(), lr=0.1),  # norm scales start at 1: a step of 2e-2 barely moves them
    M("fourierft", lambda: dt.FourierFTConfig(n_frequency=24, init_weights=True), lr=0.1),  # an entry moves ΔW by s/(out·in)
]

CASES = [
    pytest.param(arch, m, id=f"{arch}-{m.name}")
    for arch in ARCHS
    for m in METHODS
    if ARCHS[arch].has_bias or not m.needs_bias
]


def train(model, data, steps=12, lr=1e-2, method_steps=False):
    """Adam on one batch; the losses before each step. method_steps: also dt.step after each (AdaLoRA's budget)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = model(**data).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        if method_steps:
            dt.step(model, step)  # before zero_grad: AdaLoRA scores importance from the gradients
        opt.zero_grad()
    return losses


@functools.lru_cache(maxsize=None)
def _trained(arch: str, method: M):
    base = build(arch)
    model = copy.deepcopy(base)
    if method.prepare is not None:
        method.prepare(model)
    dt.attach(model, method.make())
    losses = train(model, batch(arch), lr=method.lr)
    return base, model, losses


def trained(arch, method):
    """(pristine base, trained model with the delta attached); fresh copies for each test."""
    base, model, losses = _trained(arch, method)
    return copy.deepcopy(base), copy.deepcopy(model), losses


@pytest.mark.parametrize("arch,method", CASES)
def test_outputs_unchanged_at_attach(arch, method):
    base = fresh(arch, method)
    data = batch(arch)
    before = logits(base, data)
    dt.attach(base, method.make())
    after = logits(base, data)
    if method.identity_at_attach:
        torch.testing.assert_close(after, before, rtol=0, atol=method.attach_atol)
    else:
        assert after.shape != before.shape or not torch.allclose(after, before)


@pytest.mark.parametrize("arch,method", CASES)
def test_only_delta_parameters_train(arch, method):
    model = fresh(arch, method)
    dt.attach(model, method.make())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(dt.delta_parameters(model, "default"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, batch(arch), steps=2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


@pytest.mark.parametrize("arch,method", CASES)
def test_loss_falls(arch, method):
    _, _, losses = trained(arch, method)
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.mark.parametrize("arch,method", CASES)
def test_save_load_round_trip(arch, method, tmp_path):
    base, model, _ = trained(arch, method)
    data = batch(arch)
    dt.save(model, tmp_path)
    if method.prepare is not None:
        method.prepare(base)
    dt.load(base, tmp_path)
    torch.testing.assert_close(logits(base, data), logits(model, data), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch,method", CASES)
def test_merge_equals_unmerged(arch, method):
    _, model, _ = trained(arch, method)
    data = batch(arch)
    unmerged = logits(model, data)
    if not method.mergeable:
        with pytest.raises(dt.DeltaError, match="cannot be merged"):
            dt.merge(model)
        return
    dt.merge(model)
    dt.merge(model)  # idempotent
    assert not any(layer.live for _, layer in model.named_modules() if isinstance(layer, DeltaLayer) and layer.merged)
    torch.testing.assert_close(logits(model, data), unmerged, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)
    torch.testing.assert_close(logits(model, data), unmerged, rtol=1e-5, atol=1e-5)
    dt.detach(model, merge=True)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    torch.testing.assert_close(logits(model, data), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,method", CASES)
def test_disabled_runs_the_base(arch, method):
    base, model, _ = trained(arch, method)
    data = batch(arch)
    with_delta = logits(model, data)
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, data), logits(base, data), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, data), with_delta, rtol=0, atol=0)


@pytest.mark.parametrize("arch,method", CASES)
def test_detach_restores_the_original_bit_for_bit(arch, method):
    base, model, _ = trained(arch, method)
    dt.detach(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    got, want = model.state_dict(), base.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert all(p.requires_grad for p in model.parameters())
    assert not model._forward_pre_hooks and not model._forward_hooks
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    assert hooks == [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in base.modules()]
    assert not any("_deltatune_state" in m.__dict__ for m in model.modules())
    assert "save_pretrained" not in model.__dict__


@pytest.mark.parametrize("arch,method", CASES)
def test_mixed_batch_rows_get_exactly_their_own_delta(arch, method):
    model = build(arch)
    data = batch(arch)
    base = logits(model, data)
    if method.prepare is not None:
        method.prepare(model)
    dt.attach(model, method.make(), name="a")
    perturb(model, seed=1)
    if not dt.METHODS[method.make().method].per_row or method.rewrites_base:  # whole-batch: refused, never mixed
        with pytest.raises(dt.DeltaError, match="cannot be applied per row"):
            model(**data, adapter_names=["a", "__base__"])
        return
    out_a = logits(model, data)
    dt.attach(model, method.make(), name="b")
    perturb(model, seed=2)
    out_b = logits(model, data)
    with torch.no_grad():
        mixed = model(**data, adapter_names=["b", "a"]).logits
        with_base = model(**data, adapter_names=["__base__", "a"]).logits
    torch.testing.assert_close(mixed[0], out_b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], out_a[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(with_base[0], base[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(with_base[1], out_a[1], rtol=0, atol=1e-5)
