"""The Stage seam: the loop trains whatever stage `stage_for` returns, and evaluation's loss is the fused one."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from deltatune.pipeline import stages
from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.data import prepare
from deltatune.pipeline import evaluate as evaluate_module
from deltatune.pipeline.evaluate import evaluate
from deltatune.pipeline.stages.sft import SFT
from deltatune.pipeline.train import load_base, load_tokenizer, run
from pipeline_models import save_tiny, write_jsonl

ROWS = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in ["alpha", "beta", "gamma", "delta"] * 4]


def _config(tmp_path, arch="llama", **flags):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    return load_run_config(None, {"model.name": str(save_tiny(tmp_path, arch)), "data.train": str(data),
                                  "data.format": "instruction", "model.task": "seq2seq" if arch == "t5" else "causal_lm",
                                  "method": "lora", "train.max_steps": 2, "train.batch_size": 4, "train.lr": 1e-2,
                                  "train.log_every": 1, "train.progress": False, **flags})


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_the_loop_trains_the_stage_it_is_given_and_names_none(tmp_path, monkeypatch):
    calls = {"collator": 0, "items": 0, "loss": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper

    # a stage of its own: SFT's pieces with the loss doubled; the loop gets it from stage_for alone
    doubled = dataclasses.replace(
        SFT, name="doubled", collator=counted("collator", SFT.collator), items=counted("items", SFT.items),
        loss=counted("loss", lambda forward, model, batch, config: 2 * SFT.loss(forward, model, batch, config)))
    sft = run(_config(tmp_path, **{"output.dir": str(tmp_path / "sft")}), echo=lambda *a, **k: None).output_dir
    monkeypatch.setattr(stages, "_stages", lambda: {"doubled": doubled})
    out = run(_config(tmp_path, **{"output.dir": str(tmp_path / "doubled")}), echo=lambda *a, **k: None).output_dir
    # the first step's loss is taken before any update: exactly twice SFT's
    assert _losses(out)[0] == pytest.approx(2 * _losses(sft)[0], rel=1e-6)
    assert calls["collator"] == 1 and calls["items"] == len(ROWS) and calls["loss"] == 2  # 2 steps of one micro-batch


def test_a_format_no_stage_takes_is_refused_with_the_reason(tmp_path, monkeypatch):
    config = _config(tmp_path, **{"output.dir": str(tmp_path / "out")})
    monkeypatch.setattr(stages, "_stages", lambda: {"narrow": dataclasses.replace(SFT, formats=frozenset({"text"}))})
    with pytest.raises(ConfigError, match="data.format = 'instruction'.*no training stage takes them yet"):
        run(config, echo=lambda *a, **k: None)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_evaluation_with_the_fused_loss_equals_the_standard_loss(tmp_path, arch, monkeypatch):
    import deltatune as dt

    config = _config(tmp_path, arch, **{"output.dir": str(tmp_path / "out"), "data.eval_fraction": 0.5})
    tokenizer = load_tokenizer(config)
    model = load_base(config, tokenizer)
    dt.attach(model, config.delta)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # LoRA's B starts at zero: make the delta change the loss
    prepared = prepare(config, tokenizer, None)
    assert prepared.eval
    calls: list[str] = []
    fused_loss = evaluate_module.lm_loss
    monkeypatch.setattr(evaluate_module, "lm_loss", lambda *a, **k: calls.append("fused") or fused_loss(*a, **k))
    fused = evaluate(model, prepared, config, tokenizer)
    assert calls  # the fused loss computed it, the full logits never held
    calls.clear()
    standard = evaluate(model, prepared, dataclasses.replace(config, train=dataclasses.replace(config.train, loss="standard")),
                        tokenizer)
    assert not calls
    assert fused["loss"] == pytest.approx(standard["loss"], rel=1e-5)
    assert fused["perplexity"] == pytest.approx(standard["perplexity"], rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # evaluation computed no gradient


def test_the_fused_loss_under_no_grad_computes_no_weight_gradient():
    from deltatune.losses import fused_linear_cross_entropy

    hidden = torch.randn(6, 8)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.randint(0, 11, (6,))
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        value = fused_linear_cross_entropy(hidden, weight, labels)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.detach().T, labels)
    assert not value.requires_grad and value.item() == pytest.approx(reference.item(), rel=1e-6)
    # only the logits' product (2 N H V); with gradients on, the weight's gradient product doubles it
    assert counted.get_total_flops() == 2 * 6 * 8 * 11
    with FlopCounterMode(display=False) as training:
        fused_linear_cross_entropy(hidden, weight, labels)
    assert training.get_total_flops() == 2 * counted.get_total_flops()
