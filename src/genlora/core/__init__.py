from .handle import GENLORA_CONFIG_NAME, GenLoRAHandle, attach
from .lora_layers import LoraSlot, find_lora_slots
from .method import Method

__all__ = ["GENLORA_CONFIG_NAME", "GenLoRAHandle", "LoraSlot", "Method", "attach", "find_lora_slots"]
