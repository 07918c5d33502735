"""deltatune: parameter-efficient fine-tuning for Hugging Face transformers models.

    import deltatune as dt
    dt.attach(model, dt.LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    dt.summary(model)
    ... train ...
    dt.save(model, "out/adapter")
"""

from .api import (active, attach, attached, delta_parameters, detach, disabled, finalize, merge, mixed_batch,
                  regularization, set_active, set_trainable, step, unmerge)
from .config import DeltaConfig, DeltaError, METHODS, config_from_dict, config_from_json
from .io import load, save
from .methods import (AdaLoraConfig, BitFitConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig,
                      PTuningV2Config)
from .summary import Summary, summary

__version__ = "0.1.0"

__all__ = [
    "attach", "save", "load", "merge", "unmerge", "detach", "set_active", "disabled", "summary",
    "active", "attached", "delta_parameters", "set_trainable", "mixed_batch", "regularization", "step", "finalize",
    "DeltaConfig", "DeltaError", "LoraConfig", "AdaLoraConfig", "PromptTuningConfig", "PTuningConfig",
    "PrefixTuningConfig", "PTuningV2Config", "BitFitConfig",
    "Summary", "METHODS", "config_from_dict", "config_from_json",
]  # fmt: skip
