"""The four methods; importing this package registers them (`genlora.registry.METHODS`)."""

from .flat_lora import FlatLoRA, FlatLoRAConfig
from .lora_dropout import LoRADropout, LoRADropoutConfig
from .lorasc import LoRASC, LoRASCConfig
from .rm_lora import RMLoRA, RMLoRAConfig

__all__ = ["FlatLoRA", "FlatLoRAConfig", "LoRADropout", "LoRADropoutConfig", "LoRASC", "LoRASCConfig", "RMLoRA",
           "RMLoRAConfig"]
