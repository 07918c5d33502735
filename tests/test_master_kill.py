"""kill -9 and resume, bit-exact, for every way of training 16-bit weights: the Kahan mode (its compensation
buffers), an fp16 base under dynamic loss scaling (its scale and clean-step count), and the pure 16-bit mode.
The bf16 fp32-masters case is in test_master_weights.py, whose helper these reuse: each runs a tiny full
fine-tuning twice, once whole and once killed with SIGKILL after its step-4 checkpoint and resumed, and
compares everything the two runs left, tensor by tensor with torch.equal."""

from __future__ import annotations

import pytest

from test_master_weights import killed_and_resumed

pytestmark = pytest.mark.slow  # two tiny trainings and a third process each: ~40 s on two shared cores


def test_a_kahan_bf16_run_killed_and_resumed_keeps_its_compensation_bit_exact(tmp_path):
    got = killed_and_resumed(tmp_path, {"model.dtype": "bf16", "train.master_weights": "kahan"})
    # the checkpoints hold bf16 compensation buffers, not fp32 copies, and they hold something: the resume
    # restored a non-trivial rounding residue, not zeros
    assert got["masters"] > 0 and got["master_dtypes"] == ["torch.bfloat16"] and got["compensated"] > 0, got
    assert got["adapter_dtypes"] == ["torch.bfloat16"], got


@pytest.mark.parametrize("mode", ["fp32", "kahan"])
def test_an_fp16_run_killed_and_resumed_keeps_its_loss_scale_and_weights_bit_exact(tmp_path, mode):
    # the scale grows every 2 clean steps, so the step-4 checkpoint holds a scale (and a clean-step count) other
    # than the initial one, which the resumed run must pick up to make the same steps
    got = killed_and_resumed(tmp_path, {"model.dtype": "fp16", "train.master_weights": mode}, growth_interval=2)
    want = "torch.float32" if mode == "fp32" else "torch.float16"
    assert got["masters"] > 0 and got["master_dtypes"] == [want] and got["adapter_dtypes"] == ["torch.float16"], got
    whole, resumed = got["loss_scales"]
    assert whole == resumed and len(whole) == 2, got  # the last two checkpoints, step 5 and step 6
    assert all(s is not None and s["scale"] != 2.0 ** 16 for s in whole.values()), whole


def test_a_pure_bf16_run_killed_and_resumed_is_bit_exact(tmp_path):
    got = killed_and_resumed(tmp_path, {"model.dtype": "bf16", "train.master_weights": "none"})
    assert got["masters"] == 0 and got["adapter_dtypes"] == ["torch.bfloat16"], got
