"""`deltatune compare --sweep lr=...`: each method trained once per lr, each run in DIR/<method>/lr-<value>/.

One sweep of a tiny llama (lora and ia3 at two lrs, three steps each: four child processes) is shared by the
tests of this file; they run in file order."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from deltatune.cli import main as cli
from deltatune.compare import compare, parse_sweep, sweep_grid
from deltatune.config import DeltaError
from pipeline_models import save_tiny, write_jsonl

LRS = [1e-3, 1e-1]
FLAGS = ["--train.seed", "1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = [{"instruction": f"Repeat the word {words[i % 6]}", "output": f"{words[i % 6]} {words[i % 6]}"} for i in range(24)]
    config = {"model": {"name": str(save_tiny(root, "llama"))},
              "data": {"train": str(write_jsonl(root / "rows.jsonl", rows)), "format": "instruction", "eval_fraction": 0.25},
              "lora": {"r": 4}, "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False},
              "compare": {"sweep": "lr=0.1,0.001"}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / "cmp"
    comparison = compare(path, ["lora", "ia3"], out, FLAGS, echo=lambda line: None)
    return {"root": root, "config": path, "out": out, "comparison": comparison}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_each_method_trains_once_per_lr_in_its_own_folder(sweep):
    out, grid = sweep["out"], sweep["comparison"].grid
    assert [(r.method, r.lr, r.status) for r in grid] == [("ia3", 1e-3, "ok"), ("ia3", 1e-1, "ok"),
                                                          ("lora", 1e-3, "ok"), ("lora", 1e-1, "ok")]
    for row in grid:
        run = out / row.method / f"lr-{row.lr:g}"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["method"] == row.method and saved["train"]["lr"] == row.lr  # the sweep's lr, not train.lr's
        summary = json.loads((run / "summary.json").read_text())
        assert row.eval["loss"] == summary["eval_loss"] and row.trainable == summary["trainable_parameters"]
    losses = {(r.method, r.lr): r.eval["loss"] for r in grid}
    assert losses[("lora", 1e-1)] != losses[("lora", 1e-3)]  # the lr reached the run
    record = json.loads((out / "compare.json").read_text())
    assert sorted(record["methods"]) == ["ia3/lr-0.001", "ia3/lr-0.1", "lora/lr-0.001", "lora/lr-0.1"]
    assert {"configs/lora_lr-0.1.yaml", "logs/ia3_lr-0.001.log", "comparison_sweep.csv", "comparison_sweep.md",
            "comparison_sweep.png"} <= set(record["wrote"])


def test_the_table_shows_each_method_at_its_best_lr_and_the_sweep_files_the_grid(sweep):
    out, comparison = sweep["out"], sweep["comparison"]
    best = {r.method: r for r in comparison.rows}
    assert sorted(best) == ["ia3", "lora"]
    for method, row in best.items():
        mine = [r for r in comparison.grid if r.method == method]
        assert row.eval["loss"] == min(r.eval["loss"] for r in mine) and row.lr in LRS
    table = read_csv(out / "comparison.csv")
    assert {(r["method"], float(r["lr"])) for r in table} == {(m, r.lr) for m, r in best.items()}
    md = (out / "comparison.md").read_text()
    assert "| method | lr | status |" in md and "best lr of the sweep" in md
    grid = read_csv(out / "comparison_sweep.csv")
    assert [(r["method"], float(r["lr"])) for r in grid] == [("ia3", 1e-3), ("ia3", 1e-1), ("lora", 1e-3), ("lora", 1e-1)]
    assert [float(r["eval_loss"]) for r in grid] == [r.eval["loss"] for r in comparison.grid]
    sweep_md = (out / "comparison_sweep.md").read_text()
    assert sweep_md.count("| lora | ") == 2 and sweep_md.count("| ia3 | ") == 2
    assert (out / "comparison_sweep.png").stat().st_size > 1000 and (out / "comparison.png").stat().st_size > 1000


def test_a_second_call_with_the_flag_retrains_nothing(sweep, capsys):
    out = sweep["out"]
    before = {str(p): p.stat().st_mtime_ns for p in out.glob("*/lr-*/summary.json")}
    table = (out / "comparison_sweep.csv").read_text()
    config = yaml.safe_load(sweep["config"].read_text())
    del config["compare"]
    plain = sweep["root"] / "plain.yaml"
    plain.write_text(yaml.safe_dump(config))
    assert cli(["compare", str(plain), "--methods", "lora", "ia3", "--out", str(out), "--sweep", "lr=1e-3,0.1", *FLAGS]) == 0
    assert len(before) == 4 and {str(p): p.stat().st_mtime_ns for p in out.glob("*/lr-*/summary.json")} == before
    assert (out / "comparison_sweep.csv").read_text() == table
    record = json.loads((out / "compare.json").read_text())
    assert {v["action"] for v in record["methods"].values()} == {"kept"}
    assert "lr" in capsys.readouterr().out.splitlines()[0]  # the printed table has the lr column


def test_a_sweep_and_a_plain_comparison_never_share_a_folder(sweep, tmp_path):
    with pytest.raises(DeltaError, match=r"another config \(compare.sweep: 'lr' -> '\(unset\)'\)"):
        compare(sweep["config"], ["lora"], sweep["out"], [*FLAGS, "--compare.sweep", "null"])
    # a sweep of a method refused before any process starts: its row per lr, no folder
    comparison = compare({**yaml.safe_load(sweep["config"].read_text()), "loha": {"r": 0}}, ["loha"], tmp_path / "c",
                         echo=lambda line: None)
    assert [(r.method, r.lr, r.status) for r in comparison.grid] == [("loha", 1e-3, "failed"), ("loha", 1e-1, "failed")]
    assert [r.lr for r in comparison.rows] == [1e-3] and "LoHaConfig.r = 0" in comparison.rows[0].error
    assert not (tmp_path / "c" / "loha").exists()


def test_sweep_values_are_read_and_checked():
    assert parse_sweep(None) is None and parse_sweep(False) is None
    assert parse_sweep("lr") == {"lr": []}
    assert parse_sweep("lr=3e-4,1e-4, 1e-4") == {"lr": [1e-4, 3e-4]}
    assert parse_sweep({"lr": [1e-3, "2e-3"]}) == {"lr": [1e-3, 2e-3]} and parse_sweep({"lr": None}) == {"lr": []}
    with pytest.raises(DeltaError, match="'r' cannot be swept; only lr can"):
        parse_sweep("r=4,8")
    with pytest.raises(DeltaError, match="every lr must be above 0"):
        parse_sweep("lr=0,1e-3")
    with pytest.raises(DeltaError, match="not all numbers"):
        parse_sweep("lr=fast")
    # a bare `lr`: a third, once and three times each method's starting lr
    assert sweep_grid("lora", {"lr": []}) == [6.7e-5, 2e-4, 6e-4]
    assert sweep_grid("ia3", {"lr": []}) == [1e-3, 3e-3, 9e-3]
    assert sweep_grid("full", {"lr": []}) == [6.7e-6, 2e-5, 6e-5]
    assert sweep_grid("lora", {"lr": [1e-2]}) == [1e-2]
