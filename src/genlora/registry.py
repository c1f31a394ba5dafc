"""Method names -> classes. Each method registers itself (`@register_method`, as PEFT's `register_peft_method`), so
configs (YAML, `genlora_config.json`) can name it and the contract tests (tests/test_contract.py) run over it."""

from __future__ import annotations

import json
import os
from typing import Any

from .core.handle import GENLORA_CONFIG_NAME
from .core.method import Method

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` known by its config's `method_name`."""
    name = cls.config_class.method_name
    if not name:
        raise ValueError(f"{cls.__name__}.config_class must set method_name")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method name {name!r} is already registered by {METHODS[name].__name__}")
    if not isinstance(getattr(cls, "phase", None), int):
        raise TypeError(f"{cls.__name__} must declare its phase (genlora.core.method.Phase)")
    METHODS[name] = cls
    return cls


def method_from_dict(data: dict[str, Any]) -> Method:
    """Build a method from `{"method": name, **options}`."""
    data = dict(data)
    name = data.pop("method", None)
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    cls = METHODS[name]
    return cls(cls.config_class.from_dict(data))


def load_methods(path: str | os.PathLike) -> list[Method]:
    """Fresh method objects from a `genlora_config.json` (or the folder holding one); seeds as recorded there."""
    if os.path.isdir(path):
        path = os.path.join(path, GENLORA_CONFIG_NAME)
    with open(path) as f:
        data = json.load(f)
    return [method_from_dict(m) for m in data["methods"]]
