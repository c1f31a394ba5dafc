"""A grid of runs (`genlora compare`): variants (plain LoRA, each method, combinations) x seeds, optionally x training
sizes x LoRA ranks; per-method hyperparameters chosen on a validation split carved from the training subset; mean,
std and 95% t-intervals per variant, and paired per-seed differences to plain LoRA with a paired t-test.

Resumable: every cell (one training run) is written to `<cell>.tmp` and renamed to `<cell>` when complete, so a
finished cell (a folder with metrics.json) is skipped and an interrupted one restarts from scratch. A finished cell
whose config differs from the one now requested is an error (choose another output_dir, or delete the cell).

Layout of `output_dir`::

    compare_config.yaml                          the resolved comparison config
    tuning/<setting>/<method>/<point>/seed-<s>/  tuning runs (validation split only)
    cells/<setting>/<variant>/seed-<s>/          the compared runs (a `genlora train` folder each)
    results.md, results.csv, results.json        tables and statistics
    plots/*.png                                  see plots.py
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..registry import METHODS
from .config import CompareConfig, ConfigError, TrainConfig, TuningConfig, dump_yaml, to_dict, write_json
from .data import make_splits
from .train import build_methods, run, validate

# Spec defaults (methods.md: sigma 0.05/0.10; k = r/2, lambda 0.1; LoRASC alpha in {0.5, 0.8, 1}, noise in
# {0, 0.05, 0.15}; LoRA Dropout p in {0.1, ..., 0.5}). Used when `tuning.grid` is empty.
DEFAULT_GRID: dict[str, dict[str, list[Any]]] = {
    "flat_lora": {"sigma": [0.05, 0.1]},
    "rm_lora": {"reg_lambda": [0.01, 0.1], "k": [2, 4]},
    "lorasc": {"alpha": [0.5, 1.0], "noise": [0.05, 0.15]},
    "lora_dropout": {"p": [0.1, 0.3]},
}
# Option names of methods whose configs may name them differently (the grid accepts the spec's short names).
OPTION_ALIASES: dict[str, dict[str, list[str]]] = {
    "lorasc": {
        "alpha": ["alpha", "slow_alpha", "merge_alpha", "slow_fast_alpha"],
        "noise": ["noise", "noise_lambda", "noise_scale", "noise_std", "noise_level", "noise_strength", "lam"],
    },
    "lora_dropout": {"p": ["p", "dropout", "dropout_p", "p_drop", "drop_prob", "rate"]},
}
# Columns of the tables, in order; OOD accuracies are inserted after test_acc.
TABLE_METRICS = ["train_acc", "test_acc", "gap", "test_nll", "test_ece", "eff_rank", "sharpness", "train_time_s",
                 "train_cpu_time_s", "peak_memory_mib"]
LABELS = {
    "train_acc": "train acc", "test_acc": "test acc", "gap": "gap (train-test)", "test_nll": "test NLL",
    "test_ece": "test ECE", "eff_rank": "eff. rank", "sharpness": "sharpness", "train_time_s": "train time (s)", "train_cpu_time_s": "train CPU (s)",
    "peak_memory_mib": "peak mem (MiB)",
}


def say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"genlora compare: {msg}", file=sys.stderr)


# --- plan -------------------------------------------------------------------------------------------------------------
@dataclass
class Setting:
    train_size: int
    rank: int

    @property
    def key(self) -> str:
        return f"n{self.train_size}_r{self.rank}"


@dataclass
class VariantPlan:
    name: str
    entries: list[dict[str, Any]]  # registered methods only
    skipped: list[str] = field(default_factory=list)  # method names not in registry.METHODS


@dataclass
class Plan:
    cfg: CompareConfig
    settings: list[Setting]
    variants: list[VariantPlan]
    grid: dict[str, dict[str, list[Any]]]  # registered methods, option names resolved to config fields
    messages: list[str]


def resolve_option(method: str, option: str, where: str) -> str:
    cls = METHODS[method].config_class
    names = [f.name for f in fields(cls)]
    for candidate in [option, *OPTION_ALIASES.get(method, {}).get(option, [])]:
        if candidate in names:
            return candidate
    raise ConfigError(f"{where}: {method} has no option {option!r}; its options are {names}")


def resolve_grid(tuning: TuningConfig, used_methods: set[str]) -> tuple[dict[str, dict[str, list[Any]]], list[str]]:
    """The tuning grid of the methods in use (DEFAULT_GRID when `tuning.grid` is empty), option names resolved to
    config fields and every value checked by building that method's config (ConfigError naming the entry)."""
    messages: list[str] = []
    grid: dict[str, dict[str, list[Any]]] = {}
    if not tuning.enabled:
        return grid, messages
    for method, options in (tuning.grid or DEFAULT_GRID).items():
        if method not in METHODS:
            messages.append(f"tuning: skipping {method!r} (not in genlora.registry.METHODS)")
            continue
        resolved = {}
        for option, values in options.items():
            name = resolve_option(method, option, f"tuning.grid.{method}")
            for j, value in enumerate(values):
                try:
                    METHODS[method].config_class.from_dict({name: value})
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"tuning.grid.{method}.{option}[{j}]: {e}") from None
            resolved[name] = list(values)
        if method in used_methods:
            grid[method] = resolved
    return grid, messages


def plan(cfg: CompareConfig) -> Plan:
    """Check everything (raising ConfigError) and decide what runs; writes nothing."""
    messages = []
    variants = []
    used_methods = set()
    for i, v in enumerate(cfg.variants):
        entries = [e for e in v.methods if e.get("method") in METHODS]
        skipped = [e.get("method") for e in v.methods if e.get("method") not in METHODS]
        if skipped:
            messages.append(f"variant {v.name!r}: skipping {skipped} (not in genlora.registry.METHODS "
                            f"{sorted(METHODS)})")
        if v.methods and not entries:
            messages.append(f"variant {v.name!r} skipped: none of its methods is available")
            if v.name == cfg.baseline:
                raise ConfigError(f"baseline variant {v.name!r} has no available method")
            continue
        build_methods(entries, f"variants[{i}].methods")
        used_methods.update(e["method"] for e in entries)
        variants.append(VariantPlan(v.name, [dict(e) for e in entries], skipped))

    grid, grid_messages = resolve_grid(cfg.tuning, used_methods)
    messages += grid_messages

    sizes = cfg.train_sizes or [cfg.base.data.train_size]
    if None in sizes:
        raise ConfigError("base.data.train_size must be set (or list train_sizes) for a comparison")
    settings = [Setting(n, r) for n in sizes for r in (cfg.ranks or [cfg.base.lora.r])]
    for s in settings:
        probe = cell_config(cfg, s, [], cfg.seeds[0], cfg.output_dir)
        validate(probe, prefix="base.")  # also checks the sizes against the data
        try:
            if cfg.tuning.enabled and grid:
                make_splits(replace(probe.data, validation_fraction=cfg.tuning.validation_fraction), cfg.seeds[0],
                            probe.model.num_labels)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"setting {s.key}: {e}") from None
    for v in variants:
        for s in settings:
            for e in v.entries:
                if e["method"] == "rm_lora" and isinstance(e.get("k"), int) and e["k"] > s.rank:
                    raise ConfigError(f"variant {v.name!r}: rm_lora k={e['k']} exceeds the rank {s.rank}")
    return Plan(cfg, settings, variants, grid, messages)


def cell_config(cfg: CompareConfig, setting: Setting, methods: list[dict], seed: int, out: str | os.PathLike,
                tuning: bool = False) -> TrainConfig:
    base = copy.deepcopy(cfg.base)
    data = replace(base.data, train_size=setting.train_size)
    evaluation = base.evaluation
    if tuning:
        data = replace(data, validation_fraction=cfg.tuning.validation_fraction, ood=[])
        evaluation = replace(evaluation, splits=["validation"], spectra=False, sharpness=False, landscape_scales=[])
    return replace(
        base,
        lora=replace(base.lora, r=setting.rank),
        data=data,
        evaluation=evaluation,
        training=replace(base.training, seed=seed),
        methods=[dict(m) for m in methods],
        output_dir=os.fspath(out),
        overwrite=False,
    )


def grid_points(options: dict[str, list[Any]], rank: int) -> list[dict[str, Any]]:
    keys = sorted(options)
    points = [dict(zip(keys, values)) for values in itertools.product(*(options[k] for k in keys))]
    return [p for p in points if not (isinstance(p.get("k"), int) and p["k"] > rank)]


def point_label(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(point.items())) or "default"


# --- cells ------------------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    path: Path
    cfg: TrainConfig

    @property
    def done(self) -> bool:
        return (self.path / "metrics.json").is_file()

    def check_matches(self) -> None:
        import yaml

        with open(self.path / "config.yaml") as f:
            saved = yaml.safe_load(f)
        wanted = json.loads(json.dumps(to_dict(self.cfg)))
        if saved != wanted:
            diff = sorted(_diff_keys(saved, wanted))
            raise RuntimeError(
                f"finished cell {self.path} was run with a different config (differs at {diff[:6]}); use another "
                "output_dir or delete that cell to recompute it"
            )

    def metrics(self) -> dict[str, Any]:
        with open(self.path / "metrics.json") as f:
            return json.load(f)


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def run_cell(cell: Cell, *, progress: bool, keep_adapter: bool) -> dict[str, Any]:
    """Run one cell (or return its saved metrics): written to `<cell>.tmp`, renamed when complete."""
    if cell.done:
        cell.check_matches()
        return cell.metrics()
    tmp = cell.path.with_name(cell.path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # an interrupted earlier attempt: restart cleanly
    if cell.path.exists():
        shutil.rmtree(cell.path)  # a folder without metrics.json is not a finished cell
    cell.path.parent.mkdir(parents=True, exist_ok=True)
    metrics = run(cell.cfg, tmp, progress=progress, keep_adapter=keep_adapter, tqdm_position=1)
    os.replace(tmp, cell.path)
    return metrics


# --- statistics -------------------------------------------------------------------------------------------------------
def describe(values: list[float]) -> dict[str, float]:
    """n, mean, std (ddof 1) and the 95% t-interval of the mean."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else math.nan, "std": math.nan, "ci95_low": math.nan,
           "ci95_high": math.nan}
    if n >= 2:
        std = float(x.std(ddof=1))
        half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
        out.update(std=std, ci95_low=out["mean"] - half, ci95_high=out["mean"] + half)
    return out


def paired(values: dict[int, float], baseline: dict[int, float]) -> dict[str, float]:
    """Per-seed differences (values - baseline) on the seeds both have: mean, 95% t-interval, paired t-test p."""
    from scipy import stats

    seeds = sorted(s for s in values if s in baseline and values[s] is not None and baseline[s] is not None)
    a = np.asarray([values[s] for s in seeds], dtype=np.float64)
    b = np.asarray([baseline[s] for s in seeds], dtype=np.float64)
    d = describe(list(a - b))
    p = math.nan
    if len(seeds) >= 2 and np.std(a - b) > 0:
        p = float(stats.ttest_rel(a, b).pvalue)
    return {"n": d["n"], "diff_mean": d["mean"], "diff_ci95_low": d["ci95_low"], "diff_ci95_high": d["ci95_high"],
            "p_value": p}


def select(points: list[dict], scores: list[dict[str, float]], metric: str) -> int:
    """Index of the best grid point: highest mean validation accuracy (or lowest NLL), ties broken by the other
    metric, then by grid order."""
    def key(i):
        acc, nll = scores[i]["validation_acc"], scores[i]["validation_nll"]
        return (-acc, nll, i) if metric == "accuracy" else (nll, -acc, i)

    return min(range(len(points)), key=key)


def tune(grid: dict[str, dict[str, list[Any]]], rank: int, variants: list[list[dict[str, Any]]], seeds: list[int],
         metric: str, run_point, say) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Choose each method's grid point on the validation split: `run_point(method, entry, point, seed)` trains the
    method alone (its variant's other options + the point) and returns the run's summary; scores are averaged over
    `seeds`. Returns (chosen point per method, report with every point's scores). Single-point grids do not run."""
    chosen: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {}
    for method, options in grid.items():
        points = grid_points(options, rank)
        if len(points) <= 1:
            if points:
                chosen[method] = points[0]
                report[method] = {"points": points, "scores": None, "chosen": points[0]}
            continue
        entry = single_entry(variants, method)
        scores = []
        for point in points:
            runs = [run_point(method, {**entry, **point}, point, seed) for seed in seeds]
            scores.append({k: float(np.mean([r[k] for r in runs])) for k in ("validation_acc", "validation_nll")})
        best = select(points, scores, metric)
        chosen[method] = points[best]
        report[method] = {"points": points, "scores": scores, "chosen": points[best]}
        say(f"{method} chose {point_label(points[best])} (validation acc {scores[best]['validation_acc']:.4f})")
    return chosen, report


# --- the comparison ---------------------------------------------------------------------------------------------------
def compare(cfg: CompareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the grid and write the tables and plots. Returns results.json's content."""
    from tqdm.auto import tqdm

    p = plan(cfg)  # raises before anything is written
    for msg in p.messages:
        say(msg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "compare_config.yaml")
    tuning_seeds = cfg.tuning.seeds or [cfg.seeds[0]]
    n_tune = sum(len(grid_points(opts, s.rank)) * len(tuning_seeds) for s in p.settings for opts in p.grid.values()
                 if len(grid_points(opts, s.rank)) > 1)
    n_main = len(p.settings) * len(p.variants) * len(cfg.seeds)
    bar = tqdm(total=n_tune + n_main, desc="cells", disable=not progress, position=0, dynamic_ncols=True)
    t0, c0 = time.perf_counter(), time.process_time()
    ran = skipped = 0

    def do(cell: Cell, label: str, tuning: bool = False):
        nonlocal ran, skipped
        bar.set_postfix_str(label)
        was_done = cell.done
        m = run_cell(cell, progress=progress, keep_adapter=cfg.save_adapters and not tuning)
        if was_done:
            skipped += 1
        else:
            ran += 1
        bar.update(1)
        return m

    settings_out = []
    for s in p.settings:
        def run_point(method: str, entry: dict[str, Any], point: dict[str, Any], seed: int) -> dict[str, float]:
            path = out / "tuning" / s.key / method / point_label(point) / f"seed-{seed}"
            return do(Cell(path, cell_config(cfg, s, [entry], seed, path, tuning=True)),
                      f"tune {s.key} {method} {point_label(point)} seed {seed}", tuning=True)["summary"]

        chosen, tuning_report = tune(p.grid, s.rank, [v.entries for v in p.variants], tuning_seeds,
                                     cfg.tuning.metric, run_point, lambda msg: say(f"{s.key}: {msg}"))
        variants_out = {}
        for v in p.variants:
            methods = apply_chosen(v.entries, chosen, cfg.tuning.apply_to_combinations)
            per_seed, cells, layer_ranks = {}, {}, {}
            for seed in cfg.seeds:
                path = out / "cells" / s.key / v.name / f"seed-{seed}"
                m = do(Cell(path, cell_config(cfg, s, methods, seed, path)), f"{s.key} {v.name} seed {seed}")
                per_seed[seed] = m["summary"]
                cells[seed] = os.fspath(path.relative_to(out))
                if "spectra" in m:
                    layer_ranks[seed] = m["spectra"]["effective_rank_per_layer"]
            variants_out[v.name] = {
                "methods": methods,
                "skipped_methods": v.skipped,
                "per_seed": per_seed,
                "cells": cells,
                "effective_rank_per_layer": {
                    "per_seed": layer_ranks,
                    "mean": {layer: float(np.mean([r[layer] for r in layer_ranks.values()]))
                             for layer in next(iter(layer_ranks.values()), {})},
                },
            }
        settings_out.append({"setting": s.key, "train_size": s.train_size, "rank": s.rank, "chosen": chosen,
                             "tuning": tuning_report, "variants": variants_out})
    bar.close()

    results = {
        "baseline": cfg.baseline,
        "seeds": cfg.seeds,
        "tuning_seeds": tuning_seeds if p.grid else [],
        "settings": settings_out,
        "messages": p.messages,
        "cells_run": ran,
        "cells_skipped": skipped,
        "wall_time_s": time.perf_counter() - t0,
        "cpu_time_s": time.process_time() - c0,
    }
    add_statistics(results)
    write_tables(results, out, cfg)
    if cfg.plots:
        from .plots import make_plots

        results["plots"] = make_plots(results, out)
    write_json(out / "results.json", results)
    say(f"{ran} cells run, {skipped} finished cells reused, {results['wall_time_s']:.0f} s; tables in "
        f"{out / 'results.md'}")
    return results


def single_entry(variants: list[list[dict[str, Any]]], method: str) -> dict[str, Any]:
    """The entry of the variant (a list of method entries) that runs `method` alone (its other options carry into
    tuning), else a bare one."""
    for entries in variants:
        if len(entries) == 1 and entries[0]["method"] == method:
            return dict(entries[0])
    return {"method": method}


def apply_chosen(entries, chosen, to_combinations: bool) -> list[dict[str, Any]]:
    """Chosen values fill the options a variant does not pin itself."""
    if len(entries) > 1 and not to_combinations:
        return [dict(e) for e in entries]
    out = []
    for e in entries:
        e = dict(e)
        for option, value in chosen.get(e["method"], {}).items():
            e.setdefault(option, value)
        out.append(e)
    return out


def metric_names(results: dict[str, Any]) -> list[str]:
    seen = []
    for s in results["settings"]:
        for v in s["variants"].values():
            for summary in v["per_seed"].values():
                for k in summary:
                    if k not in seen:
                        seen.append(k)
    ood = [k for k in seen if k.startswith("ood_")]
    ordered = []
    for k in TABLE_METRICS:
        if k in seen:
            ordered.append(k)
        if k == "test_acc":
            ordered += ood
    return ordered


def add_statistics(results: dict[str, Any]) -> None:
    names = metric_names(results)
    base_name = results["baseline"]
    for s in results["settings"]:
        base = s["variants"].get(base_name)
        for name, v in s["variants"].items():
            v["stats"] = {}
            v["paired"] = {}
            for metric in names:
                vals = {int(seed): summ.get(metric) for seed, summ in v["per_seed"].items()}
                v["stats"][metric] = describe(list(vals.values()))
                if base is not None and name != base_name:
                    bvals = {int(seed): summ.get(metric) for seed, summ in base["per_seed"].items()}
                    v["paired"][metric] = paired(vals, bvals)


# --- tables -----------------------------------------------------------------------------------------------------------
def _fmt(x: float, metric: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if metric.endswith("_acc") or metric == "gap":
        return f"{100 * x:.1f}"
    if metric in ("train_time_s", "train_cpu_time_s", "peak_memory_mib"):
        return f"{x:.0f}"
    if metric == "sharpness":
        return f"{x:.4f}"
    return f"{x:.3f}"


def _label(metric: str) -> str:
    if metric.startswith("ood_"):
        return f"OOD {metric[4:-4]} acc"
    return LABELS.get(metric, metric)


def _cell_abs(st: dict, metric: str) -> str:
    if st["n"] >= 2 and not math.isnan(st["ci95_low"]):
        half = (st["ci95_high"] - st["ci95_low"]) / 2
        return f"{_fmt(st['mean'], metric)} ± {_fmt(half, metric)}"
    return _fmt(st["mean"], metric)


def _cell_diff(pr: dict, metric: str) -> str:
    if pr["n"] == 0:
        return "n/a"
    text = _signed(pr["diff_mean"], metric)
    if pr["n"] >= 2 and not math.isnan(pr["diff_ci95_low"]):
        text += f" [{_signed(pr['diff_ci95_low'], metric)}, {_signed(pr['diff_ci95_high'], metric)}]"
    p = pr["p_value"]
    text += f" (p={p:.3f})" if not math.isnan(p) else " (p=n/a)"
    return text


def _signed(x: float, metric: str) -> str:
    s = _fmt(x, metric)
    return s if s.startswith("-") or s == "n/a" else f"+{s}"


SUMMARY_METRICS = ["test_acc", "test_ece"]


def summary_tables(results: dict[str, Any], metrics: list[str] = SUMMARY_METRICS) -> list[str]:
    """Markdown lines: per headline metric one table over all settings (columns) and variants (rows). The baseline
    shows its mean ± 95% half-width; every other variant its mean and the paired difference to the baseline with its
    95% interval, starred where the interval excludes 0. Needs `add_statistics` first."""
    settings = results["settings"]
    if not settings:
        return []
    base = results["baseline"]
    several_ranks = len({s["rank"] for s in settings}) > 1
    head = [f"n={s['train_size']}" + (f", r={s['rank']}" if several_ranks else "") for s in settings]
    names = list(dict.fromkeys(n for s in settings for n in s["variants"]))
    lines = []
    for m in metrics:
        if not any(m in v["stats"] for s in settings for v in s["variants"].values()):
            continue
        lines += [f"{_label(m)}: mean; for the methods, the paired difference to `{base}` [95% CI] (* the interval "
                  "excludes 0)", "", "| variant | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for name in names:
            cells = []
            for s in settings:
                v = s["variants"].get(name)
                st = v["stats"].get(m) if v else None
                pr = v["paired"].get(m) if v else None
                if not st:
                    cells.append("–")
                elif not pr or not pr["n"]:
                    cells.append(_cell_abs(st, m))
                else:
                    lo, hi = pr["diff_ci95_low"], pr["diff_ci95_high"]
                    ci = "" if math.isnan(lo) else f" [{_signed(lo, m)}, {_signed(hi, m)}]"
                    star = "*" if not math.isnan(lo) and (lo > 0 or hi < 0) else ""
                    cells.append(f"{_fmt(st['mean'], m)} ({_signed(pr['diff_mean'], m)}{ci}){star}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def tuning_table(tuning: dict[str, Any], where: str) -> list[str]:
    """Markdown lines stating each method's chosen hyperparameters and the validation score of every candidate."""
    if not tuning:
        return []
    lines = [f"Hyperparameters chosen on {where}, never on test:", "",
             "| method | chosen | candidates (validation acc %) |", "|---|---|---|"]
    for method, rep in tuning.items():
        if rep["scores"] is None:
            cands = point_label(rep["points"][0]) + " (single value)"
        else:
            cands = "; ".join(f"{point_label(pt)} ({100 * sc['validation_acc']:.1f})"
                              for pt, sc in zip(rep["points"], rep["scores"]))
        lines.append(f"| {method} | {point_label(rep['chosen'])} | {cands} |")
    return lines + [""]


def write_tables(results: dict[str, Any], out: Path, cfg: CompareConfig) -> None:
    names = metric_names(results)
    base_name = results["baseline"]
    lines = [
        "# genlora comparison",
        "",
        f"Seeds {results['seeds']}; mean ± half-width of the 95% t-interval over seeds. Accuracies and the gap in %. "
        f"Paired differences are per-seed (same training subset, data order and LoRA init) against `{base_name}`, "
        "with a 95% t-interval and a paired t-test p-value. ECE: 15 equal-width confidence bins. Eff. rank: exp of "
        "the entropy of the normalised singular values of s·B·A, mean over layers. Sharpness: mean loss increase on "
        f"training examples under {cfg.base.evaluation.sharpness_draws} random filter-wise Gaussian perturbations of "
        f"the merged weights at relative scale {cfg.base.evaluation.sharpness_scale}. Peak memory: "
        "process RSS on CPU (includes the in-process model cache), CUDA max allocated on GPU.",
        "",
    ]
    for msg in results["messages"]:
        lines.append(f"- note: {msg}")
    if results["messages"]:
        lines.append("")
    if len(results["settings"]) > 1:
        lines += ["## Summary over settings", ""] + summary_tables(results)
    for s in results["settings"]:
        lines += [f"## {s['train_size']} training examples, LoRA rank {s['rank']}", ""]
        lines += tuning_table(s["tuning"], "a validation split of the training subset "
                              f"({int(100 * cfg.tuning.validation_fraction)}%; seeds {results['tuning_seeds']})")
        lines += ["| variant | methods run | " + " | ".join(_label(m) for m in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for vname, v in s["variants"].items():
            run_desc = " + ".join(_entry_label(e) for e in v["methods"]) or "plain LoRA"
            if v["skipped_methods"]:
                run_desc += f" (skipped: {', '.join(v['skipped_methods'])})"
            lines.append(f"| {vname} | {run_desc} | " + " | ".join(_cell_abs(v["stats"][m], m) for m in names) + " |")
        lines.append("")
        if any(v["paired"] for v in s["variants"].values()):
            lines += [f"Paired difference to `{base_name}` (mean [95% CI] (p)):", "",
                      "| variant | " + " | ".join(_label(m) for m in names) + " |", "|---|" + "---|" * len(names)]
            for vname, v in s["variants"].items():
                if v["paired"]:
                    lines.append(f"| {vname} | " + " | ".join(_cell_diff(v["paired"][m], m) for m in names) + " |")
            lines.append("")
    lines.append(f"Wall time of this invocation: {results['wall_time_s']:.0f} s, process CPU time "
                 f"{results['cpu_time_s']:.0f} s ({results['cells_run']} cells run, {results['cells_skipped']} reused).")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import csv

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "train_size", "rank", "variant", "methods", "metric", "n", "mean", "std", "ci95_low",
                    "ci95_high", "diff_mean", "diff_ci95_low", "diff_ci95_high", "p_value"])
        for s in results["settings"]:
            for vname, v in s["variants"].items():
                desc = json.dumps(v["methods"], sort_keys=True)
                for m in names:
                    st = v["stats"][m]
                    pr = v["paired"].get(m, {})
                    w.writerow([s["setting"], s["train_size"], s["rank"], vname, desc, m, st["n"], st["mean"], st["std"],
                                st["ci95_low"], st["ci95_high"], pr.get("diff_mean", ""), pr.get("diff_ci95_low", ""),
                                pr.get("diff_ci95_high", ""), pr.get("p_value", "")])


def _entry_label(e: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in e.items() if k != "method")
    return f"{e['method']}({opts})" if opts else e["method"]


