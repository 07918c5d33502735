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
from .quant import load_base, prepare_kbit
from .methods import (AdaLoraConfig, AdapterConfig, AdapterFusionConfig, BitFitConfig, DiffPruningConfig, FreezeConfig,
                      FullConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                      PTuningConfig, PTuningV2Config, fusion_attention)
from .master import MasterMode, MasterWeights
from .planner import Plan, plan
from .summary import Summary, summary

__version__ = "0.1.0"

__all__ = [
    "attach", "save", "load", "merge", "unmerge", "detach", "set_active", "disabled", "summary",
    "active", "attached", "delta_parameters", "set_trainable", "mixed_batch",
    "regularization", "step", "finalize", "DeltaCallback",
    "DeltaConfig", "DeltaError", "LoraConfig", "AdaLoraConfig", "IA3Config", "LoHaConfig", "LoKrConfig",
    "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "PTuningV2Config", "BitFitConfig", "FreezeConfig",
    "FullConfig", "DiffPruningConfig", "AdapterConfig", "AdapterFusionConfig", "fusion_attention",
    "Summary", "plan", "Plan", "MasterWeights", "MasterMode", "METHODS", "config_from_dict", "config_from_json", "load_base", "prepare_kbit",
]  # fmt: skip


def __getattr__(name: str):
    # DeltaCallback subclasses transformers.TrainerCallback; importing the trainer machinery waits until it is asked for.
    if name == "DeltaCallback":
        from .callbacks import DeltaCallback

        return DeltaCallback
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
