"""The one evaluator: a model (or LoRA Dropout's test-time ensemble around it) over a split in length-sorted
batches, per-example records gathered in example order, split metrics by the task. Used for the curves during
training (the live model) and for the final numbers (the saved adapter reloaded with plain PEFT, as deployed).

LoRA Dropout saved with deploy="ensemble" is evaluated with `genlora.test_time_ensemble` after re-attaching the
LoRA Dropout config recorded in the adapter's genlora_config.json (its resolved seed included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .progress import Progress
from .tasks import Encoded, Task, eval_batches

GENLORA_CONFIG = "genlora_config.json"


@torch.no_grad()
def collect(forward, task: Task, enc: Encoded, collate, batch_size: int, device, bar: Progress | None = None):
    """{record name: array in example order} of `task.records` over every example of `enc`."""
    out: dict[str, np.ndarray] = {}
    for index in eval_batches(enc.lengths, batch_size):
        batch = collate([enc.features[i] for i in index])
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        res = forward(**inputs)
        logits = res["logits"] if isinstance(res, dict) else res.logits
        for key, values in task.records(logits, batch).items():
            if key not in out:
                out[key] = np.empty((len(enc), *values.shape[1:]), dtype=values.dtype)
            out[key][index] = values
        if bar is not None:
            bar.update(len(index))
    return out


def evaluate_sets(model, task: Task, encoded: dict[str, Encoded], cfg, collate, device, *, forward=None,
                  progress: bool = True, desc: str = "evaluate") -> dict[str, dict[str, Any]]:
    """{split name: task metrics} for every encoded split; one progress bar over all of them."""
    was_training = model.training
    model.eval()
    forward = forward or model
    total = sum(len(e) for e in encoded.values())
    results = {}
    try:
        with Progress(total, desc, enabled=progress) as bar:
            for name, enc in encoded.items():
                records = collect(forward, task, enc, collate, cfg.training.eval_batch_size, device, bar)
                results[name] = task.metrics(records, enc, cfg)
    finally:
        model.train(was_training)
    return results


def load_adapter(task: Task, cfg, adapter_dir: str | os.PathLike, device: torch.device):
    """(the saved adapter on a fresh base with plain PEFT, eval mode; processor)."""
    from peft import PeftModel

    base, processor = task.load_base(cfg, cfg.training.seed)  # a new head is replaced by the adapter's copy
    model = PeftModel.from_pretrained(base, os.fspath(adapter_dir), is_trainable=False)
    return model.to(device).eval(), processor


def saved_methods(adapter_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(adapter_dir) / GENLORA_CONFIG
    if not path.is_file():
        return []
    with open(path) as f:
        return json.load(f).get("methods", [])


def live_ensemble(model, handle):
    """LoRA Dropout's test-time ensemble around the model being trained, where the run deploys it as an ensemble
    (else None: the eval-mode forward is the deployed model). Curves use it so that they measure what is deployed:
    in eval mode the raw adapter s*B*A is 1/(1-p)^2 times the mean update of the unscaled training masks. Its masks
    come from seeds of their own (per member, layer), so evaluating curves does not move the training masks."""
    from .. import test_time_ensemble
    from ..methods.lora_dropout import LoRADropout

    if handle is None:
        return None
    try:
        method = handle.method(LoRADropout.config_class.method_name)
    except KeyError:
        return None
    return test_time_ensemble(model, handle) if method.config.deploy == "ensemble" else None


def ensemble_forward(model, adapter_dir: str | os.PathLike, n_test: int | None = None):
    """(callable like the model running LoRA Dropout's test-time ensemble, handle to detach afterwards), or
    (None, reason) when the adapter was not trained with LoRA Dropout deployed as an ensemble."""
    from .. import test_time_ensemble
    from ..core.handle import attach
    from ..registry import method_from_dict

    entries = [m for m in saved_methods(adapter_dir) if m.get("method") == "lora_dropout"]
    if not entries:
        return None, "the adapter was not trained with LoRA Dropout"
    entry = dict(entries[0])
    if entry.get("deploy", "ensemble") != "ensemble":
        return None, f"LoRA Dropout was deployed as {entry.get('deploy')!r} (its expectation is in the adapter)"
    handle = attach(model, method_from_dict(entry))
    return test_time_ensemble(model, handle, n_test), handle
