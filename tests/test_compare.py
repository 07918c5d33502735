"""`deltatune compare`: several methods of one config, each in its own process, one table.

One comparison of a tiny llama (three steps per method) is shared by the tests of this file: lora and ia3
train, bitfit fails in its child process (a llama has no biases), loha fails its config check (r: 0) before
any process starts. The later tests call again into the same folder, so they run in file order."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from deltatune.cli import main as cli
from deltatune.compare import Comparison, MethodRow, compare, write_outputs
from deltatune.config import DeltaError
from pipeline_models import save_tiny, train_records, write_jsonl

METHODS = ["lora", "ia3", "bitfit", "loha"]
FLAGS = ["--train.seed", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = [{"instruction": f"Repeat the word {words[i % 6]}", "output": f"{words[i % 6]} {words[i % 6]}"} for i in range(24)]
    config = {"model": {"name": str(save_tiny(root, "llama"))},
              "data": {"train": str(write_jsonl(root / "rows.jsonl", rows)), "format": "instruction", "eval_fraction": 0.25},
              "method": "lora", "lora": {"r": 4}, "loha": {"r": 0},
              "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "log_every": 1, "save_every": 2, "progress": False},
              "output": {"dir": str(root / "not-used")}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / "cmp"
    lines: list[str] = []
    comparison = compare(path, METHODS, out, FLAGS, echo=lines.append)
    return {"root": root, "config": path, "out": out, "comparison": comparison, "lines": lines}


def markdown_rows(path: Path) -> list[dict[str, str]]:
    table = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def files_with_mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_each_number_is_the_runs_own_record(setup):
    out, rows = setup["out"], {r.method: r for r in setup["comparison"].rows}
    assert [r.status for r in setup["comparison"].rows] == ["ok", "ok", "failed", "failed"]
    table = {r["method"]: r for r in markdown_rows(out / "comparison.md")}
    for method in ("lora", "ia3"):
        row, run = rows[method], out / method
        summary = json.loads((run / "summary.json").read_text())
        assert summary["method"] == method  # each method trained its own run, in its own folder
        assert row.trainable == summary["trainable_parameters"] and row.trainable_percent == summary["trainable_percent"]
        assert row.eval["loss"] == summary["eval_loss"] and row.eval["perplexity"] == summary["eval_perplexity"]
        assert row.wall_s == summary["wall_time_s"] and row.tokens_per_s == summary["tokens_per_s"]
        assert row.run_peak_mib == summary["peak_memory_mb"]
        assert row.train_loss == train_records(run)[-1]["loss"]
        weights = (run / "adapter" / "adapter_model.safetensors").stat().st_size
        assert row.adapter_bytes == weights + (run / "adapter" / "adapter_config.json").stat().st_size
        # measured by compare: the child's peak RSS, and the planner's estimate the run printed
        assert 50 < row.process_peak_rss_mib < 10_000 and row.planned_mib > 0
        assert f"{row.planned_mib:.1f} MiB" in (out / "logs" / f"{method}.log").read_text()
        cells = table[method]
        assert cells["trainable"] == f"{summary['trainable_parameters']:,}"
        assert cells["eval loss"] == f"{summary['eval_loss']:.4f}"
        assert cells["final train loss"] == f"{train_records(run)[-1]['loss']:.4f}"
        assert cells["adapter bytes"] == f"{row.adapter_bytes:,}"
    assert rows["lora"].trainable != rows["ia3"].trainable
    ok = [r for r in setup["comparison"].rows if r.status == "ok"]
    assert ok[0].eval["loss"] <= ok[1].eval["loss"]  # best first
    text = (out / "comparison.md").read_text()
    assert "deltatune compare" in text and "--methods lora ia3 bitfit loha" in text and "--train.seed 1" in text
    assert (out / "comparison.png").stat().st_size > 1000
    record = json.loads((out / "compare.json").read_text())
    assert set(record["wrote"]) == {"comparison.md", "comparison.csv", "comparison.png", "configs/lora.yaml",
                                    "configs/ia3.yaml", "configs/bitfit.yaml", "logs/lora.log", "logs/ia3.log",
                                    "logs/bitfit.log"}  # loha never started: no config or log of its own
    assert {m: v["status"] for m, v in record["methods"].items()} == {"lora": "ok", "ia3": "ok", "bitfit": "failed",
                                                                     "loha": "failed"}
    # the config's output.dir is replaced, and said so
    assert not (setup["root"] / "not-used").exists() and any("not used" in line for line in setup["lines"])


def test_the_csv_holds_the_markdowns_numbers(setup):
    out = setup["out"]
    md, table = markdown_rows(out / "comparison.md"), csv_rows(out / "comparison.csv")
    assert [r["method"] for r in table] == [r["method"] for r in md]
    assert sorted(r["method"] for r in table[:2]) == ["ia3", "lora"] and [r["method"] for r in table[2:]] == ["bitfit", "loha"]
    headers = list(md[0])
    assert len(headers) == len(table[0])  # one column each, in the same order
    compared = 0
    for md_row, csv_row in zip(md, table):
        for header, (key, value) in zip(headers, csv_row.items()):
            shown = md_row[header]
            if value == "" or key in ("method", "status", "error"):
                assert shown == value, (key, shown, value)
                continue
            number = float(value)
            decimals = len(shown.split(".")[1]) if "." in shown else 0
            assert float(shown.replace(",", "")) == pytest.approx(number, abs=0.5 * 10**-decimals), (key, shown, value)
            compared += 1
    assert compared >= 20


def test_a_failed_method_has_its_error_row_and_the_others_run(setup):
    rows = {r.method: r for r in setup["comparison"].rows}
    assert setup["comparison"].failed == ["bitfit", "loha"]
    assert "no bias terms" in rows["bitfit"].error and "\n" not in rows["bitfit"].error  # from its child process
    assert "LoHaConfig.r = 0" in rows["loha"].error  # refused before any process started
    assert not (setup["out"] / "loha").exists()
    assert rows["bitfit"].trainable is None and rows["bitfit"].process_peak_rss_mib is None
    table = {r["method"]: r for r in markdown_rows(setup["out"] / "comparison.md")}
    assert table["bitfit"]["status"] == "failed" and "no bias terms" in table["bitfit"]["error"]
    assert table["lora"]["status"] == table["ia3"]["status"] == "ok"


def test_a_second_call_retrains_nothing_and_gives_the_same_table(setup):
    out = setup["out"]
    before = {m: files_with_mtimes(out / m) for m in ("lora", "ia3")}
    table = (out / "comparison.md").read_text()
    code = cli(["compare", str(setup["config"]), "--methods", *METHODS, "--out", str(out), *FLAGS])
    assert code == 1  # bitfit and loha fail again
    assert {m: files_with_mtimes(out / m) for m in ("lora", "ia3")} == before
    assert (out / "comparison.md").read_text() == table
    record = json.loads((out / "compare.json").read_text())
    assert record["methods"]["lora"]["action"] == record["methods"]["ia3"]["action"] == "kept"


def test_bad_inputs_are_refused_before_anything_runs(setup, tmp_path, capsys):
    config, out = setup["config"], setup["out"]
    before = files_with_mtimes(out)
    with pytest.raises(DeltaError, match="at least one method"):
        compare(config, [], tmp_path / "a")
    with pytest.raises(DeltaError, match="'lorra' is not a deltatune method \\(did you mean 'lora'\\?\\)"):
        compare(config, ["lora", "lorra"], tmp_path / "a")
    with pytest.raises(DeltaError, match="another config \\(train.lr: 0.01 -> 0.5\\).*new --out"):
        compare(config, ["lora"], out, [*FLAGS, "--train.lr", "0.5"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(DeltaError, match="not empty and holds no compare.json"):
        compare(config, ["lora"], tmp_path / "b")
    with pytest.raises(DeltaError, match="--output.overwrite cannot be given to compare"):
        compare(config, ["lora"], tmp_path / "c", ["--output.overwrite", "true"])
    with pytest.raises(DeltaError, match="model.name is required"):  # the shared part, every method's fault
        compare({"data": {"train": "x.jsonl"}}, ["lora", "ia3"], tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "b").iterdir())) == 1
    assert files_with_mtimes(out) == before
    assert cli(["compare", str(config), "--methods", "nope", "--out", str(tmp_path / "e")]) == 2
    assert "deltatune compare: error: --methods: 'nope' is not a deltatune method" in capsys.readouterr().err


def test_without_matplotlib_the_tables_are_written_and_the_figure_skipped_with_a_note(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    comparison = Comparison(out=tmp_path, rows=[MethodRow("lora", "failed", error="boom")], command="deltatune compare x",
                            files=[])
    assert write_outputs(comparison) == [tmp_path / "comparison.md", tmp_path / "comparison.csv"]
    assert not (tmp_path / "comparison.png").exists()
    assert "no comparison.png: matplotlib is not installed" in (tmp_path / "comparison.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.csv", "comparison.md"]  # no temporary left


def test_a_changed_method_section_never_touches_that_methods_finished_run(setup):
    out = setup["out"]
    before = files_with_mtimes(out / "lora")
    comparison = compare(setup["config"], ["lora"], out, [*FLAGS, "--lora.r", "8"], echo=lambda line: None)
    (row,) = comparison.rows
    assert row.status == "failed" and "holds a run of another lora config (lora.r: 4 -> 8)" in row.error
    assert f"delete {out / 'lora'}" in row.error
    assert files_with_mtimes(out / "lora") == before


@pytest.mark.slow  # one more child process (~10 s on 2 busy cores)
def test_an_interrupted_method_resumes_to_the_same_delta(setup):
    """lora's run as a kill after its step-2 checkpoint leaves it: no final checkpoint, adapter or report."""
    out = setup["out"]
    run = out / "lora"
    finished = load_file(run / "adapter" / "adapter_model.safetensors")
    ia3 = files_with_mtimes(out / "ia3")
    for name in ("summary.json", "summary.md", "curves.png"):
        (run / name).unlink()
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-000003")
    comparison = compare(setup["config"], ["lora", "ia3"], out, FLAGS, echo=lambda line: None)
    record = json.loads((out / "compare.json").read_text())
    assert record["methods"]["lora"]["action"] == "resumed" and record["methods"]["ia3"]["action"] == "kept"
    assert "resuming from" in (out / "logs" / "lora.log").read_text()
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == finished.keys() and all((resumed[k] == finished[k]).all() for k in finished)
    assert files_with_mtimes(out / "ia3") == ia3
    assert [r.method for r in comparison.rows if r.status == "ok"] and not comparison.failed
