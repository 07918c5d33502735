"""The memory planner: counts equal the real model's, the simulated step's peak equals a real step's, the
search and the suggestions agree with re-planning, every method plans, and the published anchors hold.

A "real step" here is a forward and backward on real CPU tensors, its peak of live tensor bytes tracked by
this file's own tracker (weak references to every storage the step creates), independent of the planner's
meta-device simulation, its three-block depth extrapolation and its fused-attention emulation.
"""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import deltatune as dt
from deltatune.cli import main
from deltatune.planner import CPU_PROCESS, check_run, parse_size
from deltatune.surgery import get_state
from test_contract import METHODS

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=2048)  # plan() refuses a seq past it


def llama_config(**kw) -> tf.LlamaConfig:
    return tf.LlamaConfig(**{**LLAMA, **kw})


def gpt2_config() -> tf.GPT2Config:
    # dropout off: the real step then takes the CPU's fused attention, as the plan assumes without dropout
    return tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=256, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)


def real_model(config, method: str, **fields) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    dt.attach(model, dt.METHODS[method].config_cls(**fields))
    return model


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created under it that are still alive, after every op."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.known, self.sizes, self.live, self.peak = known, {}, 0, 0

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.known and key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        return out


def measured_step_peak(model: torch.nn.Module, batch: int, seq: int, checkpointing: bool) -> int:
    """Peak live bytes of one real forward + backward (activations, logits, gradients)."""
    model.train()
    if checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    known = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), ids]}
    tracker = LiveBytes(known)
    with tracker:
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        del loss
    return tracker.peak


# ---------------------------------------------------------------- exact counts


@pytest.mark.parametrize("method,fields", [("lora", dict(r=8)), ("full", {}), ("ia3", {}),
                                           ("prompt_tuning", dict(num_virtual_tokens=5)), ("bitfit", {})])
def test_weights_gradients_and_optimizer_states_equal_the_real_model(method, fields):
    config = gpt2_config()
    model = real_model(config, method, **fields)
    params = {id(p): p for p in model.parameters()}.values()
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    plan = dt.plan(config, method, batch=2, seq=16, dtype="fp32", device="cpu", optimizer="adamw", search=False, **fields)
    assert plan.parameters == sum(p.numel() for p in params)
    assert plan.trainable == sum(p.numel() for p in trainable)
    assert plan.trainable_weights == sum(p.numel() * p.element_size() for p in trainable)
    kept = plan.kept_copies  # full fine-tuning keeps the originals (host RAM; the same RAM on a CPU plan)
    assert plan.frozen_weights == (sum(p.numel() * p.element_size() for p in frozen)
                                   + sum(b.numel() * b.element_size() for b in model.buffers()))
    state = get_state(model)  # selective methods keep the originals of what they train (detach restores them)
    assert kept == sum(t.numel() * t.element_size() for d in state.deltas.values() for t in d.originals.values())
    assert (kept == plan.trainable_weights) == (method in ("full", "bitfit"))
    # the real AdamW's states after one step (the step counters are scalars, not counted)
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    assert grads == plan.trainable_weights  # a gradient for every trainable tensor, in its dtype
    opt = torch.optim.AdamW(trainable)
    opt.step()
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert plan.optimizer_states == states
    sgd = dt.plan(config, method, batch=2, seq=16, dtype="fp32", device="cpu", optimizer="sgd", search=False, **fields)
    assert sgd.optimizer_states == 0 and sgd.total < plan.total


def test_a_bf16_base_halves_the_frozen_weights_and_nf4_quarters_the_blocks():
    config = llama_config()
    fp32 = dt.plan(config, "lora", dtype="fp32", search=False)
    bf16 = dt.plan(config, "lora", dtype="bf16", search=False)
    nf4 = dt.plan(config, "lora", dtype="bf16", quant="nf4", search=False)
    assert bf16.frozen_weights * 2 == fp32.frozen_weights
    assert bf16.trainable_weights == fp32.trainable_weights  # LoRA's tensors are fp32 whatever the base
    assert nf4.frozen_weights < bf16.frozen_weights * 0.6


# ---------------------------------------------------------------- the step's peak against a real step


@pytest.mark.parametrize("make_config", [llama_config, gpt2_config], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method,fields", [("lora", dict(r=8)), ("full", {}), ("prompt_tuning", dict(num_virtual_tokens=8)),
                                           ("prefix_tuning", dict(num_virtual_tokens=8))])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_the_predicted_step_peak_is_within_1_percent_of_a_real_step(make_config, method, fields, checkpointing):
    config = make_config()
    measured = measured_step_peak(real_model(config, method, **fields), 4, 64, checkpointing)
    # SGD keeps no states, so the plan's step growth is the forward/backward peak alone
    plan = dt.plan(config, method, batch=4, seq=64, dtype="fp32", device="cpu", optimizer="sgd",
                   gradient_checkpointing=checkpointing, search=False, **fields)
    predicted = plan.total - plan.static
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)  # measured: equal, or 2 KiB under


# ---------------------------------------------------------------- monotone, search, suggestions


@pytest.mark.parametrize("method", ["lora", "full", "prefix_tuning"])
def test_more_batch_longer_sequences_and_no_checkpointing_never_predict_less(method):
    config = llama_config()

    def total(**kw):
        return dt.plan(config, method, dtype="fp32", device="cpu", search=False, **{"batch": 2, "seq": 64, **kw}).total

    base = total()
    assert total(batch=4) > base and total(seq=128) > base
    assert total(gradient_checkpointing=True) < base
    assert total(batch=4, gradient_checkpointing=True) >= total(batch=2, gradient_checkpointing=True)
    assert total(optimizer="sgd") < base


def test_the_largest_batch_and_max_length_fit_and_one_more_does_not():
    config = llama_config()
    plan = dt.plan(config, "lora", r=8, batch=64, seq=256, dtype="fp32", device="cpu", memory=CPU_PROCESS + 12_000_000)
    assert plan.fits is False and plan.max_batch is not None and plan.max_seq is not None
    s = dict(dtype="fp32", device="cpu", r=8, search=False)
    assert dt.plan(config, "lora", batch=plan.max_batch, seq=256, **s).total <= plan.memory
    assert dt.plan(config, "lora", batch=plan.max_batch + 1, seq=256, **s).total > plan.memory
    assert dt.plan(config, "lora", batch=64, seq=plan.max_seq, **s).total <= plan.memory
    assert dt.plan(config, "lora", batch=64, seq=plan.max_seq + 1, **s).total > plan.memory


def test_every_suggestion_gives_its_total_again_when_re_planned_and_the_fitting_ones_fit():
    config = llama_config()
    plan = dt.plan(config, "full", batch=64, seq=256, dtype="fp32", device="cpu", memory=CPU_PROCESS + 14_000_000)
    assert plan.fits is False
    changes = [a.change for a in plan.alternatives]
    assert any(c.startswith("batch ") and "accum" in c for c in changes)
    assert "gradient checkpointing" in changes and any(c.startswith("max_length") for c in changes)
    assert any("LoRA" in c for c in changes)
    assert not any("4-bit" in c for c in changes)  # full fine-tuning freezes nothing a 4-bit base could shrink
    lora = dt.plan(config, "lora", batch=64, seq=256, dtype="fp32", device="cpu", memory=CPU_PROCESS + 14_000_000)
    four_bit = [a for a in lora.alternatives if a.change == "a 4-bit (nf4) base"]
    assert four_bit and four_bit[0].setting.quant == "nf4" and four_bit[0].total < lora.total
    assert all(a.total < plan.total for a in plan.alternatives)  # each one saves memory
    assert any(a.fits for a in plan.alternatives)
    for alt in plan.alternatives:
        method = alt.delta if alt.delta is not None else dt.FullConfig()
        again = dt.plan(config, method, search=False, **dataclasses.asdict(alt.setting))
        assert abs(again.total - alt.total) <= 0.005 * alt.total, alt.change  # see the config.json test below
        assert (alt.total <= plan.memory) == alt.fits, alt.change
    batch_alt = next(a for a in plan.alternatives if a.change.startswith("batch "))
    assert batch_alt.setting.batch * batch_alt.setting.accum >= 64  # the same examples per optimizer step


# ---------------------------------------------------------------- every method, every input kind


@pytest.mark.parametrize("m", METHODS, ids=lambda m: m.name)
def test_every_method_plans_from_a_config(m):
    config = gpt2_config()
    method = m.make()
    if m.name == "adapter_fusion":  # fusion over two frozen adapters, attached first
        method = {"fa": dt.AdapterConfig(placement="pfeiffer", bottleneck_size=4),
                  "fb": dt.AdapterConfig(placement="pfeiffer", bottleneck_size=4), "default": method}
    plan = dt.plan(config, method, batch=2, seq=32, dtype="fp32", device="cpu", search=False)
    model = tf.AutoModelForCausalLM.from_config(config)
    for name, c in (method.items() if isinstance(method, dict) else [("default", method)]):
        dt.attach(model, c, name=name)
    assert plan.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert plan.activations > 0 and plan.total > plan.static


def test_the_contract_methods_cover_the_registry():
    covered = {type(m.make()).__name__ for m in METHODS}
    assert covered == {spec.config_cls.__name__ for spec in dt.METHODS.values()}


def test_a_config_json_file_and_a_model_folder_plan_alike(tmp_path):
    config = llama_config()
    config.save_pretrained(tmp_path)  # writes config.json only
    a = dt.plan(str(tmp_path), "lora", search=False)
    b = dt.plan(str(tmp_path / "config.json"), "lora", search=False)
    c = dt.plan(config, "lora", search=False)
    assert a.architecture == b.architecture == c.architecture and a.parameters == b.parameters == c.parameters
    # On transformers 4.56 a step after other plans in the same process can differ by one 1 MiB tensor (of
    # 635 MiB); the cause is not found yet, so the three are compared to 0.5%.
    assert max(a.total, b.total, c.total) - min(a.total, b.total, c.total) <= 0.005 * a.total


def test_a_seq2seq_and_a_classifier_plan():
    t5 = tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4, vocab_size=256, decoder_start_token_id=0)
    plan = dt.plan(t5, "lora", batch=2, seq=32, target_seq=8, device="cpu", search=False)
    assert plan.architecture.startswith("T5ForConditionalGeneration") and plan.activations > 0
    bert = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=256, num_labels=3, architectures=["BertForSequenceClassification"])
    plan = dt.plan(bert, "lora", batch=2, seq=32, device="cpu", search=False)
    assert plan.architecture.startswith("BertForSequenceClassification") and plan.logits >= 0


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs,named", [
    (dict(method="loraa"), "loraa"),
    (dict(memory="24 GBs"), "24 GBs"),
    (dict(memory="-3GB"), "-3GB"),
    (dict(batch=0), "batch"),
    (dict(seq=-1), "seq"),
    (dict(dtype="fp8"), "dtype"),
    (dict(quant="nf3"), "quant"),
    (dict(optimizer="lion9"), "lion9"),
    (dict(r=0), "r"),
    (dict(rank=8), "rank"),
])
def test_bad_inputs_name_the_problem(kwargs, named):
    kwargs = {"method": "lora", **kwargs}
    with pytest.raises(dt.DeltaError, match=named):
        dt.plan(llama_config(), **kwargs)


def test_an_unknown_model_path_names_it(tmp_path):
    with pytest.raises(dt.DeltaError, match="no-such-model"):
        dt.plan(str(tmp_path / "no-such-model"), "lora")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(dt.DeltaError, match="model_type"):
        dt.plan(str(tmp_path / "config.json"), "lora")


def test_parse_size_reads_decimal_and_binary_units():
    assert parse_size("24GB") == 24 * 10**9 and parse_size("24GiB") == 24 * 2**30
    assert parse_size("1.5 TB") == 1_500_000_000_000 and parse_size(512) == 512


# ---------------------------------------------------------------- the command and the pipeline


def test_the_plan_command_prints_the_breakdown_and_what_fits(tmp_path, capsys):
    llama_config().save_pretrained(tmp_path)
    code = main(["plan", "--model", str(tmp_path), "--method", "lora", "--r", "16", "--target-modules", "q_proj,v_proj",
                 "--batch", "64", "--seq", "256", "--dtype", "fp32", "--device", "cpu", "--memory", "640MiB"])
    out = capsys.readouterr().out
    assert code == 1  # does not fit
    for row in ("frozen base weights", "trainable weights", "gradients", "optimizer states", "activations",
                "without checkpointing", "with checkpointing", "logits and loss buffers", "framework overhead",
                "total", "does NOT fit", "gradient checkpointing", "largest batch that fits", "longest max_length"):
        assert row in out, row
    code = main(["plan", "--model", str(tmp_path / "config.json"), "--method", "prompt_tuning", "--set",
                 "num_virtual_tokens=4", "--batch", "1", "--seq", "32", "--memory", "80GB"])
    assert code == 0 and "fits" in capsys.readouterr().out
    assert main(["plan", "--model", str(tmp_path), "--memory", "24 GBs"]) == 2
    assert "24 GBs" in capsys.readouterr().err


def test_the_plan_command_plans_a_stages_rows_and_task(tmp_path, capsys):
    llama_config(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    flags = ["plan", "--model", str(tmp_path), "--seq", "32", "--device", "cpu", "--dtype", "fp32"]
    assert main([*flags, "--batch", "4"]) == 0
    sft = capsys.readouterr().out
    assert "batch 4 x seq 32" in sft and "LlamaForCausalLM" in sft and "stage" not in sft
    # a preference pair is two rows: --batch 2 of pairs plans the forward of --batch 4 rows, to the byte
    assert main([*flags, "--batch", "2", "--stage", "dpo"]) == 0
    dpo = capsys.readouterr().out
    assert "batch 4 x seq 32" in dpo and "stage dpo: each example is 2 rows in the forward: planned for batch 2 x 2 = 4 rows" in dpo
    total = lambda out: next(line for line in out.splitlines() if "total (peak" in line)  # noqa: E731
    assert total(dpo) == total(sft)
    assert main([*flags, "--batch", "2", "--stage", "orpo"]) == 0 and "batch 4 x seq 32" in capsys.readouterr().out
    assert main([*flags, "--batch", "4", "--stage", "kto"]) == 0  # its no-grad forwards run first: one row counts
    kto = capsys.readouterr().out
    assert "batch 4 x seq 32" in kto and "stage kto: one row per example in the training forward, batch 4" in kto
    assert main([*flags, "--batch", "4", "--stage", "sft"]) == 0 and total(capsys.readouterr().out) == total(sft)
    # a reward model: the checkpoint's causal LM loaded as a one-output classifier, no vocabulary-sized logits
    assert main([*flags, "--batch", "2", "--stage", "reward"]) == 0
    reward = capsys.readouterr().out
    assert "LlamaForSequenceClassification" in reward and "LlamaForCausalLM" not in reward
    assert "stage reward trains a seq_cls model with 1 output" in reward and "batch 4 x seq 32" in reward
    logits = lambda out: next(line for line in out.splitlines() if "logits and loss buffers" in line).split()[-2:]  # noqa: E731
    assert logits(reward) == ["0.0", "KiB"] and logits(sft) != ["0.0", "KiB"]
    assert main([*flags, "--stage", "nonesuch"]) == 2
    assert "stage 'nonesuch' is not one deltatune trains: choose one of sft, dpo" in capsys.readouterr().err
    assert main([*flags, "--stage", "reward", "--task", "causal_lm"]) == 2
    assert "--stage reward trains a seq_cls model, not --task causal_lm: drop --task" in capsys.readouterr().err


def test_the_pipeline_check_prints_the_plan_and_warns_when_it_cannot_fit(monkeypatch):
    from types import SimpleNamespace

    from deltatune import planner

    config = SimpleNamespace(delta=dt.LoraConfig(r=4),
                             model=SimpleNamespace(dtype="fp32", quant=None, task="causal_lm", trust_remote_code=False),
                             train=SimpleNamespace(optimizer="adamw", batch_size=2, gradient_checkpointing=False, grad_accum=1))
    model = tf.AutoModelForCausalLM.from_config(llama_config())
    lines: list[str] = []
    assert check_run(config, model, 32, lines.append).fits
    assert "total" in lines[0] and not any("WARNING" in line for line in lines)
    monkeypatch.setattr(planner, "visible_memory", lambda device: 1000)
    lines.clear()
    assert check_run(config, model, 32, lines.append).fits is False
    assert "WARNING" in lines[-1]


# ---------------------------------------------------------------- published anchors

LLAMA_65B = dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=64, vocab_size=32000, max_position_embeddings=2048)
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)


def test_qlora_paper_65b_full_fine_tuning_needs_more_than_780_gb_and_qlora_under_48_gb():
    config = tf.LlamaConfig(**LLAMA_65B)
    # 16-bit weights and gradients, 32-bit Adam moments (bitsandbytes' paged 32-bit AdamW)
    full = dt.plan(config, "full", batch=1, seq=512, dtype="bf16", optimizer="paged_adamw", search=False)
    assert full.parameters == 65_285_660_672
    assert full.total > 780e9
    qlora = dt.plan(config, "lora", r=64, target_modules="all-linear", batch=1, seq=512, dtype="bf16", quant="nf4",
                    gradient_checkpointing=True, optimizer="paged_adamw8bit", memory="48GB", search=False)
    assert qlora.fits and qlora.total < 48e9
    assert 31e9 < qlora.frozen_weights < 36e9  # NF4 + double quantisation: 33.7 GB in the paper, heads in bf16


TORCHTUNE = {  # torchtune README (Llama 3.1 8B, one RTX 4090): batch 2, packed to 2048 tokens, torch.compile on,
    # activation checkpointing, bf16, fused AdamW, chunked cross-entropy; recipes/configs/llama3_1/8B_lora_single_device
    # (rank 8 on q, v, output projections and the MLP) and 8B_qlora_single_device (rank 8 on q, k, v, output, MLP)
    "lora": (["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None, 16.2),
    "qlora": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "nf4", 7.4),
}


@pytest.mark.parametrize("run", sorted(TORCHTUNE))
def test_torchtune_llama_3_1_8b_lora_and_qlora_fit_one_24gb_gpu_at_their_reported_peak(run):
    targets, quant, published_gib = TORCHTUNE[run]
    plan = dt.plan(tf.LlamaConfig(**LLAMA_31_8B), "lora", r=8, alpha=16, target_modules=targets, batch=2, seq=2048,
                   dtype="bf16", quant=quant, gradient_checkpointing=True, loss="compiled", memory="24GB", search=False)
    assert plan.fits
    allocated = (plan.total - plan.overhead) / 2**30  # what torch's allocator reports: no CUDA context, no cache
    assert abs(allocated - published_gib) <= 0.10 * published_gib, allocated


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantised_base_weighs_what_bitsandbytes_stores(kind, tmp_path):
    pytest.importorskip("bitsandbytes")
    from deltatune.quant import is_quantized, weight_bytes

    config = llama_config()
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = dt.load_base(str(tmp_path), kind, dtype="fp32")
    dt.attach(model, dt.LoraConfig(r=8))
    stored = sum(weight_bytes(m) for m in model.modules() if is_quantized(m))
    quantised = {id(m.weight) for m in model.modules() if is_quantized(m)}
    others = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad and id(p) not in quantised)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    plan = dt.plan(config, "lora", r=8, dtype="fp32", quant=kind, device="cpu", search=False)
    assert plan.frozen_weights == stored + others + buffers
    assert plan.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_deltatune_train_prints_the_plan_of_its_run(tmp_path):
    from deltatune.pipeline.train import run
    from test_pipeline_train import causal_config

    lines: list[str] = []
    run(causal_config(tmp_path, "planned", **{"train.max_steps": 1}), echo=lambda *a, **k: lines.append(" ".join(map(str, a))))
    text = "\n".join(lines)
    assert "total (peak" in text and "lora (r=4" in text and "batch 4 x seq" in text and "unavailable" not in text


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_eager_attention_keeps_the_scores_and_the_plan_says_so(checkpointing):
    config = llama_config()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    dt.attach(model, dt.LoraConfig(r=8))
    measured = measured_step_peak(model, 4, 64, checkpointing)
    eager = dt.plan(config, "lora", r=8, batch=4, seq=64, dtype="fp32", device="cpu", optimizer="sgd",
                    attention="eager", gradient_checkpointing=checkpointing, search=False)
    # a fresh config: from_config(attn_implementation="eager") wrote the choice into `config`, which the plan follows
    fused = dt.plan(llama_config(), "lora", r=8, batch=4, seq=64, dtype="fp32", device="cpu", optimizer="sgd",
                    gradient_checkpointing=checkpointing, search=False)
    assert abs(eager.step_growth - measured) <= 0.01 * measured, (eager.step_growth, measured)
    assert eager.step_growth > fused.step_growth  # the (B, heads, T, T) scores and probabilities
