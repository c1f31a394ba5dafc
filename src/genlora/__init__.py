"""genlora: methods that make PEFT LoRA fine-tuning generalize, attached to an ordinary PEFT model."""

import logging

# bitsandbytes' CPU build logs, at every import (PEFT imports it when installed), that an optional fused CPU kernel
# package is missing; it is advice about speed on CPUs, not a problem with the run. Keep it out of every output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .config import MethodConfig
from .core import GENLORA_CONFIG_NAME, GenLoRAHandle, Method, Phase, Requirement, TrainInstance, attach
from .methods import FlatLoRA, FlatLoRAConfig, LoRADropout, LoRADropoutConfig, LoRASC, LoRASCConfig, RMLoRA, RMLoRAConfig
from .registry import METHODS, load_methods, method_from_dict, register_method
from .ensemble import TestTimeEnsemble, test_time_ensemble
from .checkpoint import load_training_state, save_training_state

__version__ = "0.1.0"


def __getattr__(name):
    # The Trainer callback imports transformers' Trainer machinery; load it only when asked for.
    if name == "GenLoRACallback":
        from .integrations.trainer import GenLoRACallback

        return GenLoRACallback
    if name in ("GenLoRATrainer", "GenLoRATrainerMixin"):
        from .integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'genlora' has no attribute {name!r}")


__all__ = [
    "GENLORA_CONFIG_NAME",
    "FlatLoRA",
    "FlatLoRAConfig",
    "GenLoRACallback",
    "GenLoRAHandle",
    "GenLoRATrainer",
    "GenLoRATrainerMixin",
    "LoRADropout",
    "LoRADropoutConfig",
    "LoRASC",
    "LoRASCConfig",
    "METHODS",
    "Method",
    "MethodConfig",
    "Phase",
    "RMLoRA",
    "RMLoRAConfig",
    "Requirement",
    "TestTimeEnsemble",
    "TrainInstance",
    "attach",
    "load_methods",
    "load_training_state",
    "method_from_dict",
    "register_method",
    "save_training_state",
    "test_time_ensemble",
]
