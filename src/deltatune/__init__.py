"""deltatune: parameter-efficient fine-tuning for Hugging Face transformers models.

    import deltatune as dt
    dt.attach(model, dt.LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    dt.summary(model)
    ... train ...
    dt.save(model, "out/adapter")
"""

from .config import DeltaConfig, DeltaError, METHODS, UserFileError, config_from_dict, config_from_json
from .summary import Summary, summary  # here, not lazily: the submodule deltatune.summary would shadow the function

__version__ = "0.1.0"

__all__ = [
    "attach", "save", "load", "merge", "unmerge", "detach", "set_active", "disabled", "summary",
    "active", "attached", "delta_parameters", "set_trainable", "mixed_batch",
    "regularization", "step", "finalize", "DeltaCallback",
    "DeltaConfig", "DeltaError", "UserFileError", "LoraConfig", "AdaLoraConfig", "IA3Config", "LoHaConfig", "LoKrConfig",
    "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "PTuningV2Config", "BitFitConfig", "FreezeConfig",
    "FullConfig", "DiffPruningConfig", "AdapterConfig", "AdapterFusionConfig", "fusion_attention", "VeraConfig",
    "LNTuningConfig", "FourierFTConfig",
    "HRAConfig",
    "Summary", "plan", "Plan", "MasterWeights", "MasterMode", "LossScaler", "METHODS", "config_from_dict", "config_from_json",
    "load_base", "prepare_kbit", "fused_linear_cross_entropy", "lm_loss",
]  # fmt: skip

_state = "lazy"  # -> "loading" -> "loaded"


def _load() -> None:
    """The torch-backed API, imported on first use: `deltatune --help` and `--version` start without torch."""
    global _state
    _state = "loading"  # meanwhile a submodule's `from . import quant` must find no attribute and import it
    from .api import (active, attach, attached, delta_parameters, detach, disabled, finalize, merge, mixed_batch,
                      regularization, set_active, set_trainable, step, unmerge)
    from .io import load, save
    from .quant import load_base, prepare_kbit
    from .methods import (AdaLoraConfig, AdapterConfig, AdapterFusionConfig, BitFitConfig, DiffPruningConfig,
                          FreezeConfig, FullConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig,
                          PromptTuningConfig, PTuningConfig, PTuningV2Config, VeraConfig, fusion_attention)
    from .methods import FourierFTConfig, LNTuningConfig
    from .methods import HRAConfig
    from .planner import Plan, plan
    from .losses import fused_linear_cross_entropy, lm_loss
    from .master import MasterMode, MasterWeights
    from .loss_scale import LossScaler

    globals().update({k: v for k, v in locals().items() if not k.startswith("_")})
    _state = "loaded"


def __getattr__(name: str):
    # DeltaCallback subclasses transformers.TrainerCallback; importing the trainer machinery waits until it is asked for.
    if name == "DeltaCallback":
        from .callbacks import DeltaCallback

        return DeltaCallback
    # Only the public names load the API: a submodule's `from . import quant` must find no attribute (and so
    # import the submodule), or importing deltatune.planner first would start the whole load halfway through.
    if name in __all__ and _state == "lazy":
        try:
            _load()
        except BaseException:
            globals()["_state"] = "lazy"
            raise
        return globals()[name]
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
