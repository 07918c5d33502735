"""Kill a pipeline run with SIGKILL after a checkpoint, resume it, compare with a run never interrupted
(run by test_crash_safety.py), for every method in the registry.

    python crash_trainer.py WORKDIR METHOD [METHOD ...]

One process does all the methods (the imports are paid once): per method it trains the whole
run here, forks a child that trains the same run into another folder and sends itself SIGKILL
right after its step-4 checkpoint is written, then resumes that folder here. It prints JSON:
per method, how the child ended, whether the run resumed, and the largest difference between
the two runs' training-time deltas in their last two checkpoints (delta.safetensors: every
parameter, buffer and method state, unfolded) and their folded adapters.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.config import METHODS
from deltatune.pipeline import checkpoint as ckpt, train
from deltatune.pipeline.config import load_run_config
from pipeline_models import save_tiny, write_jsonl

STEPS, KILL_AFTER = 6, 4
# What a method needs set to train at all (a required field, a size that fits a tiny model); a method
# with nothing required trains with its defaults and needs no line here.
SETTINGS = {"adalora": {"adalora.total_step": STEPS, "adalora.init_r": 4, "adalora.target_r": 2},
            "adapter_fusion": {"adapter_fusion.adapters": ["fa", "fb"]},
            "full": {"train.lr": 1e-3}}


def fused_adapters(model: torch.nn.Module) -> None:
    """AdapterFusion fuses adapters attached before it; the pipeline has no key for those, so they come with the base."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        for name in ("fa", "fb"):
            dt.attach(model, dt.AdapterConfig(placement="pfeiffer", bottleneck_size=4), name=name)
            with torch.no_grad():
                for p in dt.delta_parameters(model, name).values():
                    p.add_(torch.randn_like(p) * 0.3)


def config(work: Path, method: str, out: str, **flags):
    """The run of `method` on a tiny GPT-2 (it has biases, for BitFit)."""
    rows = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in ["alpha", "beta", "gamma", "delta"] * 6]
    base = {"model.name": str(save_tiny(work, "gpt2")), "data.train": str(write_jsonl(work / "rows.jsonl", rows)),
            "data.format": "instruction", "train.max_steps": STEPS, "train.batch_size": 4, "train.lr": 1e-2,
            "train.save_every": 1, "train.keep_last": 2, "train.progress": False, "method": method,
            "output.dir": str(work / method / out)}
    return load_run_config(None, {**base, **SETTINGS.get(method, {}), **flags})


def final_state(out: Path) -> dict[str, torch.Tensor]:
    """The last two checkpoints' training-time deltas (one step before the end holds state the end has dropped,
    AdaLoRA's importance scores) and the folded adapter."""
    tensors = {}
    for _, folder in ckpt.steps(out):
        tensors.update({f"{folder.name}/{k}": v for k, v in load_file(str(folder / "delta.safetensors")).items()})
    for file in sorted((out / "adapter").glob("*.safetensors")):
        tensors.update({f"adapter/{file.name}/{k}": v for k, v in load_file(str(file)).items()})
    return tensors


def quiet(*args, **kwargs):
    pass


def main() -> None:
    work, methods = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    real_load_base, real_save = train.load_base, ckpt.save_checkpoint
    report = {}
    for method in methods:
        if METHODS[method].depends_on is not None:
            train.load_base = lambda *a, **k: (lambda m: (fused_adapters(m), m)[1])(real_load_base(*a, **k))
        else:
            train.load_base = real_load_base
        train.run(config(work, method, "whole"), echo=quiet)
        pid = os.fork()
        if pid == 0:
            def save_then_die(output_dir, step, *args, **kwargs):
                folder = real_save(output_dir, step, *args, **kwargs)
                if step == KILL_AFTER:
                    os.kill(os.getpid(), signal.SIGKILL)
                return folder

            ckpt.save_checkpoint = save_then_die
            try:
                train.run(config(work, method, "killed"), echo=quiet)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        said: list[str] = []
        train.run(config(work, method, "killed", **{"train.resume": True}), echo=lambda *a, **k: said.append(" ".join(map(str, a))))
        a, b = final_state(work / method / "whole"), final_state(work / method / "killed")
        diff = max(((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0) for k in a) if a.keys() == b.keys() else None
        report[method] = {"killed": killed, "resumed": any(f"step-{KILL_AFTER:06d}" in line and "resuming" in line for line in said),
                          "keys": len(a), "same_keys": a.keys() == b.keys(), "max_diff": diff}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
