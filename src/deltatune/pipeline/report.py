"""What a run leaves behind: log.jsonl (and TensorBoard events when installed), curves.png,
and a summary table (method, trainable parameters, peak memory, wall time, tokens/s, metrics)
printed and saved as summary.json and summary.md beside the adapter."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any, Callable

import torch


class RunLog:
    """Append-only JSONL log, mirrored to TensorBoard when the tensorboard package is installed."""

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.path = Path(output_dir) / "log.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """A resumed run drops what the killed run logged after its checkpoint."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def plot_curves(records: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and not r.get("skipped")]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    metric = next((k for k in ("eval_accuracy", "eval_rouge_l", "eval_perplexity") if any(k in r for r in records)), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(10 if metric else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    if metric:
        points = [(r["step"], r[metric]) for r in records if metric in r]
        axes[0][1].plot(*zip(*points), "o-", color="tab:green")
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel(metric.removeprefix("eval_"))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_report(output_dir: Path, config: Any, counts: Any, log: RunLog, metrics: dict[str, float], wall: float,
                 tokens_per_s: float, skipped: int = 0, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    summary = {
        "method": config.method,
        "model": config.model.name,
        "trainable_parameters": counts.trainable,
        "total_parameters": counts.total,
        "trainable_percent": round(counts.percent, 4),
        "peak_memory_mb": round(peak_memory_bytes() / 2**20, 1),
        "wall_time_s": round(wall, 1),
        "tokens_per_s": round(tokens_per_s, 1),
        "skipped_steps": skipped,
        **{f"eval_{k}": round(v, 5) for k, v in metrics.items()},
    }
    rows = [(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value)) for key, value in summary.items()]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    plotted = plot_curves(log.records(), output_dir / "curves.png")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "summary.md").write_text("| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows))
    echo("\n" + table)
    echo(f"\nadapter: {output_dir / 'adapter'}; log: {log.path}" + (f"; curves: {output_dir / 'curves.png'}" if plotted else ""))
    return summary
