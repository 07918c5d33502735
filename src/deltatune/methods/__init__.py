"""One module per method family; importing this package registers them all."""

from .adalora import AdaLoraConfig, AdaLoraLayer
from .diff_pruning import DiffPruningConfig, DiffPruningLayer
from .lora import LoraConfig, LoraLayer
from .prompts import PromptTuningConfig
from .selective import BitFitConfig, FreezeConfig, FullConfig

__all__ = ["LoraConfig", "LoraLayer", "AdaLoraConfig", "AdaLoraLayer", "PromptTuningConfig", "BitFitConfig",
           "FreezeConfig", "FullConfig", "DiffPruningConfig", "DiffPruningLayer"]
