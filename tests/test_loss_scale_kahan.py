"""fp16 dynamic loss scaling (deltatune/loss_scale.py) and the lean kahan mode (train.master_weights: kahan)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
import deltatune.loss_scale as loss_scale
from deltatune.pipeline.train import run
from test_master_weights import METHODS, _config, _drop, _full, _moved, _one_step
from tiny_models import batch


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lean")


def _log(result) -> list[dict]:
    return [json.loads(line) for line in (result.output_dir / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the scaler alone


def test_the_scaler_halves_on_overflow_grows_after_clean_steps_and_round_trips(monkeypatch):
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 3)
    scaler = dt.LossScaler()
    assert scaler.scale_value == 2.0 ** 16 and scaler.scale(torch.tensor(2.0)) == 2.0 ** 17
    grads = [torch.full((3,), 2.0 ** 15, dtype=torch.float16)]
    assert scaler.unscale_(grads) and torch.equal(grads[0], torch.full((3,), 0.5, dtype=torch.float16))
    scaler.update()
    assert not scaler.unscale_([torch.tensor([float("inf"), 1.0])])
    scaler.update()
    assert scaler.scale_value == 2.0 ** 15 and scaler.clean == 0 and scaler.skipped == 1
    for _ in range(3):
        scaler.update(True)
    assert scaler.scale_value == 2.0 ** 16 and scaler.clean == 0
    scaler.update(True)
    again = dt.LossScaler()
    again.load_state_dict(json.loads(json.dumps(scaler.state_dict())))
    assert again.state_dict() == {"scale": 2.0 ** 16, "clean": 1}
    off = dt.LossScaler(enabled=False)
    assert off.scale(torch.tensor(3.0)) == 3.0 and off.unscale_([torch.tensor([float("nan")])])
    with pytest.raises(dt.DeltaError, match="needs unscale_"):
        dt.LossScaler().update()


def test_a_scale_that_keeps_overflowing_stops_with_the_fix(monkeypatch):
    monkeypatch.setattr(loss_scale, "MIN_SCALE", 2.0 ** 15)
    scaler = dt.LossScaler()
    scaler.update(False)
    with pytest.raises(dt.DeltaError, match="NaN or inf at any scale.*model.dtype: bf16"):
        scaler.update(False)


def test_small_fp16_gradients_survive_with_the_scale_and_flush_without_it():
    def grad(scaler: dt.LossScaler | None) -> torch.Tensor:
        z = torch.full((4,), 1e-4, dtype=torch.float16, requires_grad=True)
        loss = (z.float() * 1e-8).sum()  # an fp32 loss as the pipeline's; dL/dz = 1e-8 < fp16's smallest subnormal
        (scaler.scale(loss) if scaler else loss).backward()
        return z.grad.float()

    assert (grad(None) == 0).all()
    scaler = dt.LossScaler()
    g = grad(scaler)
    assert scaler.unscale_([g]) and torch.allclose(g, torch.full_like(g, 1e-8), rtol=1e-2)


# ---------------------------------------------------------------- fp16 through the pipeline


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_fp16_run_learns_as_much_as_an_fp32_run(root, method):
    flags = {"method": method, "train.lr": 3e-5, "train.max_steps": 8, **METHODS[method]}
    fp32 = _drop(root, f"{method}-fp32", **{**flags, "model.dtype": "fp32"})
    said: list[str] = []
    fp16 = _drop(root, f"{method}-fp16", said, **{**flags, "model.dtype": "fp16"})
    assert fp32 > 0.005 and fp16 >= 0.9 * fp32, (method, fp16, fp32)
    assert any("dynamic loss scaling" in line for line in said)
    if method == "full":  # the lean mode under loss scaling too (its 16-bit gradients are unscaled in place)
        kahan = _drop(root, f"{method}-fp16-kahan", **{**flags, "model.dtype": "fp16", "train.master_weights": "kahan"})
        assert kahan >= 0.9 * fp32, (kahan, fp32)


def test_an_overflow_is_skipped_halves_the_scale_and_the_loss_check_does_not_fire(root, monkeypatch):
    monkeypatch.setattr(loss_scale, "INIT_SCALE", 2.0 ** 40)  # every fp16 gradient overflows at first
    flags = {"method": "full", "model.dtype": "fp16", "train.lr": 3e-5, "train.max_steps": 40}  # on_nan: stop
    result = run(_config(root, "overflow", **flags), echo=lambda *a, **k: None)
    rows = _log(result)
    skipped = [r for r in rows if r.get("skipped")]
    assert result.summary["skipped_steps"] == len(skipped) > 0
    assert [r["loss_scale"] for r in skipped] == [2.0 ** (39 - i) for i in range(len(skipped))]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert not rows[-1].get("skipped")  # it found a scale that does not overflow, and trained on


def test_a_resumed_fp16_run_keeps_its_scale_and_is_bit_equal(root, monkeypatch):
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 2)  # the scale changes across the resume
    flags = {"method": "full", "model.dtype": "fp16", "train.lr": 3e-5, "train.batch_size": 2, "train.save_every": 1}
    whole = run(_config(root, "fp16-whole", **flags, **{"train.max_steps": 6}), echo=lambda *a, **k: None)
    run(_config(root, "fp16-resumed", **flags, **{"train.max_steps": 3}), echo=lambda *a, **k: None)
    resumed = run(_config(root, "fp16-resumed", **flags, **{"train.max_steps": 6, "train.resume": True}),
                  echo=lambda *a, **k: None)
    states = [json.loads((r.output_dir / "checkpoints" / "step-000006" / "trainer_state.json").read_text())["loss_scale"]
              for r in (whole, resumed)]
    assert states[0] == states[1] and states[0]["scale"] > 2.0 ** 16  # it grew (after an overflow or not)
    for name in ("master.safetensors", "optimizer.safetensors"):
        a = load_file(str(whole.output_dir / "checkpoints" / "step-000006" / name))
        b = load_file(str(resumed.output_dir / "checkpoints" / "step-000006" / name))
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a), name


# ---------------------------------------------------------------- kahan


def _kahan_step(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dt.MasterWeights]:
    model = _full(dtype)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().float().clone() for n, p in named.items()}
    master = dt.MasterWeights(model, "kahan")
    optimizer = torch.optim.AdamW(master.param_groups(model.parameters()), lr=1e-5)
    model(**batch("llama")).loss.backward()
    master.step(optimizer)
    comps = {master.names[k]: c for k, c in master.comps.items()}
    return start, {n: p.detach().float() + comps[n].float() for n, p in named.items()}, master


def test_one_kahan_bf16_step_moves_what_an_fp32_step_moves_without_an_fp32_copy():
    fp32 = _moved(*_one_step(torch.float32, "fp32"))
    start, after, master = _kahan_step(torch.bfloat16)
    kahan = _moved(start, after)
    assert (kahan & fp32).sum() >= 0.99 * fp32.sum()
    assert not master.masters and len(master) == len(master.comps) > 0
    assert all(c.dtype == torch.bfloat16 for c in master.comps.values())
    assert all(s.numel() == 0 for s in master.shadows.values())  # the fp32 stand-ins are gone after the step
    assert all(p.grad is None for p in master.params.values())
    # the weight plus its compensation is the fp32 update to within the compensation's own rounding
    ref = _one_step(torch.bfloat16, "fp32")[1]
    error = max(float((after[n] - ref[n]).abs().max()) for n in ref)
    assert error < 1e-7, error


def test_kahan_accumulates_updates_a_pure_16_bit_step_rounds_away():
    model = _full(torch.bfloat16)
    master = dt.MasterWeights(model, "kahan")
    weight = model.model.layers[0].mlp.down_proj.weight
    start = weight.detach().float().clone()
    optimizer = torch.optim.SGD(master.param_groups([weight]), lr=1.0)
    for _ in range(64):  # 64 updates of 1e-6 each, far under half a bf16 spacing of ~0.02
        weight.grad = torch.full_like(weight, -1e-6)
        master.step(optimizer)
    total = (weight.detach().float() + master.comps[id(weight)].float() - start)
    assert torch.allclose(total, torch.full_like(total, 64e-6), rtol=0.05)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_kahan_bf16_run_learns_as_much_as_an_fp32_run(root, method):
    flags = {"method": method, "train.lr": 3e-5, "train.max_steps": 8, **METHODS[method]}
    fp32 = _drop(root, f"{method}-fp32-ref", **{**flags, "model.dtype": "fp32"})
    said: list[str] = []
    kahan = _drop(root, f"{method}-kahan", said, **{**flags, "model.dtype": "bf16", "train.master_weights": "kahan"})
    assert kahan >= 0.9 * fp32, (method, kahan, fp32)
    assert any("Kahan-compensated" in line for line in said)


def test_a_resumed_kahan_run_equals_one_never_interrupted(root):
    flags = {"method": "full", "model.dtype": "bf16", "train.master_weights": "kahan", "train.lr": 3e-5,
             "train.batch_size": 2, "train.grad_accum": 2, "train.max_grad_norm": 0.5, "train.save_every": 1}
    whole = run(_config(root, "k-whole", **flags, **{"train.max_steps": 6}), echo=lambda *a, **k: None)
    run(_config(root, "k-resumed", **flags, **{"train.max_steps": 3}), echo=lambda *a, **k: None)
    resumed = run(_config(root, "k-resumed", **flags, **{"train.max_steps": 6, "train.resume": True}),
                  echo=lambda *a, **k: None)
    for name in ("master.safetensors", "optimizer.safetensors", "delta.safetensors"):
        a = load_file(str(whole.output_dir / "checkpoints" / "step-000006" / name))
        b = load_file(str(resumed.output_dir / "checkpoints" / "step-000006" / name))
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a), name
    comps = load_file(str(whole.output_dir / "checkpoints" / "step-000006" / "master.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in comps.values()) and any(t.abs().sum() > 0 for t in comps.values())


def test_a_checkpoint_of_another_mode_is_named():
    model = _full(torch.bfloat16)
    fp32 = dt.MasterWeights(model).state_dict()
    kahan = dt.MasterWeights(_full(torch.bfloat16), "kahan")
    with pytest.raises(dt.DeltaError, match="compensation buffers .* is torch.float32 .* model.dtype"):
        kahan.load_state_dict(fp32)


# ---------------------------------------------------------------- the planner


def test_the_planner_counts_kahan_buffers_and_compares_the_modes():
    import transformers as tf

    from deltatune.planner import compare_master_modes

    config = tf.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    kw = dict(batch=2, seq=16, dtype="bf16", device="cpu", optimizer="adamw", search=False)
    fp32, kahan = dt.plan(config, "full", **kw), dt.plan(config, "full", master_weights="kahan", **kw)
    # the real thing: the compensation buffers and AdamW's fp32 states after one kahan step
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    dt.attach(model, dt.FullConfig(originals="none"))
    master = dt.MasterWeights(model, "kahan")
    optimizer = torch.optim.AdamW(master.param_groups(model.parameters()))
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    master.step(optimizer)
    real_comps = sum(c.numel() * c.element_size() for c in master.comps.values())
    real_states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert kahan.master_weights == real_comps == 2 * kahan.trainable
    assert kahan.optimizer_states == real_states == 8 * kahan.trainable
    assert kahan.total < fp32.total and "Kahan compensation" in kahan.table()
    assert any("master weights kahan" in n for n in kahan.notes)
    table = compare_master_modes(config, "full", batch=2, seq=16, device="cpu")
    per = {line.split()[2]: float(line.split()[3]) for line in table.splitlines() if "master_weights" in line}
    assert per == {"fp32": 18.0, "kahan": 14.0, "none": 8.0}
    assert "more than 780 GB" in table


def test_deltatune_plan_full_prints_the_modes_side_by_side(tmp_path, capsys):
    import transformers as tf

    from deltatune.cli import main

    tf.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2).save_pretrained(tmp_path)
    main(["plan", "--model", str(tmp_path / "config.json"), "--method", "full", "--dtype", "bf16", "--device", "cpu",
          "--batch", "1", "--seq", "16"])
    out = capsys.readouterr().out
    assert "bf16, master_weights kahan" in out and "14.0" in out and "more than 780 GB" in out


@pytest.mark.parametrize("mode", ["fp32", "kahan", "none"])
def test_deltatune_plan_master_weights_plans_that_mode_and_says_so(tmp_path, capsys, mode):
    import transformers as tf

    from deltatune.cli import main

    config = tf.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path)
    argv = ["plan", "--model", str(tmp_path / "config.json"), "--method", "full", "--dtype", "bf16", "--device", "cpu",
            "--batch", "1", "--seq", "16"]
    assert main(argv + (["--master-weights", mode] if mode != "fp32" else [])) == 0  # fp32: the default, as train's
    out = capsys.readouterr().out
    want = dt.plan(str(tmp_path / "config.json"), "full", batch=1, seq=16, dtype="bf16", device="cpu", loss="fused",
                   master_weights=mode)
    assert out.startswith(want.table()), out  # the plan printed is the planner's plan for that mode
    assert f"cpu, master_weights {mode}\n" in out and f"note: master weights {mode}:" in out
    marked = [line for line in out.splitlines() if "<- the plan above" in line]
    assert len(marked) == 1 and f"bf16, master_weights {mode} " in marked[0], marked
    totals = {m: dt.plan(config, "full", batch=1, seq=16, dtype="bf16", device="cpu", search=False,
                         master_weights=m).total for m in ("fp32", "kahan", "none")}
    assert totals["fp32"] > totals["kahan"] > totals["none"]  # so the flag changed what was planned


def test_deltatune_plan_master_weights_on_fp32_parameters_says_it_changes_nothing(tmp_path, capsys):
    import transformers as tf

    from deltatune.cli import main

    tf.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2).save_pretrained(tmp_path)
    argv = ["plan", "--model", str(tmp_path), "--method", "lora", "--r", "2", "--dtype", "bf16", "--device", "cpu",
            "--batch", "1", "--seq", "16"]
    assert main(argv + ["--master-weights", "kahan"]) == 0
    out = capsys.readouterr().out
    assert "--master-weights kahan changes nothing here: no trainable parameter is 16-bit (lora on a bf16 base" in out
    assert "master_weights" not in out and "<- the plan above" not in out  # no mode line, no comparison
    with pytest.raises(SystemExit):
        main(argv + ["--master-weights", "bf16"])
    assert "invalid choice: 'bf16' (choose from" in capsys.readouterr().err
