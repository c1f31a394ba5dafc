"""Method names -> classes, to rebuild methods from saved `genlora_config.json` files and YAML configs."""

from __future__ import annotations

import json
import os
from typing import Any

from .core.handle import GENLORA_CONFIG_NAME
from .core.method import Method
from .methods import FlatLoRA, RMLoRA
from .methods import LoRADropout
from .methods import LoRASC

METHODS: dict[str, type[Method]] = {cls.config_class.method_name: cls for cls in (FlatLoRA, RMLoRA)}
METHODS[LoRADropout.config_class.method_name] = LoRADropout
METHODS[LoRASC.config_class.method_name] = LoRASC


def method_from_dict(data: dict[str, Any]) -> Method:
    """Build a method from `{"method": name, **options}`."""
    data = dict(data)
    name = data.pop("method", None)
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    cls = METHODS[name]
    return cls(cls.config_class.from_dict(data))


def load_methods(path: str | os.PathLike) -> list[Method]:
    """Fresh method objects from a `genlora_config.json` (or the folder holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, GENLORA_CONFIG_NAME)
    with open(path) as f:
        data = json.load(f)
    return [method_from_dict(m) for m in data["methods"]]
