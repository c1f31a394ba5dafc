"""Dataclass configs shared by all genlora methods (PEFT style: `field(metadata={"help": ...})`, validated in
`__post_init__`, JSON round trip)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar


def check_range(
    name: str, value: Any, *, low: float | None = None, high: float | None = None, low_open=False, high_open=False
) -> None:
    """Raise a `ValueError` naming `name` and the allowed range when `value` lies outside it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:  # value != value catches NaN
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})")
    check_range(name, value, low=low, high=high)


def check_seed(name: str, value: Any) -> None:
    """A method seed: None (derived from the global torch seed at attach) or an integer >= 0."""
    if value is not None:
        check_int(name, value, low=0)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


@dataclass
class MethodConfig:
    """Base of every method config. Subclasses are plain dataclasses whose fields carry `help` metadata."""

    method_name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps({"method": self.method_name, **self.to_dict()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MethodConfig:
        data = json.loads(text)
        method = data.pop("method", cls.method_name)
        if method != cls.method_name:
            raise ValueError(f"config is for method {method!r}, not {cls.method_name!r}")
        return cls.from_dict(data)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for docs and CLIs."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
