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

from ..files import write_failure


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
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            # The log is the run's record, not its result: a full or read-only disk costs the log lines, said
            # once, and training goes on (the next checkpoint or the adapter then names the space it needs).
            failure = write_failure(err)
            if failure is None:
                raise
            print(f"warning: {failure[0]}: {self.path} cannot be appended to, so training goes on without its log; "
                  f"{failure[1]} to keep the rest", file=sys.stderr)
            self.enabled = False
            return
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def records(self) -> list[dict[str, Any]]:
        return read_log(self.path.parent)

    def truncate_after(self, step: int) -> None:
        """A resumed run drops what the killed run logged after its checkpoint."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    """The records a run wrote to output_dir/log.jsonl (none when it wrote no log)."""
    path = Path(output_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


# The metric panel shows the first of these the run logged; the fractions are drawn on 0..1 whatever their values,
# so one point, or a flat line, sits where it belongs instead of in a window a few thousandths wide.
METRICS = ("eval_accuracy", "eval_rewards/accuracies", "eval_reward", "eval_rouge_l", "eval_exact_match", "eval_perplexity")
FRACTIONS = {"eval_accuracy", "eval_rewards/accuracies", "eval_rouge_l", "eval_exact_match"}  # DPO, ORPO: rewards/accuracies


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """An exponential moving average, debiased (as TensorBoard's smoothing): the first points are not pulled
    toward 0. weight None: heavier for longer curves (0.58 for a dozen points, up to 0.98 past 250)."""
    if weight is None:
        weight = 1 - 1 / max(2.4, min(50.0, len(values) / 5))
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def run_title(config: Any) -> str:
    return f"{config.method} on {_short(str(config.model.name))}  ({_short(str(config.output.dir))})"


def _short(name: str, limit: int = 48) -> str:
    """A long local path keeps its last two parts (the figure's title has one line)."""
    parts = Path(name).parts
    return name if len(name) <= limit or len(parts) <= 2 else str(Path("...", *parts[-2:]))


def curves_figure(runs: dict[str, list[dict[str, Any]]], title: str,
                  baselines: dict[str, dict[str, float]] | None = None) -> Any:
    """The loss (raw training loss faint, its moving average over it, eval loss as points) and the eval metric
    of one or more runs, each run in its own colour; `baselines` are runs without a log (an untuned model),
    drawn as dashed levels of the metric. Returns the matplotlib figure; the caller saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [r for records in runs.values() for r in records]
    metric = next((k for k in METRICS if any(k in r for r in every)
                   or any(k.removeprefix("eval_") in b for b in (baselines or {}).values())), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(10.5 if metric else 5.8, 3.9), squeeze=False, sharex=True)
    fig.suptitle(title, fontsize=9)
    loss_ax = axes[0][0]
    several = len(runs) > 1
    for n, (name, records) in enumerate(runs.items()):
        colour = f"C{n}"
        prefix = f"{name}: " if several else ""
        train = [(r["step"], r["loss"]) for r in records if "loss" in r and not r.get("skipped")]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            steps, losses = zip(*train)
            # with several runs the faint lines stay out of the legend (a leading "_" hides a label)
            raw = f"_{name}: train loss (logged steps)" if several else "train loss (logged steps)"
            loss_ax.plot(steps, losses, color=colour, alpha=0.25, linewidth=1, label=raw)
            loss_ax.plot(steps, smooth(list(losses)), color=colour, linewidth=2, label=f"{prefix}train loss (moving average)")
        if evals:
            loss_ax.plot(*zip(*evals), "o--", color=colour, markersize=5, label=f"{prefix}eval loss")
        if metric:
            points = [(r["step"], r[metric]) for r in records if metric in r]
            if points:
                axes[0][1].plot(*zip(*points), "o-", color=colour, markersize=5, label=name)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss", fontsize=9)
    if loss_ax.get_lines():  # a run that logged nothing draws empty axes, without legend's warning
        loss_ax.legend(fontsize=7)
    last = max((r.get("step", 0) for r in every), default=0)
    loss_ax.set_xlim(0, max(1, last) * 1.03)  # the whole run, from its start, in both panels
    if metric:
        ax = axes[0][1]
        label = metric.removeprefix("eval_")
        for n, (name, values) in enumerate((baselines or {}).items(), len(runs)):
            if label in values:
                ax.axhline(values[label], color=f"C{n}", linestyle="--", linewidth=1.5, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"eval {label}", fontsize=9)
        if metric in FRACTIONS:
            ax.set_ylim(0, 1.02)
        else:
            _pad_flat(ax)
        if several or baselines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _pad_flat(ax: Any) -> None:
    """A single point or a flat line: a window of +-10% around it, not matplotlib's +-0.5%."""
    values = [float(y) for line in ax.get_lines() for y in line.get_ydata()]
    if values and max(values) - min(values) <= 1e-9 * max(1.0, abs(max(values))):
        half = max(0.1 * abs(values[0]), 0.05)
        ax.set_ylim(values[0] - half, values[0] + half)


def save_figure(fig: Any, path: Path) -> None:
    """Write the figure atomically (a temporary file renamed into place) and free it."""
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    try:
        import matplotlib  # noqa: F401 - optional: without it the run writes no figure
    except ImportError:
        return False
    save_figure(curves_figure({"run": records}, title), path)
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
    plotted = plot_curves(log.records(), output_dir / "curves.png", title=run_title(config))
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "summary.md").write_text("| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows))
    echo("\n" + table)
    echo(f"\nadapter: {output_dir / 'adapter'}; log: {log.path}" + (f"; curves: {output_dir / 'curves.png'}" if plotted else ""))
    return summary
