"""Every registered method, on a decoder, an encoder and an encoder-decoder, decodes and learns.

A transformers release that changes how generate() hands the model its cache (5.24 renamed
past_key_values to cache) breaks the methods that live in the cache or the inputs without any
error: generate() then silently returns what the base model would. So for every method in the
registry (deltatune.config.METHODS, so a new method is covered without a new line here):

* (a) on the models that generate (llama, t5), with the delta trained a few steps so that it
  changes the output: greedy decoding with the KV cache gives the same tokens as decoding without
  it, and not the tokens the base model gives;
* (b) on llama, bert (sequence classification) and t5: a few optimizer steps on one fixed batch
  lower the loss.
"""

from __future__ import annotations

import functools

import pytest
import torch

import deltatune as dt
from deltatune.config import METHODS
from test_contract import train as contract_train, two_adapters
from tiny_models import batch, build

ARCHS = ("llama", "bert", "t5")
GENERATES = ("llama", "t5")

# Only what differs from a config's defaults: sizes that fit the tiny models, and what a method needs
# that has no default. A method not listed runs with its config's defaults.
SMALL = {
    "lora": dict(r=4, alpha=8),
    "adalora": dict(init_r=6, target_r=4, alpha=12, total_step=12),
    "bottleneck_adapter": dict(bottleneck_size=4),
    "adapter_fusion": dict(adapters=["fa", "fb"]),
    "loha": dict(r=4, alpha=8),
    "lokr": dict(r=4, alpha=8),
    "fourierft": dict(n_frequency=64),  # the default 1000 exceeds the tiny llama's 16 x 32 v_proj spectrum
    "prompt_tuning": dict(num_virtual_tokens=3, init="sample_vocab"),
    "p_tuning": dict(num_virtual_tokens=3, encoder_hidden_size=16),
    "prefix_tuning": dict(num_virtual_tokens=3, projection_hidden_size=16),
    "p_tuning_v2": dict(num_virtual_tokens=3),
}
PREPARE = {"adapter_fusion": two_adapters}  # what must be attached first (the adapters a fusion fuses)
LR = {"ia3": 0.2, "full": 1e-3, "prompt_tuning": 0.1, "p_tuning_v2": 0.1}
# Methods that cannot attach to an architecture, and why (checked: attaching them raises DeltaError).
CANNOT = {
    ("bitfit", "llama"): "llama has no biases for BitFit to train",
    ("bitfit", "t5"): "t5 has no biases for BitFit to train",
}
STEPS = 4
CASES = [pytest.param(m, a, id=f"{a}-{m}") for m in sorted(METHODS) for a in ARCHS]


def make(method: str) -> dt.DeltaConfig:
    return METHODS[method].config_cls(**SMALL.get(method, {}))


def attached(method: str, arch: str) -> torch.nn.Module:
    if (method, arch) in CANNOT:
        with pytest.raises(dt.DeltaError):
            dt.attach(build(arch), make(method))
        pytest.skip(CANNOT[method, arch])
    model = build(arch)
    if method in PREPARE:
        PREPARE[method](model)
    return dt.attach(model, make(method))


def train(model: torch.nn.Module, data: dict, lr: float) -> list[float]:
    """The losses before each of STEPS steps, then after the last."""
    losses = contract_train(model, data, steps=STEPS, lr=lr, method_steps=True)
    with torch.no_grad():
        return losses + [model(**data).loss.item()]


@functools.lru_cache(maxsize=None)
def _trained(method: str, arch: str) -> tuple[torch.nn.Module, list[float]]:
    model = attached(method, arch)
    return model, train(model, batch(arch), LR.get(method, 2e-2))


def prompt_ids() -> torch.Tensor:
    return torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(3))


def greedy(model: torch.nn.Module, use_cache: bool) -> torch.Tensor:
    ids = prompt_ids()
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              num_beams=1, pad_token_id=0, use_cache=use_cache)


@pytest.mark.parametrize("method,arch", [c for c in CASES if c.values[1] in GENERATES])
def test_greedy_decoding_with_the_cache_equals_without_it(method, arch):
    model, _ = _trained(method, arch)
    model.eval()
    cached, uncached = greedy(model, True), greedy(model, False)
    assert torch.equal(cached, uncached), f"{method} on {arch}: the KV cache changes the greedy tokens"
    assert not torch.equal(cached, greedy(build(arch), True)), f"{method} on {arch}: the delta does not reach generate()"


@pytest.mark.parametrize("method,arch", CASES)
def test_a_few_steps_lower_the_loss(method, arch):
    _, losses = _trained(method, arch)
    assert losses[-1] < losses[0], f"{method} on {arch}: loss {losses}"
