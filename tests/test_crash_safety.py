"""A save killed with SIGKILL at any moment leaves a folder that loads as exactly the old or the new adapter.

crash_saver.py (run here as a subprocess) saves adapter B over adapter A and kills
the saving process just before and just after every file system step of the save
(each open, write, fsync and rename), and at random moments in a loop over one
folder. Each folder is then loaded in this process and compared with A and B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import deltatune as dt
import crash_saver
from crash_saver import build_net, run, with_adapter
from deltatune.io import CONFIG_NAME, WEIGHTS_NAME
from deltatune.model_files import MARKER

HERE = Path(__file__).parent


def _outputs(folder: Path) -> torch.Tensor:
    net = dt.load(build_net(), folder)
    with torch.no_grad():
        return run(net)


FILES = {"lora": ["README.md", CONFIG_NAME, WEIGHTS_NAME],
         "full": ["README.md", "config.json", MARKER, "generation_config.json", "model.safetensors"]}


@pytest.mark.parametrize("mode", ["lora", "full"], ids=["adapter", "whole-model"])
def test_a_killed_save_loads_as_the_old_or_the_new_adapter(tmp_path, mode, monkeypatch):
    monkeypatch.setitem(crash_saver.MODE, "mode", mode)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(HERE / "crash_saver.py"), str(tmp_path), "25", "0", mode],
                           capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout)
    assert report["events"] >= 10  # opens, writes, fsyncs, renames: each killed before and after
    steps = {k: v for k, v in report["outcomes"].items() if k.startswith("step/")}
    assert len(steps) == report["events"] and set(steps.values()) == {"killed"}

    with torch.no_grad():
        expected = {"A": run(with_adapter("A")), "B": run(with_adapter("B"))}
    assert not torch.allclose(expected["A"], expected["B"])
    seen = []
    for k in range(1, report["events"] + 1):
        folder = tmp_path / "step" / str(k)
        out = _outputs(folder)
        which = [name for name, want in expected.items() if torch.equal(out, want)]
        assert len(which) == 1, f"kill at step {k} left a folder that is neither adapter"
        seen.append(which[0])
    # before the commit point the old adapter, after it the new one, never back
    assert seen == sorted(seen) and set(seen) == {"A", "B"}, seen

    # the next save into a killed folder completes or clears what the kill left, and writes cleanly
    for k in range(1, report["events"] + 1):
        folder = tmp_path / "step" / str(k)
        dt.save(with_adapter("A"), folder)
        assert sorted(p.name for p in folder.iterdir()) == FILES[mode]
        assert torch.equal(_outputs(folder), expected["A"])

    randoms = Counter(v for k, v in report["outcomes"].items() if k.startswith("random/"))
    assert set(randoms) <= {"A", "B"} and sum(randoms.values()) == 25, randoms


# ---------------------------------------------------------------- training runs, every method


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """crash_trainer.py over the whole registry, once: each method trained whole, and killed with SIGKILL
    after a checkpoint and resumed."""
    from deltatune.config import METHODS

    work = tmp_path_factory.mktemp("killed_runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src"),
                                                                             os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(HERE / "crash_trainer.py"), str(work), *METHODS],
                           capture_output=True, text=True, env=env, timeout=900)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def _registry() -> list[str]:
    from deltatune.config import METHODS

    return sorted(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("method", _registry())
def test_a_run_killed_after_a_checkpoint_and_resumed_ends_with_the_delta_of_a_run_never_killed(killed_and_resumed, method):
    got = killed_and_resumed[method]
    assert got["killed"] and got["resumed"], got  # SIGKILL after step 4's checkpoint; resumed from that one
    # every training-time tensor of the final checkpoint (encoders, log-alpha, masks, importance) and the export
    assert got["same_keys"] and got["keys"] > 0 and got["max_diff"] <= 1e-6, got
