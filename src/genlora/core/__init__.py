from .handle import GENLORA_CONFIG_NAME, GENLORA_STATE_NAME, GenLoRAHandle, LoopInfo, TrainInstance, attach
from .lora_layers import LoraSlot, find_lora_slots
from .method import Method, Phase, Requirement

__all__ = ["GENLORA_CONFIG_NAME", "GENLORA_STATE_NAME", "GenLoRAHandle", "LoopInfo", "LoraSlot", "Method", "Phase",
           "Requirement", "TrainInstance", "attach", "find_lora_slots"]
