"""One run (`genlora train`, and every cell of `genlora compare`), for any task: build the PEFT LoRA model, attach
the genlora methods (their seeds derived from the run's seed), train with the one loop, save the adapter, and
evaluate it as deployed: reloaded with plain PEFT (LoRA Dropout with deploy=ensemble: its test-time ensemble).

Output folder (built under a temporary name and renamed when complete)::

    adapter/            PEFT adapter (+ genlora_config.json with the methods' resolved options and seeds)
    methods.json        the attached methods as run
    config.yaml         the resolved run config
    metrics.json        everything measured; `summary` holds the headline numbers, `curve` the evaluation points
    train.log           training log; train_log.jsonl: the same as JSON lines
    data_split.json     ids of the training and validation examples (training order)
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, TrainConfig
from .evaluate import ensemble_forward, evaluate_sets, live_ensemble, load_adapter
from .files import replace_folder, write_json, write_yaml
from .loop import TrainLog, eval_points, train_loop
from .method_entries import build_methods
from .metrics import STALL_MARGIN, PeakMemory, Timer, did_not_learn, loss_landscape, sharpness, update_spectra
from .models import resolve_device
from .tasks import Task, eval_batches, get_task


def validate(cfg: TrainConfig) -> Task:
    """Everything checkable before training (model folder and pinned sha256, data sources and sizes, the methods'
    options, the device); ConfigError naming the key. Writes nothing."""
    task = get_task(cfg.task)
    task.check(cfg)
    try:
        build_methods(cfg.methods, cfg.training.seed)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"methods: {e}") from None
    resolve_device(cfg.training.device)
    return task


def needed_parts(cfg: TrainConfig) -> tuple[str, ...]:
    """The splits a run touches: a run that neither evaluates nor draws curves on test never builds it (tuning)."""
    ev = cfg.evaluation
    wanted = set(ev.splits) | (set(ev.curve_splits) if ev.curve_points else set())
    if cfg.training.early_stopping:
        wanted.add("validation")
    parts = ["train"] + [p for p in ("validation", "test") if p in wanted]
    if "test" in ev.splits:
        parts.append("ood")
    return tuple(parts)


def run(cfg: TrainConfig, out_dir: str | os.PathLike, *, progress: bool = True, keep_adapter: bool = True,
        task: Task | None = None) -> dict[str, Any]:
    """Train and evaluate into `out_dir` (created if needed). Returns metrics.json's content."""
    from peft import get_peft_model
    from transformers import get_scheduler

    from ..core.handle import attach

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tc, ev = cfg.training, cfg.evaluation
    if tc.num_threads is not None:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    task = task or get_task(cfg.task)
    seed = tc.seed

    splits = task.splits(cfg, seed, needed_parts(cfg))
    torch.manual_seed(seed)
    base, processor = task.load_base(cfg, seed)
    torch.manual_seed(seed)  # PEFT draws LoRA's A from the global RNG: the same init for every variant of a seed
    model = get_peft_model(base, task.lora_config(cfg, base)).to(device)
    collate = task.collator(processor)
    encoded = {name: task.encode(processor, data, cfg) for name, data in splits.items()}
    train_enc = encoded["train"]
    if ev.train_eval_size is not None:
        encoded["train"] = train_enc.head(ev.train_eval_size)  # the subset is in random order

    steps_per_epoch = math.ceil(len(train_enc) / tc.batch_size)
    epochs = tc.epochs_for(steps_per_epoch)
    total_steps = steps_per_epoch * epochs
    methods = build_methods(cfg.methods, seed)
    handle = attach(model, *methods, total_steps=total_steps, steps_per_epoch=steps_per_epoch) if methods else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    if handle is not None:
        handle.bind_optimizer(optimizer)
    scheduler = get_scheduler(tc.lr_schedule, optimizer, num_warmup_steps=int(round(tc.warmup_ratio * total_steps)),
                              num_training_steps=total_steps)

    write_yaml(out / "config.yaml", cfg.to_dict())
    write_json(out / "methods.json", handle.config_dict() if handle else {"methods": []})
    write_json(out / "data_split.json", {k: [str(i) for i in _ids(v)] for k, v in splits.items()
                                         if k in ("train", "validation")})
    log = TrainLog(out)
    dropped = {v.name.split(":")[0]: list(v.dropped) for v in splits.values() if getattr(v, "dropped", ())}
    log.write({"event": "start", "total_steps": total_steps, "n_train": len(train_enc), "device": str(device),
               "dropped_rows": dropped},
              f"task {cfg.task}: training {len(train_enc)} examples, {epochs} epochs, {total_steps} steps on {device};"
              f" methods: {[e.label() for e in cfg.methods] or 'plain LoRA'}"
              + "".join(f"; {k}: dropped {len(v)} incomplete rows (lines {v[:10]})" for k, v in dropped.items()))

    curve_sets = {s: encoded[s] for s in ev.curve_splits if s in encoded} if ev.curve_points else {}
    curve_forward = live_ensemble(model, handle) if ev.ensemble else None  # the deployed model, as evaluate_saved

    def evaluate(step: int) -> dict[str, Any]:
        res = evaluate_sets(model, task, curve_sets, cfg, collate, device, forward=curve_forward, progress=progress,
                            desc=f"curve @ step {step}")
        return {k: {m: v[m] for m in ("accuracy", "loss") if m in v} for k, v in res.items()}

    with Timer() as train_timer, PeakMemory(device) as mem:
        loop = train_loop(model, handle, optimizer, scheduler, train_enc, collate, tc, epochs=epochs,
                          total_steps=total_steps, device=device, evaluate=evaluate if curve_sets else None,
                          points=eval_points(total_steps, ev.curve_points), log=log, progress=progress)

    adapter_dir = out / "adapter"
    if handle is not None:
        handle.save_pretrained(adapter_dir)
        methods_config = handle.config_dict()
        with warnings.catch_warnings():  # LoRASC warns that detaching drops its slow experts: they are saved above
            warnings.simplefilter("ignore", UserWarning)
            handle.detach()
    else:
        model.save_pretrained(adapter_dir)
        methods_config = {"methods": []}
    model = handle = optimizer = scheduler = trainable = methods = None  # free the training copy before evaluating

    final = evaluate_saved(cfg, task, adapter_dir, encoded, collate, device, progress)
    metrics: dict[str, Any] = {
        **final,
        "task": cfg.task,
        "curve": loop.curve,
        "early_stopping": {"stopped_early": loop.stopped_early, "restored_step": loop.restored_step}
        if tc.early_stopping else None,
        "train_time_s": train_timer.seconds,
        "train_cpu_time_s": train_timer.cpu_seconds,
        "peak_memory_mib": mem.peak_mib,
        "memory_kind": mem.kind,
        "steps": loop.steps,
        "planned_steps": total_steps,
        "epochs": epochs,
        "epoch_train_loss": loop.epoch_losses,
        "methods": methods_config["methods"],
        "device": str(device),
        "base_model": task.base_fingerprint(cfg),
        "torch_threads": torch.get_num_threads(),
        "data": {k: {"n": len(v), "ids_sha256": v.ids_sha256()} for k, v in splits.items()},
        "dropped_rows": dropped,  # local files with data.drop_incomplete: lines of the rows dropped, per source
    }
    metrics["wall_time_s"] = time.perf_counter() - t_start
    metrics["summary"] = summarize(metrics)
    write_json(out / "metrics.json", metrics)
    log.write({"event": "done", "summary": metrics["summary"]},
              "done: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics["summary"].items()))
    if did_not_learn(metrics["summary"]):
        log.write({"event": "did_not_learn"}, "warning: " + not_learned_message(metrics["summary"]))
    log.close()
    if not keep_adapter:
        shutil.rmtree(adapter_dir)
    return metrics


def not_learned_message(summary: dict[str, float]) -> str:
    return (f"training accuracy {100 * summary['train_acc']:.1f}% is within {100 * STALL_MARGIN:.0f} points of always "
            f"predicting the majority label ({100 * summary['train_majority_acc']:.1f}%): the run did not learn; "
            "try a lower training.lr (in the measured text runs, 1e-3 instead of 2e-3 fixed it; a longer warmup did "
            "not)")


def _ids(data) -> list:
    ids = data.ids
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def evaluate_saved(cfg: TrainConfig, task: Task, adapter_dir: Path, encoded: dict, collate, device,
                   progress: bool) -> dict[str, Any]:
    """Metrics of the saved adapter reloaded with plain PEFT: the evaluated splits (+ OOD sets with test), the
    spectra of the learned updates, sharpness and the loss along random directions."""
    ev = cfg.evaluation
    model, _ = load_adapter(task, cfg, adapter_dir, device)
    forward, ens_handle, ensemble = None, None, None
    if ev.ensemble:
        forward, ens_handle = ensemble_forward(model, adapter_dir)
        if forward is None:
            ensemble = {"used": False, "reason": ens_handle}
            ens_handle = None
        else:
            ensemble = {"used": True, "n_test": forward.n_test}
    sets = {k: v for k, v in encoded.items() if k in ev.splits or (k.startswith("ood:") and "test" in ev.splits)}
    desc = "evaluate (ensemble)" if ens_handle is not None else "evaluate"
    with Timer() as eval_timer:
        results = evaluate_sets(model, task, sets, cfg, collate, device, forward=forward, progress=progress,
                                desc=desc)
    if ens_handle is not None:
        ens_handle.detach()
    metrics: dict[str, Any] = {"eval": results, "eval_time_s": eval_timer.seconds, "ensemble": ensemble}
    if ev.spectra:
        metrics["spectra"] = update_spectra(model)
    if ev.sharpness or ev.landscape_scales:
        train = encoded["train"].head(ev.sharpness_examples)
        batches = [{k: v.to(device) for k, v in collate([train.features[i] for i in idx]).items()}
                   for idx in eval_batches(train.lengths, min(16, cfg.training.eval_batch_size))]
        with Timer() as timer:
            if ev.sharpness:
                metrics["sharpness"] = sharpness(model, batches, task.batch_loss, ev.sharpness_scale,
                                                 ev.sharpness_draws, seed=cfg.training.seed)
            if ev.landscape_scales:
                metrics["landscape"] = loss_landscape(model, batches, task.batch_loss, ev.landscape_scales,
                                                      ev.landscape_directions, seed=cfg.training.seed)
        metrics["sharpness_time_s"] = timer.seconds
    return metrics


def summarize(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a run, flat (the columns of the comparison tables)."""
    s: dict[str, float] = {}
    ev = metrics.get("eval", {})
    for split, r in ev.items():
        key = f"ood_{split[4:]}" if split.startswith("ood:") else split
        if "accuracy" in r:
            s[f"{key}_acc"] = r["accuracy"]
        s[f"{key}_loss"] = r["loss"]
        if "ppl" in r:
            s[f"{key}_ppl"] = r["ppl"]
    if "majority_acc" in ev.get("train", {}):
        s["train_majority_acc"] = ev["train"]["majority_acc"]  # the floor of a run that learned nothing
    if "train_acc" in s and "test_acc" in s:
        s["gap"] = s["train_acc"] - s["test_acc"]
    elif "train_loss" in s and "test_loss" in s:
        s["loss_gap"] = s["test_loss"] - s["train_loss"]
    if "ece" in ev.get("test", {}):
        s["test_ece"] = ev["test"]["ece"]
    if "spectra" in metrics:
        s["eff_rank"] = metrics["spectra"]["effective_rank"]
    if "sharpness" in metrics:
        s["sharpness"] = metrics["sharpness"]["mean_increase"]
    val = [p["validation"]["loss"] for p in metrics.get("curve", []) if "validation" in p]
    if len(val) >= 2:
        s["val_loss_rise"] = val[-1] - min(val)  # > 0: the validation loss turned upward before the end
    s["steps"] = float(metrics.get("steps", 0))
    for key in ("train_time_s", "train_cpu_time_s", "peak_memory_mib", "wall_time_s"):
        if metrics.get(key) is not None:
            s[key] = float(metrics[key])
    return s


def train(cfg: TrainConfig, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """`genlora train`: validate, train into `.<output_dir>.tmp-<pid>`, then rename it to `output_dir`. An existing
    `output_dir` is an error unless `overwrite: true` (then it is replaced once the new run is complete)."""
    task = validate(cfg)
    final = Path(cfg.output_dir)
    if final.exists() and not cfg.overwrite:
        raise ConfigError(f"output_dir {os.fspath(final)!r} already exists; set overwrite: true or choose another")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        metrics = run(cfg, tmp, progress=progress, task=task)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)
    return final, metrics
