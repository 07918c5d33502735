"""Kill `dt.save` with SIGKILL at every step, and at random moments (run by test_crash_safety.py).

    python crash_saver.py WORKDIR RANDOM_KILLS SEED [lora|full]

Adapters A and B have the same shapes but different scales and weights, so a folder
that mixed A's config with B's weights would load without any shape error and
compute something that is neither: the dangerous case. Every folder starts
holding A; a forked child saves B over it and is killed:

  * step/<k>: the child sends itself SIGKILL just before or just after the k-th file
    system step of the save (opening, writing, fsync, each rename);
  * random: a child saves B and A over the same folder in a loop and is killed
    from outside after a random delay, again and again on the same folder, so
    the leftovers of one kill meet the next save.

Prints a JSON summary: the number of steps and how each child ended.

With "full", A and B are full fine-tuning deltas of a tiny GPT-2, saved as whole-model
folders (save_pretrained's files and deltatune_config.json, see model_files.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

import deltatune as dt
import deltatune.io as dtio
import deltatune.model_files as model_files

MODE = {"mode": "lora"}  # "full": whole-model folders


def build_net() -> torch.nn.Module:
    torch.manual_seed(0)
    if MODE["mode"] == "full":
        from tiny_models import build

        return build("gpt2")
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def with_adapter(which: str) -> torch.nn.Module:
    net = build_net()
    if MODE["mode"] == "full":
        dt.attach(net, dt.FullConfig())
        scale = {"A": 0.01, "B": 0.03}[which]
    else:
        alpha = {"A": 4, "B": 16}[which]
        dt.attach(net, dt.LoraConfig(r=4, alpha=alpha, target_modules=["0", "2"], init="none"))
        scale = 1.0
    torch.manual_seed({"A": 1, "B": 2}[which])
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad and MODE["mode"] == "full":
                p.add_(torch.randn_like(p) * scale)  # near the base: the logits stay finite
            elif p.requires_grad:
                p.normal_()
    return net


def probe() -> torch.Tensor:
    return torch.linspace(-1, 1, 3 * 16).reshape(3, 16)


def run(net: torch.nn.Module) -> torch.Tensor:
    if MODE["mode"] == "full":
        return net(input_ids=torch.arange(3, 19).reshape(2, 8)).logits
    return net(probe())


STEPS = [("os", "open"), ("os", "fsync"), ("os", "replace"), ("os", "chmod"), ("dtio", "save_file"),
         ("model_files", "save_pretrained")]


def instrument(kill_at: int | None, counter: list[int]) -> None:
    """Wrap each file system step of the save; SIGKILL ourselves at event number kill_at."""
    owners = {"os": os, "dtio": dtio, "model_files": model_files}

    def event():
        counter[0] += 1
        if counter[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    for owner_name, attribute in STEPS:
        owner = owners[owner_name]
        original = getattr(owner, attribute)

        def wrapped(*args, __original=original, **kwargs):
            event()  # just before the step
            result = __original(*args, **kwargs)
            event()  # just after it
            return result

        setattr(owner, attribute, wrapped)


def save_in_child(folder: Path, model: torch.nn.Module, kill_at: int | None) -> int:
    """Fork; the child saves `model` into `folder` (killing itself at event kill_at). Returns the child's status."""
    pid = os.fork()
    if pid == 0:
        counter = [0]
        instrument(kill_at, counter)
        dt.save(model, folder)
        if kill_at is None:  # a counting run: report how many events one save has
            Path(folder, ".events").write_text(str(counter[0]))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


def main() -> None:
    work, random_kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    MODE["mode"] = sys.argv[4] if len(sys.argv) > 4 else "lora"
    torch.set_num_threads(1)
    a, b = with_adapter("A"), with_adapter("B")

    # how many events a full save has
    count_dir = work / "count"
    dt.save(a, count_dir)
    save_in_child(count_dir, b, kill_at=None)
    events = int((count_dir / ".events").read_text())

    outcomes = {}
    for k in range(1, events + 1):
        folder = work / "step" / str(k)
        dt.save(a, folder)
        status = save_in_child(folder, b, kill_at=k)
        outcomes[f"step/{k}"] = "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else f"exit {status}"

    rng = random.Random(seed)
    folder = work / "random"
    dt.save(a, folder)
    for i in range(random_kills):
        pid = os.fork()
        if pid == 0:
            while True:
                dt.save(b, folder)
                dt.save(a, folder)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # what a reader sees right after each kill
        fresh = build_net()
        dt.load(fresh, folder)
        with torch.no_grad():
            out = run(fresh)
        with torch.no_grad():
            which = [w for w, m in (("A", a), ("B", b)) if torch.equal(out, run(m))]
        outcomes[f"random/{i}"] = which[0] if which else "neither"
    print(json.dumps({"events": events, "outcomes": outcomes}))


if __name__ == "__main__":
    main()
