"""`genlora eval`: a saved adapter (a run's folder or its adapter/ folder) on a data set, loaded with plain PEFT
(optionally with LoRA Dropout's test-time ensemble). The run's config.yaml, when present, supplies the task, base
model and data settings; command-line options override them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, TrainConfig
from .evaluate import ensemble_forward, evaluate_sets, load_adapter
from .models import resolve_device
from .tasks import get_task


def find_adapter(path: str | os.PathLike) -> tuple[Path, TrainConfig | None]:
    """(adapter folder, the run's config or None) for a run folder or an adapter folder."""
    import yaml

    p = Path(path)
    if (p / "adapter").is_dir():
        adapter, run_cfg = p / "adapter", p / "config.yaml"
    else:
        adapter, run_cfg = p, p.parent / "config.yaml"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"ADAPTER: {os.fspath(path)!r} is not a PEFT adapter folder (no adapter_config.json) nor a "
                          "run folder holding adapter/")
    cfg = None
    if run_cfg.is_file():
        with open(run_cfg) as f:
            cfg = TrainConfig.from_dict(yaml.safe_load(f))
    return adapter, cfg


def evaluate_adapter(adapter: str | os.PathLike, data: str, *, task: str | None = None, base_model: str | None = None,
                     num_labels: int | None = None, max_length: int | None = None, batch_size: int = 64,
                     size: int | None = None, text_column: str | None = None, label_column: str | None = None,
                     ensemble: int | None = None, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Metrics of the adapter on `data` (all of it, or a fixed random subset of `size` examples)."""
    folder, cfg = find_adapter(adapter)
    cfg = cfg or TrainConfig(task=task or "text")
    if task is not None and task != cfg.task:
        raise ConfigError(f"--task {task} differs from the run's task {cfg.task}")
    model_cfg = dataclasses.replace(cfg.model, path=base_model or cfg.model.path,
                                    num_labels=num_labels or cfg.model.num_labels)
    data_cfg = dataclasses.replace(cfg.data, dataset=data, test=None, ood=[], train_size=None, validation_size=0,
                                   text_column=text_column or cfg.data.text_column,
                                   label_column=label_column or cfg.data.label_column,
                                   max_length=max_length or cfg.data.max_length)
    training = dataclasses.replace(cfg.training, eval_batch_size=batch_size, device=device, early_stopping=False)
    evaluation = dataclasses.replace(cfg.evaluation, splits=["test"], curve_points=0)
    cfg = dataclasses.replace(cfg, model=model_cfg, data=data_cfg, training=training, evaluation=evaluation,
                              methods=[])
    t = get_task(cfg.task)
    if cfg.task == "vision":
        raise ConfigError("genlora eval evaluates text and lm adapters; a vision run's metrics.json holds its "
                          "MNIST-5k test numbers")
    from .data import check_source, load_source

    check_source(data, "DATA")
    examples = load_source(data, cfg.data, labels=t.num_labels(cfg) is not None)
    if size is not None and size < len(examples):
        examples = examples.subset(np.sort(np.random.default_rng(0).permutation(len(examples))[:size]))
    dev = resolve_device(device)
    model, processor = load_adapter(t, cfg, folder, dev)
    forward, info = None, None
    if ensemble is not None:
        forward, handle_or_reason = ensemble_forward(model, folder, ensemble or None)
        info = {"used": False, "reason": handle_or_reason} if forward is None else {"used": True,
                                                                                      "n_test": forward.n_test}
    enc = {data: t.encode(processor, examples, cfg)}
    desc = "evaluate (ensemble)" if forward is not None else "evaluate"
    res = evaluate_sets(model, t, enc, cfg, t.collator(processor), dev, forward=forward, progress=progress,
                        desc=desc)[data]
    return {"adapter": os.fspath(folder), "data": data, "ensemble": info, **res}
