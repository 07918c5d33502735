"""One module per method family; importing this package registers them all."""

from .adalora import AdaLoraConfig, AdaLoraLayer
from .adapters import AdapterConfig, AdapterFusionConfig, AdapterLayer, fusion_attention
from .lora import LoraConfig, LoraLayer
from .prompts import PromptTuningConfig
from .selective import BitFitConfig

__all__ = ["LoraConfig", "LoraLayer", "AdaLoraConfig", "AdaLoraLayer", "PromptTuningConfig", "BitFitConfig", "AdapterConfig",
           "AdapterFusionConfig", "AdapterLayer", "fusion_attention"]
