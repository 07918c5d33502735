"""summary(): counts, percentage, per-module breakdown, printed table."""

from __future__ import annotations

import deltatune as dt
from tiny_models import build


def test_summary_counts_and_table(capsys):
    model = build("llama")
    assert dt.attach(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])) is model  # same object back
    stats = dt.summary(model)
    base_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert stats.trainable == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    assert stats.total == base_total + stats.trainable
    assert abs(stats.percent - 100 * stats.trainable / stats.total) < 1e-12
    assert stats.per_module == {
        "model.layers.*.self_attn.q_proj.lora_A.default": 2 * 4 * 32,
        "model.layers.*.self_attn.q_proj.lora_B.default": 2 * 32 * 4,
        "model.layers.*.self_attn.v_proj.lora_A.default": 2 * 4 * 32,
        "model.layers.*.self_attn.v_proj.lora_B.default": 2 * 16 * 4,
    }
    printed = capsys.readouterr().out
    assert f"trainable {stats.trainable:,} of {stats.total:,} parameters" in printed
    assert "model.layers.*.self_attn.v_proj.lora_B.default" in printed
    assert str(stats) == printed.rstrip("\n")
