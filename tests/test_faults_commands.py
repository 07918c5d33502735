"""The fault catalogue, the commands' outputs: `deltatune merge --out` never deletes what it did not make.

An existing folder with files is replaced only with --overwrite, and then only once the new
one is complete; a folder that holds the command's own input (the adapter, the base model,
the run folder around them) or the current directory is refused even with --overwrite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers as tf

import deltatune as dt
from checks import folder_bytes
from deltatune.cli import main as cli
from pipeline_models import save_tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("merge"), "llama")


@pytest.fixture
def run_folder(base, tmp_path) -> Path:
    """A run folder as `deltatune train` leaves it: adapter/, a log, checkpoints."""
    model = tf.AutoModelForCausalLM.from_pretrained(base)
    dt.attach(model, dt.LoraConfig(r=2, init="gaussian"))
    run = tmp_path / "run"
    dt.save(model, run / "adapter")
    (run / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "trainer_state.json").write_text("{}")
    return run


def merge(base: Path, adapter: Path, out: Path | str, *extra: str) -> int:
    return cli(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), *extra])


@pytest.mark.parametrize("where", ["run folder", "adapter folder", "base folder"])
def test_merge_never_writes_over_its_own_input(base, run_folder, where, capsys):
    out = {"run folder": run_folder, "adapter folder": run_folder / "adapter", "base folder": base}[where]
    before_run, before_base = folder_bytes(run_folder), folder_bytes(base)
    for extra in ((), ("--overwrite",)):
        assert merge(base, run_folder / "adapter", out, *extra) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and "that this command reads" in err and "choose a new folder" in err
    assert folder_bytes(run_folder) == before_run and folder_bytes(base) == before_base


def test_merge_into_a_folder_with_files_needs_overwrite_and_then_replaces_it_whole(base, run_folder, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert merge(base, run_folder / "adapter", out) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "--overwrite" in err
    assert folder_bytes(out) == {"notes.txt": folder_bytes(out)["notes.txt"]} and (out / "notes.txt").read_text() == "mine"
    assert merge(base, run_folder / "adapter", out, "--overwrite") == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    tf.AutoModelForCausalLM.from_pretrained(out)  # a complete model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "run"]  # no temporary or old folder left


def test_merge_into_a_new_or_empty_folder_needs_no_flag(base, run_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    assert merge(base, run_folder / "adapter", tmp_path / "empty") == 0
    assert merge(base, run_folder / "adapter", tmp_path / "new" / "merged") == 0
    assert (tmp_path / "empty" / "config.json").is_file() and (tmp_path / "new" / "merged" / "config.json").is_file()


@pytest.mark.parametrize("out", [".", ".."])
def test_merge_into_the_current_directory_is_refused(base, run_folder, tmp_path, monkeypatch, capsys, out):
    work = tmp_path / "elsewhere" / "work"  # `..` holds no input either, so only the cwd rule applies
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    assert merge(base, run_folder / "adapter", out, "--overwrite") == 2
    assert "current directory" in capsys.readouterr().err
    assert (work / "keep.txt").read_text() == "x"


def test_merge_failing_while_writing_keeps_the_old_folder(base, run_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", full_disk)
    assert merge(base, run_folder / "adapter", out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"the disk is full: writing the merged model into {out} failed; it needs about " in err
    assert f"Nothing was half-written: {out} is as it was.\nTo finish: free some space on that disk" in err
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]  # the temporary folder is gone


def test_merge_out_that_is_a_file_is_refused(base, run_folder, tmp_path, capsys):
    out = tmp_path / "file.bin"
    out.write_bytes(b"data")
    assert merge(base, run_folder / "adapter", out, "--overwrite") == 2
    assert "is a file, not a folder" in capsys.readouterr().err and out.read_bytes() == b"data"
