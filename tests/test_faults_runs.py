"""Part of the fault catalogue (see test_faults.py): run folders, checkpoints and resume.

A run owns its folder (run.json); a second run never mixes into it. A checkpoint counts
only when its complete.json is there and its files match it; deletions go through a trash
name; a full disk and a folder that cannot be written are clear errors; a resumed run must
have the config of the run it continues.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from deltatune.config import DeltaError
from deltatune.files import remove_tree
from deltatune.pipeline import checkpoint as ckpt
from deltatune.pipeline.config import ConfigError, load_run_config
from deltatune.pipeline.train import TrainingError, run
from pipeline_models import save_tiny, write_jsonl


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run_faults")


def config(root: Path, out: Path, **flags):
    rows = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in ["alpha", "beta", "gamma", "delta"] * 4]
    base = {"model.name": str(save_tiny(root, "llama")), "data.train": str(write_jsonl(root / "rows.jsonl", rows)),
            "data.format": "instruction", "train.max_steps": 4, "train.batch_size": 4, "train.lr": 1e-2,
            "train.save_every": 2, "train.keep_last": 3, "train.progress": False, "lora.r": 4, "output.dir": str(out)}
    if flags.get("method", "lora") != "lora":
        del base["lora.r"]
    return load_run_config(None, {**base, **flags})


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def finished(root) -> Path:
    """A finished run of 4 steps with checkpoints at steps 2 and 4."""
    run(config(root, root / "finished"), echo=quiet)
    return root / "finished"


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def resumed(root: Path, out: Path, **flags) -> list[str]:
    said: list[str] = []
    run(config(root, out, **{"train.resume": True, **flags}), echo=lambda *a, **k: said.append(" ".join(map(str, a))))
    return said


# ---------------------------------------------------------------- one run per folder


def test_another_run_into_the_folder_of_a_run_is_refused(root, copy):
    with pytest.raises(DeltaError, match=r"holds another run .*lora\.r: 4 -> 8.*\nTo train this one: pass --output\.overwrite "
                                         r"true.*another output\.dir") as err:
        run(config(root, copy, **{"lora.r": 8}), echo=quiet)
    assert str(copy) in str(err.value)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step-000002", "step-000004"]  # untouched


def test_another_method_into_the_folder_of_a_run_is_refused_in_a_few_lines(root, copy):
    with pytest.raises(DeltaError) as err:
        run(config(root, copy, method="ia3", **{"train.lr": 5e-3}), echo=quiet)
    message = str(err.value).replace(str(copy), "DIR")
    first, advice = message.split("\n")
    assert first.startswith("output.dir DIR holds another run (its config differs: method: 'lora' -> 'ia3'; ")
    assert "lora.r: 4 -> '(unset)'" in first and "train.lr: 0.01 -> 0.005" in first  # the keys someone set
    assert "loftq" not in first and re.search(r"and \d+ defaults of the two methods\)\.$", first)
    assert advice.startswith("To train this one: pass --output.overwrite true")
    assert len(message) < 500


def test_the_same_run_again_into_its_finished_folder_is_refused(root, copy):
    with pytest.raises(DeltaError, match=r"already holds this run \(step-000004\).*--train\.resume true"):
        run(config(root, copy), echo=quiet)


def test_a_folder_with_files_of_no_run_is_refused(root, tmp_path):
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    with pytest.raises(DeltaError, match=r"is not empty \(checkpoints\) and holds no run\.json"):
        run(config(root, tmp_path / "out"), echo=quiet)


def test_overwrite_clears_the_folder_and_starts_the_new_run(root, copy):
    run(config(root, copy, **{"lora.r": 8, "train.max_steps": 2, "output.overwrite": True}), echo=quiet)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step-000002"]  # none of the old run's
    assert json.loads((copy / "run.json").read_text())["config"]["lora.r"] == 8
    assert [p.name for p in copy.parent.iterdir()] == ["run"]  # the renamed-aside folder is gone


def test_output_dir_that_is_a_file_is_refused_before_training(root, tmp_path):
    (tmp_path / "out").write_text("notes")
    with pytest.raises(DeltaError, match=r"output\.dir .* is a file, not a folder"):
        run(config(root, tmp_path / "out"), echo=quiet)


def test_a_read_only_output_dir_is_refused_before_training(root, tmp_path, monkeypatch):
    from deltatune.pipeline import rundir

    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders: a read-only file system instead
        def read_only(path, write, mode=0o666):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

        monkeypatch.setattr(rundir, "write_new", read_only)
    try:
        with pytest.raises(DeltaError, match=r"output\.dir .* cannot be written \((Read-only file system|Permission denied)\): "
                                            r"make it writable or choose another output\.dir"):
            run(config(root, tmp_path / "out"), echo=quiet)
    finally:
        (tmp_path / "out").chmod(0o755)
    assert not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- resume compares configs


def test_resume_with_changed_weights_or_optimisation_lists_every_change(root, copy):
    with pytest.raises(ConfigError) as err:
        resumed(root, copy, **{"method": "ia3", "train.lr": 5e-3, "train.seed": 3})
    message = str(err.value)
    for change in ("method: 'lora' -> 'ia3'", "train.lr: 0.01 -> 0.005", "train.seed: 0 -> 3", "lora.r: 4 -> '(unset)'"):
        assert change in message, message


def test_a_run_recorded_before_a_key_existed_resumes_when_the_key_holds_its_default(root, copy):
    """A run.json written by an older deltatune lacks the keys added since (train.master_weights,
    data.group_by_length, ...): the run ran as their defaults do, so it resumes; a set value still differs."""
    record = json.loads((copy / "run.json").read_text())
    for key in ("train.master_weights", "data.group_by_length", "train.loss"):
        record["config"].pop(key, None)
    (copy / "run.json").write_text(json.dumps(record))
    said = resumed(root, copy, **{"train.max_steps": 4})
    assert any("resuming from" in s for s in said), said
    (copy / "run.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"train\.master_weights: '\(unset\)' -> 'none'"):
        resumed(root, copy, **{"train.master_weights": "none"})


def test_resume_with_another_rank_is_refused(root, copy):
    with pytest.raises(ConfigError, match=r"lora\.r: 4 -> 8"):
        resumed(root, copy, **{"lora.r": 8})


def test_more_steps_on_a_linear_schedule_is_refused_and_on_a_constant_one_resumes(root, tmp_path):
    with pytest.raises(ConfigError, match=r"total from 4 to 6 steps, and its linear schedule"):
        run(config(root, tmp_path / "linear"), echo=quiet)
        resumed(root, tmp_path / "linear", **{"train.max_steps": 6})
    run(config(root, tmp_path / "constant", **{"train.scheduler": "constant"}), echo=quiet)
    said = resumed(root, tmp_path / "constant", **{"train.scheduler": "constant", "train.max_steps": 6, "train.eval_every": 2})
    assert any("resuming with changed settings: train.max_steps: 4 -> 6; train.eval_every: None -> 2" in s for s in said), said
    assert (tmp_path / "constant" / "checkpoints" / "step-000006").is_dir()


def test_resume_true_with_no_checkpoint_names_the_folder(root, tmp_path):
    with pytest.raises(DeltaError, match=rf"train\.resume is true but {tmp_path / 'none'} holds no run to resume"):
        resumed(root, tmp_path / "none")


def test_resume_auto_starts_afresh_without_a_checkpoint_and_resumes_with_one(root, tmp_path):
    said = resumed(root, tmp_path / "auto", **{"train.resume": "auto", "train.max_steps": 2})
    assert not any("resuming" in s for s in said) and (tmp_path / "auto" / "checkpoints" / "step-000002").is_dir()
    remove_tree(tmp_path / "auto" / "adapter")  # as if killed after its checkpoint, before the export
    said = resumed(root, tmp_path / "auto", **{"train.resume": "auto", "train.max_steps": 2})
    assert any("resuming from" in s and "step-000002" in s for s in said), said


def test_resume_auto_never_clears_a_finished_adapter(root, copy):
    for _, folder in ckpt.steps(copy):
        (folder / "complete.json").unlink()
    with pytest.raises(DeltaError, match=r"holds this run's finished adapter but no complete checkpoint .*no complete\.json"):
        resumed(root, copy, **{"train.resume": "auto"})
    assert (copy / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_must_be_true_false_or_auto(root, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.resume = 'yes' is not allowed: expected True or False or one of 'auto'"):
        config(root, tmp_path / "x", **{"train.resume": "yes"})


# ---------------------------------------------------------------- complete checkpoints only


@pytest.mark.parametrize("file", ["optimizer.safetensors", "trainer_state.json", "delta.safetensors"])
def test_a_truncated_file_in_the_newest_checkpoint_falls_back_to_the_one_before(root, copy, file):
    path = copy / "checkpoints" / "step-000004" / file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    remove_tree(copy / "adapter")
    said = resumed(root, copy)
    assert any(f"skipped checkpoint {copy / 'checkpoints' / 'step-000004'}: {file} is" in s and "truncated" in s for s in said), said
    assert any("resuming from" in s and "step-000002" in s for s in said), said
    assert ckpt.verify(copy / "checkpoints" / "step-000004") is None  # written again, complete


def test_a_half_deleted_checkpoint_is_skipped(root, copy):
    newest = copy / "checkpoints" / "step-000004"
    for name in ("complete.json", "optimizer.safetensors"):  # what a kill inside a plain rmtree leaves
        (newest / name).unlink()
    assert ckpt.find(copy).folder.name == "step-000002"
    assert "no complete.json" in ckpt.find(copy).notes()[0]


def test_pruning_goes_through_a_trash_name_that_resume_ignores(root, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)  # every deletion "killed" after its rename
    run(config(root, tmp_path / "prune", **{"train.save_every": 1, "train.keep_last": 1, "train.max_steps": 3}), echo=quiet)
    names = sorted(p.name for p in (tmp_path / "prune" / "checkpoints").iterdir())
    assert [n for n in names if n.startswith("step-")] == ["step-000003"]
    assert {n.rsplit("-", 1)[0] for n in names if not n.startswith("step-")} == {".trash-step-000001", ".trash-step-000002"}
    assert ckpt.latest(tmp_path / "prune").name == "step-000003"
    monkeypatch.undo()
    ckpt.clear_leftovers(tmp_path / "prune" / "checkpoints")  # what the next save does first
    assert sorted(p.name for p in (tmp_path / "prune" / "checkpoints").iterdir()) == ["step-000003"]


def test_a_full_disk_during_a_checkpoint_says_how_much_space_and_keeps_the_earlier_ones(root, tmp_path, monkeypatch):
    real = ckpt.save_file

    def full_at_step_4(tensors, path, *args, **kwargs):
        if ".step-000004.tmp-" in str(path) and path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_at_step_4)
    # step 4 ends the run: its adapter is written first, and only the final checkpoint is missing
    with pytest.raises(TrainingError, match=r"the run finished and its adapter is saved at .*Only the final checkpoint did "
                                            r"not fit: the disk is full, and writing .*step-000004 needs about [\d.]+ kB"
                                            r".*the checkpoint .*step-000002 stays"):
        run(config(root, tmp_path / "full"), echo=quiet)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step-000002"]  # no temporary folder
    assert (tmp_path / "full" / "adapter" / "adapter_model.safetensors").is_file()
    assert ckpt.verify(tmp_path / "full" / "checkpoints" / "step-000002") is None
    monkeypatch.undo()
    assert any("step-000002" in s for s in resumed(root, tmp_path / "full"))


# ---------------------------------------------------------------- the training-time state


def test_the_training_state_restores_a_fixed_diff_pruning_mask_and_adalora_scores_exactly():
    """What a checkpoint holds beyond parameters: diff pruning's mask once fixed (a buffer that only
    finalize creates) and AdaLoRA's importance scores and kept triplets (plain attributes)."""
    import torch

    import deltatune as dt
    from deltatune import api
    from tiny_models import batch, build

    for make in (lambda: dt.DiffPruningConfig(target_sparsity=0.1), lambda: dt.AdaLoraConfig(init_r=4, target_r=2, total_step=4)):
        torch.manual_seed(0)
        model = dt.attach(build("llama"), make())
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in (1, 2):
            model(**batch("llama")).loss.backward()
            optimizer.step()
            dt.step(model, step)
            optimizer.zero_grad()
        dt.finalize(model)
        tensors, record = api.training_state(model)
        fresh = dt.attach(build("llama"), make())
        record = json.loads(json.dumps(record))  # as delta.json holds it
        api.load_training_state(fresh, tensors, record, "test")
        again, record_again = api.training_state(fresh)
        assert record_again == record and again.keys() == tensors.keys()
        assert any("diff_mask" in k or "importance" in k for k in tensors), sorted(tensors)[:5]
        for key in tensors:
            assert torch.equal(again[key], tensors[key]), key
        with torch.no_grad():
            assert torch.equal(model.eval()(**batch("llama")).logits, fresh.eval()(**batch("llama")).logits)


def test_a_start_that_failed_before_training_leaves_no_folder_in_the_way(root, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DeltaError, match=r"train\.resume is true but .* holds no run to resume \(the folder does not exist\)"):
        run(config(root, out, **{"train.resume": True}), echo=quiet)
    assert not out.exists()  # nothing made for a run that cannot start
    with pytest.raises(DeltaError, match="no model folder at"):
        run(config(root, out, **{"model.name": str(tmp_path / "no-such-model")}), echo=quiet)
    assert [p.name for p in out.iterdir()] == ["run.json"]
    result = run(config(root, out, **{"train.max_steps": 2}), echo=quiet)  # the corrected config takes the folder
    assert result.steps == 2 and (out / "adapter").is_dir()
