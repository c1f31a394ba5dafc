"""Typed method entries of a config: `{method: flat_lora, sigma: 0.1}` becomes a `MethodEntry`, checked against the
registered method's own config dataclass (`genlora.registry.METHODS[name].config_class`, whose `__post_init__`
validates names, types and ranges). The YAML form stays a plain mapping; jsonargparse knows the type through
`register_type`, so a bad entry is reported under its key (`methods`, `variants`, ...) with the method's own message.

Seeds (issue 11, item 1.1): a run's methods draw their noise, masks and re-inits from seeds derived from the run's
seed, so different seeds give different method randomness; an entry that sets `seed` pins it.
"""

from __future__ import annotations

from typing import Any

from ..core.seeding import derive_seed


class MethodEntry:
    """One genlora method of a run: its registered name and the options given (unset options keep the method's
    defaults)."""

    __slots__ = ("method", "options")

    def __init__(self, method: str, options: dict[str, Any] | None = None):
        from ..registry import METHODS

        options = dict(options or {})
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        config_class = METHODS[method].config_class
        try:
            config_class.from_dict(options)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{method}: {e}") from None
        self.method, self.options = method, options

    @classmethod
    def parse(cls, value: Any) -> MethodEntry:
        if isinstance(value, MethodEntry):
            return value
        if not isinstance(value, dict) or "method" not in value:
            raise ValueError(f"a method entry is a mapping with a `method:` name and its options, e.g. "
                             f"{{method: flat_lora, sigma: 0.1}}; got {value!r}")
        data = dict(value)
        return cls(data.pop("method"), data)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.options}

    def resolved(self) -> dict[str, Any]:
        """Every option of the method, the unset ones at their defaults: two entries that run the same method the
        same way (`{method: lora_dropout, p: 0.1}` and `{..., p: 0.1, n_train: 1}`) resolve to the same mapping."""
        from ..registry import METHODS

        return {"method": self.method, **METHODS[self.method].config_class.from_dict(self.options).to_dict()}

    def with_options(self, **options: Any) -> MethodEntry:
        return MethodEntry(self.method, {**self.options, **options})

    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}({opts})" if opts else self.method

    def build(self, run_seed: int):
        """A fresh method object; its seed derived from `run_seed` unless the entry pins one."""
        from ..registry import method_from_dict

        options = dict(self.options)
        if options.get("seed") is None:
            options["seed"] = method_seed(run_seed, self.method)
        return method_from_dict({"method": self.method, **options})

    def __eq__(self, other) -> bool:
        return isinstance(other, MethodEntry) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"MethodEntry({self.to_dict()!r})"


def method_seed(run_seed: int, method: str) -> int:
    """The seed of `method` in a run with seed `run_seed` (31 bits: valid for every generator)."""
    return derive_seed(run_seed, f"genlora.experiments.method:{method}") & 0x7FFFFFFF


def method_entries(entries: Any, key: str) -> list[MethodEntry]:
    """A list of MethodEntry from entries or plain mappings; each method at most once."""
    if not isinstance(entries, (list, tuple)):
        raise TypeError(f"{key} must be a list of method entries, got {entries!r}")
    out = []
    for i, e in enumerate(entries):
        try:
            out.append(MethodEntry.parse(e))
        except (ValueError, TypeError) as err:
            raise type(err)(f"{key}[{i}]: {err}") from None
    names = [e.method for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{key}: each method may appear once, got {names}")
    return out


def build_methods(entries: list[MethodEntry], run_seed: int) -> list:
    return [e.build(run_seed) for e in entries]


def register_with_jsonargparse() -> None:
    """Let jsonargparse parse and dump `MethodEntry` values as plain mappings."""
    from jsonargparse.typing import register_type

    try:
        register_type(MethodEntry, serializer=MethodEntry.to_dict, deserializer=MethodEntry.parse)
    except ValueError:  # registered already
        pass
