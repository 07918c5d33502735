"""One module per method family; importing this package registers them all."""

from .diff_pruning import DiffPruningConfig, DiffPruningLayer
from .lora import LoraConfig, LoraLayer
from .prompts import PromptTuningConfig
from .selective import BitFitConfig, FreezeConfig, FullConfig

__all__ = ["LoraConfig", "LoraLayer", "PromptTuningConfig", "BitFitConfig", "FreezeConfig", "FullConfig",
           "DiffPruningConfig", "DiffPruningLayer"]
