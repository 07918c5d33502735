"""One module per method family; importing this package registers them all."""

from .adalora import AdaLoraConfig, AdaLoraLayer
from .lora import LoraConfig, LoraLayer
from .prompts import PromptTuningConfig
from .p_tuning import PTuningConfig
from .prefix import PrefixTuningConfig, PTuningV2Config
from .selective import BitFitConfig

__all__ = ["LoraConfig", "LoraLayer", "AdaLoraConfig", "AdaLoraLayer", "PromptTuningConfig", "PTuningConfig",
           "PrefixTuningConfig", "PTuningV2Config", "BitFitConfig"]
