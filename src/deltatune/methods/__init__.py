"""One module per method family; importing this package registers them all."""

from .adalora import AdaLoraConfig, AdaLoraLayer
from .adapters import AdapterConfig, AdapterFusionConfig, AdapterLayer, fusion_attention
from .diff_pruning import DiffPruningConfig, DiffPruningLayer
from .fourierft import FourierFTConfig, FourierFTLayer
from .hra import HRAConfig, HRALayer
from .ia3 import IA3Config, IA3Layer
from .ln_tuning import LNTuningConfig, LNTuningLayer
from .lokr_loha import LoHaConfig, LoHaLayer, LoKrConfig, LoKrLayer
from .lora import LoraConfig, LoraLayer
from .prompts import PromptTuningConfig
from .p_tuning import PTuningConfig
from .prefix import PrefixTuningConfig, PTuningV2Config
from .selective import BitFitConfig, FreezeConfig, FullConfig
from .vera import VeraConfig, VeraLayer

__all__ = ["LoraConfig", "LoraLayer", "AdaLoraConfig", "AdaLoraLayer", "IA3Config", "IA3Layer", "LoHaConfig",
           "LoHaLayer", "LoKrConfig", "LoKrLayer", "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig",
           "PTuningV2Config", "BitFitConfig", "FreezeConfig", "FullConfig", "DiffPruningConfig", "DiffPruningLayer",
           "AdapterConfig", "AdapterFusionConfig", "AdapterLayer", "fusion_attention", "VeraConfig", "VeraLayer",
           "HRAConfig", "HRALayer"]
__all__ += ["LNTuningConfig", "LNTuningLayer", "FourierFTConfig", "FourierFTLayer"]
