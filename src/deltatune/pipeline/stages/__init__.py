"""Training stages: what a run trains its delta *for*.

A stage says which data formats it takes, how many loss items an example holds (what token-weighted
accumulation weighs by), how a batch of its examples becomes a loss (the sum over the batch's items, with
metric sums beside it), and optionally its settings, its refusals, its evaluation and the rows an example
puts into the forward (what the memory plan and tokens/s count). Everything else (devices, accumulation, clipping, fp32 masters and loss scaling,
the schedule, checkpoints, logs) is the loop's, in train.run, which knows no stage by name: it asks
`stage_for(config)` and calls the record it gets.

A run picks its stage with the top-level `stage` key, or leaves it to the data: the first stage that takes
data.format (SFT takes every format but preference and KTO rows; DPO takes preference pairs, KTO its rows; ORPO and
reward take preference pairs when named). A stage with
settings of its own reads them from the section named after it (`dpo:`), as a method does (`lora:`).

A new stage (KTO, ORPO, a reward model, GRPO) is one file here and one entry in `_stages`. What the preference
stages share, their reference model (the delta switched off, or a separate frozen copy of the base), is reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..data import Example


@dataclass(frozen=True)
class Stage:
    name: str
    # data.format values it trains on (after canonical_format); None: every format the SFT readers take
    formats: frozenset[str] | None
    # the loss items of one example: its label tokens, or 1 for a classifier's example
    items: Callable[["Example", "RunConfig"], int]
    # (config, tokenizer) -> a function from a list of examples to a batch of CPU tensors
    collator: Callable[["RunConfig", Any], Callable[[list["Example"]], dict[str, Any]]]
    # (forward, model, batch, config) -> the loss summed over the batch's items, or (that loss, {metric: its sum
    # over the batch's items}); the loop logs each metric per step divided by the step's items. `forward` is what
    # to call for the forward pass (a DistributedDataParallel wrapper, so gradients are reduced); `model` the model.
    loss: Callable[[Callable[..., Any], torch.nn.Module, dict[str, Any], "RunConfig"],
                   "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]
    # formats read and checked by `deltatune data` that this stage refuses, with what they are (for the error)
    refuses: tuple[str, ...] = ()
    # the dataclass of the config section named after the stage (`dpo:`), or None when it has no settings
    settings: type | None = None
    # (config) -> why this run cannot train with the stage, or None; asked when the config is read
    check: Callable[["RunConfig"], str | None] | None = None
    # (model, prepared, config, tokenizer) -> the stage's own eval metrics over prepared.eval, in eval batches, under
    # no_grad (DPO's loss and rewards); None: evaluate.py's metrics for the task (loss and perplexity, accuracy)
    evaluate: Callable[[torch.nn.Module, Any, "RunConfig", Any], dict[str, float]] | None = None
    # (example, the stage's settings or None) -> the rows it puts into the training forward (a pair: its chosen
    # and its rejected row; a GRPO prompt: its G sampled rows); what the memory plan sizes the batch by and what
    # tokens/s counts. None: the example is one row
    rows: Callable[["Example", Any], tuple["Example", ...]] | None = None
    # the model class the stage trains, when it is not model.task's (a reward model: "seq_cls" on a causal LM's
    # checkpoint), and its head's output count; load_base loads the base so. None: model.task decides, as for SFT
    task: str | None = None
    num_labels: int | None = None
    # the optional example fields (data columns) the stage reads: a run whose data carries one its stage does not
    # read is told so (`ignored_columns`) rather than training as if it were used
    reads: frozenset[str] = frozenset()
    # (config) -> whether the loss compares the policy with a reference model (DPO but SimPO, KTO, GRPO with
    # beta > 0); the loss gets it from reference.reference(model). None: never. Where the method trains the base
    # weights, the loop then holds a separate frozen copy of the base (reference.py) and the plan counts it
    reference: Callable[["RunConfig"], bool] | None = None

    def rows_of(self, example: "Example", config: "RunConfig | None" = None) -> tuple["Example", ...]:
        """The rows `example` puts into a training forward of this stage, under `config`'s settings of the stage
        (its defaults without a config)."""
        if self.rows is None:
            return (example,)
        settings = None
        if self.settings is not None:
            settings = config.stage_settings[self.name] if config is not None else self.settings()
        return self.rows(example, settings)

    def rows_per_example(self) -> int:
        """The rows one example puts into a training forward, for a plan made before any data is read (`deltatune
        plan --stage`, the stage's default settings): counted on a stand-in example that carries every field a
        stage's rows may read (a rejected completion, a KTO label), so no stage is special-cased here."""
        from ..data import Example

        stand_in = Example([0], [0], rejected=Example([0], [0]), desirable=True)
        return len(self.rows_of(stand_in))


# optional example fields some stage reads, with the column they come from
OPTIONAL_COLUMNS = {"margin": "margin"}


def ignored_columns(stage: Stage, examples: list["Example"]) -> list[str]:
    """Notes for the optional columns the data carries that `stage` does not read (a `margin` on a DPO run)."""
    notes = []
    for field, column in OPTIONAL_COLUMNS.items():
        if field in stage.reads or not any(getattr(e, field, None) is not None for e in examples):
            continue
        readers = [s.name for s in _stages().values() if field in s.reads]
        notes.append(f"column {column!r} is read by stage {' and '.join(readers)} only; stage {stage.name!r} ignores it "
                     f"(set stage: {readers[0]} to use it, or drop the column)")
    return notes


# formats that are read and checked but that no stage trains on yet: what they are, for the error message
# (every format has a stage today; a format added to the readers before its stage goes here)
NOT_YET_TRAINED: dict[str, str] = {}


def _stages() -> dict[str, Stage]:
    from .dpo import DPO
    from .grpo import GRPO
    from .kto import KTO
    from .orpo import ORPO
    from .reward import REWARD
    from .sft import SFT

    # preference data: DPO unless stage: orpo or stage: reward; instruction/chat rows: SFT unless stage: grpo
    return {SFT.name: SFT, DPO.name: DPO, KTO.name: KTO, ORPO.name: ORPO, REWARD.name: REWARD, GRPO.name: GRPO}


def names() -> list[str]:
    return list(_stages())


def named(name: str) -> Stage:
    """The stage called `name`; an error listing the stages otherwise."""
    from ...config import DeltaError

    registry = _stages()
    if name not in registry:
        raise DeltaError(f"stage {name!r} is not one deltatune trains: choose one of {', '.join(registry)}")
    return registry[name]


def settings_classes() -> dict[str, type]:
    """Section name -> dataclass, for the stages that have settings of their own."""
    return {name: stage.settings for name, stage in _stages().items() if stage.settings is not None}


def takes(stage: Stage, fmt: str) -> bool:
    return fmt not in stage.refuses and (stage.formats is None or fmt in stage.formats)


def active_stage(config: "RunConfig") -> Stage | None:
    """The stage the run names (`stage:`), or else the first that takes its data format; None if none does."""
    from ..rows import canonical_format

    registry = _stages()
    if config.stage is not None:
        return registry.get(config.stage)
    fmt = canonical_format(config.data.format)
    return next((stage for stage in registry.values() if takes(stage, fmt)), None)


def stage_for(config: "RunConfig") -> Stage:
    """The stage that trains on this run's data; a clear error where none does."""
    from ..config import ConfigError
    from ..rows import canonical_format

    fmt = canonical_format(config.data.format)
    stage = active_stage(config)
    if stage is not None and takes(stage, fmt):
        return stage
    if stage is not None:  # named by the run, but not for this data
        others = [s.name for s in _stages().values() if takes(s, fmt)]
        fix = f"set stage: {others[0]} (or drop stage)" if others else "no stage trains this format yet"
        raise ConfigError(f"{config.source}: stage = {stage.name!r} does not train on data.format = {config.data.format!r}; "
                          f"{fix}")
    what = NOT_YET_TRAINED.get(fmt, f"rows of format {fmt!r}")
    raise ConfigError(f"{config.source}: data.format = {config.data.format!r}: {what} are read and checked (`deltatune "
                      "data` shows them), but no training stage takes them yet; the stages are: "
                      + ", ".join(f"{s.name} ({'every format' if s.formats is None else ', '.join(sorted(s.formats))})"
                                  for s in _stages().values()))
