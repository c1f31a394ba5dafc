"""A comparison (`genlora compare`), for any task: per training size, every variant is tuned on validation (the
baseline first: its choices are the reference the others' ties go to), then runs once per seed with its chosen
settings; the same seed gives every variant the same training subset, order, head and LoRA init (paired).

Resumable: every cell (one run) is written to `<cell>.tmp` and renamed to `<cell>` when complete; a finished cell is
reused, an unfinished one restarts. A finished cell whose config differs from the one now requested is an error.

Layout of `output_dir`::

    compare_config.yaml                                  the resolved comparison config
    tuning/<setting>/<variant>/<point>/seed-<s>/         tuning cells (validation only; no test split is built)
    cells/<setting>/<variant>/seed-<s>/                  the compared runs (a `genlora train` folder each)
    results.md, results.csv, results.json                tables, statistics, verdicts (report.py)
    plots/*.png                                          curves, accuracy vs size, calibration, spectra (plots.py)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .compare_config import CompareConfig, Variant
from .config import ConfigError, TrainConfig
from .files import read_json, write_json, write_yaml
from .progress import Progress, quiet_libraries, say
from .run import run, validate
from .tasks import get_task
from .tuning import SearchResult, apply, axes_of, check_variant, label, reference_point, search, tuning_config


@dataclass
class Setting:
    train_size: int

    @property
    def key(self) -> str:
        return f"n{self.train_size}"


def settings_of(cfg: CompareConfig) -> list[Setting]:
    sizes = cfg.train_sizes or [cfg.base.data.train_size]
    if None in sizes:
        raise ConfigError("base.data.train_size must be set (or list train_sizes) for a comparison")
    return [Setting(n) for n in sizes]


def setting_base(cfg: CompareConfig, s: Setting) -> TrainConfig:
    return dataclasses.replace(cfg.base, data=dataclasses.replace(cfg.base.data, train_size=s.train_size))


def plan(cfg: CompareConfig) -> list[Setting]:
    """Check everything that can be checked (model, data sizes per setting, every variant's overrides and grid
    values); ConfigError naming the key. Writes nothing."""
    settings = settings_of(cfg)
    for s in settings:
        base = setting_base(cfg, s)
        try:
            validate(base)
        except ConfigError as e:
            raise ConfigError(f"base ({s.key}): {e}") from None
        for i, v in enumerate(cfg.variants):
            check_variant(base, v, i, cfg.tuning)
    return settings


# --- cells -----------------------------------------------------------------------------------------------------------
def run_cell(path: Path, cfg: TrainConfig, *, keep_adapter: bool, progress: bool) -> tuple[dict[str, Any], bool]:
    """(metrics, ran): the finished cell's metrics, or the metrics of running it now."""
    import yaml

    wanted = _as_run(cfg)
    if (path / "metrics.json").is_file():
        with open(path / "config.yaml") as f:
            saved = yaml.safe_load(f)
        try:  # a key added since, or a method option now written out, at its default: still the same run
            saved = _as_run(TrainConfig.from_dict(saved))
        except (ConfigError, TypeError, ValueError):
            pass  # not parseable any more: compared as written, and reported below
        if saved != wanted:
            diff = sorted(_diff_keys(saved, wanted))
            raise ConfigError(f"finished cell {path} was run with another config (differs at {diff[:6]}); use another "
                              "output_dir, or delete that cell to recompute it")
        metrics = read_json(path / "metrics.json")
        _check_same_base(path, metrics, cfg)
        return metrics, False
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)  # a folder without metrics.json is not a finished cell
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = run(cfg, tmp, progress=progress, keep_adapter=keep_adapter)
    os.replace(tmp, path)
    return metrics, True


def _check_same_base(path: Path, metrics: dict[str, Any], cfg: TrainConfig) -> None:
    """A finished cell is reused only if it trained from the base this machine has: the config names the vision base
    by how it is pretrained, not by its weights, and another CPU or library version can pretrain different weights.
    Cells from before the fingerprint was recorded (no `base_model`) are reused as before."""
    recorded = (metrics.get("base_model") or {}).get("weights_sha256")
    if recorded is None:
        return
    current = get_task(cfg.task).base_fingerprint(cfg)["weights_sha256"]
    if recorded != current:
        raise ConfigError(f"finished cell {path} was trained from another base model (weights sha256 "
                          f"{recorded[:12]}..., this machine's base: {current[:12]}...); use another output_dir, or "
                          "delete that cell to recompute it")


def _as_run(cfg: TrainConfig) -> dict[str, Any]:
    """What a cell runs, for comparing a finished cell's config with the wanted one: the config as plain data, each
    method entry with all its options (unset ones at their defaults), so that a grid axis added later reuses the
    cells run at its default value; and the epochs it trains in place of `epochs` and `min_steps`, so that a
    `min_steps` added for a small training size keeps the cells of the larger sizes it does not lengthen."""
    data = json.loads(json.dumps(cfg.to_dict()))
    data["methods"] = [json.loads(json.dumps(e.resolved())) for e in cfg.methods]
    if cfg.data.train_size is not None:  # run.py: a step per batch of the subset (exactly train_size, or an error)
        tc = cfg.training
        data["training"]["epochs"] = tc.epochs_for(math.ceil(cfg.data.train_size / tc.batch_size))
        data["training"]["min_steps"] = None
    return data


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def _run_cell_job(path: str, cfg: dict[str, Any], keep_adapter: bool) -> tuple[dict[str, Any], bool]:
    """run_cell in a worker process (the config travels as its plain dict)."""
    return run_cell(Path(path), TrainConfig.from_dict(cfg), keep_adapter=keep_adapter, progress=False)


@dataclass
class Job:
    path: Path
    cfg: TrainConfig
    label: str
    keep_adapter: bool = False


class Counter:
    """Runs (or reuses) cells and counts them; with `workers` > 1, `prefetch` runs a batch of independent cells at
    once in worker processes, and `cell` then hands out their results."""

    def __init__(self, total: int, progress: bool, workers: int = 1):
        self.ran = self.reused = 0
        self.bar = Progress(total, "cells", enabled=progress, leave=True, every_s=30.0)
        self.workers = workers
        self.pool = None
        self.done: dict[Path, dict[str, Any]] = {}

    def _count(self, ran: bool, label_: str) -> None:
        self.ran += ran
        self.reused += not ran
        self.bar.update(1, cell=label_)

    def prefetch(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if j.path not in self.done]
        if self.workers == 1 or len(jobs) < 2:
            return  # run one by one by `cell`, as without workers
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a fresh interpreter per worker (fork would copy this process's torch threads and caches)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=quiet_libraries)  # a fresh interpreter: quiet it as the CLI
        futures = [(j, self.pool.submit(_run_cell_job, str(j.path), j.cfg.to_dict(), j.keep_adapter)) for j in jobs]
        for job, future in futures:
            metrics, ran = future.result()  # a failed cell raises here, as it would in this process
            self.done[job.path] = metrics
            self._count(ran, job.label)

    def cell(self, job: Job, progress: bool) -> dict[str, Any]:
        if job.path in self.done:
            return self.done[job.path]
        metrics, ran = run_cell(job.path, job.cfg, keep_adapter=job.keep_adapter, progress=progress)
        self._count(ran, job.label)
        return metrics

    def close(self) -> None:
        self.bar.close()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def cpu_seconds() -> float:
    """CPU time of this process plus that of its finished child processes (the `workers` pool): with workers, the
    cells' CPU time is spent in the children, which process_time() alone does not see."""
    try:
        import resource
    except ImportError:  # not on POSIX: this process only
        return time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# --- the comparison --------------------------------------------------------------------------------------------------
def count_cells(cfg: CompareConfig, settings: list[Setting]) -> int:
    """An upper bound of the cells (a coordinate search may try fewer points than its grid product)."""
    per_setting = len(cfg.variants) * len(cfg.seeds)
    if cfg.tuning.enabled:
        for v in cfg.variants:
            axes = axes_of(v, cfg.tuning)
            if cfg.tuning.search == "grid":
                points = 1
                for a in axes:
                    points *= len(a.values)
            else:
                points = 1 + cfg.tuning.rounds * sum(len(a.values) - 1 for a in axes)
            per_setting += points * len(cfg.tuning.seeds) if points > 1 else 0
    return per_setting * len(settings)


def compare(cfg: CompareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the comparison and write its tables and plots. Returns results.json's content."""
    from .report import add_statistics, write_report

    settings = plan(cfg)  # raises before anything is written
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "compare_config.yaml", cfg.to_dict())
    task = get_task(cfg.base.task)
    for s in settings:  # a base built on first use (the vision ViT) is built here once, not by every worker at once
        task.model_folder(setting_base(cfg, s), progress=True)
    metric = cfg.tuning.metric if cfg.tuning.metric != "auto" else task.metric_for_selection(cfg.base)
    counter = Counter(count_cells(cfg, settings), progress, cfg.workers)
    inner = progress and counter.bar.on_terminal  # per-run bars only on a terminal; plain logs stay short
    t0, c0 = time.perf_counter(), cpu_seconds()
    order = sorted(cfg.variants, key=lambda v: v.name != cfg.baseline)  # the baseline is tuned first
    settings_out = []
    try:
        _run_settings(cfg, settings, out, counter, metric, order, inner, settings_out)
    finally:
        counter.close()
    results = {
        "task": cfg.base.task,
        "baseline": cfg.baseline,
        "seeds": cfg.seeds,
        "tuning": {"enabled": cfg.tuning.enabled, "seeds": cfg.tuning.seeds, "search": cfg.tuning.search,
                   "metric": metric, "tie_tolerance": cfg.tuning.tie_tolerance,
                   "validation_size": cfg.base.data.validation_size},
        "settings": settings_out,
        "cells_run": counter.ran,
        "cells_reused": counter.reused,
        "wall_time_s": time.perf_counter() - t0,
        "cpu_time_s": cpu_seconds() - c0,  # after counter.close(): the workers have exited and been reaped
    }
    add_statistics(results)
    write_report(results, out, cfg)
    if cfg.plots:
        from .plots import make_plots

        results["plots"] = make_plots(results, out)
    write_json(out / "results.json", results)
    say("genlora compare", f"{counter.ran} cells run, {counter.reused} reused, {results['wall_time_s']:.0f} s; "
        f"tables in {out / 'results.md'}")
    return results


def _run_settings(cfg: CompareConfig, settings: list[Setting], out: Path, counter: Counter, metric: str,
                  order: list[Variant], inner: bool, settings_out: list[dict[str, Any]]) -> None:
    """Per setting: tune every variant (the baseline first), then run every variant x seed with its choice."""
    for s in settings:
        base = setting_base(cfg, s)
        chosen: dict[str, dict[str, Any]] = {}
        tuning_report: dict[str, Any] = {}
        if cfg.tuning.enabled:
            for v in order:
                result = tune_variant(cfg, base, v, s, out, counter, metric, chosen.get(cfg.baseline), inner)
                chosen[v.name] = result.chosen
                key = "validation_acc" if metric == "accuracy" else "validation_loss"
                tuning_report[v.name] = {"metric": metric, "chosen": result.chosen,
                                         "tried": [{"point": t.point, "score": t.score,
                                                    "validation": [x.get(key) for x in t.summaries]}
                                                   for t in result.tried]}
                say("genlora compare", f"{s.key}: {v.name} chose {label(result.chosen)}")
        jobs = {(v.name, seed): Job(out / "cells" / s.key / v.name / f"seed-{seed}",
                                    apply(base, v, chosen.get(v.name, {}), seed), f"{s.key} {v.name} seed {seed}",
                                    cfg.save_adapters)
                for v in cfg.variants for seed in cfg.seeds}
        counter.prefetch(list(jobs.values()))  # every compared cell is independent of the others
        variants_out = {}
        for v in cfg.variants:
            point = chosen.get(v.name, {})
            per_seed, cells = {}, {}
            for seed in cfg.seeds:
                job = jobs[v.name, seed]
                per_seed[seed] = counter.cell(job, inner)["summary"]
                cells[seed] = os.fspath(job.path.relative_to(out))
            variants_out[v.name] = {"methods": [e.to_dict() for e in v.methods], "overrides": v.overrides,
                                    "chosen": point, "per_seed": per_seed, "cells": cells}
        settings_out.append({"setting": s.key, "train_size": s.train_size, "tuning": tuning_report,
                             "variants": variants_out})


def tune_variant(cfg: CompareConfig, base: TrainConfig, v: Variant, s: Setting, out: Path, counter: Counter,
                 metric: str, baseline_choice: dict[str, Any] | None, progress: bool) -> SearchResult:
    axes = axes_of(v, cfg.tuning)
    reference = reference_point(axes, baseline_choice)

    def job(point: dict[str, Any], seed: int) -> Job:
        return Job(out / "tuning" / s.key / v.name / label(point) / f"seed-{seed}",
                   tuning_config(apply(base, v, point, seed)), f"tune {s.key} {v.name} {label(point)} seed {seed}")

    def evaluate(point: dict[str, Any]) -> list[dict[str, float]]:
        return [counter.cell(job(point, seed), progress)["summary"] for seed in cfg.tuning.seeds]

    def prefetch(points: list[dict[str, Any]]) -> None:
        counter.prefetch([job(p, seed) for p in points for seed in cfg.tuning.seeds])

    if all(len(a.values) == 1 for a in axes):  # nothing to choose: no tuning runs
        return SearchResult({a.key: a.values[0] for a in axes}, [], metric)
    return search(axes, cfg.tuning, metric, reference, evaluate, prefetch)
