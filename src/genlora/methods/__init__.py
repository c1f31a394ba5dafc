from .flat_lora import FlatLoRA, FlatLoRAConfig
from .rm_lora import RMLoRA, RMLoRAConfig
from .lora_dropout import LoRADropout, LoRADropoutConfig
from .lorasc import LoRASC, LoRASCConfig
from ..ensemble import TestTimeEnsemble, test_time_ensemble

__all__ = ["FlatLoRA", "FlatLoRAConfig", "RMLoRA", "RMLoRAConfig"]
__all__ += ["LoRADropout", "LoRADropoutConfig", "TestTimeEnsemble", "test_time_ensemble"]
__all__ += ["LoRASC", "LoRASCConfig"]
