"""The `deltatune` command.

    deltatune train CONFIG.yaml [--section.key value ...]   fine-tune; every YAML key is also a flag
    deltatune compare CONFIG.yaml --methods lora ia3 bitfit --out DIR [--reference-data FILE] [--sweep lr] [--section.key value ...]   the methods side by side
    deltatune eval CONFIG.yaml [--adapter DIR]               the same metrics for a base, or a base + adapter
    deltatune merge --model M --adapter DIR --out DIR        a merged model any transformers install loads
    deltatune export --adapter DIR --out model.gguf [--type q8_0]   one GGUF file for llama.cpp / Ollama, drift-checked
    deltatune export --adapter DIR --out DIR --format vllm        a LoRA folder vLLM serves as it is
    deltatune generate --model M [--adapter DIR] (--prompt TEXT | --file FILE | --chat)
    deltatune serve --model M [--adapter NAME=DIR ...] [--port 8000]   an OpenAI-style HTTP server, one adapter per request
    deltatune data CONFIG.yaml                               rendered examples, trained tokens marked
    deltatune info MODEL                                     architecture, targets, counts per method
    deltatune plan --model M --method lora --batch 8 --seq 1024 [--memory 24GB]   peak training memory, from the config
    deltatune demo [--quick]                                 the offline demo (pretrained MiniLM)
    deltatune tiny MODEL_TYPE DIR                            a tiny random model + tokenizer, to try an example offline
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DeltaError, UserFileError, reading

if TYPE_CHECKING:
    from .pipeline.render import Renderer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning for transformers models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--version", action="version", version=f"deltatune {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback behind an error (also DELTATUNE_DEBUG=1); "
                        "may be given anywhere on the line")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="fine-tune a model with a delta (YAML config + flags)")
    p.add_argument("config", nargs="?", help="YAML run config (optional when every key is given as a flag)")
    p = commands.add_parser("compare", help="train one config with several methods side by side, into one table",
                            description="Each method trains as `deltatune train` would, in a process of its own, "
                            "into DIR/<method>/; DIR/comparison.md, .csv and .png compare them. Run again to resume.")
    p.add_argument("config", nargs="?", help="YAML run config (a method's own section applies to that method)")
    p.add_argument("--methods", nargs="+", default=[], help="the methods to train, e.g. --methods lora ia3 bitfit")
    p.add_argument("--out", required=True, help="the comparison's folder (new, empty, or this comparison's)")
    # read by cmd_compare from the flags main() passes on (main's own-option list is not compare's block)
    p.add_argument("--reference-data", metavar="FILE", help="also measure forgetting on this data (compare.reference_data): "
                   "each run's loss increase and KL(base || tuned) there")
    p.add_argument("--sweep", metavar="lr[=A,B,...]", help="train each method once per lr (compare.sweep): "
                   "--sweep lr=1e-4,3e-4,1e-3, or --sweep lr for a grid around each method's usual lr")
    p = commands.add_parser("eval", help="evaluate a base model, or a base plus an adapter, on the config's eval data")
    p.add_argument("config", nargs="?")
    p.add_argument("--adapter", help="adapter folder (deltatune's or peft's); omit to evaluate the base alone")
    p = commands.add_parser("data", help="print rendered examples with the trained tokens marked, and length statistics")
    p.add_argument("config", nargs="?")
    p.add_argument("--examples", type=int, default=3, help="how many training examples to print (0: the statistics only)")
    p = commands.add_parser("merge", help="fold an adapter into its base and save a standard transformers model")
    p.add_argument("--model", default=None, help="base model id or folder (default: the base recorded in adapter_config.json)")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    p.add_argument("--trust-remote-code", action="store_true")
    p = commands.add_parser("export", help="a base + adapter for another runtime: one GGUF file (llama.cpp, Ollama) or a "
                            "vLLM-ready adapter, each checked against the model it came from",
                            description="--format gguf: fold the adapter into its base and write one GGUF file with the "
                            "tokenizer. gguf-lora: the LoRA alone as a llama.cpp adapter GGUF. vllm: the LoRA as an "
                            "adapter folder vLLM serves as it is. Each is read back and its logits compared with the "
                            "unmerged model's (the drift line).")
    p.add_argument("--model", default=None, help="base model id or folder (default: the base recorded in adapter_config.json)")
    p.add_argument("--adapter", default=None, help="adapter folder (gguf: omit to convert the base alone)")
    p.add_argument("--out", required=True, help="the .gguf file to write (gguf, gguf-lora), or a new folder (vllm)")
    p.add_argument("--format", choices=["gguf", "gguf-lora", "vllm"], default="gguf")
    p.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                   help="GGUF tensor type (1-D tensors stay f32; gguf-lora: f32, f16 or bf16); default f16")
    p.add_argument("--no-check", action="store_true", help="skip reading the result back for the drift check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--trust-remote-code", action="store_true")
    p = commands.add_parser("generate", help="generate text with a base model and optionally an adapter")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--file", help="a text file with one prompt per line")
    source.add_argument("--chat", action="store_true", help="an interactive chat (empty line or Ctrl-D ends it)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--template", default=None, help="--chat: a chat template (default: the one saved with the adapter, else the tokenizer's own): a "
                   "built-in name (chatml, qwen2.5, qwen3, llama3, llama2, mistral, gemma, phi-3, zephyr, alpaca, plain), "
                   "a Jinja string or a file")
    p.add_argument("--system", default=None, help="--chat: a system prompt")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--trust-remote-code", action="store_true")
    p = commands.add_parser("serve", help="an OpenAI-style HTTP server for a base model and several adapters",
                            description="Serves /v1/completions, /v1/chat/completions, /v1/models and /health; a "
                            "request's `model` names an adapter (or the base), and requests for different adapters "
                            "share a batch. Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--model", required=True, help="base model id or folder (a causal LM); requests name it as given")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter folder served under NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-new-tokens-limit", type=int, default=512, help="the largest max_tokens a request may ask for (default 512)")
    p.add_argument("--max-batch", type=int, default=16, help="at most this many rows in one generate call, and prompts in one request (default 16)")
    p.add_argument("--template", default=None, help="chat template for the base and for adapters saved without one "
                   "(an adapter's saved template wins; default: the tokenizer's own, else chatml)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (also DELTATUNE_API_KEY)")
    p.add_argument("--trust-remote-code", action="store_true")
    p = commands.add_parser("info", help="what deltatune can do with a model: architecture, targets, counts per method")
    p.add_argument("model")
    p.add_argument("--trust-remote-code", action="store_true")
    p = commands.add_parser("plan", help="a training run's peak memory from the model's config alone (nothing downloaded)",
                            description="Peak memory of one training setting, by what holds it; with --memory, whether "
                            "it fits, changes that would, and the largest batch and max_length that fit.")
    p.add_argument("--model", required=True, help="model id, model folder or config.json path (only the config is read)")
    p.add_argument("--method", default="lora", help="a deltatune method name (default lora)")
    p.add_argument("--r", type=int, default=None, help="rank, for the methods that have one")
    p.add_argument("--target-modules", default=None, help="comma-separated module names, or all-linear")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other field of the method's config (repeatable), e.g. --set num_virtual_tokens=20")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024, help="max_length: tokens per example")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the frozen base (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--quant", choices=["nf4", "fp4", "int8"], default=None, help="a quantised base (bitsandbytes)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit, paged_adamw8bit, paged_adamw, sgd, ...")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--master-weights", choices=["fp32", "kahan", "none"], default="fp32",
                   help="how trainable 16-bit weights (full, freeze, bitfit on a bf16/fp16 base) train: fp32 master "
                   "copies (default, what `deltatune train` uses: train.master_weights), kahan (16-bit compensation "
                   "buffers) or none (pure 16-bit updates)")
    p.add_argument("--memory", default=None, help="what the device has: 24GB (10^9 bytes) or 24GiB (2^30)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="the device to plan for (default: this machine's, cuda when it has a GPU, else cpu)")
    p.add_argument("--task", choices=["causal_lm", "seq_cls", "seq2seq"], default=None)
    # the names are the stage registry's, checked in cmd_plan: importing the registry here would import torch for
    # every command's --help
    p.add_argument("--stage", default=None, help="the training stage (train's stage: key): the batch is planned as the "
                   "rows its examples put into the forward (a preference pair: 2) and with the model class it trains "
                   "(a reward model: a one-output classifier); default: one row per example on the model's own task, "
                   "as sft trains")
    p.add_argument("--attention", choices=["sdpa", "eager"], default=None, help="default: the config's own (sdpa)")
    p.add_argument("--loss", choices=["fused", "standard", "chunked", "compiled"], default="fused",
                   help="fused: deltatune's fused linear + cross-entropy, what `deltatune train` runs (train.loss: fused); "
                   "standard: transformers' loss; chunked: torchtune's chunked cross-entropy; compiled: chunked and fused "
                   "by torch.compile")
    p.add_argument("--trust-remote-code", action="store_true")
    p = commands.add_parser("demo", help="the offline demo: fine-tune the pretrained MiniLM on a task built from the stdlib")
    p.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    p.add_argument("--out", default="out/demo")
    p = commands.add_parser("tiny", help="write a tiny random-init model with a tokenizer, to try the examples offline",
                            description="A tiny random model of MODEL_TYPE (hidden size 32, two layers) and a small BPE "
                            "tokenizer, written to DIR; pass DIR as --model.name to try a config offline.")
    from .tiny import ARCHITECTURES  # transformers is imported only when a model is built

    p.add_argument("model_type", metavar="MODEL_TYPE", help=", ".join(sorted(ARCHITECTURES)))
    p.add_argument("dir", metavar="DIR", help="a new or empty folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=32, help="hidden size (64 for a 4-bit base on a CPU)")

    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere (after a subcommand's own options too): no option of any command takes "--debug" as its value
    debug = "--debug" in argv or os.environ.get("DELTATUNE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    argv = [a for a in argv if a != "--debug"]
    rest: list[str] = []
    if argv and argv[0] in RUN_COMMANDS:
        # CONFIG, the command's own options, then any number of --section.key value flags
        own = {"eval": {"--adapter"}, "data": {"--examples"}, "compare": {"--methods", "--out", "--reference-data", "--sweep"}}.get(argv[0], set())
        head, i = [argv[0]], 1
        if i < len(argv) and not argv[i].startswith("-"):
            head.append(argv[i])
            i += 1
        while i < len(argv):
            key = argv[i].split("=", 1)[0]
            if key in own or key in ("-h", "--help"):
                head.append(argv[i])
                if "=" not in argv[i] and key not in ("-h", "--help") and i + 1 < len(argv):
                    head.append(argv[i + 1])
                    i += 1
                    # compare's --methods takes several names: every word up to the next flag
                    while key == "--methods" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                        head.append(argv[i + 1])
                        i += 1
            else:
                rest.append(argv[i])
            i += 1
        argv = head
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args, rest)
    except DeltaError as err:
        # a DeltaError is worded for the user: one line, the traceback only on request. Any other exception
        # is deltatune's bug (a dependency's, met reading the user's files, arrives as a UserFileError) and
        # shows its traceback.
        if debug:
            traceback.print_exc()
        hint = " (--debug shows the traceback)" if isinstance(err, UserFileError) and not debug else ""
        print(f"deltatune {args.command}: error: {err}{hint}", file=sys.stderr)
        return 2
    except ImportError as err:
        if debug:
            traceback.print_exc()
        print(f"deltatune {args.command}: error: {err}; the command needs the pipeline extras: "
              "pip install 'deltatune[pipeline]'", file=sys.stderr)
        return 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deltatune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return __version__


RUN_COMMANDS = ("train", "eval", "data", "compare")


def _run_config(args: argparse.Namespace, rest: list[str]) -> Any:
    from .pipeline.config import load_run_config

    return load_run_config(args.config, rest)


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .pipeline.train import run

    run(_run_config(args, rest))
    return 0


def cmd_compare(args: argparse.Namespace, rest: list[str]) -> int:
    import shlex

    from .compare import compare, print_table

    argv = [a for a in sys.argv[1:] if a != "--debug"] if sys.argv[1:2] == ["compare"] else None
    command = shlex.join(["deltatune", *argv]) if argv else None
    comparison = compare(args.config, args.methods, args.out, rest, command=command,
                         reference_data=args.reference_data, sweep=args.sweep)
    print_table(comparison)
    return 1 if comparison.failed else 0


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from . import io as dt_io
    from .pipeline.data import prepare
    from .pipeline.evaluate import evaluate
    from .pipeline.train import check_max_length, load_base, load_tokenizer, model_limit

    config = _run_config(args, rest)
    tokenizer = load_tokenizer(config)
    labels = _labels(config)
    from .model_files import RESTORED

    model = load_base(config, tokenizer, labels, say=print,
                      fate=RESTORED if args.adapter else "evaluated as it is (an untuned baseline)")
    check_max_length(config, model)
    prepared = prepare(config, tokenizer, model_limit(model, tokenizer))
    if not prepared.eval:
        raise DeltaError("no eval data: set data.eval (a file) or data.eval_fraction")
    if args.adapter:
        dt_io.load(model, args.adapter)
    metrics = evaluate(model, prepared, config, tokenizer)
    what = f"{config.model.name} + {args.adapter}" if args.adapter else f"{config.model.name} (base)"
    print(f"evaluation of {what} on {len(prepared.eval)} examples")
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"  {key.ljust(width)}  {value:.4f}")
    return 0


def _labels(config: Any) -> list[str] | None:
    if config.model.task != "seq_cls":
        return None
    from .pipeline.data import check_rows, label_set, read_rows

    rows, where = read_rows(config.data.train, config.data)
    return label_set(check_rows(rows, where, config.data, labels=config.data.labels), config.data)


def cmd_data(args: argparse.Namespace, rest: list[str]) -> int:
    from .pipeline.data import prepare
    from .pipeline.train import load_tokenizer

    if args.examples < 0:  # a slice [:-1] would print all but one
        raise DeltaError(f"--examples {args.examples}: give how many training examples to print, 0 or more "
                         "(0 prints the length statistics only)")
    config = _run_config(args, rest)
    tokenizer = load_tokenizer(config)
    prepared = prepare(config, tokenizer, getattr(tokenizer, "model_max_length", None) if
                       (getattr(tokenizer, "model_max_length", 0) or 0) < 1_000_000 else None)
    for line in prepared.notes + prepared.lengths.lines():
        print(line)
    if args.examples == 0:
        return 0
    color = sys.stdout.isatty()
    start, end = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    shown = min(args.examples, len(prepared.train))
    print(f"\nthe first {shown} training examples; trained tokens are {'green' if color else 'between [[ and ]]'}:")
    for n, example in enumerate(prepared.train[: args.examples], 1):
        kind = " chosen" if example.rejected is not None else ""
        print(f"\n--- example {n}{kind} ({len(example.input_ids)} tokens)")
        if isinstance(example.labels, int):
            print(tokenizer.decode(example.input_ids) + f"  -> label {prepared.labels[example.labels]!r}")
            continue
        if example.decoder_labels is not None:
            print(tokenizer.decode(example.input_ids) + f"\n  -> {start}{tokenizer.decode(example.decoder_labels)}{end}")
            continue
        if example.desirable is not None:
            print(f"(KTO: the completion is {'desirable' if example.desirable else 'undesirable'})")
        print(_marked(tokenizer, example.input_ids, example.labels, start, end))
        if example.rejected is not None:
            print(f"--- rejected ({len(example.rejected.input_ids)} tokens)")
            print(_marked(tokenizer, example.rejected.input_ids, example.rejected.labels, start, end))
    return 0


def _marked(tokenizer: Any, ids: list[int], labels: list[int], start: str, end: str) -> str:
    """The decoded example with its trained runs of tokens between start and end."""
    from .pipeline.data import IGNORE

    text, run_ids, trained = [], [], None
    for token, label in zip(ids, labels):
        flag = label != IGNORE
        if trained is not None and flag != trained:
            text.append((tokenizer.decode(run_ids), trained))
            run_ids = []
        run_ids.append(token)
        trained = flag
    text.append((tokenizer.decode(run_ids), trained))
    return "".join(f"{start}{t}{end}" if flag else t for t, flag in text)


def cmd_merge(args: argparse.Namespace, rest: list[str]) -> int:
    from . import io as dt_io
    from .files import check_output_folder
    from .model_files import read_labels
    from .pipeline.export import export_merged
    from .quant import DTYPES

    config, _ = dt_io.read_adapter(args.adapter)
    base = args.model or config.base_model_name_or_path
    if not base:
        raise DeltaError(f"{Path(args.adapter) / 'adapter_config.json'} records no base model "
                         "(base_model_name_or_path); name it with --model")
    if args.model is None:
        print(f"base model: {base} (recorded in the adapter's config; --model chooses another)")
    inputs = {"adapter": Path(args.adapter)} | ({"base model": Path(base)} if Path(base).exists() else {})
    check_output_folder(Path(args.out), inputs, args.overwrite)  # before the slow part, and before anything is written
    labels = read_labels(Path(args.adapter))
    # a classifier's head as the run trained it: its label count (one for a reward model's score)
    count = len(labels) if labels is not None and config.task_type == "SEQ_CLS" else None
    model, tokenizer = _load_for_adapter(base, config.task_type, args.trust_remote_code, num_labels=count)
    dt_io.load(model, args.adapter)
    if labels is not None:  # the run's label names, not transformers' LABEL_0, LABEL_1
        model.config.id2label = labels
        model.config.label2id = {name: i for i, name in labels.items()}
    dtype = DTYPES.get(args.dtype)
    folder = export_merged(model, tokenizer, args.out, dtype=dtype, in_place=True)
    print(f"merged {args.adapter} into {base}: {folder} (loads with transformers alone)")
    return 0


def cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    from . import io as dt_io
    from .files import check_output_folder

    out = Path(args.out)
    if args.format == "vllm":
        inputs = {"adapter": Path(args.adapter)} if args.adapter else {}
        check_output_folder(out, inputs, args.overwrite)
    else:
        _check_gguf_out(out, args.overwrite)
    if args.format != "gguf" and args.adapter is None:
        raise DeltaError(f"--format {args.format} writes an adapter: name it with --adapter")
    task_type, base = "CAUSAL_LM", args.model
    if args.adapter is not None:
        config, _ = dt_io.read_adapter(args.adapter)
        task_type, base = config.task_type or "CAUSAL_LM", args.model or config.base_model_name_or_path
        if task_type != "CAUSAL_LM":
            raise DeltaError(f"{args.adapter} is a {task_type} adapter; `deltatune export` writes causal language "
                             "models (`deltatune merge` writes any)")
        if not base:
            raise DeltaError(f"{Path(args.adapter) / 'adapter_config.json'} records no base model "
                             "(base_model_name_or_path); name it with --model")
        if args.model is None:
            print(f"base model: {base} (recorded in the adapter's config; --model chooses another)")
    elif base is None:
        raise DeltaError("name the model to export with --model, an adapter with --adapter, or both")
    model, tokenizer = _load_for_adapter(base, task_type, args.trust_remote_code)
    if args.adapter is not None:
        dt_io.load(model, args.adapter)
    name = Path(args.adapter or base).name
    if args.format == "vllm":
        return _export_vllm(model, out, base, name, args)
    from .export.gguf import export_gguf, export_gguf_lora

    if args.format == "gguf-lora":
        report = export_gguf_lora(model, out, args.type, name=name, check=not args.no_check)
    else:
        report = export_gguf(model, tokenizer, out, args.type, name=name, check=not args.no_check)
    print(f"wrote {report.path}: {report.arch}, {report.type}, {report.tensors} tensors, "
          f"{report.bytes / 2**20:.1f} MiB")
    if report.drift is not None:
        print(f"drift from the unmerged model: {report.drift.line()}")
    return 0


def _check_gguf_out(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise DeltaError(f"--out {out}: a GGUF file's name ends in .gguf (e.g. --out {out.with_suffix('.gguf').name})")
    if out.is_dir():
        raise DeltaError(f"--out {out} is a folder; name the file to write, e.g. --out {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise DeltaError(f"--out {out} already exists; nothing was written. Pass --overwrite to replace it "
                         "(once the new file is complete), or choose another name")
    if not out.parent.is_dir():
        raise DeltaError(f"--out {out}: the folder {out.parent} does not exist; create it first")


def _export_vllm(model: Any, out: Path, base: str, name: str, args: argparse.Namespace) -> int:
    import secrets
    import shutil

    from .export.vllm import export_vllm
    from .files import replace_tree

    if args.type != "f16":
        print("note: --type applies to GGUF; the vLLM folder keeps the adapter's own dtype")
    # a fresh folder beside the target, renamed into place once complete (check_output_folder allowed replacing it)
    staging = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        result = export_vllm(model, staging, check=not args.no_check)
        replace_tree(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out}: a LoRA adapter vLLM serves as it is ({result.modules} modules, rank {result.rank}; each "
          "module's scale folded into its B)")
    if result.drift is not None:
        print(f"drift from the unmerged model: {result.drift.line()}")
    if result.max_lora_rank is None:
        print(f"note: rank {result.rank} is above vLLM's largest --max-lora-rank (512)")
    print(f"serve it: {result.command(base, name, out)}")
    return 0


def _load_for_adapter(name: str, task_type: str | None, trust_remote_code: bool,
                      num_labels: int | None = None) -> tuple[Any, Any]:
    import transformers as tf

    from .model_files import RESTORED, check_base_model, fresh_weights_line, load_pretrained

    classes = {"CAUSAL_LM": tf.AutoModelForCausalLM, "SEQ_CLS": tf.AutoModelForSequenceClassification,
               "SEQ_2_SEQ_LM": tf.AutoModelForSeq2SeqLM, "TOKEN_CLS": tf.AutoModelForTokenClassification,
               "QUESTION_ANS": tf.AutoModelForQuestionAnswering}
    cls = classes.get(task_type or "", tf.AutoModel)
    check_base_model(name, "--model")
    with reading(f"the model {name}"):  # what transformers raises beside these
        try:
            # dtype="auto": the checkpoint's own dtype (transformers 4 would load fp32, or fp16 beside bitsandbytes)
            extra = {"num_labels": num_labels} if num_labels is not None else {}
            model, missing = load_pretrained(cls, name, trust_remote_code=trust_remote_code, dtype="auto", **extra)
        except (OSError, ValueError) as err:
            raise DeltaError(f"cannot load {name!r}: {str(err)[:300]}") from None
    line = fresh_weights_line(name, missing, None, RESTORED)
    if line is not None:
        print(line)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError):  # none saved (transformers 4 then tries a slow class, which may need protobuf)
        tokenizer = None
    return model, tokenizer


def cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from . import io as dt_io

    prompts = _prompt_lines(Path(args.file)) if args.file is not None else []  # read before the model loads
    task = dt_io.read_adapter(args.adapter)[0].task_type if args.adapter else "CAUSAL_LM"
    if task not in (None, *GENERATING_TASKS):
        # checked before loading: a classifier's model has no generate(), and the AttributeError would say nothing
        raise DeltaError(f"the adapter at {args.adapter} was trained for task {task}: its model has no generation head "
                         f"(no language-model head to produce tokens); generate needs a causal LM or seq2seq adapter "
                         f"({' or '.join(GENERATING_TASKS)}); score a classifier with `deltatune eval CONFIG --adapter DIR`")
    model, tokenizer = _load_for_adapter(args.model, task or "CAUSAL_LM", args.trust_remote_code)
    if not callable(getattr(model, "generate", None)) or not _can_generate(model):
        raise DeltaError(f"{args.model} loads as {type(model).__name__}, which has no generation head; generate needs a "
                         "causal LM or seq2seq model")
    if tokenizer is None:
        raise DeltaError(f"{args.model} has no tokenizer to generate with")
    if args.adapter:
        dt_io.load(model, args.adapter)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    seq2seq = getattr(model.config, "is_encoder_decoder", False)

    def complete(prompt: str, chat: Renderer | None = None) -> str:
        # A rendered chat already holds the template's special tokens (BOS among them): adding them again
        # would start the prompt with two BOS, unlike every example the model was trained on.
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=chat is None or seq2seq)
        stops = chat.stop_ids() if chat is not None and not seq2seq else None
        with torch.no_grad():
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None)
        new = out[0] if seq2seq else out[0, enc["input_ids"].shape[1]:]
        return tokenizer.decode(new, skip_special_tokens=True)

    if args.prompt is not None:
        print(complete(args.prompt))
    elif args.file is not None:
        for line in prompts:
            if line.strip():
                print(f">>> {line}\n{complete(line)}\n")
    else:
        template = args.template
        if template is None and args.adapter:
            from .pipeline.render import saved_template

            template = saved_template(args.adapter)  # the template the adapter was trained with
        chat = chat_renderer(tokenizer, template)
        history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append({"role": "user", "content": line})
            answer = complete(chat.prompt(history), chat).strip()
            history.append({"role": "assistant", "content": answer})
            print(f"model> {answer}")
    return 0


def chat_renderer(tokenizer: Any, template: str | None) -> Renderer:
    """The renderer `generate --chat` prompts with: the same one training renders conversations with."""
    from .pipeline.config import DataSection
    from .pipeline.render import Renderer

    return Renderer(tokenizer, DataSection(chat_template=template))


def _prompt_lines(path: Path) -> list[str]:
    from .pipeline.config import read_utf8

    if not path.is_file():
        raise DeltaError(f"no prompt file at {path}")
    return read_utf8(path).splitlines()


GENERATING_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


def _can_generate(model: Any) -> bool:
    check = getattr(model, "can_generate", None)
    return bool(check()) if callable(check) else True


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from . import io as dt_io
    from . import serve

    adapters: dict[str, str] = {}
    for item in args.adapter:
        name, eq, folder = (part.strip() for part in item.partition("="))
        if not eq or not name or not folder:
            raise DeltaError(f"--adapter {item!r}: write NAME=DIR, e.g. --adapter sql=out/sql/adapter")
        if name in adapters:
            raise DeltaError(f"--adapter {name}= is given twice ({adapters[name]} and {folder}); give each its own name")
        task = dt_io.read_adapter(folder, verify=False)[0].task_type  # checked before the model loads
        if task not in (None, "CAUSAL_LM"):
            raise DeltaError(f"the adapter at {folder} was trained for task {task}; serve runs causal LM adapters")
        adapters[name] = folder
    if not serve.is_loopback(args.host):
        print(f"deltatune serve: warning: binding {args.host} makes the server reachable from the network, and it has "
              f"{'only the --api-key' if args.api_key else 'no'} authentication", file=sys.stderr)
    model, tokenizer = _load_for_adapter(args.model, "CAUSAL_LM", args.trust_remote_code)
    if torch.cuda.is_available():
        model.to("cuda")
    server = serve.make_server(model, tokenizer, adapters, args.host, args.port, base_name=args.model,
                               template=args.template, max_new_tokens_limit=args.max_new_tokens_limit,
                               api_key=args.api_key or os.environ.get("DELTATUNE_API_KEY") or None,
                               max_batch_rows=args.max_batch)
    host, port = server.server_address[:2]
    print(f"serving {', '.join(server.served.names())} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_info(args: argparse.Namespace, rest: list[str]) -> int:
    from .info import describe

    print(describe(args.model, trust_remote_code=args.trust_remote_code))
    return 0


def cmd_plan(args: argparse.Namespace, rest: list[str]) -> int:
    import json

    from .planner import plan

    fields: dict[str, Any] = {}
    for item in args.set:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise DeltaError(f"--set {item!r}: write FIELD=VALUE, e.g. --set alpha=32")
        try:
            fields[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            fields[key.strip()] = text
    if args.r is not None:
        fields["r"] = args.r
    if args.target_modules is not None:
        names = [t.strip() for t in args.target_modules.split(",") if t.strip()]
        fields["target_modules"] = "all-linear" if names == ["all-linear"] else names
    device, dtype, assumed = _plan_target(args.device, args.dtype)
    task, num_labels, rows_per_example, stage_notes = _plan_stage(args)
    reference = _plan_reference(args)  # dpo, kto on full, freeze, bitfit: a frozen copy of the base beside it
    rows = args.batch * rows_per_example  # the planner sizes the forward, which holds rows, not examples
    result = plan(args.model, args.method, batch=rows, seq=args.seq, dtype=dtype, quant=args.quant,
                  gradient_checkpointing=args.grad_checkpointing, optimizer=args.optimizer, accum=args.accum,
                  memory=args.memory, device=device, task=task, attention=args.attention, loss=args.loss,
                  trust_remote_code=args.trust_remote_code, master_weights=args.master_weights, num_labels=num_labels,
                  reference=reference, **fields)
    result.notes.extend(stage_notes)
    if assumed:
        result.notes.append(assumed)
    if args.master_weights != "fp32" and not result.sixteen_bit_trainable:
        # a flag the plan could not apply is said, not silently dropped
        result.notes.append(f"--master-weights {args.master_weights} changes nothing here: no trainable parameter is "
                            f"16-bit ({args.method} on {'a' if dtype == 'bf16' else 'an'} {dtype} base trains fp32 parameters)")
    print(result.table())
    if result.sixteen_bit_trainable:  # trainable 16-bit weights: the ways to train them, side by side
        from .planner import compare_master_modes

        print("\n" + compare_master_modes(args.model, args.method, batch=rows, seq=args.seq, dtype=dtype,
                                          quant=args.quant, gradient_checkpointing=args.grad_checkpointing,
                                          optimizer=args.optimizer, accum=args.accum, device=device, task=task,
                                          num_labels=num_labels,
                                          attention=args.attention, loss=args.loss,
                                          trust_remote_code=args.trust_remote_code, planned=args.master_weights,
                                          reference=reference, **fields))
    return 0 if result.fits is not False else 1


def _plan_reference(args: argparse.Namespace) -> bool:
    """Whether --stage with --method holds a reference copy of the weights (the stage's default settings)."""
    if args.stage is None:
        return False
    from .pipeline.stages import named
    from .pipeline.stages.reference import needs_copy_by_default

    return needs_copy_by_default(named(args.stage), args.method)


def _plan_stage(args: argparse.Namespace) -> tuple[str | None, int | None, int, list[str]]:
    """What --stage changes in a plan: the task and head size the stage loads (None: --task's, the config's),
    the rows one example puts into the forward, and the notes that say so."""
    if args.stage is None:
        return args.task, None, 1, []
    from .pipeline.stages import named
    from .planner import rows_note

    stage = named(args.stage)
    if stage.task is not None and args.task is not None and args.task != stage.task:
        raise DeltaError(f"--stage {stage.name} trains a {stage.task} model, not --task {args.task}: drop --task")
    rows = stage.rows_per_example()
    notes = [f"stage {stage.name}: " + (rows_note(args.batch, rows) if rows > 1 else
                                        f"one row per example in the training forward, batch {args.batch}")
             + (", so 'largest batch that fits' counts rows too" if args.memory is not None and rows > 1 else "")]
    if stage.task is not None:
        head = f" with {stage.num_labels} output{'s' if stage.num_labels != 1 else ''}" if stage.num_labels else ""
        notes.append(f"stage {stage.name} trains a {stage.task} model{head} (whatever the config's architectures say)")
    return stage.task or args.task, stage.num_labels, rows, notes


def _plan_target(device: str | None, dtype: str | None) -> tuple[str, str, str | None]:
    """The device and dtype to plan for: those given, else this machine's (a GPU with bf16, or the CPU with
    fp32), and a note saying what was assumed and how to choose another."""
    if device is not None and dtype is not None:
        return device, dtype, None
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        other, where = ("cpu", "the CPU") if device == "cuda" else ("cuda", "a GPU")
        dtype, flags = (dtype, "") if dtype is not None else ("bf16" if device == "cuda" else "fp32", None)
        flags = f"--device {other}" + ("" if flags == "" else f" --dtype {'fp32' if other == 'cpu' else 'bf16'}")
        why = "this machine has a GPU" if device == "cuda" else "this machine has no GPU"
        return device, dtype, f"planned for {device}, {dtype} ({why}); pass {flags} to plan for {where}"
    dtype = "bf16" if device == "cuda" else "fp32"
    return device, dtype, f"planned with a {dtype} base, the default on {device}; pass --dtype to plan another"


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from .pipeline.demo import run_demo

    return run_demo(quick=args.quick, out=args.out)


def cmd_tiny(args: argparse.Namespace, rest: list[str]) -> int:
    import transformers

    from .tiny import ARCHITECTURES, write_tiny

    transformers.utils.logging.disable_progress_bar()  # a bar for one small file is noise
    folder = write_tiny(args.model_type, args.dir, seed=args.seed, width=args.width)
    kind = ARCHITECTURES[args.model_type].model
    print(f"wrote a tiny random {kind} with its tokenizer to {folder}; try it with --model.name {folder}")
    return 0


COMMANDS = {"train": cmd_train, "compare": cmd_compare, "eval": cmd_eval, "data": cmd_data, "merge": cmd_merge,
            "export": cmd_export, "generate": cmd_generate, "serve": cmd_serve,
            "info": cmd_info, "plan": cmd_plan, "demo": cmd_demo, "tiny": cmd_tiny}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
