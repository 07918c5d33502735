"""fp32 master weights for trainable 16-bit parameters (deltatune/master.py, train.master_weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.pipeline.config import load_run_config
from deltatune.pipeline.train import run
from pipeline_models import save_tiny, write_jsonl
from test_pipeline_train import instruction_rows
from tiny_models import batch, build


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("master")


# ---------------------------------------------------------------- the module, in a plain loop


def _full(dtype: torch.dtype) -> torch.nn.Module:
    model = build("llama").to(dtype)
    dt.attach(model, dt.FullConfig(originals="none"))
    return model


def _one_step(dtype: torch.dtype, mode: str, recwarn=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(start, after) of every trained weight, after one AdamW step at lr 1e-5; `after` is what the optimizer
    holds: the fp32 master where there is one."""
    model = _full(dtype)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().float().clone() for n, p in named.items()}
    master = dt.MasterWeights(model, mode)
    optimizer = torch.optim.AdamW(master.param_groups(model.parameters()), lr=1e-5)
    model(**batch("llama")).loss.backward()
    master.step(optimizer)
    masters = {master.names[k]: m for k, m in master.masters.items()}
    return start, {n: masters.get(n, p).detach().float() for n, p in named.items()}


def _moved(start, after) -> torch.Tensor:
    return torch.cat([(after[n] != start[n]).reshape(-1) for n in start])


def test_one_bf16_step_at_a_small_lr_moves_what_an_fp32_step_moves():
    fp32 = _moved(*_one_step(torch.float32, "fp32"))
    master = _moved(*_one_step(torch.bfloat16, "fp32"))
    assert fp32.float().mean() > 0.95  # AdamW moves every weight with a gradient
    assert (master & fp32).sum() >= 0.99 * fp32.sum()
    with pytest.warns(UserWarning, match=r"master weights 'none': in the first step \d+% of the bfloat16 weights"):
        pure = _moved(*_one_step(torch.bfloat16, "none"))
    assert pure.sum() < 0.5 * fp32.sum()  # most updates are under half a bf16 spacing and round away


def test_the_forward_weights_are_the_masters_rounded_and_a_16_bit_model_stays_16_bit():
    model = _full(torch.bfloat16)
    master = dt.MasterWeights(model)
    optimizer = torch.optim.AdamW(master.param_groups(model.parameters()), lr=1e-3)
    for _ in range(2):
        model(**batch("llama")).loss.backward()
        master.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    for key, m in master.masters.items():
        p = master.params[key]
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32 and p.grad is None
        assert torch.equal(p, m.to(torch.bfloat16))
    state = optimizer.state_dict()["state"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())


def test_gradients_accumulate_in_fp32_clip_on_the_masters_and_a_skipped_step_drops_them():
    model = _full(torch.bfloat16)
    master = dt.MasterWeights(model)
    weight = model.model.layers[0].mlp.down_proj.weight
    grads = []
    for seed in (1, 2):
        model(**batch("llama", seed=seed)).loss.backward()  # the hook moves the bf16 gradient into the master
        assert weight.grad is None
        grads.append(master.masters[id(weight)].grad.clone())
    probe = _full(torch.bfloat16)  # the same two bf16 gradients, summed in fp32 by hand
    want = torch.zeros_like(grads[0])
    for seed in (1, 2):
        probe(**batch("llama", seed=seed)).loss.backward()
        want += probe.model.layers[0].mlp.down_proj.weight.grad.float()
        probe.zero_grad(set_to_none=True)
    assert torch.equal(grads[1], want)
    norm = master.clip_grad_norm_(1e-3)
    assert norm > 1e-3
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m.grad) for m in master.masters.values()]))
    assert total == pytest.approx(1e-3, rel=1e-3)
    master.zero_grad()
    assert all(m.grad is None for m in master.masters.values())


def test_without_hooks_the_gradients_are_collected_at_the_step():
    model = _full(torch.bfloat16)
    master = dt.MasterWeights(model, hooks=False)  # DDP's way: reduced first, moved over after the last micro-batch
    weight = model.model.layers[0].mlp.down_proj.weight
    model(**batch("llama")).loss.backward()
    assert weight.grad is not None and master.masters[id(weight)].grad is None
    master.collect()
    assert weight.grad is None and master.masters[id(weight)].grad.dtype == torch.float32


def test_fp32_parameters_get_no_master_and_a_bad_mode_is_named():
    model = build("llama")
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(dt.MasterWeights(model.to(torch.bfloat16).float())) == 0
    with pytest.raises(dt.DeltaError, match="'fp64' is not one deltatune knows; choose one of fp32, none"):
        dt.MasterWeights(model, "fp64")
    with pytest.raises(dt.DeltaError, match="train.master_weights = 'bf16' is not allowed: expected one of 'fp32', 'none'"):
        load_run_config(None, {"model.name": "m", "data.train": "d.jsonl", "train.master_weights": "bf16"})


# ---------------------------------------------------------------- through the pipeline


def _config(root: Path, out: str, **flags):
    data = write_jsonl(root / "instructions.jsonl", instruction_rows())
    base = {"model.name": str(save_tiny(root, flags.pop("arch", "llama"))), "data.train": str(data),
            "data.format": "instruction", "data.eval_fraction": 0.0, "train.batch_size": 48, "train.log_every": 1,
            "train.scheduler": "constant", "train.progress": False, "output.dir": str(root / out)}
    return load_run_config(None, {**base, **flags})


def _drop(root: Path, out: str, said: list[str] | None = None, **flags) -> float:
    """First loss minus last: every step sees the whole training set (batch 48 of 48 rows), so it is not noise."""
    result = run(_config(root, out, **flags), echo=(said.append if said is not None else lambda *a, **k: None))
    losses = [r["loss"] for r in map(json.loads, (result.output_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]
    return losses[0] - losses[-1]


# lr 3e-5 for 8 steps: fp32 learns clearly; a pure bf16 update loses most of it (the tiny llama's weights are
# ~0.02, half a bf16 spacing ~8e-5 > lr)
METHODS = {"full": {}, "freeze": {"freeze.trainable_layers": 1}, "bitfit": {"arch": "qwen2", "train.lr": 3e-3}}  # biases start at 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_bf16_run_learns_as_much_as_an_fp32_run(root, method):
    flags = {"method": method, "train.lr": 3e-5, "train.max_steps": 8, **METHODS[method]}
    fp32 = _drop(root, f"{method}-fp32", **{**flags, "model.dtype": "fp32"})
    said: list[str] = []
    master = _drop(root, f"{method}-bf16", said, **{**flags, "model.dtype": "bf16"})
    assert fp32 > 0.005  # full batch, constant lr: the drop is the run's, not noise
    assert master >= 0.9 * fp32, (method, master, fp32)
    assert any("fp32 master weights for" in line for line in said)
    if method == "full":
        said = []
        pure = _drop(root, f"{method}-bf16-none", said, **{**flags, "model.dtype": "bf16", "train.master_weights": "none"})
        assert pure < 0.6 * fp32, (pure, fp32)
        assert any("master weights 'none': in the first step" in line for line in said)


def test_a_resumed_bf16_run_equals_one_never_interrupted_and_saves_bf16(root):
    flags = {"method": "full", "model.dtype": "bf16", "train.lr": 3e-5, "train.batch_size": 2, "train.grad_accum": 2,
             "train.max_grad_norm": 0.5, "train.save_every": 1}  # fp32 accumulation and clipping of the masters
    whole = run(_config(root, "whole", **flags, **{"train.max_steps": 6}), echo=lambda *a, **k: None)
    run(_config(root, "resumed", **flags, **{"train.max_steps": 3}), echo=lambda *a, **k: None)
    said: list[str] = []
    resumed = run(_config(root, "resumed", **flags, **{"train.max_steps": 6, "train.resume": True}), echo=said.append)
    assert any("resuming from" in line for line in said)
    for name in ("master.safetensors", "optimizer.safetensors"):
        a = load_file(str(whole.output_dir / "checkpoints" / "step-000006" / name))
        b = load_file(str(resumed.output_dir / "checkpoints" / "step-000006" / name))
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    masters = load_file(str(whole.output_dir / "checkpoints" / "step-000006" / "master.safetensors"))
    assert all(t.dtype == torch.float32 for t in masters.values())
    saved = {}
    for file in sorted(whole.adapter_dir.glob("*.safetensors")):
        saved.update(load_file(str(file)))
    again = {}
    for file in sorted(resumed.adapter_dir.glob("*.safetensors")):
        again.update(load_file(str(file)))
    assert saved.keys() == again.keys() and saved
    for key in saved:
        assert saved[key].dtype == torch.bfloat16 and torch.equal(saved[key], again[key]), key


# ---------------------------------------------------------------- the planner


def test_the_planner_counts_the_masters_and_their_fp32_states_and_says_which_mode():
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    kw = dict(batch=2, seq=16, dtype="bf16", device="cpu", optimizer="adamw", search=False)
    master = dt.plan(config, "full", **kw)
    pure = dt.plan(config, "full", master_weights="none", **kw)
    # the real thing: a bf16 model, its masters, AdamW's states over them after one step
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    dt.attach(model, dt.FullConfig(originals="none"))
    masters = dt.MasterWeights(model)
    optimizer = torch.optim.AdamW(masters.param_groups(model.parameters()))
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    masters.step(optimizer)
    real_masters = sum(m.numel() * 4 for m in masters.masters.values())
    real_states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert master.trainable_weights == pure.trainable_weights == 2 * master.trainable  # the bf16 weights themselves
    assert master.master_weights == real_masters == 4 * master.trainable and pure.master_weights == 0
    assert master.optimizer_states == real_states == 8 * master.trainable and pure.optimizer_states == 4 * master.trainable
    assert master.total > pure.total + 4 * master.trainable + 4 * master.trainable  # masters + moments + fp32 gradients
    assert "fp32 master weights" in master.table() and "fp32 master weights" not in pure.table()
    assert any("master weights fp32" in n for n in master.notes) and any("master weights none" in n for n in pure.notes)
    # an fp32 base, or a method whose parameters are fp32 (LoRA), has nothing to copy
    assert dt.plan(config, "full", **{**kw, "dtype": "fp32"}).master_weights == 0
    assert dt.plan(config, "lora", r=2, **kw).master_weights == 0


def test_continued_training_from_a_checkpoint_keeps_its_masters(root):
    # every step sees the whole set (batch 48 of 48) at a constant lr, so 2 steps + 1 continued step (moments kept)
    # is the 3-step run up to summation order, far closer than the bf16 rounding of the masters would be
    flags = {"method": "full", "model.dtype": "bf16", "train.lr": 3e-5}
    whole = run(_config(root, "three", **flags, **{"train.max_steps": 3}), echo=lambda *a, **k: None)
    first = run(_config(root, "first", **flags, **{"train.max_steps": 2}), echo=lambda *a, **k: None)
    folder = first.output_dir / "checkpoints" / "step-000002"
    said: list[str] = []
    second = run(_config(root, "second", **flags, **{"train.max_steps": 1, "train.init_adapter": str(folder)}),
                 echo=said.append)
    assert any("kept the checkpoint's optimizer state" in line for line in said)
    start = load_file(str(folder / "master.safetensors"))
    want = load_file(str(whole.output_dir / "checkpoints" / "step-000003" / "master.safetensors"))
    got = load_file(str(second.output_dir / "checkpoints" / "step-000001" / "master.safetensors"))
    assert start.keys() == want.keys() == got.keys()
    error = torch.cat([(got[k] - want[k]).abs().reshape(-1) for k in want]).mean()
    rounding = torch.cat([(t - t.to(torch.bfloat16).float()).abs().reshape(-1) for t in start.values()]).mean()
    assert error < 0.1 * rounding, (float(error), float(rounding))


def test_a_skipped_step_drops_the_gradients_its_earlier_micro_batches_left_in_the_masters(root, monkeypatch):
    import deltatune.api as api
    from deltatune.master import MasterWeights

    calls, made, seen = {"n": 0}, [], []
    original, init, zero_grad = api.regularization, MasterWeights.__init__, MasterWeights.zero_grad

    def leftovers() -> int:
        master = made[0]
        return sum(m.grad is not None for m in master.masters.values()) + sum(p.grad is not None for p in master.params.values())

    def poisoned(model):  # the 4th forward, the second micro-batch of step 2, is NaN: the first one's gradients are in
        calls["n"] += 1
        if calls["n"] == 4:
            seen.append(leftovers())
            return float("nan")
        return original(model)

    def spied(self):
        zero_grad(self)
        seen.append(leftovers())

    monkeypatch.setattr(api, "regularization", poisoned)
    monkeypatch.setattr(MasterWeights, "__init__", lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    monkeypatch.setattr(MasterWeights, "zero_grad", spied)
    flags = {"method": "full", "model.dtype": "bf16", "train.lr": 3e-5, "train.batch_size": 2, "train.grad_accum": 2,
             "train.max_steps": 4, "train.on_nan": "skip"}
    result = run(_config(root, "skip", **flags), echo=lambda *a, **k: None)
    assert result.summary["skipped_steps"] == 1 and result.steps == 4
    assert seen[0] == len(made[0].masters) > 0 and seen[1] == 0  # every master had a gradient; none is left


KILLED = r"""
import json, os, signal, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from crash_trainer import config, quiet
import deltatune.loss_scale as loss_scale
from deltatune.pipeline import checkpoint as ckpt, train

work, setting = Path(sys.argv[1]), json.loads(sys.argv[2])
flags = {"train.lr": 3e-5, "train.grad_accum": 2, **setting["flags"]}
if setting.get("growth_interval"):  # fp16: a scale that grows every few steps changes across the kill
    loss_scale.GROWTH_INTERVAL = setting["growth_interval"]
torch.set_num_threads(1)
real_save = ckpt.save_checkpoint
if len(sys.argv) > 3:  # the run to kill, in a process of its own (a fork would inherit the loader's threads)
    def save_then_die(output_dir, step, *args, **kwargs):
        folder = real_save(output_dir, step, *args, **kwargs)
        if step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return folder
    ckpt.save_checkpoint = save_then_die
    train.run(config(work, "full", "killed", **flags), echo=quiet)
    sys.exit(3)
import subprocess
train.run(config(work, "full", "whole", **flags), echo=quiet)
status = subprocess.run([sys.executable, "-c", SCRIPT, str(work), sys.argv[2], "kill"]).returncode
said = []
train.run(config(work, "full", "killed", **flags, **{"train.resume": True}), echo=lambda *a, **k: said.append(str(a)))
def state(out):
    found, scales = {}, {}
    for _, folder in ckpt.steps(out):
        for name in ("master.safetensors", "optimizer.safetensors", "delta.safetensors"):
            if name != "master.safetensors" or (folder / name).exists():  # master_weights none keeps no masters
                found.update({f"{folder.name}/{name}/{k}": v for k, v in load_file(str(folder / name)).items()})
        scales[folder.name] = json.loads((folder / "trainer_state.json").read_text()).get("loss_scale")
    for file in sorted((out / "adapter").glob("*.safetensors")):
        found.update({f"adapter/{k}": v for k, v in load_file(str(file)).items()})
    return found, scales
(a, scale_a), (b, scale_b) = state(work / "full" / "whole"), state(work / "full" / "killed")
masters = {k: v for k, v in a.items() if "master.safetensors" in k}
print(json.dumps({"killed": status == -signal.SIGKILL,
                  "resumed": any("resuming from" in line and "step-000004" in line for line in said),
                  "masters": len(masters), "master_dtypes": sorted({str(v.dtype) for v in masters.values()}),
                  "compensated": sum(int(v.count_nonzero()) for v in masters.values()),
                  "same_keys": a.keys() == b.keys(),
                  "adapter_dtypes": sorted({str(v.dtype) for k, v in a.items() if k.startswith("adapter/")
                                            and v.is_floating_point()}),
                  "loss_scales": [scale_a, scale_b],
                  "unequal": [k for k in a if k in b and not torch.equal(a[k], b[k])][:5]}))
"""


def killed_and_resumed(tmp_path: Path, flags: dict, growth_interval: int | None = None) -> dict:
    """Train a tiny full fine-tuning run whole; train it again in a child process that SIGKILLs itself right after
    its step-4 checkpoint, and resume that; what the two runs left (checkpoints, masters, adapter), compared."""
    import os
    import subprocess
    import sys

    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    script = KILLED.replace("SCRIPT", repr(KILLED))
    setting = json.dumps({"flags": flags, "growth_interval": growth_interval})
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path), setting], capture_output=True, text=True,
                           env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["killed"] and got["resumed"] and got["same_keys"], got
    assert got["unequal"] == [], got
    return got


def test_a_bf16_run_killed_with_sigkill_and_resumed_is_bit_equal_to_one_never_killed(tmp_path):
    got = killed_and_resumed(tmp_path, {"model.dtype": "bf16"})
    assert got["masters"] > 0 and got["master_dtypes"] == ["torch.float32"] and got["adapter_dtypes"] == ["torch.bfloat16"], got
