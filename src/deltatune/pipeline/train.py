"""The training loop: model + delta + data -> trained delta, checkpoints, logs and a report.

Built on accelerate (devices, mixed precision, several processes). The loop feeds
batches itself, from one integer data position (see data.global_batch), so a run
on N processes sees the same examples as a run on one, and a resumed run continues
exactly where its checkpoint stopped: a run killed with SIGKILL and resumed ends
with the same delta as a run never interrupted.

Methods reach the loop only through the Method record: the loss adds
`dt.regularization(model)`, every optimizer step is followed by `dt.step(model, step)`,
and the run ends with `dt.finalize(model)`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import api, io as dt_io
from ..config import DeltaError, reading
from ..files import remove_tree, size_text, tensor_bytes, write_atomic, write_failure
from ..loss_scale import LossScaler, needs_scaling
from ..master import MasterWeights
from ..model_files import RESTORED, check_base_model, check_model_path, write_labels
from ..quant import DTYPES
from ..planner import check_positions, check_run
from ..summary import summary
from . import checkpoint as ckpt, rundir
from .config import UNUSABLE_OPTIMIZERS, ConfigError, RunConfig, with_step_count
from .data import CHAT_FORMATS, Prepared, global_batch, prepare
from .packing import check_model as check_packing
from .evaluate import evaluate
from .render import Renderer
from .report import RunLog, write_report
from .rows import canonical_format
from .stages import active_stage, ignored_columns, reference, stage_for
from .stages.reference import needs_copy


class TrainingError(DeltaError):
    """The run cannot go on (a non-finite loss, say); the message names the step and what to do."""


@dataclass
class RunResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    final_loss: float
    metrics: dict[str, float]
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- model


# any one of these in a folder is a tokenizer transformers can read
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def load_tokenizer(config: RunConfig) -> Any:
    from transformers import AutoTokenizer

    name = config.model.name
    check_model_path(name)  # a mistyped folder would come back as "Repo id must be in the form ..."
    folder = Path(name).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer from config.json alone (every text becomes no tokens),
        # transformers 4 asks for protobuf: neither says what is missing
        raise DeltaError(f"model.name = {name!r}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, "
                         "...); save it beside the model with tokenizer.save_pretrained(folder), or copy the "
                         "tokenizer files of the model it was trained from")
    with reading(f"the tokenizer of {_where(name)}"):  # what transformers raises beside these
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=config.model.trust_remote_code,
                                                      revision=config.model.revision)
        except (OSError, ValueError) as err:
            raise DeltaError(f"cannot load the tokenizer of {name!r}: {str(err)[:300]}") from None
        except ImportError as err:  # a slow tokenizer class needs sentencepiece or protobuf
            raise DeltaError(f"the tokenizer of {name!r} needs a package that is not installed ({str(err).strip()[:200]}); "
                             "install it, or save a fast tokenizer (tokenizer.json) beside the model") from None
    if len(tokenizer) == 0:
        raise DeltaError(f"the tokenizer of {name!r} has an empty vocabulary, so every text would become no tokens; "
                         "save the model's real tokenizer beside it with tokenizer.save_pretrained(folder)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_base(config: RunConfig, tokenizer: Any, labels: list[str] | None = None, say: Any = None,
              fate: str = "training fits it") -> torch.nn.Module:
    """The base model for a run; `say` gets one line for weights the checkpoint lacked (a fresh head), in place of
    transformers' load report, saying what becomes of them (`fate`)."""
    import transformers as tf

    from ..model_files import fresh_weights_line, load_pretrained

    check_base_model(config.model.name)  # safetensors weights only: a pickle could run code

    classes = {"causal_lm": tf.AutoModelForCausalLM, "seq_cls": tf.AutoModelForSequenceClassification,
               "seq2seq": tf.AutoModelForSeq2SeqLM}
    kwargs: dict[str, Any] = {"trust_remote_code": config.model.trust_remote_code, "revision": config.model.revision,
                              "dtype": DTYPES[config.model.dtype]}
    if config.model.attention is not None:
        check_attention(config.model.attention)
        kwargs["attn_implementation"] = config.model.attention
    stage = active_stage(config)
    task = model_task(config)
    if task == "seq_cls" and stage is not None and stage.num_labels is not None:
        kwargs.update(num_labels=stage.num_labels)  # the stage's head: no labels of the data to name
    elif task == "seq_cls":
        count = check_head(config, labels)
        kwargs.update(num_labels=count)
        if labels and len(labels) == count:
            kwargs.update(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
        if config.model.reinit_head:
            kwargs.update(ignore_mismatched_sizes=True)  # a head of another size starts fresh
    if config.model.quant is not None:
        from ..quant import CLASSIFIER_HEADS, quantization_config

        heads = ["lm_head", *CLASSIFIER_HEADS] if task == "seq_cls" else None  # a head trained whole stays full precision
        kwargs["quantization_config"] = quantization_config(config.model.quant, DTYPES[config.model.dtype],
                                                            double_quant=config.model.double_quant,
                                                            int8_threshold=config.model.int8_threshold, skip_modules=heads)
    # A head the checkpoint lacks (a classifier's, a resized one) starts from the run's seed, so an untuned
    # baseline, `deltatune eval` of the base and the run itself see the same fresh head every time.
    torch.manual_seed(config.train.seed)
    with reading(f"the model {_where(config.model.name)}"):  # what transformers raises beside these
        try:
            model, missing = load_pretrained(classes[task], config.model.name, **kwargs)
        except (OSError, ValueError) as err:
            raise DeltaError(f"cannot load {config.model.name!r} as a {task} model: {str(err)[:400]}") from None
    line = fresh_weights_line(config.model.name, missing, config.train.seed, fate)
    if line is not None and say is not None:
        say(line)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def model_task(config: RunConfig) -> str:
    """The model class a run loads: model.task's, or its stage's own (a reward model loads a causal LM's checkpoint
    as a one-output sequence classifier)."""
    stage = active_stage(config)
    return stage.task if stage is not None and stage.task is not None else config.model.task


def check_attention(kind: str) -> None:
    """flash_attention_2 needs a CUDA GPU and the flash-attn package; say so before transformers' own error."""
    if kind != "flash_attention_2":
        return
    import importlib.util

    missing = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                     ("the flash-attn package (pip install flash-attn)",
                                      importlib.util.find_spec("flash_attn") is not None)) if not ok]
    if missing:
        raise ConfigError(f"model.attention = 'flash_attention_2' needs {' and '.join(missing)}, which this machine lacks; "
                          "use model.attention: sdpa (the default), which packs as exactly")


def check_head(config: RunConfig, labels: list[str] | None) -> int:
    """The classifier's label count, checked against the data and the checkpoint's head before anything loads.

    transformers would fail while loading (a head of another size) or the loss mid-training (a label
    index past the head), long after the mistake; here it is named with both counts."""
    where = config.source
    if labels is not None and len(labels) < 2:
        raise ConfigError(f"{where}: the classification data {config.data.train} has one label only ({labels!r}); a "
                          "classifier needs at least two: add rows of another label, or list the whole set in data.labels")
    count = config.model.num_labels or (len(labels) if labels else 2)
    if labels is not None and config.model.num_labels is not None and config.model.num_labels != len(labels):
        raise ConfigError(f"{where}: model.num_labels = {config.model.num_labels} but the data has {len(labels)} labels "
                          f"({', '.join(labels)}); set model.num_labels: {len(labels)} or drop it (the data's count is "
                          "the default), or list every label in data.labels")
    head = _checkpoint_head(config)
    if head is not None and len(head) != count and not config.model.reinit_head:
        have = f"the data's {len(labels)} labels ({', '.join(labels)})" if labels else f"{count} labels"
        raise ConfigError(f"{where}: the classifier head of {config.model.name!r} has {len(head)} labels "
                          f"({', '.join(head)}), but this run needs {have}; add model.reinit_head: true to load it "
                          f"with a fresh {count}-label head (its trained head is dropped), or give data.labels the "
                          "checkpoint's labels")
    return count


def _checkpoint_head(config: RunConfig) -> list[str] | None:
    """The labels of the checkpoint's classifier head, or None when it has none (a base model, a causal LM)."""
    from transformers import AutoConfig

    with reading(f"the model config {_where(config.model.name, 'config.json')}"):
        try:
            base = AutoConfig.from_pretrained(config.model.name, trust_remote_code=config.model.trust_remote_code,
                                              revision=config.model.revision)
        except (OSError, ValueError) as err:
            raise DeltaError(f"cannot read the config of {config.model.name!r}: {str(err)[:300]}") from None
    # Only a checkpoint saved as a classifier has trained head weights; any other gets a fresh head of any size.
    if not any(a.endswith("ForSequenceClassification") for a in getattr(base, "architectures", None) or []):
        return None
    return [str(base.id2label[i]) for i in sorted(base.id2label)]


def _where(name: str, file: str | None = None) -> str:
    """How an error names what model.name points at: the folder (or a file in it), or the hub id."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder / file) if file else str(folder)
    return repr(name)


def check_max_length(config: RunConfig, model: torch.nn.Module) -> None:
    """data.max_length longer than the model's positions is refused before any data is encoded: no example
    could use the positions past the model's last one (and a forward pass would fail on them)."""
    if config.data.max_length:
        check_positions(model.config, config.data.max_length, "data.max_length", repr(config.model.name))


def model_limit(model: torch.nn.Module, tokenizer: Any) -> int | None:
    limits = [getattr(model.config, k, None) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")]
    tok = getattr(tokenizer, "model_max_length", None)
    limits.append(tok if tok and tok < 1_000_000 else None)
    limits = [n for n in limits if isinstance(n, int) and n > 0]
    return min(limits) if limits else None


def parameter_groups(model: torch.nn.Module, lr: float, head_lr: float | None) -> list[dict[str, Any]]:
    """The trainable parameters, a modules-kept-whole group (a classifier head) apart when head_lr is set.

    A head starts from scratch and learns best with a larger step than a low-rank delta does."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if head_lr is None:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    head = [p for n, p in trainable if ".modules_to_save." in f".{n}"]
    rest = [p for n, p in trainable if ".modules_to_save." not in f".{n}"]
    return [g for g in ({"params": rest, "lr": lr}, {"params": head, "lr": head_lr}) if g["params"]]


def make_optimizer(name: str, params: list[Any], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """`params`: parameters or parameter groups (each group may carry its own lr)."""
    import inspect

    from ..quant import OPTIMIZERS, bnb_optimizer

    if name.lower() in OPTIMIZERS:
        return bnb_optimizer(name.lower(), params, lr, weight_decay)
    by_lower = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)
                if isinstance(getattr(torch.optim, n), type) and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
                and n != "Optimizer" and n.lower() not in UNUSABLE_OPTIMIZERS}
    usable = f"{', '.join(sorted(by_lower))}, or from bitsandbytes {', '.join(OPTIMIZERS)}"
    if name.lower() in UNUSABLE_OPTIMIZERS:
        raise DeltaError(f"train.optimizer = {name!r} cannot be used here: {UNUSABLE_OPTIMIZERS[name.lower()]}; "
                         f"choose one of {usable}")
    if name.lower() not in by_lower:
        squeezed = {n.replace("_", ""): n for n in OPTIMIZERS}
        close = squeezed.get(name.lower().replace("_", "").replace("-", "").replace("bnb", ""))
        if close is not None:  # transformers' spellings: adamw_bnb_8bit, paged_adamw_8bit, ...
            raise DeltaError(f"train.optimizer = {name!r} is not a name deltatune knows; the bitsandbytes optimizer "
                             f"it looks like is spelled {close!r} here: set train.optimizer: {close}")
        raise DeltaError(f"train.optimizer = {name!r} is not a torch.optim optimizer; choose one of {usable}")
    cls = by_lower[name.lower()]
    kwargs: dict[str, Any] = {"lr": lr}
    if "weight_decay" in inspect.signature(cls).parameters:
        kwargs["weight_decay"] = weight_decay
    elif weight_decay:
        raise DeltaError(f"train.optimizer = {name!r} has no weight decay, but train.weight_decay = {weight_decay}; "
                         "set train.weight_decay: 0 or choose another optimizer")
    try:
        return cls(params, **kwargs)
    except (ValueError, TypeError) as err:  # Muon, say, takes 2-D parameters only
        raise DeltaError(f"train.optimizer = {name!r} cannot train this delta's parameters ({err}); "
                         "choose another optimizer, such as adamw") from None


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- the run


def run(config: RunConfig, echo: Any = print) -> RunResult:
    stage = stage_for(config)  # what the delta trains for; the loop below knows no stage by name
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from accelerate.state import AcceleratorState

    t_start = time.perf_counter()
    # accelerate keeps one state per process; a second run here (a notebook, the demo's runs) may want
    # another precision. The process group itself (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        # no GPU: processes started by `accelerate launch` or torchrun join over gloo on the CPU
        accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=not torch.cuda.is_available())
    except ValueError as err:
        raise DeltaError(f"train.mixed_precision = {config.train.mixed_precision!r} is not available here: {err}") from None
    main = accelerator.is_main_process
    say = echo if main else (lambda *a, **k: None)
    out = Path(config.output.dir)
    resume_from = _claim(accelerator, config, say)
    set_seed(config.train.seed)

    tokenizer = load_tokenizer(config)
    labels_hint = None
    if config.model.task == "seq_cls":
        from .data import check_rows, label_set, read_rows

        rows, where = read_rows(config.data.train, config.data)
        labels_hint = label_set(check_rows(rows, where, config.data, labels=config.data.labels), config.data)
    restored = bool(config.train.init_adapter) or resume_from is not None
    model = load_base(config, tokenizer, labels_hint, say=say,
                      fate=RESTORED if restored else "the delta trains it")
    check_max_length(config, model)
    prepared = prepare(config, tokenizer, model_limit(model, tokenizer))
    if config.model.task == "causal_lm" and canonical_format(config.data.format) in CHAT_FORMATS:
        # The template training rendered with is saved with the adapter's tokenizer (and the merged
        # model's), so `deltatune generate --chat` and apply_chat_template prompt as the model was trained.
        template = Renderer(tokenizer, config.data).template_to_save()
        if template is not None:
            tokenizer.chat_template = template
    for line in prepared.notes + ignored_columns(stage, prepared.train) + prepared.lengths.lines():
        say(line)
    world = accelerator.num_processes
    per_step = config.train.batch_size * world * config.train.grad_accum  # examples per optimizer step
    total = config.train.max_steps or max(1, math.ceil(config.train.epochs * len(prepared.train) / per_step))
    config, note = with_step_count(config, total)  # before attach: AdaLoRA's budget schedule spans the run
    if note:
        say(note)

    # a resumed run attaches its delta as the run did at its start, then takes the checkpoint's training state
    if config.train.init_adapter:
        source = Path(config.train.init_adapter)
        adapter = source / "adapter" if (source / "trainer_state.json").is_file() else source  # a checkpoint, or an adapter
        dt_io.load(model, adapter, trainable=True)
        if resume_from is None:
            say(f"continuing the adapter at {adapter}")
    else:
        api.attach(model, config.delta)
    if resume_from is not None:
        ckpt.load_delta(resume_from, model)
        say(f"resuming from {resume_from}")
    if config.model.quant is not None:
        from ..quant import prepare_kbit

        checkpointing = bool(getattr(model, "supports_gradient_checkpointing", False))
        prepare_kbit(model, gradient_checkpointing=checkpointing)  # QLoRA's recipe: fp32 norms and head, checkpointing
        if not checkpointing:
            say(f"{type(model).__name__} does not support gradient checkpointing: training the quantised base without it")
    elif config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.data.packing:  # refuse a model whose attention would let packed examples see each other
        check_packing(model, len(tokenizer))
    counts = summary(model, print_table=False)
    say(f"{config.method}: {counts.trainable:,} trainable parameters of {counts.total:,} ({counts.percent:.3f}%)")
    # the rows each example puts into the forward (one; a preference pair's two), for the plan and the tokens/s
    rows_of = [stage.rows_of(e, config) for e in prepared.train]
    if main:  # the memory plan at the longest training row: advice, never a stop
        targets = [len(e.decoder_labels) for e in prepared.train if e.decoder_labels is not None]
        check_run(config, model, max((len(r.input_ids) for rows in rows_of for r in rows), default=1), say,
                  max(targets) if targets else None, rows_per_example=max((len(rows) for rows in rows_of), default=1),
                  task=model_task(config),  # the class loaded: a reward run's classifier, not model.task's LM
                  reference=needs_copy(config))

    warmup = config.train.warmup_steps or int(config.train.warmup_ratio * total)
    model = accelerator.prepare(model)  # on its device first: the fp32 masters are made there
    inner = accelerator.unwrap_model(model)
    if needs_copy(config):
        # the stage compares with a reference and the method trains the base weights: the base loaded again,
        # frozen, beside the policy (stages/reference.py); loaded now, so a load that fails fails before step 1
        # and is not timed as one. Re-read from model.name, so a resumed run gets the same reference.
        reference.hold(inner, lambda: reference.load_reference(config, tokenizer, accelerator.device))
        reference.copy_of(inner)
        say(f"reference: a frozen copy of {config.model.name} beside the trained weights ({config.method} trains the "
            "base itself, so no delta can be switched off for it)")
    # Trainable weights stored in 16 bits train through fp32 masters (master.py); the optimizer, the clipping and
    # the checkpoints see the masters, the forward the 16-bit weights. Under DDP the hooks would free gradients
    # before their reduction: there the gradients are moved over after the last micro-batch.
    master = MasterWeights(inner, config.train.master_weights, hooks=world == 1, warn=say)
    if len(master) and master.comps:
        say(f"Kahan-compensated 16-bit updates for {len(master)} trainable 16-bit tensors (train.master_weights: kahan; "
            "fp32 keeps an fp32 copy of each)")
    elif len(master):
        say(f"fp32 master weights for {len(master)} trainable 16-bit tensors (train.master_weights: fp32; none updates them in 16 bits)")
    # fp16 weights: the loss is scaled before backward so small gradients do not flush to zero (loss_scale.py)
    scaler = LossScaler(enabled=needs_scaling(inner))
    if scaler.enabled:
        say(f"fp16 weights: dynamic loss scaling (from {scaler.scale_value:g}; overflowing steps are skipped)")
    params = master.parameters(p for p in inner.parameters() if p.requires_grad)
    groups = master.param_groups(parameter_groups(inner, config.train.lr, config.train.head_lr))
    optimizer = make_optimizer(config.train.optimizer, groups, config.train.lr, config.train.weight_decay)
    scheduler = make_scheduler(optimizer, config.train.scheduler, warmup, total)
    optimizer = accelerator.prepare(optimizer)

    step, offset = 0, 0
    log = RunLog(out, enabled=main)
    if resume_from is not None:
        record = ckpt.load_checkpoint(resume_from, optimizer, scheduler)
        ckpt.load_master(resume_from, master, say)
        if scaler.enabled and "loss_scale" in record:
            scaler.load_state_dict(record["loss_scale"])
        rundir.check_schedule(config, record, total, warmup)
        step, offset = record["step"], record["offset"]
        log.truncate_after(step)
    elif config.train.init_adapter and (Path(config.train.init_adapter) / "trainer_state.json").is_file():
        ckpt.load_optimizer(Path(config.train.init_adapter), optimizer)  # continued training keeps the moments
        ckpt.load_master(Path(config.train.init_adapter), master, say)  # and the fp32 masters they are over
        say("kept the checkpoint's optimizer state")
    collate = stage.collator(config, tokenizer)
    say(f"training {total} steps of {per_step} examples ({config.train.batch_size} x {world} process(es) x "
        f"{config.train.grad_accum} accumulation); {len(prepared.train)} training examples, {len(prepared.eval)} for eval")
    say("the same run as a command: " + config.command())

    bar = _progress(total, step, enabled=main and config.train.progress)
    items_of = [stage.items(e, config) for e in prepared.train]  # counted once, read every step
    tokens_of = [sum(len(r.input_ids) for r in rows) for rows in rows_of]  # a pair's rejected tokens train too
    lengths = tuple(len(e.input_ids) for e in prepared.train) if config.data.group_by_length else None
    # Throughput, one definition for the bar, the log and the summary: non-padding tokens trained per second
    # of training steps (forward, backward, update), evaluations and checkpoints not counted.
    tokens_seen, train_time, skipped, last_loss = 0, 0.0, 0, float("nan")
    t_loop = time.perf_counter()
    model.train()
    while step < total:
        t_step = time.perf_counter()
        # The step's micro-batches, and the loss items (label tokens; examples for a classifier) of the
        # whole step on every process, counted before any forward: each token then weighs the same
        # however the step is split into micro-batches and processes (what transformers calls num_items_in_batch).
        size = config.train.batch_size
        micro_batches = []
        for _ in range(config.train.grad_accum):
            micro_batches.append(global_batch(len(prepared.train), config.train.seed, offset, size * world, lengths))
            offset += size * world
        step_items = sum(items_of[i] for indices in micro_batches for i in indices)
        step_loss_sum, step_tokens, bad = 0.0, 0, None
        metric_sums: dict[str, float] = {}  # a stage's own metrics (DPO's rewards), summed over the step's items
        for micro, indices in enumerate(micro_batches):
            mine = indices[accelerator.process_index * size:(accelerator.process_index + 1) * size]
            batch = {k: v.to(accelerator.device) for k, v in collate([prepared.train[i] for i in mine]).items()}
            syncing = micro == config.train.grad_accum - 1
            with accelerator.no_sync(model) if not syncing and world > 1 else contextlib.nullcontext():
                with accelerator.autocast():
                    token_sum = stage.loss(model, inner, batch, config)  # summed over this micro-batch's items
                    token_sum, sums = token_sum if isinstance(token_sum, tuple) else (token_sum, {})
                    regularization = api.regularization(inner)
                    # processes average their gradients, hence x world; the regulariser counts once per step
                    loss = token_sum * (world / max(1, step_items)) + regularization / config.train.grad_accum
                if not torch.isfinite(loss.detach()):
                    bad = loss.item()
                    break
                accelerator.backward(scaler.scale(loss))  # the loss checked and logged is the unscaled one
            reg_value = regularization.item() if torch.is_tensor(regularization) else float(regularization)
            step_loss_sum += token_sum.item() + reg_value * max(1, step_items) / world / config.train.grad_accum
            for name, value in sums.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
            step_tokens += sum(tokens_of[i] for i in mine) * world  # padding not counted
        if bad is None and world > 1:  # the step's loss (and metrics) over every process's items
            step_loss_sum = float(accelerator.reduce(torch.tensor(step_loss_sum, device=accelerator.device), "sum"))
            if metric_sums:
                names = sorted(metric_sums)
                reduced = accelerator.reduce(torch.tensor([metric_sums[n] for n in names], device=accelerator.device), "sum")
                metric_sums = dict(zip(names, reduced.tolist()))
        step_loss = step_loss_sum / max(1, step_items)
        if bad is not None:
            if config.train.on_nan == "stop":
                good = ckpt.latest(out)
                raise TrainingError(
                    f"step {step + 1}: the loss is {bad} (not finite), so the run stops before that update; "
                    + (f"the last good checkpoint is {good}; " if good else "no checkpoint was written; ")
                    + "lower train.lr, use bf16 instead of fp16, or set train.on_nan: skip to skip such steps")
            optimizer.zero_grad(set_to_none=True)
            master.zero_grad()  # the 16-bit gradients of the micro-batches before the bad one, and the masters'
            skipped += 1
            step += 1
            scheduler.step()
            log.write({"step": step, "skipped": True, "loss": bad})
            bar.update(1)
            continue
        master.collect()  # gradients still on 16-bit weights (several processes) into the fp32 masters
        if not scaler.unscale_(master.gradients(params)):  # fp16: an overflow at this scale, not a bad loss
            scaler.update(False)
            optimizer.zero_grad(set_to_none=True)
            master.zero_grad()
            skipped += 1
            step += 1
            scheduler.step()
            log.write({"step": step, "skipped": True, "loss": step_loss, "loss_scale": scaler.scale_value})
            bar.update(1)
            continue
        scaler.update(True)
        if config.train.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, config.train.max_grad_norm)  # the masters' gradients
        master.step(optimizer)  # optimizer.step() on the masters, then the 16-bit weights from them
        step += 1
        api.step(inner, step)  # before zero_grad: AdaLoRA scores importance from these gradients
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += step_tokens
        last_loss = step_loss
        train_time += time.perf_counter() - t_step
        elapsed = time.perf_counter() - t_loop
        rate = tokens_seen / train_time if train_time > 0 else 0.0
        lr = scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
        bar.update(1)
        if step % config.train.log_every == 0 or step == total:
            log.write({"step": step, "loss": step_loss, **{n: v / max(1, step_items) for n, v in metric_sums.items()},
                       "lr": lr, "tokens_per_s": rate, "elapsed_s": elapsed})
        if config.train.eval_every and step % config.train.eval_every == 0 and step < total and prepared.eval:
            metrics = evaluate(inner, prepared, config, tokenizer)
            log.write({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
            with bar.external_write_mode():  # a line of its own under the bar, not only in log.jsonl
                say(eval_line(step, total, metrics))
            model.train()
        if config.train.save_every and step % config.train.save_every == 0 and step < total:
            _checkpoint(accelerator, out, step, inner, optimizer, scheduler, offset, config, total, warmup, master, scaler)
    bar.close()

    api.finalize(inner)
    # Everything the run produced is written before the final eval, so an eval that fails never loses the delta;
    # the adapter first, so a disk too small for the final checkpoint or the merged model never costs it.
    adapter_dir = out / "adapter"
    _on_main(accelerator, lambda: _save_adapter(inner, tokenizer, config, out))
    if config.output.merged:
        _on_main(accelerator, lambda: _save_merged(inner, tokenizer, config, out))
    _checkpoint(accelerator, out, step, inner, optimizer, scheduler, offset, config, total, warmup, master, scaler,
                final=True)
    accelerator.wait_for_everyone()
    metrics = _final_eval(inner, prepared, config, tokenizer, out) if prepared.eval else {}
    reference.release(inner)  # the reference copy, if any, is freed with the run rather than with the model
    if metrics:
        log.write({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
    result = RunResult(output_dir=out, adapter_dir=adapter_dir, steps=step, final_loss=last_loss, metrics=metrics)
    if main:
        with _writing("the report (summary.json, summary.md)", out, 100_000, lambda: (
                f"The adapter is saved at {adapter_dir}; only the summary is missing", "evaluate the adapter with "
                f"`deltatune eval {out / 'config.yaml'} --adapter {adapter_dir}`")):
            result.summary = write_report(out, config, counts, log, metrics, wall=time.perf_counter() - t_start,
                                          tokens_per_s=tokens_seen / max(1e-9, train_time),
                                          skipped=skipped, echo=say)
    return result


def eval_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """One evaluation during training, as printed under the progress bar."""
    return f"eval at step {step}/{total}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _final_eval(model: torch.nn.Module, prepared: Prepared, config: RunConfig, tokenizer: Any, out: Path) -> dict[str, float]:
    """The end-of-run metrics; a failure here says that the trained delta is already safe on disk."""
    try:
        return evaluate(model, prepared, config, tokenizer)
    except Exception as err:  # noqa: BLE001 - any fault of the eval, reported with where the delta is
        raise TrainingError(f"the final evaluation failed ({type(err).__name__}: {str(err)[:300]}); the trained delta is "
                            f"saved at {out / 'adapter'} (and config.yaml beside it), so nothing is lost: evaluate it "
                            f"again with `deltatune eval {out / 'config.yaml'} --adapter {out / 'adapter'}`") from err


def _claim(accelerator: Any, config: RunConfig, say: Any) -> Path | None:
    """The folder is this run's, checked and claimed (run.json) by the main process before anything loads or
    trains; every process gets the checkpoint to resume from, or the same error (none waits for a failed one)."""
    found = _on_main(accelerator, lambda: rundir.claim(config, say))
    return Path(found) if found is not None else None


def _on_main(accelerator: Any, action: Callable[[], Any]) -> Any:
    """Run `action` on the main process alone; every process gets its verdict: its result (a path, or None), or
    the same error, so none waits at a barrier for a process that has failed."""
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [("ok", None)]
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            value = action()
            outcome[0] = ("ok", str(value) if isinstance(value, Path) else value)
        except Exception as err:  # noqa: BLE001 - every process must hear of it, whatever it is
            failure = err
            kind = ("config" if isinstance(err, ConfigError) else "training" if isinstance(err, TrainingError)
                    else "error" if isinstance(err, DeltaError) else "crash")
            outcome[0] = (kind, str(err) if kind != "crash" else f"{type(err).__name__}: {str(err)[:500]}")
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)  # plain strings between this run's own processes
    kind, value = outcome[0]
    if failure is not None:
        raise failure
    if kind == "crash":
        raise TrainingError(f"the main process failed ({value}); this process stops with it")
    if kind != "ok":
        raise {"config": ConfigError, "training": TrainingError}.get(kind, DeltaError)(value)
    return value


@contextlib.contextmanager
def _writing(what: str, folder: Path, need: int, kept: Callable[[], tuple[str, str]]) -> Iterator[None]:
    """A write that fails for lack of space or permission becomes a TrainingError that names the folder, the
    space it needed, what was kept and what to do then (`kept()`, asked only on failure); any other failure
    passes through."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - matched by what it says (files.write_failure), not by its class
        failure = write_failure(err)
        if failure is None:
            raise
        saved, then = kept()
        raise TrainingError(f"{failure[0]}: writing {what} into {folder} failed; it needs about {size_text(need)}. "
                            f"{saved}.\nTo finish: {failure[1]}, then {then}") from None


def _save_adapter(model: torch.nn.Module, tokenizer: Any, config: RunConfig, out: Path) -> None:
    """The adapter, its tokenizer and config.yaml; a write that fails leaves no adapter folder that could pass
    for a finished one (the earlier checkpoints stay)."""
    adapter_dir = out / "adapter"
    existed = adapter_dir.exists()

    def kept() -> tuple[str, str]:
        good = ckpt.latest(out)
        if good is not None:
            return (f"Nothing was half-written, and the newest checkpoint {good} stays",
                    "resume with --train.resume true to finish the run from it")
        return ("Nothing was half-written, but no checkpoint was kept either, so the trained delta is lost",
                "run it again with --output.overwrite true (train.save_every keeps checkpoints on the way)")

    need = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    try:
        with _writing("the adapter", adapter_dir, need, kept):
            dt_io.save(model, adapter_dir)
            tokenizer.save_pretrained(adapter_dir)
            if model_task(config) == "seq_cls":
                write_labels(adapter_dir, model.config.id2label)  # `deltatune merge` names them as the run did
            write_atomic(out / "config.yaml", _yaml(config.as_dict()).encode())
    except BaseException:
        if not existed:
            remove_tree(adapter_dir)
        raise


def _save_merged(model: torch.nn.Module, tokenizer: Any, config: RunConfig, out: Path) -> None:
    from .export import export_merged

    need = tensor_bytes(model.parameters())  # about: the base and its merged delta in the export's dtype
    with _writing("the merged model", out / "merged", need, lambda: (
                  f"The adapter is saved at {out / 'adapter'}", f"write the merged model from it with `deltatune merge "
                  f"--model {config.model.name} --adapter {out / 'adapter'} --out {out / 'merged'}`")):
        export_merged(model, tokenizer, out / "merged")


def _checkpoint(accelerator: Any, out: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                offset: int, config: RunConfig, total: int, warmup: int, master: MasterWeights | None = None,
                scaler: LossScaler | None = None, final: bool = False) -> None:
    """Written by the main process; every process gets the verdict (a disk-full or non-finite error included)."""
    def save() -> None:
        _check_finite(model, step)
        state = {"offset": offset, "method": config.method, "total": total, "warmup": warmup}
        if scaler is not None and scaler.enabled:
            state["loss_scale"] = scaler.state_dict()  # the scale and its clean-step count: resume stays bit-exact
        try:
            ckpt.save_checkpoint(out, step, model, optimizer, scheduler, state, config.train.keep_last, master)
        except ckpt.CheckpointSpaceError as err:
            if not final:
                raise TrainingError(str(err)) from None
            kept = f"the checkpoint {err.kept} stays" if err.kept else "no earlier checkpoint was kept"
            raise TrainingError(
                f"the run finished and its adapter is saved at {out / 'adapter'} (with config.yaml): the trained delta is "
                f"safe. Only the final checkpoint did not fit: {err.failure[0]}, and writing {err.folder} needs about "
                f"{size_text(err.need)} (the optimizer state, needed only to continue this run with more steps); "
                f"nothing of it was left half-written, and {kept}.\nTo continue the run later: {err.failure[1]}, then "
                + ("resume with --train.resume true" if err.kept else f"train on from the adapter with --train.init_adapter "
                   f"{out / 'adapter'} into another output.dir") + "; to use it, load the adapter as it is") from None

    accelerator.wait_for_everyone()
    _on_main(accelerator, save)
    accelerator.wait_for_everyone()


def _check_finite(model: torch.nn.Module, step: int) -> None:
    """Never write NaN weights over a good checkpoint."""
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p.detach()).all():
            raise TrainingError(f"step {step}: {name} holds non-finite values, so nothing is saved (the previous "
                                "checkpoint stays); lower train.lr or use bf16 instead of fp16")


def _progress(total: int, start: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    import sys

    # a live bar on a terminal; in a log file, a line every 10 s rather than one per step
    interval = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=interval)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
