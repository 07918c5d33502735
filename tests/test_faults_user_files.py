"""The fault catalogue, the user's files that a dependency cannot read: one line naming the file, no traceback.

transformers 5 validates a config with huggingface_hub's strict dataclasses, whose errors derive from neither
OSError nor ValueError; whatever a dependency raises while reading a model's config, weights or tokenizer
reaches the user as one line that names the file and the dependency's message (`--debug`, or
DELTATUNE_DEBUG=1, shows the traceback). An exception raised in deltatune's own code is a bug and keeps its
traceback. `plan` and `info` read only the config; `train`, `eval` and `merge` load the whole model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers as tf

import deltatune as dt
from deltatune.cli import main
from deltatune.config import UserFileError, reading
from pipeline_models import save_tiny, write_jsonl

# config.json contents that transformers 5.25 refuses, each a different way; what the error must say
BROKEN = {
    "heads": ({"hidden_size": 30}, "not a multiple of the number of attention heads"),
    "type": ({"hidden_size": "big"}, "hidden_size"),
    "no_model_type": ({"model_type": None}, "model_type"),
    "json": ('{"model_type": "llama",', "JSON"),
}


# transformers 4 reads these configs without validating their values (the model then fails later, elsewhere)
STRICT = pytest.mark.skipif(int(tf.__version__.split(".")[0]) < 5,
                            reason="transformers 4 does not validate config values while reading them")
VALIDATED = {"heads", "type"}


def kinds(names):
    return [pytest.param(k, marks=STRICT) if k in VALIDATED else k for k in names]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("user-files"), "llama")


def broken_model(tiny: Path, where: Path, kind: str) -> Path:
    """A copy of the tiny model (weights and tokenizer) whose config.json is broken in one way."""
    folder = where / f"model-{kind}"
    shutil.copytree(tiny, folder)
    change, _ = BROKEN[kind]
    if isinstance(change, str):
        (folder / "config.json").write_text(change)
    else:
        data = json.loads((folder / "config.json").read_text())
        data.update(change)
        data = {k: v for k, v in data.items() if v is not None}
        (folder / "config.json").write_text(json.dumps(data))
    return folder


def one_line_error(capsys, argv: list[str], command: str) -> str:
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deltatune {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("kind", kinds(sorted(BROKEN)))
def test_plan_and_info_name_the_config_file(tiny, tmp_path, capsys, kind):
    folder = broken_model(tiny, tmp_path, kind)
    _, says = BROKEN[kind]
    for model in (str(folder), str(folder / "config.json")):
        for argv, command in ((["plan", "--model", model, "--device", "cpu", "--dtype", "fp32"], "plan"),
                              (["info", model], "info")):
            line = one_line_error(capsys, argv, command)
            assert str(folder) in line and says in line, line


@pytest.mark.parametrize("kind", kinds(["heads", "type"]))
def test_train_eval_and_merge_name_the_model(tiny, tmp_path, capsys, kind):
    folder = broken_model(tiny, tmp_path, kind)
    _, says = BROKEN[kind]
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i} of some text"} for i in range(6)])
    flags = ["--model.name", str(folder), "--data.train", str(data), "--train.max_steps", "1",
             "--data.eval_fraction", "0.5", "--output.dir", str(tmp_path / "run")]
    for argv, command in ((["train", *flags], "train"), (["eval", *flags], "eval")):
        line = one_line_error(capsys, argv, command)
        assert str(folder) in line and says in line, line
    # merge: a good adapter, a base whose config is broken
    model = tf.AutoModelForCausalLM.from_pretrained(tiny)
    dt.attach(model, dt.LoraConfig(r=2))
    dt.save(model, tmp_path / "adapter")
    line = one_line_error(capsys, ["merge", "--model", str(folder), "--adapter", str(tmp_path / "adapter"),
                                   "--out", str(tmp_path / "merged")], "merge")
    assert str(folder) in line and says in line, line


@STRICT
def test_debug_shows_the_traceback(tiny, tmp_path, capsys, monkeypatch):
    folder = broken_model(tiny, tmp_path, "heads")
    line = one_line_error(capsys, ["info", str(folder)], "info")
    assert "--debug shows the traceback" in line
    for argv in (["info", str(folder), "--debug"], ["--debug", "info", str(folder)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "StrictDataclassClassValidationError" in err
        assert err.strip().splitlines()[-1].startswith("deltatune info: error: cannot read the model config")
    monkeypatch.setenv("DELTATUNE_DEBUG", "1")
    assert main(["plan", "--model", str(folder)]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_reading_wraps_a_dependency_error_and_leaves_deltatune_bugs_alone():
    class ForeignError(Exception):  # neither OSError nor ValueError, like huggingface_hub's validation errors
        pass

    foreign = compile("def fail():\n    raise ForeignError('line one\\n    line two')", "/site-packages/dep.py", "exec")
    scope = {"ForeignError": ForeignError}
    exec(foreign, scope)
    with pytest.raises(UserFileError, match=r"^cannot read the model config x/config.json: line one line two$") as info:
        with reading("the model config x/config.json"):
            scope["fail"]()
    assert isinstance(info.value.__cause__, ForeignError)
    # the same exception raised in deltatune's own code is a bug: it keeps its type (and its traceback)
    inside = compile("def fail():\n    raise ForeignError('a bug')", str(Path(dt.config.__file__).parent / "x.py"),
                     "exec")
    exec(inside, scope)
    with pytest.raises(ForeignError):
        with reading("a file"):
            scope["fail"]()
