"""Training stages: what a run trains its delta *for*.

A stage says three things and nothing else: which data formats it takes, how many loss items an example
holds (what token-weighted accumulation weighs by), and how a batch of its examples becomes a loss (the sum
over the batch's items). Everything else (devices, accumulation, clipping, fp32 masters and loss scaling,
the schedule, checkpoints, logs) is the loop's, in train.run, which knows no stage by name: it asks
`stage_for(config)` and calls the record it gets.

A new stage (DPO, KTO, ORPO, a reward model, GRPO) is one file here and one entry in STAGES.
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
    # (forward, model, batch, config) -> the loss summed over the batch's items. `forward` is what to call
    # for the forward pass (a DistributedDataParallel wrapper, so gradients are reduced); `model` the model itself.
    loss: Callable[[Callable[..., Any], torch.nn.Module, dict[str, Any], "RunConfig"], torch.Tensor]
    # formats read and checked by `deltatune data` that this stage refuses, with what they are (for the error)
    refuses: tuple[str, ...] = ()


# formats that are read and checked but that no stage trains on yet: what they are, for the error message
NOT_YET_TRAINED = {"preference": "preference pairs", "kto": "KTO feedback rows"}


def _stages() -> dict[str, Stage]:
    from .sft import SFT

    return {SFT.name: SFT}


def stage_for(config: "RunConfig") -> Stage:
    """The stage that trains on this run's data; a clear error where none does."""
    from ..config import ConfigError
    from ..rows import canonical_format

    fmt = canonical_format(config.data.format)
    for stage in _stages().values():
        if fmt in stage.refuses:
            continue
        if stage.formats is None or fmt in stage.formats:
            return stage
    what = NOT_YET_TRAINED.get(fmt, f"rows of format {fmt!r}")
    raise ConfigError(f"{config.source}: data.format = {config.data.format!r}: {what} are read and checked (`deltatune "
                      "data` shows them), but no training stage takes them yet; the preference stages (DPO, ORPO, KTO, "
                      "reward models) are separate work")
