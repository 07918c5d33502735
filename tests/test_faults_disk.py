"""Part of the fault catalogue (see test_faults.py): a disk that fills up, or cannot be written, at the end of a run.

The adapter is written first, so a final checkpoint (or merged model) that does not fit never costs the trained
delta; every such failure is one TrainingError that names the folder, the space and what was kept, whether the
writer said so with an OSError or with safetensors' own SafetensorError.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import deltatune as dt
from deltatune import io as dt_io
from deltatune.files import write_failure
from deltatune.pipeline import checkpoint as ckpt
from deltatune.pipeline.config import load_run_config
from deltatune.pipeline.train import TrainingError, run
from pipeline_models import save_tiny, write_jsonl

FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("disk_faults")


def config(root: Path, out: Path, **flags):
    rows = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in ["alpha", "beta", "gamma", "delta"] * 4]
    base = {"model.name": str(save_tiny(root, "llama")), "data.train": str(write_jsonl(root / "rows.jsonl", rows)),
            "data.format": "instruction", "train.max_steps": 3, "train.batch_size": 4, "train.lr": 1e-2,
            "train.keep_last": 1, "train.progress": False, "output.dir": str(out)}
    if flags.get("method", "lora") == "lora":
        base["lora.r"] = 4
    return load_run_config(None, {**base, **flags})


def quiet(*args, **kwargs):
    pass


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def reference(root) -> dict[str, Path]:
    """The same runs on a disk with room: what the adapters must hold."""
    out = {}
    for method in ("lora", "full"):
        out[method] = run(config(root, root / f"ref-{method}", method=method), echo=quiet).adapter_dir
    return out


def loads(root: Path, adapter: Path) -> None:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(save_tiny(root, "llama"))
    dt.load(model, adapter)


# ---------------------------------------------------------------- the matcher


@pytest.mark.parametrize("err, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (SafetensorError(FULL), "the disk is full"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
    (SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)"), "may not write"),
    (RuntimeError("Permission denied"), "may not write"),
])
def test_write_failures_are_matched_by_what_they_say_not_by_class(err, words):
    assert words in write_failure(err)[0]


@pytest.mark.parametrize("err", [OSError(errno.ENOENT, "No such file"), SafetensorError("invalid header"), ValueError("x")])
def test_other_failures_are_not_write_failures(err):
    assert write_failure(err) is None


# ---------------------------------------------------------------- a small real disk


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 700 KiB tmpfs here ({mounted.stderr.strip() or 'mount failed'}; needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_fine_tuning_onto_a_small_disk_keeps_the_adapter(root, reference, small_disk):
    out = small_disk / "run"
    with pytest.raises(TrainingError) as err:
        run(config(root, out, method="full"), echo=quiet)
    message = str(err.value)
    assert "SafetensorError" not in message and "needs about" in message and "disk is full" in message
    if (out / "adapter").exists():  # it fit: only the final checkpoint is missing, and the run says so
        assert message.startswith("the run finished and its adapter is saved at")
        assert "\nTo continue the run later: free some space" in message
        same(weights(out / "adapter"), weights(reference["full"]))
        loads(root, out / "adapter")
    else:  # nothing half-written passes for an adapter
        assert "writing the adapter into" in message
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary file or folder left


# ---------------------------------------------------------------- safetensors' own error, where mounting is not possible


def test_a_final_checkpoint_that_does_not_fit_never_costs_the_adapter(root, reference, tmp_path, monkeypatch):
    def full(tensors, path, *args, **kwargs):
        raise SafetensorError(FULL)

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(TrainingError, match=r"^the run finished and its adapter is saved at .*adapter.*Only the final "
                                            r"checkpoint did not fit: the disk is full, and writing .*step-000003 needs "
                                            r"about [\d.]+ [kM]B .*optimizer state.*\nTo continue the run later") as err:
        run(config(root, tmp_path / "out"), echo=quiet)
    assert len(str(err.value).replace(str(tmp_path), "")) < 600  # short, the paths aside
    same(weights(tmp_path / "out" / "adapter"), weights(reference["lora"]))
    loads(root, tmp_path / "out" / "adapter")
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").iterdir())


def test_an_adapter_that_does_not_fit_names_the_space_and_the_checkpoint_kept(root, tmp_path, monkeypatch):
    real = dt_io.save_file

    def full_outside_checkpoints(tensors, path, *args, **kwargs):
        if "checkpoints" not in str(path):
            raise SafetensorError(FULL)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(dt_io, "save_file", full_outside_checkpoints)
    with pytest.raises(TrainingError, match=r"^the disk is full: writing the adapter into .*adapter failed; it needs "
                                            r"about [\d.]+ [kM]B\. .*checkpoint .*step-000002 stays.*\nTo finish: free some space"):
        run(config(root, tmp_path / "out", **{"train.save_every": 1}), echo=quiet)
    assert not (tmp_path / "out" / "adapter").exists()  # nothing that could pass for a finished adapter


def test_a_merged_model_that_does_not_fit_keeps_the_adapter(root, reference, tmp_path, monkeypatch):
    import transformers as tf

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", full)
    with pytest.raises(TrainingError, match=r"^the disk is full: writing the merged model into .*merged failed; it needs "
                                            r"about [\d.]+ [kM]B\. The adapter is saved at.*\nTo finish: free some space on that disk, then "
                                            r"write the merged model from it with `deltatune merge"):
        run(config(root, tmp_path / "out", **{"output.merged": True}), echo=quiet)
    same(weights(tmp_path / "out" / "adapter"), weights(reference["lora"]))
    assert not (tmp_path / "out" / "merged").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]


def test_a_checkpoint_during_the_run_that_does_not_fit_keeps_the_one_before(root, tmp_path, monkeypatch):
    real = ckpt.save_file

    def full_at_step_2(tensors, path, *args, **kwargs):
        if ".step-000002.tmp-" in str(path):
            raise SafetensorError(FULL)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_at_step_2)
    with pytest.raises(TrainingError, match=r"^step 2: the disk is full: writing checkpoint .*step-000002 needs about "
                                            r"[\d.]+ [kM]B .*the newest is .*step-000001\)\. Free some space on that disk "
                                            r"\(or lower train\.keep_last\) and resume"):
        run(config(root, tmp_path / "out", **{"train.save_every": 1}), echo=quiet)
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-000001"]


# ---------------------------------------------------------------- two processes hear the same verdict

FAULTS = {
    "disk": "from safetensors import SafetensorError\n"
            "from deltatune.pipeline import checkpoint as ckpt\n"
            "real = ckpt.save_file\n"
            "def save_file(tensors, path, *args, **kwargs):\n"
            "    if '.step-000002.tmp-' in str(path):\n"
            f"        raise SafetensorError({FULL!r})\n"
            "    return real(tensors, path, *args, **kwargs)\n"
            "ckpt.save_file = save_file\n",
    "nan": "from deltatune.pipeline import train\n"
           "real = train._check_finite\n"
           "def check_finite(model, step):\n"
           "    if step == 2:\n"
           "        raise train.TrainingError(f'step {step}: lora_A holds non-finite values, so nothing is saved')\n"
           "    return real(model, step)\n"
           "train._check_finite = check_finite\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("fault, words", [("disk", "step 2: the disk is full"), ("nan", "step 2: lora_A holds non-finite")])
def test_an_error_at_checkpoint_time_on_the_main_process_stops_every_process(root, tmp_path, fault, words):
    """The checkpoint is written by the main process alone; its verdict reaches the others, which would
    otherwise wait for it at the next barrier until the process group's timeout."""
    import os
    import sys

    cfg = config(root, tmp_path / "out", **{"train.save_every": 1, "train.batch_size": 2})
    (tmp_path / "run.yaml").write_text(f"model: {{name: {cfg.model.name}}}\n"
                                       f"data: {{train: {cfg.data.train}, format: instruction}}\n"
                                       "lora: {r: 4}\ntrain: {max_steps: 3, save_every: 1, keep_last: 1, lr: 1.0e-2, "
                                       "progress: false}\n")
    script = tmp_path / "faulty.py"
    script.write_text(FAULTS[fault] + "import sys\nfrom deltatune.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    # `--multi_gpu` selects accelerate's torchrun launcher; with no GPU the processes join over gloo on the CPU
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), "train",
                          str(tmp_path / "run.yaml"), "--train.batch_size", "2", "--output.dir", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode != 0
    assert "2 x 2 process(es)" in two.stdout  # two processes really took part
    assert two.stderr.count(f"deltatune train: error: {words}") == 2, two.stderr[-3000:]  # each process, the same error
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-000001"]


def test_a_merge_that_does_not_fit_says_so_and_leaves_nothing(root, tmp_path, monkeypatch):
    import transformers as tf

    from deltatune.config import DeltaError
    from deltatune.pipeline.export import export_merged

    model = tf.AutoModelForCausalLM.from_pretrained(save_tiny(root, "llama"))
    dt.attach(model, dt.LoraConfig(r=4))

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", read_only)
    with pytest.raises(DeltaError, match=r"^the file system is read-only: writing the merged model into .*merged failed; "
                                         r"it needs about [\d.]+ [kM]B\. Nothing was half-written: nothing is at .*merged\.\n"
                                         r"To finish: make that disk writable, then merge again"):
        export_merged(model, None, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_a_log_line_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    import builtins
    import errno

    from deltatune.pipeline.report import RunLog

    log = RunLog(tmp_path, enabled=True)
    log.write({"step": 1, "loss": 2.0})
    real_open = builtins.open

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith("log.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    log.write({"step": 2, "loss": 1.5})
    log.write({"step": 3, "loss": 1.0})
    monkeypatch.setattr(builtins, "open", real_open)
    err = capsys.readouterr().err
    assert err.count("the disk is full") == 1 and "training goes on without its log" in err
    assert [r["step"] for r in log.records()] == [1]  # what was written stays readable
