"""A run owns its folder: run.json says which run, and a second run never mixes into it.

run.json (written atomically when a run starts) holds the run's config and its identity,
the SHA-256 of every key that decides the weights. `train` into a folder that holds
another run, or files that are no run's, is an error that says what to do: resume the
same run, pass output.overwrite (the folder is renamed aside, then deleted), or choose
another output.dir. A resumed run must have the config of the run it continues: a key
that changes the weights or the optimisation is an error listing each change as
`key: old -> new`; only the keys in SAFE may change, and the run says which did.

Changing the number of steps (train.max_steps, train.epochs) is allowed only where the
learning-rate schedule does not depend on it (scheduler constant and no warmup_ratio):
a linear or cosine schedule over a new total would give the steps already taken other
rates than either run had, so the result would match no uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any, Callable

from ..config import DeltaError
from ..files import remove_tree, write_atomic, write_new
from . import checkpoint as ckpt
from .config import SECTIONS, ConfigError, RunConfig

RUN_FILE = "run.json"
# Keys a resumed run may change: they decide neither the weights nor the optimisation (the fused and the
# standard loss are the same loss, equal to float tolerance).
SAFE = ("train.max_steps", "train.epochs", "train.eval_every", "train.save_every", "train.log_every", "train.keep_last",
        "train.progress", "train.resume", "train.gradient_checkpointing", "train.loss", "model.attention", "output.",
        "eval.")


def flat(config: RunConfig) -> dict[str, Any]:
    """The config as dotted keys: {"train.lr": 0.01, "method": "lora", "lora.r": 4, ...}."""
    out: dict[str, Any] = {}
    for section, values in config.as_dict().items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE)


def identity(values: dict[str, Any]) -> str:
    decisive = {k: v for k, v in values.items() if not is_safe(k)}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The keys whose values differ. A key one side lacks is no difference when the other side holds its
    default: a run recorded before deltatune had the key (train.master_weights, data.group_by_length) ran as
    the default does, so it resumes."""
    unset = "(unset)"
    keys = list(dict.fromkeys([*old, *new]))
    changes = [(k, old.get(k, unset), new.get(k, unset)) for k in keys if old.get(k, unset) != new.get(k, unset)]
    # only the run's own sections: a method's unset key is a difference between two methods, counted elsewhere
    from .stages import settings_classes

    own = set(SECTIONS) | set(settings_classes())  # the run's sections and its stage's
    return [(k, a, b) for k, a, b in changes if not (k.partition(".")[0] in own and (
        (a == unset and _is_default(k, b)) or (b == unset and _is_default(k, a))))]


def _listing(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)


def _is_default(key: str, value: Any) -> bool:
    """`value` is what `key` has when nobody sets it: a run section's key ("train.master_weights"), a
    stage's ("dpo.beta") or a method's ("lora.r")."""
    import dataclasses

    from ..config import METHODS
    from .stages import settings_classes

    section, _, name = key.partition(".")
    cls = (SECTIONS.get(section) or settings_classes().get(section)
           or (METHODS[section].config_cls if section in METHODS else None))
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls is not None else None
    if field is None:
        return False
    default = (field.default if field.default is not dataclasses.MISSING else field.default_factory()
               if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
    return default is not dataclasses.MISSING and json.loads(json.dumps(default, default=str)) == value


def _another_run(changes: list[tuple[str, Any, Any]], shown: int = 6) -> str:
    """The changes that tell two runs apart, short: the method first, then the keys someone set; the keys that
    are only one method's defaults (`lora.loftq_bits: 4 -> '(unset)'`) counted, not listed."""
    unset = "(unset)"
    defaults = [c for c in changes if (c[1] == unset and _is_default(c[0], c[2])) or (c[2] == unset and _is_default(c[0], c[1]))]
    set_ = sorted((c for c in changes if c not in defaults), key=lambda c: c[0] != "method")
    text = _listing(set_[:shown])
    more = len(set_) - shown
    if more > 0:
        text += f" and {more} more key{'s' if more > 1 else ''}"
    if defaults:
        text += f"{'; ' if set_ else ''}and {len(defaults)} default{'s' if len(defaults) > 1 else ''} of the two methods"
    return text


def read_run(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["identity"], record["config"]  # noqa: B018 - both must be there
    except (OSError, ValueError, KeyError, TypeError):
        raise DeltaError(f"{path} is damaged (not the JSON a run writes): pass --output.overwrite true to start the "
                         "run again there, or choose another output.dir") from None
    return record


def write_run(out: Path, config: RunConfig) -> None:
    values = flat(config)
    text = json.dumps({"identity": identity(values), "config": values}, indent=1, default=str)
    write_atomic(out / RUN_FILE, text.encode())


def check_writable(out: Path) -> None:
    """output.dir must be a folder this process can write into (checked before anything trains)."""
    if out.exists() and not out.is_dir():
        raise DeltaError(f"output.dir {out} is a file, not a folder: choose another output.dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{secrets.token_hex(4)}"
        write_new(probe, lambda f: f.write(b"ok"))
        probe.unlink()
    except OSError as err:
        raise DeltaError(f"output.dir {out} cannot be written ({err.strerror or err}): make it writable or choose "
                         "another output.dir") from None


def clear(out: Path) -> None:
    """Empty a run folder safely: renamed aside to a trash name in one step, deleted, made again."""
    remove_tree(out)
    out.mkdir()


def _what_is_there(out: Path) -> str:
    names = sorted(p.name for p in out.iterdir() if p.name != RUN_FILE and not p.name.startswith(".write-test-"))
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def never_trained(out: Path) -> bool:
    """Only run.json is there: the run stopped before it wrote a log line, a checkpoint or an adapter."""
    return all(p.name == RUN_FILE or p.name.startswith(".") for p in out.iterdir())


def claim(config: RunConfig, say: Callable[[str], Any] = print) -> Path | None:
    """Make output.dir this run's folder; returns the checkpoint to resume from (None: start afresh).

    Called on the main process before anything trains; writes run.json."""
    out = Path(config.output.dir)
    resume = config.train.resume
    if config.output.overwrite and resume is True:
        raise ConfigError(f"{config.source}: output.overwrite and train.resume: true contradict each other (one clears "
                          "the run, the other continues it): drop one")
    if out.exists() and not out.is_dir():
        raise DeltaError(f"output.dir {out} is a file, not a folder: choose another output.dir")
    if config.output.overwrite and out.is_dir() and any(out.iterdir()):
        say(f"output.overwrite: clearing {out}")
        clear(out)
    if resume is True and not out.exists():
        raise DeltaError(f"train.resume is true but {out} holds no run to resume (the folder does not exist): start it with "
                         "train.resume false or auto")
    check_writable(out)
    mine = json.loads(json.dumps(flat(config), default=str))  # as run.json holds it (ints as dict keys become strings)
    record = read_run(out)
    if record is not None and not resume and never_trained(out):
        record = None  # a start that failed before its first step (a wrong model name, say) holds nothing to keep
        (out / RUN_FILE).unlink()
    again = ("pass --output.overwrite true to clear it and start this run afresh, resume it with --train.resume true "
             "(with the config it was started with), or choose another output.dir")
    if record is None:
        if any(p for p in out.iterdir() if not p.name.startswith(".write-test-")):
            raise DeltaError(f"output.dir {out} is not empty ({_what_is_there(out)}) and holds no {RUN_FILE}, so it is "
                             f"not a run of this config: {again}")
        if resume is True:
            raise DeltaError(f"train.resume is true but {out} holds no run to resume (no checkpoint): start it with "
                             "train.resume false or auto")
        write_run(out, config)
        return None
    changes = differences(record["config"], mine)
    decisive = [c for c in changes if not is_safe(c[0])]
    if decisive and resume:
        raise ConfigError(f"{config.source}: cannot resume the run in {out} with another config; these keys change the "
                          f"weights or the optimisation: {_listing(decisive)}. Set them back, or pass "
                          "--output.overwrite true to start afresh, or choose another output.dir")
    if decisive:
        raise DeltaError(f"output.dir {out} holds another run (its config differs: {_another_run(decisive)}).\n"
                         f"To train this one: {again}")
    found = ckpt.find(out)
    finished = (out / "adapter").exists() or bool(ckpt.steps(out))
    if resume and found.folder is not None:
        for note in found.notes():
            say(note)
        safe = [c for c in changes if c[0] != "train.resume"]
        if safe:
            say(f"resuming with changed settings: {_listing(safe)}")
        write_run(out, config)
        return found.folder
    if resume is True:
        why = "; ".join(found.notes()) or "it has none"
        raise DeltaError(f"train.resume is true but {out} holds no complete checkpoint to resume ({why}): set "
                         "train.resume auto to start afresh when there is none, or --output.overwrite true")
    if resume and (out / "adapter").exists():  # auto: a finished adapter is never cleared to start afresh
        why = "; ".join(found.notes()) or "it has none"
        raise DeltaError(f"{out} holds this run's finished adapter but no complete checkpoint to resume ({why}): "
                         f"pass --output.overwrite true to train it again, or choose another output.dir")
    if finished and not resume:
        newest = ckpt.steps(out)[-1][1].name if ckpt.steps(out) else "adapter"
        raise DeltaError(f"output.dir {out} already holds this run ({newest}); training again there would mix the two "
                         f"runs' checkpoints: {again}")
    # the same run, nothing to resume (killed before its first checkpoint, or every one incomplete): start afresh
    for note in found.notes():
        say(note)
    if any(p for p in out.iterdir() if p.name != RUN_FILE):
        say(f"nothing to resume in {out}: starting afresh")
        clear(out)
    write_run(out, config)
    return None


def check_schedule(config: RunConfig, record: dict[str, Any], total: int, warmup: int) -> None:
    """A resumed run may change its step count only where the learning-rate schedule does not depend on it."""
    old_total, old_warmup = record.get("total"), record.get("warmup")
    if old_total is None or (old_total == total and old_warmup == warmup):
        return
    if record["step"] > total:
        raise ConfigError(f"{config.source}: the checkpoint is at step {record['step']}, past this run's {total} "
                          "steps: raise train.max_steps (or train.epochs)")
    if config.train.scheduler != "constant" or old_warmup != warmup:
        raise ConfigError(
            f"{config.source}: train.max_steps/epochs change the run's total from {old_total} to {total} steps, and its "
            f"{config.train.scheduler} schedule (warmup {old_warmup} -> {warmup}) is computed over the total, so the "
            "steps already taken would not match the new schedule: resume with the old max_steps/epochs, or start "
            "afresh (--output.overwrite true); with train.scheduler constant (and warmup_steps, not warmup_ratio) "
            "the step count may change")
