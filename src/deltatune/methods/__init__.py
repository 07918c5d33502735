"""One module per method family; importing this package registers them all."""

from .lora import LoraConfig, LoraLayer
from .prompts import PromptTuningConfig
from .selective import BitFitConfig

__all__ = ["LoraConfig", "LoraLayer", "PromptTuningConfig", "BitFitConfig"]
