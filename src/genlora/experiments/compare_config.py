"""The config of a comparison (`genlora compare`): variants (rows) x seeds x training sizes, each variant tuned on
validation before its cells run. YAML keys mirror these dataclasses; `base:` is a whole run config (config.py).

Variants name what differs from `base`: genlora `methods`, fixed `overrides` (dotted run-config keys, e.g.
`training.weight_decay: 0.01` or `lora.lora_dropout: 0.1`), and a tuning `grid` over dotted keys (run-config keys
or `<method>.<option>`). Every variant's learning rate is tuned too (`tuning.lr`), because noise and regularizers
move the best learning rate (issue 11, Deliver 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..config import check_choice, check_int, check_range
from .config import ConfigError, TrainConfig, build_top, check_bool, check_str, plain, section
from .method_entries import MethodEntry, method_entries

# Run-config keys a variant may fix or tune. Data keys are absent on purpose: every variant sees the same examples.
TUNABLE_KEYS = {
    "training": ("lr", "epochs", "min_steps", "batch_size", "weight_decay", "warmup_ratio", "lr_schedule",
                 "max_grad_norm", "early_stopping", "early_stopping_metric", "patience"),
    "lora": ("r", "lora_alpha", "lora_dropout", "target_modules"),
    "evaluation": ("curve_points",),  # early stopping checks the validation loss at these points
}
MIN_TUNING_SEEDS = 2


@dataclass
class Variant:
    """One row of the tables: plain LoRA plus `methods`, with `overrides` fixed and `grid` tuned."""

    name: str
    """Row name (letters, digits, _ . + -; it names folders)."""
    methods: list[MethodEntry] = field(default_factory=list)
    """genlora method entries, e.g. [{method: flat_lora}] ([]: plain LoRA)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fixed run-config values, dotted: {training.weight_decay: 0.01, lora.lora_dropout: 0.1,
    training.early_stopping: true, flat_lora.schedule: constant}."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Values tuned on validation, dotted keys as in `overrides` (list each axis from the weakest setting: ties go
    toward plain LoRA), e.g. {flat_lora.sigma: [0.05, 0.1, 0.15, 0.2]}. training.lr comes from tuning.lr unless
    listed here."""

    def __post_init__(self):
        check_str("name", self.name)
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name):
            raise ValueError(f"name must use letters, digits and _ . + - only (it names folders), got {self.name!r}")
        self.methods = method_entries(self.methods, "methods")
        names = {e.method for e in self.methods}
        for what in ("overrides", "grid"):
            mapping = getattr(self, what)
            if not isinstance(mapping, dict):
                raise TypeError(f"{what} must be a mapping of dotted keys, got {mapping!r}")
            for key in mapping:
                check_key(key, names, f"{what}.{key}")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{key} must list at least one value, got {values!r}")
            if len(set(map(repr, values))) != len(values):
                raise ValueError(f"grid.{key} lists a value twice: {values}")
        both = sorted(set(self.grid) & set(self.overrides))
        if both:
            raise ValueError(f"{both[0]} is both fixed (overrides) and tuned (grid)")


def check_key(key: Any, methods: set[str], where: str) -> None:
    """A dotted key is `training.<field>`, `lora.<field>` or `<method>.<option>` of a method the variant runs."""
    if not isinstance(key, str) or key.count(".") != 1:
        raise ValueError(f"{where}: keys are dotted, e.g. training.lr or flat_lora.sigma")
    head, name = key.split(".")
    if head in TUNABLE_KEYS:
        if name not in TUNABLE_KEYS[head]:
            raise ValueError(f"{where}: {head}.{name} cannot vary between variants; allowed: "
                             f"{[f'{head}.{k}' for k in TUNABLE_KEYS[head]]}")
    elif head not in methods:
        raise ValueError(f"{where}: {head!r} is neither training/lora/evaluation nor a method of this variant "
                         f"({sorted(methods)})")
    elif name == "seed":
        raise ValueError(f"{where}: method seeds follow the run seed; pin one in the method entry instead")


@dataclass
class TuningConfig:
    """How each variant's grid is searched, on the validation split only (never test): every point trains with
    each tuning seed (their own training subsets), and is scored by its mean validation metric."""

    enabled: bool = True
    seeds: list[int] = field(default_factory=lambda: [1000, 1001])
    """Tuning seeds (at least 2), distinct from the compared seeds so that the chosen values are not fitted to the
    compared runs' training subsets."""
    lr: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 4e-3])
    """Learning rates tried for every variant (unless its grid lists training.lr)."""
    search: Literal["coordinate", "grid"] = "coordinate"
    """grid: every combination; coordinate: from the first value of each axis (the baseline's learning rate),
    sweep one axis at a time in the listed order (the learning rate last), `rounds` times; the chosen point is the
    best one tried. Each listed value is tried at least once."""
    rounds: int = 1
    metric: Literal["auto", "accuracy", "loss"] = "auto"
    """auto: accuracy where the task has labels, else loss."""
    tie_tolerance: float = 0.0025
    """Points whose score is within this of the best tie; ties go to the point nearest plain LoRA (the baseline's
    chosen values, then the first listed value of each axis)."""
    min_validation: int = 100
    """Smallest validation split that may rank settings (base.data.validation_size must reach it)."""

    def __post_init__(self):
        check_bool("enabled", self.enabled)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        for i, s in enumerate(self.seeds):
            check_int(f"seeds[{i}]", s, low=0)
        if self.enabled and len(self.seeds) < MIN_TUNING_SEEDS:
            raise ValueError(f"seeds must list at least {MIN_TUNING_SEEDS} tuning seeds (one seed cannot tell a "
                             f"setting from its noise), got {self.seeds}")
        if not self.lr:
            raise ValueError("lr must list at least one learning rate")
        for i, v in enumerate(self.lr):
            check_range(f"lr[{i}]", v, low=0.0, low_open=True)
        check_choice("search", self.search, ("coordinate", "grid"))
        check_int("rounds", self.rounds, low=1)
        check_choice("metric", self.metric, ("auto", "accuracy", "loss"))
        check_range("tie_tolerance", self.tie_tolerance, low=0.0)
        check_int("min_validation", self.min_validation, low=1)


@dataclass
class CompareConfig:
    """A comparison: every variant x seed (x training size), paired per seed, each variant tuned on validation."""

    base: TrainConfig = field(default_factory=TrainConfig)
    """The run config every cell starts from (its `methods` must be empty: methods belong to variants)."""
    variants: list[Variant] = field(default_factory=lambda: [Variant("lora")])
    """The rows, e.g. [{name: lora}, {name: flat_lora, methods: [{method: flat_lora}], grid: {flat_lora.sigma:
    [0.05, 0.1]}}, {name: lora_wd, grid: {training.weight_decay: [0.01, 0.1]}}]."""
    baseline: str = "lora"
    """The variant the paired differences are taken against."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the compared runs (each: training subset and order, inits, method seeds); intervals need >= 3."""
    train_sizes: Optional[list[int]] = None
    """Training sizes (settings). null: base.data.train_size."""
    tuning: TuningConfig = field(default_factory=TuningConfig)
    output_dir: str = "runs/compare"
    plots: bool = True
    save_adapters: bool = False
    """Keep each compared cell's adapter (tuning cells never keep theirs)."""
    workers: int = 1
    """Cells run at once, each in its own process: the cells that do not depend on each other (a tuning axis's
    values x tuning seeds, then every variant x seed). Keep workers x base.training.num_threads within the CPU cores.
    Results do not depend on it (a cell's numbers depend on its config only)."""
    quick_overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted-key overrides applied by --quick (a smaller version of the same comparison)."""

    def __post_init__(self):
        if not self.variants:
            raise ValueError("variants must list at least one variant")
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variants must have distinct names, repeated: {dup}")
        if self.baseline not in names:
            raise ValueError(f"baseline must name one of the variants {names}, got {self.baseline!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must list distinct seeds, got {self.seeds}")
        for i, s in enumerate(self.seeds):
            check_int(f"seeds[{i}]", s, low=0)
        if self.train_sizes is not None:
            if not self.train_sizes or len(set(self.train_sizes)) != len(self.train_sizes):
                raise ValueError(f"train_sizes must list distinct sizes (or be null), got {self.train_sizes}")
            for i, v in enumerate(self.train_sizes):
                check_int(f"train_sizes[{i}]", v, low=1)
        check_str("output_dir", self.output_dir)
        check_bool("plots", self.plots)
        check_bool("save_adapters", self.save_adapters)
        check_int("workers", self.workers, low=1)
        if self.base.methods:
            raise ValueError("base.methods must be empty: list each row's methods under `variants`")
        if self.tuning.enabled and self.base.data.validation_size < self.tuning.min_validation:
            raise ValueError(f"base.data.validation_size={self.base.data.validation_size} is below "
                             f"tuning.min_validation={self.tuning.min_validation}: a smaller validation split cannot "
                             "rank settings (set tuning.enabled: false to compare untuned values)")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CompareConfig:
        data = dict(data or {})
        if "base" in data:
            data["base"] = TrainConfig.from_dict(data["base"], "base.")
        if "variants" in data:
            if not isinstance(data["variants"], list):
                raise ConfigError(f"variants must be a list, got {data['variants']!r}")
            data["variants"] = [section(Variant, v, f"variants[{i}]") for i, v in enumerate(data["variants"])]
        if "tuning" in data:
            data["tuning"] = section(TuningConfig, data["tuning"], "tuning")
        return build_top(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return plain(self)


