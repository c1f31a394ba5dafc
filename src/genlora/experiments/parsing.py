"""Reading configs with jsonargparse: the YAML file, then `--section.key=value` overrides, typed by the dataclasses
(config.py, compare_config.py); jsonargparse's own messages name the key of a wrong type or an unknown key, the
dataclasses' `__post_init__` checks name the key of a value out of range (`from_dict`). The help of every key is the
docstring under its field."""

from __future__ import annotations

import os
from typing import Any

from .compare_config import CompareConfig
from .config import ConfigError, TrainConfig
from .method_entries import register_with_jsonargparse

COMMANDS = {"train": TrainConfig, "compare": CompareConfig}


def command_parser(command: str):
    """The jsonargparse parser of `genlora <command>` (train or compare)."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    register_with_jsonargparse()
    cls = COMMANDS[command]
    parser = ArgumentParser(prog=f"genlora {command}", description=cls.__doc__, exit_on_error=False,
                            usage=f"genlora {command} CONFIG.yaml [--quick] [--no-progress] [--section.key=value ...]"
                            if command == "compare" else
                            f"genlora {command} CONFIG.yaml [--no-progress] [--section.key=value ...]")
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML config (the positional CONFIG.yaml).")
    parser.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true",
                        help="No progress bars or progress lines.")
    if command == "compare":
        parser.add_argument("--quick", action="store_true",
                            help="Apply the config's quick_overrides: a smaller version of the same comparison.")
    parser.add_class_arguments(cls, None, sub_configs=True, instantiate=False)
    return parser


def _argv(config: str | os.PathLike | dict | None, overrides: list[str], layers: list[dict[str, Any]]) -> list[str]:
    import yaml

    args: list[str] = []
    if isinstance(config, dict):
        args += ["--config", yaml.safe_dump(config)]
    elif config is not None:
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        args += ["--config", path]
    for layer in layers:
        args += ["--config", yaml.safe_dump(layer)]
    return args + list(overrides)


def parse_args(command: str, config, overrides: list[str] | None = None, layers: list[dict[str, Any]] | None = None):
    """(validated config, flags {no_progress, quick}) from a YAML file (or a dict), extra YAML layers (e.g. the
    quick overrides) and command-line overrides, later ones winning. ConfigError names the key."""
    from jsonargparse import ArgumentError

    parser = command_parser(command)
    try:
        ns = parser.parse_args(_argv(config, overrides or [], layers or []))
    except ArgumentError as e:
        raise ConfigError(" ".join(str(e).split())) from None
    data = ns.as_dict()
    data.pop("config", None)
    flags = {"no_progress": data.pop("no_progress", False), "quick": data.pop("quick", False)}
    return COMMANDS[command].from_dict(data), flags


def parse_config(cls: type, config=None, overrides: list[str] | None = None,
                 layers: list[dict[str, Any]] | None = None):
    """A validated TrainConfig or CompareConfig (Python API of `parse_args`)."""
    command = next(k for k, v in COMMANDS.items() if v is cls)
    return parse_args(command, config, overrides, layers)[0]


def dotted_to_nested(flat: dict[str, Any], where: str = "quick_overrides") -> dict[str, Any]:
    """{"base.training.epochs": 1} -> {"base": {"training": {"epochs": 1}}} (mappings merged key by key)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: keys must be dotted config keys, got {key!r}")
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}.{key}: {p} is set both as a value and as a section")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return nested


def parse_compare(config, overrides: list[str] | None = None, quick: bool = False):
    """A CompareConfig, with its `quick_overrides` applied (between the file and the overrides) when `quick`."""
    cfg, flags = parse_args("compare", config, overrides)
    if quick or flags["quick"]:
        if not cfg.quick_overrides:
            raise ConfigError("--quick needs a `quick_overrides:` section of dotted-key overrides in the config")
        cfg, _ = parse_args("compare", config, overrides, [dotted_to_nested(cfg.quick_overrides)])
    return cfg, flags
