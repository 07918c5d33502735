"""`deltatune compare`: one run config trained with several methods, side by side.

Each method is one ordinary `deltatune train` run in a process of its own (so one method's memory, crash or
out-of-memory kill cannot touch another's, and each peak is its own), into DIR/<method>/. The numbers of the
table come from each run's own records: summary.json (parameters, eval metrics, wall time, tokens/s, the
run's peak memory) and log.jsonl (the final train loss, the curves). Two numbers runs do not record are taken
here: the child process's peak RSS (wait4's rusage for that process alone) and the planner's estimate, read
from the plan table the run prints into its log (runs write no plan file).

DIR belongs to one comparison: compare.json records the config it was started with (a hash of every key
but the method and the output folder) and each method's status. A second call with the same config keeps
the finished runs untouched, resumes an interrupted one (`train.resume auto`, as `deltatune train` would)
and runs the rest; a failed method gets a row with its error and the others still run.

Beyond the task loss, two optional measures (the `compare:` section of the config, or their flags):
- forgetting (`reference_data`): each finished run's loss and KL against its base on data that was not its task
  (forgetting.py), measured in a child process of its own per run and kept in the run's folder (forgetting.json);
- a learning-rate sweep (`sweep: lr`): each method trained once per lr into DIR/<method>/lr-<value>/, the table
  showing each method at its best lr and comparison_sweep.* the whole grid.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import METHODS, DeltaError
from .files import write_atomic
from . import forgetting

RECORD = "compare.json"
# compare's own files beside the run folders (no method is called "configs" or "logs")
CONFIGS, LOGS = "configs", "logs"
# keys compare sets for every method itself: its own output folder, and resuming what a killed call left
OWNED = ("method", "output.dir", "output.overwrite", "train.resume")
SECTION = "compare"  # compare's own keys in the config: options of the comparison, no run's setting

# A starting lr per method family for a bare `--sweep lr` (the grid is it /3, x1, x3): the usual published
# ranges (a low-rank delta ~2e-4, IA3's vectors and BitFit's biases ~1e-3 to 3e-3, soft prompts ~1e-2 to 3e-2,
# whole weights ~2e-5). Starting points for a sweep to test, not defaults it has justified.
SWEEP_CENTRE = {"ia3": 3e-3, "bitfit": 1e-3, "prompt_tuning": 3e-2, "p_tuning": 1e-2, "prefix_tuning": 1e-2,
                "p_tuning_v2": 1e-2, "full": 2e-5, "freeze": 2e-5, "bottleneck_adapter": 1e-4,
                "adapter_fusion": 1e-4, "diff_pruning": 1e-3}
DEFAULT_CENTRE = 2e-4  # lora, dora, adalora, loha, lokr: train.lr's own default


@dataclass
class Options:
    """The comparison's own settings (the config's `compare:` section), none of them a run's."""

    reference_data: str | None = None  # forgetting is measured on it when set
    reference_format: str | None = None  # its data.format; default: text for .txt, else the run's own
    sweep: dict[str, list[float]] | None = None  # {"lr": [...]}, or {"lr": []} for each method's default grid


@dataclass
class MethodRow:
    """One run's line of the table (a method, or a method at one lr of a sweep); None where no such number."""

    method: str
    status: str  # "ok" or "failed"
    error: str | None = None
    lr: float | None = None  # a sweep's lr of this run; None: no sweep
    trainable: int | None = None
    total: int | None = None
    trainable_percent: float | None = None
    train_loss: float | None = None
    eval: dict[str, float] = field(default_factory=dict)  # the run's eval_* metrics, names without "eval_"
    wall_s: float | None = None  # the run's own wall time (summary.json)
    tokens_per_s: float | None = None
    run_peak_mib: float | None = None  # the run's record: CUDA max allocated on a GPU, peak RSS on a CPU
    process_peak_rss_mib: float | None = None  # measured here: the child process's peak RSS
    planned_mib: float | None = None  # the planner's estimate of the peak, from the run's printed plan
    adapter_bytes: int | None = None  # adapter_model.safetensors + adapter_config.json
    # forgetting on the reference data (forgetting.json): tuned loss - base loss, and mean KL(base || tuned)
    ref_loss_increase: float | None = None
    ref_kl: float | None = None
    action: str = ""  # what this call did: trained, resumed, kept (finished earlier), failed

    @property
    def name(self) -> str:
        """The run's folder under DIR: the method's name, or method/lr-<value> in a sweep."""
        return self.method if self.lr is None else f"{self.method}/{lr_folder(self.lr)}"


@dataclass
class Comparison:
    out: Path
    rows: list[MethodRow]
    command: str
    files: list[Path]
    notes: list[str] = field(default_factory=list)
    grid: list[MethodRow] = field(default_factory=list)  # a sweep's every run; `rows` then holds each method's best

    @property
    def failed(self) -> list[str]:
        return [r.method for r in self.rows if r.status != "ok"]


# ---------------------------------------------------------------- configs


def read_config(config: str | os.PathLike | dict[str, Any] | None, overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """The run config as plain data, the flags applied (as `deltatune train` applies them)."""
    from .pipeline.config import ConfigError, parse_flags, read_config_file, set_path

    source = "<flags>" if config is None else "<dict>" if isinstance(config, dict) else str(config)
    if isinstance(config, dict):
        data = json.loads(json.dumps(config))  # a copy the flags may change
    else:
        data = {} if config is None else read_config_file(config)
    pairs = overrides.items() if isinstance(overrides, dict) else parse_flags(list(overrides or []))
    for key, value in pairs:
        if key in OWNED:
            why = {"method": "compare trains each of --methods", "output.dir": "each method's run goes to --out/<method>",
                   "output.overwrite": "it would clear finished runs; compare into a new --out instead",
                   "train.resume": "compare resumes interrupted runs itself"}[key]
            raise ConfigError(f"--{key} cannot be given to compare: {why}; drop the flag")
        set_path(data, key, value, source)
    return data


def method_data(data: dict[str, Any], method: str, out: Path, lr: float | None = None) -> dict[str, Any]:
    """One run's config: the shared keys, this method's own section (other methods' dropped), its folder, and in a
    sweep its lr."""
    mine = {k: v for k, v in data.items() if (k not in METHODS or k == method) and k != SECTION}
    mine["method"] = method
    folder = out / method if lr is None else out / method / lr_folder(lr)
    mine["output"] = {**(mine.get("output") or {}), "dir": str(folder), "overwrite": False}
    mine["train"] = {**(mine.get("train") or {}), "resume": "auto", **({"lr": lr} if lr is not None else {})}
    return mine


def take_options(data: dict[str, Any], reference_data: str | None = None, sweep: Any = None) -> Options:
    """The config's `compare:` section as Options, taken out of `data` (no run has such a section); the
    arguments, when given, override it."""
    section = data.pop(SECTION, None) or {}
    if not isinstance(section, dict):
        raise DeltaError(f"{SECTION}: must be a section (reference_data, reference_format, sweep), not {section!r}")
    unknown = sorted(set(section) - {"reference_data", "reference_format", "sweep"})
    if unknown:
        raise DeltaError(f"{SECTION}.{unknown[0]} is not a compare setting; the settings are reference_data, "
                         "reference_format and sweep")
    reference = reference_data if reference_data is not None else section.get("reference_data")
    if reference is not None:
        reference = str(reference)
        if not Path(reference).exists() and Path(reference).suffix:
            raise DeltaError(f"{SECTION}.reference_data: no data file at {reference}")
    return Options(reference_data=reference, reference_format=section.get("reference_format"),
                   sweep=parse_sweep(sweep if sweep is not None else section.get("sweep")))


def parse_sweep(value: Any) -> dict[str, list[float]] | None:
    """`lr` (each method's default grid), `lr=1e-4,3e-4` or {lr: [1e-4, 3e-4]} as {"lr": [...]}; None: no sweep."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        key, _, listed = value.partition("=")
        values: Any = [v for v in listed.split(",") if v.strip()] if listed else []
    elif isinstance(value, dict) and len(value) == 1:
        key, values = next(iter(value.items()))
        values = [] if values is None else values if isinstance(values, list) else [values]
    else:
        raise DeltaError(f"sweep = {value!r}: give `lr` (each method's default grid) or `lr=1e-4,3e-4,1e-3`")
    if key.strip() != "lr":
        raise DeltaError(f"sweep: {key.strip()!r} cannot be swept; only lr can (--sweep lr=1e-4,3e-4,1e-3)")
    try:
        lrs = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DeltaError(f"sweep: the lrs {values!r} are not all numbers; give e.g. lr=1e-4,3e-4,1e-3") from None
    if any(not lr > 0 for lr in lrs):
        raise DeltaError(f"sweep: every lr must be above 0 (train.lr's own rule), got {lrs}")
    return {"lr": sorted(set(lrs))}


def sweep_grid(method: str, sweep: dict[str, list[float]]) -> list[float]:
    """The lrs a method trains with: the given ones, else a third, once and three times its starting lr."""
    if sweep["lr"]:
        return sweep["lr"]
    centre = SWEEP_CENTRE.get(method, DEFAULT_CENTRE)
    return [float(f"{centre * f:.2g}") for f in (1 / 3, 1, 3)]


def lr_folder(lr: float) -> str:
    return f"lr-{lr:g}"


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and not prefix:
            out.update(_flat(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def shared_keys(data: dict[str, Any]) -> dict[str, Any]:
    """What makes two comparisons the same: every key but those compare sets per method and the methods' own
    sections (fixing one method's setting after it failed is the same comparison; each run folder checks its
    own method's keys)."""
    return {k: v for k, v in sorted(_flat(data).items()) if k not in OWNED and k.partition(".")[0] not in METHODS}


def identity(keys: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


def check_methods(methods: list[str]) -> list[str]:
    """The method names, each once, in the order given; an empty list or an unknown name is an error."""
    if not methods:
        raise DeltaError(f"compare needs at least one method: pass --methods with one or more of {', '.join(sorted(METHODS))}")
    for name in methods:
        if name not in METHODS:
            close = difflib.get_close_matches(name, sorted(METHODS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DeltaError(f"--methods: {name!r} is not a deltatune method{hint}; the methods are "
                             f"{', '.join(sorted(METHODS))}")
    return list(dict.fromkeys(methods))


def check_out(out: Path, keys: dict[str, Any]) -> dict[str, Any] | None:
    """DIR is new, empty, or this comparison's (its compare.json records the same config); returns that record."""
    if out.exists() and not out.is_dir():
        raise DeltaError(f"--out {out} is a file, not a folder: choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return None
    path = out / RECORD
    if not path.is_file():
        raise DeltaError(f"--out {out} is not empty and holds no {RECORD}, so it is no comparison's folder: "
                         "choose a new or empty --out")
    try:
        record = json.loads(path.read_text())
        record["identity"], record["config"], record["methods"]  # noqa: B018 - all three must be there
    except (OSError, ValueError, KeyError, TypeError):
        raise DeltaError(f"{path} is damaged (not the JSON compare writes): choose a new --out") from None
    if record["identity"] != identity(keys):
        old = record["config"]
        changed = [f"{k}: {old.get(k, '(unset)')!r} -> {keys.get(k, '(unset)')!r}"
                   for k in sorted(set(old) | set(keys)) if old.get(k, "(unset)") != keys.get(k, "(unset)")]
        raise DeltaError(f"--out {out} holds a comparison of another config ({'; '.join(changed[:6]) or 'its hash differs'}"
                         f"{f' and {len(changed) - 6} more' if len(changed) > 6 else ''}): run it with the config it was "
                         "started with, or choose a new --out for this one")
    return record


# ---------------------------------------------------------------- the runs


def run_state(run_dir: Path, config: Any) -> str:
    """What run_dir holds for this method's config: "new" (nothing, or a start that never trained), "finished"
    (this config's run wrote its report: summary.json is written last), "unfinished" (this config's run, to
    resume), or why it holds another run (an error for the row)."""
    from .pipeline import rundir

    record = rundir.read_run(run_dir) if run_dir.is_dir() else None  # a damaged run.json: its own error
    if record is None:
        return "new"
    mine = json.loads(json.dumps(rundir.flat(config), default=str))
    if record["identity"] == rundir.identity(mine):
        return "finished" if (run_dir / "summary.json").is_file() else "unfinished"
    if rundir.never_trained(run_dir):
        # a start of this comparison that failed before its first step (a setting since fixed): nothing to keep
        (run_dir / rundir.RUN_FILE).unlink()
        return "new"
    changes = [c for c in rundir.differences(record["config"], mine) if not rundir.is_safe(c[0])]
    listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:6])
    return (f"{run_dir} holds a run of another {config.method} config ({listing or 'its hash differs'}): set those keys "
            f"back, or delete {run_dir} to train it again with this config")


def train_child(config_file: Path, log_file: Path) -> tuple[int, float, float]:
    """`deltatune train CONFIG` in a process of its own, its output into log_file.

    Returns the exit code, the process's wall time and its peak RSS in MiB (wait4: this child alone)."""
    return child(["-m", "deltatune.cli", "train", str(config_file)], log_file)


def child(argv: list[str], log_file: Path) -> tuple[int, float, float]:
    """`python ARGV` in a process of its own, its output into log_file: the exit code, wall time and peak RSS MiB."""
    import deltatune

    env = dict(os.environ)
    source = str(Path(deltatune.__file__).resolve().parent.parent)  # the child imports this very deltatune
    env["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: the child got it too; wait for it, so it never outlives us
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024  # Linux: KiB
    return proc.returncode, time.perf_counter() - start, round(rss / 2**20, 1)


def error_line(log_file: Path, code: int, prog: str = "deltatune train") -> str:
    """The one line that says why a child failed: the CLI's error line, else the last line it wrote."""
    lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()] if log_file.is_file() else []
    for line in reversed(lines):
        if line.startswith(f"{prog}: error: "):
            return line.removeprefix(f"{prog}: error: ")
    if code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return (lines[-1] if lines else "no output") + f" (exit code {code})"


PLAN_TOTAL = re.compile(r"total \(peak, [^)]*\)\s+([\d.]+) (KiB|MiB|GiB)")


def planned_mib(log_file: Path) -> float | None:
    """The planner's peak estimate, from the plan table the run printed (the last one: a resumed run prints again)."""
    if not log_file.is_file():
        return None
    found = PLAN_TOTAL.findall(log_file.read_text(errors="replace"))
    if not found:
        return None
    value, unit = found[-1]
    return round(float(value) * {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}[unit], 3)


def collect(row: MethodRow, run_dir: Path) -> None:
    """Fill a row from the run's own records: summary.json, log.jsonl and the adapter's files."""
    from .io import CONFIG_NAME, WEIGHTS_NAME
    from .pipeline.report import read_log

    summary = json.loads((run_dir / "summary.json").read_text())
    row.trainable, row.total = summary.get("trainable_parameters"), summary.get("total_parameters")
    row.trainable_percent = summary.get("trainable_percent")
    row.wall_s, row.tokens_per_s = summary.get("wall_time_s"), summary.get("tokens_per_s")
    row.run_peak_mib = summary.get("peak_memory_mb")  # MiB (2**20 bytes), whatever the key says
    row.eval = {k.removeprefix("eval_"): v for k, v in summary.items() if k.startswith("eval_")}
    steps = [r for r in read_log(run_dir) if "loss" in r and not r.get("skipped") and "eval_loss" not in r]
    row.train_loss = steps[-1]["loss"] if steps else None
    files = [run_dir / "adapter" / n for n in (WEIGHTS_NAME, CONFIG_NAME)]
    row.adapter_bytes = sum(f.stat().st_size for f in files if f.is_file()) or None


def compare(config: str | os.PathLike | dict[str, Any] | None, methods: list[str], out: str | os.PathLike,
            overrides: list[str] | dict[str, Any] | None = None, echo: Callable[[str], Any] = print,
            command: str | None = None, reference_data: str | None = None, sweep: Any = None) -> Comparison:
    """Train `config` with each of `methods` into out/<method>/ (in a sweep, out/<method>/lr-<value>/ per lr) and
    write the comparison beside them; `reference_data` and `sweep` override the config's compare: section."""
    from .pipeline.config import build_run_config

    methods = check_methods(list(methods))
    out = Path(out)
    data = read_config(config, overrides)
    options = take_options(data, reference_data, sweep)
    keys = shared_keys(data)
    if options.sweep:  # a sweep's runs live one folder deeper: never the same comparison as one without
        keys["compare.sweep"] = "lr"
    record = check_out(out, keys)
    source = str(config) if isinstance(config, (str, os.PathLike)) else "<flags>"
    # the shared part alone (every method section dropped) must build: its faults are every method's
    shared = {k: v for k, v in data.items() if k not in METHODS}
    build_run_config(method_data(shared, methods[0], out), source)
    if data.get("output", {}).get("dir"):
        echo(f"output.dir {data['output']['dir']!r} of the config is not used: each method's run goes to {out}/<method>")
    command = command or _command(config, methods, out, overrides, reference_data, sweep)
    configs, logs = out / CONFIGS, out / LOGS
    configs.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    record = record or {"identity": identity(keys), "config": keys, "methods": {}}
    record["command"] = command
    _write_record(out, record)

    runs = [(m, lr) for m in methods for lr in (sweep_grid(m, options.sweep) if options.sweep else [None])]
    rows, notes = [], []
    for n, (method, lr) in enumerate(runs, 1):
        name = MethodRow(method, "", lr=lr).name
        tag = f"[{n}/{len(runs)}] {name}"

        def running(run_dir: Path, log_file: Path, resuming: bool, tag: str = tag, name: str = name) -> None:
            echo(f"{tag}: {'resuming' if resuming else 'training'} into {run_dir} (log: {log_file})")
            record["methods"][name] = {"status": "running", "run_dir": str(run_dir)}
            _write_record(out, record)  # a call killed now leaves a record that says which run it was in

        row, measured = run_method(method, data, out, source, record["methods"].get(name, {}), running, lr)
        echo(f"{tag}: {row.action}" + (f": {row.error}" if row.error else ""))
        if row.status == "ok" and options.reference_data:
            note = measure_forgetting(row, out, options, echo, tag)
            if note:
                notes.append(note)
        record["methods"][name] = {"status": row.status, "action": row.action, "error": row.error,
                                   "run_dir": str(out / name), "process_peak_rss_mib": row.process_peak_rss_mib,
                                   "planned_mib": row.planned_mib, **measured}
        _write_record(out, record)
        rows.append(row)

    grid = sorted(rows, key=lambda r: (r.method, r.lr or 0.0)) if options.sweep else []
    comparison = Comparison(out=out, rows=sorted(best_per_method(rows) if options.sweep else rows, key=_order),
                            command=command, files=[], notes=notes, grid=grid)
    comparison.files = write_outputs(comparison)
    stems = [_stem(MethodRow(m, "", lr=lr).name) for m, lr in runs]
    own = [p for s in stems for p in (configs / f"{s}.yaml", logs / f"{s}.log", logs / f"{s}.forgetting.log") if p.is_file()]
    earlier = [w for w in record.get("wrote", []) if w.startswith((f"{CONFIGS}/", f"{LOGS}/")) and (out / w).is_file()]
    record["wrote"] = sorted({*earlier, *(str(p.relative_to(out)) for p in [*comparison.files, *own])})
    record["notes"] = comparison.notes
    _write_record(out, record)
    return comparison


def best_per_method(rows: list[MethodRow]) -> list[MethodRow]:
    """Each method's run at its best lr (lowest eval loss, else final train loss); a method none of whose runs
    finished keeps its first failed run, so its error shows."""
    best: dict[str, MethodRow] = {}
    for row in rows:
        if row.method not in best or _order(row) < _order(best[row.method]):
            best[row.method] = row
    return list(best.values())


def measure_forgetting(row: MethodRow, out: Path, options: Options, echo: Callable[[str], Any], tag: str) -> str | None:
    """Fill the row's forgetting numbers from the run's forgetting.json, measuring it first (in a child process)
    when it is missing or was measured from another reference or adapter. A failure is a note; the row stays."""
    assert options.reference_data is not None
    run_dir = out / row.name
    found = forgetting.is_current(run_dir, options.reference_data, options.reference_format)
    if found is None:
        log_file = out / LOGS / f"{_stem(row.name)}.forgetting.log"
        echo(f"{tag}: measuring forgetting on {options.reference_data} (log: {log_file})")
        # A child of its own, not the training child: the training child stays a plain `deltatune train` whose peak
        # memory is training's alone (the base loaded again for full/freeze/bitfit would add to it); a run kept
        # from before --reference-data was given is measured without training it again; and a crash or OOM here
        # costs only the forgetting numbers, never the trained run.
        argv = ["-m", "deltatune.forgetting", str(run_dir), options.reference_data]
        code, _, _ = child(argv + (["--format", options.reference_format] if options.reference_format else []), log_file)
        found = forgetting.is_current(run_dir, options.reference_data, options.reference_format) if code == 0 else None
        if found is None:
            why = error_line(log_file, code, "deltatune forgetting") if code != 0 else "it wrote no current record"
            echo(f"{tag}: forgetting not measured: {why}")
            return f"{row.name}: forgetting not measured: {why}"
    row.ref_loss_increase, row.ref_kl = found["loss_increase"], found["kl"]
    return None


def run_method(method: str, data: dict[str, Any], out: Path, source: str, previous: dict[str, Any],
               running: Callable[[Path, Path, bool], Any], lr: float | None = None) -> tuple[MethodRow, dict[str, Any]]:
    """One run's row (a method, or a method at one lr of a sweep): its finished run kept, its interrupted run
    resumed, or its run trained in a child process; a config the method refuses, a folder of another run, or a
    failed child is the row's error. Returns the row and what compare measured of the child (kept from
    `previous`, the last call's record)."""
    from .pipeline.config import build_run_config

    row = MethodRow(method=method, status="failed", lr=lr)
    measured = {"process_wall_s": previous.get("process_wall_s")}
    stem = _stem(row.name)
    config_file, log_file, run_dir = out / CONFIGS / f"{stem}.yaml", out / LOGS / f"{stem}.log", out / row.name
    try:
        mine = method_data(data, method, out, lr)
        config = build_run_config(json.loads(json.dumps(mine)), f"{source} (method {row.name})")
        state = run_state(run_dir, config)
    except DeltaError as err:  # the method's own settings refused, or a damaged run.json: this row only
        row.error, row.action = _one_line(str(err)), "failed"
        return row, measured
    if state not in ("new", "unfinished", "finished"):
        row.error, row.action = state, "failed"
        return row, measured
    if state == "finished":
        row.action = "kept"
        row.process_peak_rss_mib = previous.get("process_peak_rss_mib")
    else:
        _write_if_changed(config_file, _yaml(mine))
        row.action = "resumed" if state == "unfinished" else "trained"
        running(run_dir, log_file, state == "unfinished")
        code, wall, rss = train_child(config_file, log_file)
        measured["process_wall_s"] = round(wall, 1)  # imports and loading included, unlike the run's own wall time
        if code != 0:  # a failed row holds its error only: its numbers would describe no finished run
            row.error, row.action = error_line(log_file, code), "failed"
            return row, measured
        row.process_peak_rss_mib = rss
    if not (run_dir / "summary.json").is_file():
        row.error, row.action = "the run ended without a summary.json", "failed"
        return row, measured
    try:
        collect(row, run_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged record costs this row only
        row.error, row.action = f"cannot read the run's records in {run_dir}: {err}", "failed"
        return row, measured
    row.status, row.planned_mib = "ok", planned_mib(log_file)
    return row, measured


def _stem(name: str) -> str:
    """A run's name as one file name (configs/, logs/): lora, or lora_lr-0.001 in a sweep."""
    return name.replace("/", "_")


def _order(row: MethodRow) -> tuple:
    """Succeeded methods first, best (lowest) eval loss first, else lowest train loss; failed ones last, by name."""
    loss = row.eval.get("loss", row.train_loss)
    return (row.status != "ok", loss is None, loss if loss is not None else 0.0, row.method)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _yaml(data: dict[str, Any]) -> bytes:
    import yaml

    return yaml.safe_dump(data, sort_keys=False).encode()


def _write_if_changed(path: Path, data: bytes) -> None:
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data)


def _write_record(out: Path, record: dict[str, Any]) -> None:
    write_atomic(out / RECORD, json.dumps(record, indent=1, default=str).encode())


def _command(config: Any, methods: list[str], out: Path, overrides: Any, reference_data: str | None = None,
             sweep: Any = None) -> str:
    flags = list(overrides) if isinstance(overrides, list) else [f"--{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
    head = ["deltatune", "compare"] + ([str(config)] if config is not None and not isinstance(config, dict) else [])
    own = (["--reference-data", str(reference_data)] if reference_data is not None else []) + (
        ["--sweep", sweep if isinstance(sweep, str) else json.dumps(sweep)] if sweep is not None else [])
    return shlex.join([*head, "--methods", *methods, "--out", str(out), *own, *flags])


# ---------------------------------------------------------------- the table


def columns(rows: list[MethodRow]) -> list[tuple[str, str, Callable[[MethodRow], Any], Callable[[Any], str]]]:
    """(CSV name, Markdown header, the row's value, its Markdown text): one list, so both tables hold the same numbers."""
    metrics = sorted({k for r in rows for k in r.eval if k != "loss"})
    count, loss, one, pct = (lambda v: f"{v:,}"), (lambda v: f"{v:.4f}"), (lambda v: f"{v:.1f}"), (lambda v: f"{v:.4f}")
    # shown only when measured: a sweep's lr, and forgetting on the reference data
    swept = [("lr", "lr", lambda r: r.lr, lambda v: f"{v:g}")] if any(r.lr is not None for r in rows) else []
    forgot = [("ref_loss_increase", "reference loss increase", lambda r: r.ref_loss_increase, lambda v: f"{v:+.4f}"),
              ("ref_kl", "KL(base‖tuned)", lambda r: r.ref_kl, lambda v: f"{v:.6f}")] \
        if any(r.ref_kl is not None for r in rows) else []
    return [
        ("method", "method", lambda r: r.method, str),
        *swept,
        ("status", "status", lambda r: r.status, str),
        ("trainable", "trainable", lambda r: r.trainable, count),
        ("trainable_percent", "% of total", lambda r: r.trainable_percent, pct),
        ("train_loss", "final train loss", lambda r: r.train_loss, loss),
        ("eval_loss", "eval loss", lambda r: r.eval.get("loss"), loss),
        *[(f"eval_{m}", f"eval {m}", (lambda r, m=m: r.eval.get(m)), loss) for m in metrics],
        *forgot,
        ("wall_s", "wall s", lambda r: r.wall_s, one),
        ("tokens_per_s", "tokens/s", lambda r: r.tokens_per_s, one),
        ("run_peak_mib", "peak MiB (run)", lambda r: r.run_peak_mib, one),
        ("process_peak_rss_mib", "peak RSS MiB (process)", lambda r: r.process_peak_rss_mib, one),
        ("planned_mib", "planned MiB", lambda r: r.planned_mib, one),
        ("adapter_bytes", "adapter bytes", lambda r: r.adapter_bytes, count),
        ("error", "error", lambda r: r.error, str),
    ]


def table_lines(rows: list[MethodRow]) -> list[str]:
    cols = columns(rows)
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [fmt(get(row)) if get(row) is not None else "" for _, _, get, fmt in cols]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


FORGETTING_NOTE = ("Forgetting, on the reference data (each run's forgetting.json): *reference loss increase* is the "
                   "fine-tuned model's mean loss per labelled token there minus its base's (> 0: it got worse at what "
                   "it was not trained on); *KL(base‖tuned)* is the mean over those tokens of the KL divergence from "
                   "the base's next-token distribution to the fine-tuned one's (0: the same predictions). The base is "
                   "the model with its delta switched off; for full, freeze and bitfit it is loaded again.")


def markdown(comparison: Comparison) -> str:
    sweep = bool(comparison.grid)
    lines = ["# Method comparison\n", f"`{comparison.command}`\n", *table_lines(comparison.rows)]
    if sweep:
        lines += ["", "Each method at its best lr of the sweep (lowest eval loss, else final train loss); every run of "
                  "the grid is in comparison_sweep.md and .csv."]
    if any(r.ref_kl is not None for r in comparison.rows):
        lines += ["", FORGETTING_NOTE]
    lines += ["", "Sorted by eval loss (else final train loss), failed methods last. Trainable counts, eval metrics, "
              "wall time, tokens/s and peak MiB (run) are each run's summary.json (peak: CUDA max allocated on a GPU, "
              "the process's peak RSS on a CPU); the final train loss is the last step of its log.jsonl; peak RSS "
              "(process) is measured by compare around the child process; planned MiB is the planner's estimate the "
              "run printed; adapter bytes are adapter_model.safetensors + adapter_config.json."]
    lines += [f"\nNote: {n}" for n in comparison.notes]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[MethodRow]) -> str:
    cols = columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c[0] for c in cols])
    for row in rows:
        writer.writerow(["" if get(row) is None else repr(get(row)) if isinstance(get(row), float) else get(row)
                         for _, _, get, _ in cols])
    return buffer.getvalue()


def sweep_markdown(comparison: Comparison) -> str:
    lines = ["# Learning-rate sweep\n", f"`{comparison.command}`\n", *table_lines(comparison.grid), "",
             "Every run of the sweep, by method and lr; comparison.md keeps each method's best (lowest eval loss, "
             "else final train loss)."]
    if any(r.ref_kl is not None for r in comparison.grid):
        lines += ["", FORGETTING_NOTE]
    return "\n".join(lines) + "\n"


def write_outputs(comparison: Comparison) -> list[Path]:
    """comparison.md, .csv and .png (and in a sweep comparison_sweep.md, .csv and .png), each written to a
    temporary file and renamed."""
    out = comparison.out
    wrote = []
    if _plot(comparison):
        wrote.append(out / "comparison.png")
    if comparison.grid and _plot_sweep(comparison):
        wrote.append(out / "comparison_sweep.png")
    write_atomic(out / "comparison.csv", csv_text(comparison.rows).encode())
    write_atomic(out / "comparison.md", markdown(comparison).encode())
    tables = [out / "comparison.md", out / "comparison.csv"]
    if comparison.grid:
        write_atomic(out / "comparison_sweep.csv", csv_text(comparison.grid).encode())
        write_atomic(out / "comparison_sweep.md", sweep_markdown(comparison).encode())
        tables += [out / "comparison_sweep.md", out / "comparison_sweep.csv"]
    return [*tables, *wrote]


def _plot(comparison: Comparison) -> bool:
    try:
        import matplotlib  # noqa: F401 - the demo extra's; without it no figure
    except ImportError:
        comparison.notes.append("no comparison.png: matplotlib is not installed (pip install 'deltatune[demo]')")
        return False
    from .pipeline.report import curves_figure, read_log, save_figure

    runs = {(r.method if r.lr is None else f"{r.method} lr={r.lr:g}"): read_log(comparison.out / r.name)
            for r in comparison.rows if r.status == "ok"}
    if not runs:
        return False
    save_figure(curves_figure(runs, f"compare: {', '.join(runs)}"), comparison.out / "comparison.png")
    return True


def _plot_sweep(comparison: Comparison) -> bool:
    """Eval loss (else final train loss) against lr, one line per method, its best lr marked."""
    try:
        import matplotlib  # noqa: F401 - the demo extra's
    except ImportError:  # _plot has said so in a note
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .pipeline.report import save_figure

    ok = [r for r in comparison.grid if r.status == "ok" and r.lr is not None]
    if not ok:
        return False
    use_eval = all("loss" in r.eval for r in ok)
    value = (lambda r: r.eval["loss"]) if use_eval else (lambda r: r.train_loss)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    best = {r.method: r for r in comparison.rows}
    for method in dict.fromkeys(r.method for r in ok):
        mine = sorted((r for r in ok if r.method == method and value(r) is not None), key=lambda r: r.lr)
        if not mine:
            continue
        line, = ax.plot([r.lr for r in mine], [value(r) for r in mine], marker="o", label=method)
        top = best.get(method)
        if top is not None and top.status == "ok" and value(top) is not None:
            ax.plot([top.lr], [value(top)], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("lr")
    ax.set_ylabel("eval loss" if use_eval else "final train loss")
    ax.set_title("lr sweep (star: each method's best)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, comparison.out / "comparison_sweep.png")
    return True


def print_table(comparison: Comparison, echo: Callable[[str], Any] = print) -> None:
    cols = [c for c in columns(comparison.rows) if c[0] in
            ("method", "lr", "status", "trainable", "train_loss", "eval_loss", "ref_loss_increase", "ref_kl", "wall_s",
             "process_peak_rss_mib", "error")]
    cells = [[c[1] for c in cols]] + [[fmt(get(r)) if get(r) is not None else "" for _, _, get, fmt in cols]
                                      for r in comparison.rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    for line in cells:
        echo("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    echo(f"\nwrote {', '.join(str(p) for p in comparison.files)}")
