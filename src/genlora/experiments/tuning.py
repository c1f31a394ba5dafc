"""Choosing a variant's settings on validation (never on test), issue 11 Deliver 1.

A variant's search space is its `grid` (dotted keys: `training.*`, `lora.*`, `<method>.<option>`) plus the learning
rate (`tuning.lr`, last). Each point trains once per tuning seed (each seed draws its own training subset of the
setting's size) and is scored by its mean validation metric: accuracy where the task has labels, else loss.

`grid` search tries every combination; `coordinate` search starts from the first value of every axis (the
learning rate: the baseline's chosen one) and sweeps one axis at a time in the listed order, keeping the best value
of each before moving on; every listed value is tried at least once, and the chosen point is the best one tried.

Ties: points within `tie_tolerance` of the best score tie, and ties go to the point nearest plain LoRA: the fewest
axes away from the reference (the baseline's chosen value of an axis it shares, e.g. the learning rate; else the
first listed value, which configs list as the weakest setting), then the better score, then the earlier point.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from .compare_config import TuningConfig, Variant
from .config import ConfigError, TrainConfig

LR = "training.lr"


@dataclass
class Axis:
    key: str
    values: list[Any]


@dataclass
class Scored:
    point: dict[str, Any]
    summaries: list[dict[str, float]]  # one per tuning seed
    score: float


@dataclass
class SearchResult:
    chosen: dict[str, Any]
    tried: list[Scored] = field(default_factory=list)
    metric: str = "accuracy"


def axes_of(variant: Variant, tuning: TuningConfig) -> list[Axis]:
    """The variant's grid axes in their listed order, then the learning rate (from `tuning.lr` unless listed)."""
    axes = [Axis(k, list(v)) for k, v in variant.grid.items() if k != LR]
    axes.append(Axis(LR, list(variant.grid.get(LR, tuning.lr))))
    return axes


def label(point: dict[str, Any]) -> str:
    """Folder-safe name of a point: `flat_lora.sigma=0.1,training.lr=0.002`."""
    return ",".join(f"{k}={point[k]}" for k in sorted(point)) or "default"


def apply(base: TrainConfig, variant: Variant, point: dict[str, Any], seed: int, where: str = "") -> TrainConfig:
    """The run config of `variant` at `point` with `seed`: base + methods + overrides + point (validated)."""
    data = base.to_dict()
    data["methods"] = [e.to_dict() for e in variant.methods]
    data["training"]["seed"] = seed
    for key, value in {**variant.overrides, **point}.items():
        head, name = key.split(".")
        if head in ("training", "lora", "evaluation"):
            data[head][name] = value
        else:
            entry = next(e for e in data["methods"] if e["method"] == head)
            entry[name] = value
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def check_variant(base: TrainConfig, variant: Variant, index: int, tuning: TuningConfig) -> None:
    """Every override and every grid value builds a valid run config (errors name the variant's key)."""
    where = f"variants[{index}] ({variant.name}): "
    apply(base, variant, {}, 0, where)
    for axis in axes_of(variant, tuning):
        for j, value in enumerate(axis.values):
            apply(base, variant, {axis.key: value}, 0, f"variants[{index}].grid.{axis.key}[{j}]: ")


def better(a: float, b: float, metric: str) -> bool:
    return a > b if metric == "accuracy" else a < b


def select(tried: list[Scored], metric: str, tolerance: float, reference: dict[str, Any]) -> Scored:
    """The chosen point among `tried` (see the module docstring for the tie rule)."""
    scores = [t.score for t in tried]
    best = max(scores) if metric == "accuracy" else min(scores)
    tied = [t for t in tried if abs(t.score - best) <= tolerance + 1e-12]

    def distance(t: Scored) -> int:
        return sum(1 for k, v in t.point.items() if k in reference and v != reference[k])

    sign = -1.0 if metric == "accuracy" else 1.0
    return min(tied, key=lambda t: (distance(t), sign * t.score, tried.index(t)))


def search(axes: list[Axis], tuning: TuningConfig, metric: str, reference: dict[str, Any],
           evaluate: Callable[[dict[str, Any]], list[dict[str, float]]],
           prefetch: Callable[[list[dict[str, Any]]], None] | None = None) -> SearchResult:
    """Search `axes`; `evaluate(point)` returns the validation summaries of the point's runs (one per seed).
    `prefetch(points)`, when given, is told every batch of points whose runs do not depend on each other before they
    are evaluated (so that they can run at once)."""
    key = "validation_acc" if metric == "accuracy" else "validation_loss"
    cache: dict[str, Scored] = {}

    def score(point: dict[str, Any]) -> Scored:
        name = label(point)
        if name not in cache:
            summaries = evaluate(point)
            values = [s[key] for s in summaries]
            cache[name] = Scored(dict(point), summaries, float(sum(values) / len(values)))
        return cache[name]

    def batch(points: list[dict[str, Any]]) -> list[Scored]:
        if prefetch is not None:
            prefetch([p for p in points if label(p) not in cache])
        return [score(p) for p in points]

    if tuning.search == "grid":
        batch([dict(zip((a.key for a in axes), values)) for values in itertools.product(*(a.values for a in axes))])
    else:
        current = {a.key: (reference[a.key] if reference.get(a.key) in a.values else a.values[0]) for a in axes}
        for _ in range(tuning.rounds):
            for axis in axes:
                if len(axis.values) == 1:
                    continue
                candidates = batch([{**current, axis.key: v} for v in axis.values])
                current = dict(select(candidates, metric, tuning.tie_tolerance, reference).point)
        score(current)
    tried = list(cache.values())
    chosen = select(tried, metric, tuning.tie_tolerance, reference)
    return SearchResult(chosen.point, tried, metric)


def reference_point(axes: list[Axis], baseline_choice: dict[str, Any] | None) -> dict[str, Any]:
    """The point nearest plain LoRA: the baseline's chosen value of a shared axis, else the first listed value."""
    ref = {a.key: a.values[0] for a in axes}
    for k, v in (baseline_choice or {}).items():
        if k in ref:
            ref[k] = v
    return ref


def tuning_config(cfg: TrainConfig) -> TrainConfig:
    """A tuning cell's run config: validation only (no test, no out-of-domain sets, no curves unless early
    stopping watches them), no spectra or sharpness."""
    import dataclasses

    ev = dataclasses.replace(cfg.evaluation, splits=["validation"], curve_splits=["validation"],
                             curve_points=cfg.evaluation.curve_points if cfg.training.early_stopping else 0,
                             spectra=False, sharpness=False, landscape_scales=[])
    return dataclasses.replace(cfg, evaluation=ev, data=dataclasses.replace(cfg.data, ood=[]))
