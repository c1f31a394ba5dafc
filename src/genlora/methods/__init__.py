from .flat_lora import FlatLoRA, FlatLoRAConfig
from .rm_lora import RMLoRA, RMLoRAConfig

__all__ = ["FlatLoRA", "FlatLoRAConfig", "RMLoRA", "RMLoRAConfig"]
